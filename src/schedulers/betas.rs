//! The training noise schedule shared by every scheduler (betas, `alphas_cumprod`, the zero-terminal-
//! SNR rescale) and the inference timestep spacings, plus the few numpy/torch array constructors
//! whose exact rounding the schedules depend on.
//!
//! diffusers builds betas and `alphas_cumprod` as torch float32 tensors (`torch.cumprod` on the CPU
//! accumulates in float64 and rounds each output to float32), and most timestep arithmetic in numpy
//! float64; we follow the same dtypes so that timesteps and coefficients agree to the last bit or so.

use super::SchedulerConfig;
use crate::Result;

/// Beta-schedule defaults of a diffusers class (`__init__` keyword defaults).
pub(crate) struct BetaDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
}

/// DDIM, DDPM, PNDM, Euler, Euler-ancestral, LMS, DPM-Solver, UniPC and DEIS defaults.
pub(crate) const LINEAR_DEFAULTS: BetaDefaults =
    BetaDefaults { beta_start: 0.0001, beta_end: 0.02, beta_schedule: "linear" };

/// Heun, DPM2 and DPM2-ancestral defaults (SD's beta range on a `linear` schedule).
pub(crate) const K_DEFAULTS: BetaDefaults =
    BetaDefaults { beta_start: 0.00085, beta_end: 0.012, beta_schedule: "linear" };

/// LCM and TCD defaults.
pub(crate) const LCM_DEFAULTS: BetaDefaults =
    BetaDefaults { beta_start: 0.00085, beta_end: 0.012, beta_schedule: "scaled_linear" };

/// The resolved training schedule of one scheduler.
pub(crate) struct Train {
    pub num_train_timesteps: usize,
    /// `alphas_cumprod[t]` for t in 0..num_train_timesteps, float32 as in diffusers.
    pub alphas_cumprod: Vec<f32>,
    /// Whether `rescale_betas_zero_snr` was applied.
    pub zero_snr: bool,
    /// Whether `beta_schedule` is `squaredcos_cap_v2` (DPM-Solver's Karras timesteps depend on it).
    pub cosine: bool,
}

/// The most training timesteps a config may declare (diffusion models use 1000; the table costs
/// 4 bytes per step, so a bound keeps a hostile config from allocating gigabytes).
pub(crate) const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl Train {
    /// Reads the beta fields of `cfg` with the class's `defaults`; `zero_snr_supported` is false for
    /// classes without `rescale_betas_zero_snr` (PNDM), which ignore the field like diffusers does.
    pub fn new(cfg: &SchedulerConfig, defaults: &BetaDefaults, zero_snr_supported: bool) -> Result<Self> {
        let t = cfg.num_train_timesteps.unwrap_or(1000);
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&t) {
            return Err(cfg.bad_value("num_train_timesteps", t, &format!("2 to {MAX_TRAIN_TIMESTEPS}")));
        }
        let schedule = cfg.beta_schedule.as_deref().unwrap_or(defaults.beta_schedule);
        let cosine = schedule == "squaredcos_cap_v2";
        let betas: Vec<f32> = if let Some(trained) = &cfg.trained_betas {
            if trained.len() != t {
                return Err(
                    cfg.error(format!("`trained_betas` has {} values but `num_train_timesteps` is {t}", trained.len()))
                );
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            let start = cfg.beta_start.unwrap_or(defaults.beta_start);
            let end = cfg.beta_end.unwrap_or(defaults.beta_end);
            match schedule {
                "linear" => torch_linspace_f32(start, end, t),
                "scaled_linear" => torch_linspace_f32(start.sqrt(), end.sqrt(), t).into_iter().map(|b| b * b).collect(),
                "squaredcos_cap_v2" => betas_for_alpha_bar(t, 0.999),
                other => {
                    return Err(cfg.bad_value(
                        "beta_schedule",
                        format!("`{other}`"),
                        "valid: linear, scaled_linear, squaredcos_cap_v2",
                    ));
                }
            }
        };
        if betas.iter().any(|b| !b.is_finite() || *b < 0.0 || *b > 1.0) {
            return Err(cfg.error("the betas must lie in [0, 1]"));
        }
        let zero_snr = zero_snr_supported && cfg.rescale_betas_zero_snr.unwrap_or(false);
        let betas = if zero_snr { rescale_zero_terminal_snr(&betas) } else { betas };
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(Train { num_train_timesteps: t, alphas_cumprod: cumprod(&alphas), zero_snr, cosine })
    }
}

