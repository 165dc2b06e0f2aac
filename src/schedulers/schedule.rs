//! Sigma schedules as an axis separate from the sampler: which noise levels the sampler visits.
//!
//! Each schedule is applied the way diffusers applies it, so a schedule on a sampler reproduces
//! the corresponding diffusers setup:
//! - `karras`, `exponential`, `beta`: the class's `use_karras_sigmas`, `use_exponential_sigmas`,
//!   `use_beta_sigmas` flags (the classes that have them: Euler, Heun, DPM2, DPM2-a, LMS,
//!   DPM-Solver multistep, DPM-Solver SDE, UniPC, DEIS; and DPM++ 2S-a, which samples on Euler's
//!   sigmas).
//! - `sgm_uniform`: `timestep_spacing = "trailing"`, as diffusers documents for A1111's/ComfyUI's
//!   sgm_uniform (every sampler with a `timestep_spacing`, that is all but LCM and TCD).
//! - `simple`: ComfyUI's `simple_scheduler` (comfy/samplers.py): for `n` steps, the training sigma
//!   at index `T - 1 - floor(i * T / n)` for i in 0..n (T training timesteps), then 0. The sigmas
//!   are training-table entries, so this is the same as passing the integer timesteps
//!   `T - 1 - floor(i * T / n)` as diffusers' `set_timesteps(timesteps=...)`, which is how it is
//!   applied (and tested): Euler, Heun, DPM-Solver multistep, DPM++ 2S-a.
//! - `align-your-steps`: diffusers' `AysSchedules` timestep tables (10 steps) for SD1.5 and SDXL,
//!   passed as `timesteps=`, on the same samplers as `simple`.
//! - `normal`: the class's own spacing with every sigma flag of the config cleared.
//!
//! No schedule (`None` in [`super::build`]) keeps the config as it is, flags included.

use std::fmt;
use std::str::FromStr;

use super::{SchedulerConfig, SchedulerKind};
use crate::{Error, Result};

/// diffusers' `AysSchedules["StableDiffusionTimesteps"]`.
const AYS_SD15: [f64; 10] = [999.0, 850.0, 736.0, 645.0, 545.0, 455.0, 343.0, 233.0, 124.0, 24.0];
/// diffusers' `AysSchedules["StableDiffusionXLTimesteps"]`.
const AYS_SDXL: [f64; 10] = [999.0, 845.0, 730.0, 587.0, 443.0, 310.0, 193.0, 116.0, 53.0, 13.0];

/// Which model family's Align-Your-Steps table to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AysModel {
    /// SD1.x/2.x (`StableDiffusionTimesteps`).
    Sd15,
    /// SDXL (`StableDiffusionXLTimesteps`).
    Sdxl,
}

/// A sigma schedule (see the module documentation for how each is applied and to which samplers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigmaSchedule {
    /// `normal`: the class's own schedule, ignoring any sigma flag in the config.
    Normal,
    /// `karras`: Karras et al. (2022), rho = 7.
    Karras,
    /// `exponential`: log-linear between the largest and smallest sigma.
    Exponential,
    /// `beta`: Beta(0.6, 0.6) quantiles between the largest and smallest sigma.
    Beta,
    /// `sgm_uniform`: trailing timestep spacing.
    SgmUniform,
    /// `simple`: ComfyUI's simple schedule.
    Simple,
    /// `align-your-steps`: the AYS timesteps of a model family; `None` (the bare name) means the
    /// loaded model's family, which the pipeline fills in (SD1.5's table when built directly).
    AlignYourSteps(Option<AysModel>),
}

