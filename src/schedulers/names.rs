//! Sampler names: ours (`dpmpp-2m`), A1111's (`DPM++ 2M`) and the suffixed forms that name a
//! sampler and a sigma schedule together (`DPM++ 2M Karras`, `dpmpp-2m-karras`).

use super::{SchedulerKind, SigmaSchedule};
use crate::{Error, Result};

/// A sampler choice as a user writes it: a sampler name, optionally followed by a schedule.
pub struct SamplerChoice;

/// A1111's sampler names (matched without regard to case) and the kinds they mean.
const A1111: [(&str, SchedulerKind); 18] = [
    ("Euler a", SchedulerKind::EulerAncestral),
    ("Euler", SchedulerKind::Euler),
    ("LMS", SchedulerKind::Lms),
    ("Heun", SchedulerKind::Heun),
    ("DPM2", SchedulerKind::Dpm2),
    ("DPM2 a", SchedulerKind::Dpm2Ancestral),
    ("DPM++ 2S a", SchedulerKind::DpmPp2sAncestral),
    ("DPM++ 2M", SchedulerKind::DpmPp2m),
    ("DPM++ 2M SDE", SchedulerKind::DpmPp2mSde),
    ("DPM++ 3M SDE", SchedulerKind::DpmPp3mSde),
    ("DPM++ SDE", SchedulerKind::DpmPpSde),
    ("DDIM", SchedulerKind::Ddim),
    ("PLMS", SchedulerKind::Pndm),
    ("UniPC", SchedulerKind::UniPc),
    ("LCM", SchedulerKind::Lcm),
    ("DEIS", SchedulerKind::Deis),
    ("DDPM", SchedulerKind::Ddpm),
    ("TCD", SchedulerKind::Tcd),
];

impl SamplerChoice {
    /// A1111's sampler names, in its order.
    pub fn a1111_names() -> impl Iterator<Item = &'static str> {
        A1111.iter().map(|(name, _)| *name)
    }

    /// Parses a sampler name (ours, such as `dpmpp-2m-sde`, or A1111's, such as `DPM++ 2M SDE`,
    /// without regard to case) and an optional schedule suffix separated by a space, `-` or `_`
    /// (`DPM++ 2M Karras`, `Euler a Karras`, `dpmpp-2m-karras`, `DPM++ 2M SDE Exponential`).
    /// Whether the schedule applies to the sampler is checked later, by [`super::build`].
    pub fn parse(text: &str) -> Result<(SchedulerKind, Option<SigmaSchedule>)> {
        let lower = text.trim().to_lowercase();
        if let Some(kind) = sampler(&lower) {
            return Ok((kind, None));
        }
        for schedule in SigmaSchedule::ALL_NAMED {
            for alias in schedule.aliases() {
                for sep in [' ', '-', '_'] {
                    let suffix = format!("{sep}{alias}");
                    if let Some(kind) = lower.strip_suffix(&suffix).and_then(sampler) {
                        return Ok((kind, Some(schedule)));
                    }
                }
            }
        }
        Err(Error::invalid(format!(
            "unknown sampler `{}`; valid names: {}; A1111 names: {}; either may be followed by a schedule: {}",
            text.trim(),
            SchedulerKind::names(),
            A1111.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", "),
            SigmaSchedule::names()
        )))
    }
}

/// The sampler a lower-cased name means, ours or A1111's.
fn sampler(lower: &str) -> Option<SchedulerKind> {
    SchedulerKind::ALL
        .into_iter()
        .find(|k| k.name() == lower)
        .or_else(|| A1111.iter().find(|(name, _)| name.to_lowercase() == lower).map(|(_, k)| *k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_a1111_name_parses() {
        for (name, kind) in A1111 {
            assert_eq!(SamplerChoice::parse(name).unwrap(), (kind, None), "{name}");
        }
    }
}