/// `torch.cumprod` of a float32 vector on the CPU: float64 accumulator, float32 outputs.
fn cumprod(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's CPU kernel computes it: a float32
/// step, the first half counted up from `start` and the second half down from `end`, each value
/// one fused multiply-add (bit-identical to torch 2.15 on x86-64 for the schedules we checked).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (a, b) = (start as f32, end as f32);
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, a) } else { (-step).mul_add((n - 1 - i) as f32, b) }).collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (`squaredcos_cap_v2`).
fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = *sqrt_ab.last().expect("non-empty");
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v -= last;
        *v *= scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for w in ab.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// How inference timesteps are spread over the training range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    /// The config's `timestep_spacing`, or the class default.
    pub fn from_config(cfg: &SchedulerConfig, default: Spacing) -> Result<Spacing> {
        match cfg.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some("linspace") => Ok(Spacing::Linspace),
            Some(other) => {
                Err(cfg.bad_value("timestep_spacing", format!("`{other}`"), "valid: leading, trailing, linspace"))
            }
        }
    }
}

/// The descending inference timesteps of DDIM, DDPM, PNDM and the Euler schedulers, as float64
/// before any integer conversion: `linspace` values are left unrounded (Euler keeps them as
/// floats, the others round half-to-even), `leading` includes `steps_offset`.
pub(crate) fn spaced_timesteps(spacing: Spacing, train: usize, n: usize, offset: i64) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut v = np_linspace(0.0, (train - 1) as f64, n, true);
            v.reverse();
            v
        }
        Spacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + offset as f64).collect()
        }
        Spacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|v| v.round_ties_even() - 1.0)
            .collect(),
    }
}

/// [`spaced_timesteps`] as integers (`linspace` rounded half-to-even, like `np.round`), checked to
/// lie in the training range.
pub(crate) fn integer_timesteps(
    cfg: &SchedulerConfig,
    spacing: Spacing,
    train: usize,
    n: usize,
    offset: i64,
) -> Result<Vec<i64>> {
    let ts: Vec<i64> =
        spaced_timesteps(spacing, train, n, offset).into_iter().map(|v| v.round_ties_even() as i64).collect();
    check_range(cfg, &ts, train)?;
    Ok(ts)
}

/// Errors when a timestep falls outside `0..train` (e.g. a too large `steps_offset`).
pub(crate) fn check_range(cfg: &SchedulerConfig, ts: &[i64], train: usize) -> Result<()> {
    if let Some(bad) = ts.iter().find(|&&t| t < 0 || t >= train as i64) {
        return Err(cfg.error(format!(
            "timestep {bad} falls outside the training range 0..{train} \
             (check `steps_offset` = {})",
            cfg.steps_offset.unwrap_or(0)
        )));
    }
    Ok(())
}

/// `np.linspace(start, stop, num, endpoint)` in float64 (`i * step + start`, last = `stop`).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in float64: length `ceil((stop - start) / step)`, values
/// `start + i * (second - start)` as numpy's fill does.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 0 { start } else { start + i as f64 * delta }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_and_linspace_match_numpy_shapes() {
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        assert_eq!(np_linspace(0.0, 999.0, 1, true), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 4, true), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 50.0, 4, false), vec![0.0, 12.5, 25.0, 37.5]);
    }

    #[test]
    fn spacings() {
        assert_eq!(spaced_timesteps(Spacing::Leading, 1000, 4, 1), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(
            spaced_timesteps(Spacing::Trailing, 1000, 7, 0),
            vec![999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
        );
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let cfg = SchedulerConfig {
            rescale_betas_zero_snr: Some(true),
            beta_schedule: Some("scaled_linear".into()),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            ..Default::default()
        };
        let train = Train::new(&cfg, &LINEAR_DEFAULTS, true).unwrap();
        assert_eq!(*train.alphas_cumprod.last().unwrap(), 0.0);
    }
}