impl SigmaSchedule {
    /// Every schedule a name can give, in the order the CLI lists them.
    pub const ALL_NAMED: [SigmaSchedule; 9] = [
        SigmaSchedule::Normal,
        SigmaSchedule::Karras,
        SigmaSchedule::Exponential,
        SigmaSchedule::SgmUniform,
        SigmaSchedule::Simple,
        SigmaSchedule::Beta,
        SigmaSchedule::AlignYourSteps(None),
        SigmaSchedule::AlignYourSteps(Some(AysModel::Sd15)),
        SigmaSchedule::AlignYourSteps(Some(AysModel::Sdxl)),
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            SigmaSchedule::Normal => "normal",
            SigmaSchedule::Karras => "karras",
            SigmaSchedule::Exponential => "exponential",
            SigmaSchedule::Beta => "beta",
            SigmaSchedule::SgmUniform => "sgm_uniform",
            SigmaSchedule::Simple => "simple",
            SigmaSchedule::AlignYourSteps(None) => "align-your-steps",
            SigmaSchedule::AlignYourSteps(Some(AysModel::Sd15)) => "align-your-steps-sd15",
            SigmaSchedule::AlignYourSteps(Some(AysModel::Sdxl)) => "align-your-steps-sdxl",
        }
    }

    /// Lower-case spellings accepted for this schedule (the CLI name first, then A1111's and
    /// ComfyUI's).
    pub(crate) fn aliases(self) -> &'static [&'static str] {
        match self {
            SigmaSchedule::Normal => &["normal"],
            SigmaSchedule::Karras => &["karras"],
            SigmaSchedule::Exponential => &["exponential"],
            SigmaSchedule::Beta => &["beta"],
            SigmaSchedule::SgmUniform => &["sgm_uniform", "sgm uniform", "sgm-uniform"],
            SigmaSchedule::Simple => &["simple"],
            SigmaSchedule::AlignYourSteps(None) => &["align-your-steps", "align your steps", "ays"],
            SigmaSchedule::AlignYourSteps(Some(AysModel::Sd15)) => &["align-your-steps-sd15", "ays-sd15"],
            SigmaSchedule::AlignYourSteps(Some(AysModel::Sdxl)) => &["align-your-steps-sdxl", "ays-sdxl"],
        }
    }

    /// The schedule for a loaded model: a bare `align-your-steps` takes the SDXL table for an SDXL
    /// model and SD1.5's otherwise; every other schedule is returned as it is.
    pub fn for_model(self, sdxl: bool) -> SigmaSchedule {
        match self {
            SigmaSchedule::AlignYourSteps(None) => {
                SigmaSchedule::AlignYourSteps(Some(if sdxl { AysModel::Sdxl } else { AysModel::Sd15 }))
            }
            other => other,
        }
    }

    pub(crate) fn names() -> String {
        Self::ALL_NAMED.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    }

    /// The samplers this schedule applies to.
    fn applies_to(self, kind: SchedulerKind) -> bool {
        use SchedulerKind as K;
        match self {
            SigmaSchedule::Normal => true,
            SigmaSchedule::Karras | SigmaSchedule::Exponential | SigmaSchedule::Beta => matches!(
                kind,
                K::Euler
                    | K::Heun
                    | K::Dpm2
                    | K::Dpm2Ancestral
                    | K::Lms
                    | K::DpmPp2m
                    | K::DpmPp2mSde
                    | K::DpmPp3mSde
                    | K::DpmPp2sAncestral
                    | K::DpmPpSde
                    | K::UniPc
                    | K::Deis
            ),
            SigmaSchedule::SgmUniform => !matches!(kind, K::Lcm | K::Tcd),
            SigmaSchedule::Simple | SigmaSchedule::AlignYourSteps(_) => {
                matches!(kind, K::Euler | K::Heun | K::DpmPp2m | K::DpmPp2mSde | K::DpmPp3mSde | K::DpmPp2sAncestral)
            }
        }
    }

    /// Applies the schedule to `cfg` for `kind` and `n` steps; returns the given timesteps for the
    /// schedules that are timestep lists. An error names the sampler when the schedule does not
    /// apply to it.
    pub(crate) fn apply(self, kind: SchedulerKind, cfg: &mut SchedulerConfig, n: usize) -> Result<Option<Vec<f64>>> {
        if !self.applies_to(kind) {
            let valid: Vec<&str> =
                SchedulerKind::ALL.iter().filter(|k| self.applies_to(**k)).map(|k| k.name()).collect();
            return Err(Error::invalid(format!(
                "the `{self}` schedule does not apply to the `{kind}` sampler ({}); it applies to: {}",
                kind.class_name(),
                valid.join(", ")
            )));
        }
        cfg.use_karras_sigmas = Some(self == SigmaSchedule::Karras);
        cfg.use_exponential_sigmas = Some(self == SigmaSchedule::Exponential);
        cfg.use_beta_sigmas = Some(self == SigmaSchedule::Beta);
        Ok(match self {
            SigmaSchedule::SgmUniform => {
                cfg.timestep_spacing = Some("trailing".into());
                None
            }
            SigmaSchedule::Simple => {
                let t = cfg.num_train_timesteps.unwrap_or(1000);
                let ss = t as f64 / n as f64;
                Some((0..n).map(|i| (t - 1 - (i as f64 * ss) as usize) as f64).collect())
            }
            SigmaSchedule::AlignYourSteps(model) => {
                if n != 10 {
                    return Err(Error::invalid(format!(
                        "the `{self}` schedule is defined for 10 steps (diffusers' AysSchedules), not {n}"
                    )));
                }
                if cfg.num_train_timesteps.unwrap_or(1000) != 1000 {
                    return Err(Error::invalid(format!(
                        "the `{self}` schedule needs a scheduler with 1000 training timesteps"
                    )));
                }
                Some(match model.unwrap_or(AysModel::Sd15) {
                    AysModel::Sd15 => AYS_SD15.to_vec(),
                    AysModel::Sdxl => AYS_SDXL.to_vec(),
                })
            }
            _ => None,
        })
    }
}

impl fmt::Display for SigmaSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SigmaSchedule {
    type Err = Error;

    /// A schedule name or alias, without regard to case.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_lowercase();
        Self::ALL_NAMED
            .into_iter()
            .find(|sch| sch.aliases().contains(&lower.as_str()))
            .ok_or_else(|| Error::invalid(format!("unknown schedule `{}`; valid names: {}", s.trim(), Self::names())))
    }
}
