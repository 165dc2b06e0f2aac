//! Sigma-space helpers shared by the sigma-space schedulers: the per-training-timestep sigma table,
//! `np.interp` onto inference timesteps, the Karras et al. (2022), exponential and beta schedules
//! that replace the interpolated sigmas (diffusers' `use_karras_sigmas`, `use_exponential_sigmas`,
//! `use_beta_sigmas`), the inverse map from a sigma back to a (fractional) timestep, and the whole
//! schedule of the k-diffusion-style discrete schedulers (Euler, Heun, DPM2, LMS).

use super::SchedulerConfig;
use super::betas::{Spacing, spaced_timesteps};
use crate::Result;

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, indexed by training timestep.
pub(crate) fn sigma_table(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log` of the float32 sigma table (float32 results).
pub(crate) fn log_table(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    slope * (x - j as f64) + y0
}

/// The Karras et al. (2022) schedule with rho = 7 from `sigma_max` down to `sigma_min`, `n` values
/// (float64, as diffusers' `_convert_to_karras`).
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    super::betas::np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// A schedule that replaces the interpolated sigmas (the config flags `use_karras_sigmas`,
/// `use_exponential_sigmas`, `use_beta_sigmas`; at most one may be set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conversion {
    Karras,
    Exponential,
    Beta,
}

impl Conversion {
    /// The conversion the config asks for, an error when it sets more than one flag.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Option<Conversion>> {
        let set: Vec<Conversion> = [
            (cfg.use_karras_sigmas, Conversion::Karras),
            (cfg.use_exponential_sigmas, Conversion::Exponential),
            (cfg.use_beta_sigmas, Conversion::Beta),
        ]
        .into_iter()
        .filter_map(|(flag, c)| (flag == Some(true)).then_some(c))
        .collect();
        match set.as_slice() {
            [] => Ok(None),
            [c] => Ok(Some(*c)),
            _ => {
                Err(cfg
                    .error("only one of `use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas` can be set"))
            }
        }
    }

    /// `n` sigmas from `sigma_max` down to `sigma_min` (float64, as diffusers' `_convert_to_*`).
    pub fn apply(self, sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
        match self {
            Conversion::Karras => karras(sigma_min, sigma_max, n),
            Conversion::Exponential => {
                super::betas::np_linspace(sigma_max.ln(), sigma_min.ln(), n, true).into_iter().map(f64::exp).collect()
            }
            Conversion::Beta => super::betas::np_linspace(0.0, 1.0, n, true)
                .into_iter()
                .map(|r| sigma_min + beta_ppf(1.0 - r, 0.6, 0.6) * (sigma_max - sigma_min))
                .collect(),
        }
    }
}

/// `scipy.stats.beta.ppf(q, a, b)`: the inverse of the regularised incomplete beta function, by
/// bisection to full float64 precision.
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The regularised incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes §6.4).
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(1.0 - x, b, a) / b
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine coefficients; about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The float32 inference timesteps of the k-diffusion-style schedulers: the given ones, or the
/// spacing's (`linspace` ones are fractional).
pub(crate) fn inference_timesteps(
    cfg: &SchedulerConfig,
    train: usize,
    spacing: Spacing,
    n: usize,
    custom: Option<&[f64]>,
) -> Vec<f64> {
    match custom {
        Some(ts) => ts.iter().map(|&t| t as f32 as f64).collect(),
        None => spaced_timesteps(spacing, train, n, cfg.steps_offset.unwrap_or(0))
            .into_iter()
            .map(|v| v as f32 as f64)
            .collect(),
    }
}

/// The schedule of diffusers' k-diffusion-style discrete schedulers (Euler, Heun, KDPM2, LMS):
/// float32 timesteps from the spacing (or the given ones), the sigma table interpolated at them,
/// optionally replaced by a [`Conversion`] (timesteps then mapped back with [`sigma_to_t`]).
pub(crate) struct Discrete {
    /// Inference timesteps, before any class-specific rounding.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep (float64, without the final sigma).
    pub sigmas: Vec<f64>,
    /// The training sigma table (float32).
    pub table: Vec<f32>,
    /// The conversion applied, if any.
    pub conversion: Option<Conversion>,
}

impl Discrete {
    /// Builds the schedule for `n` steps; `custom` timesteps replace the spacing (diffusers'
    /// `set_timesteps(timesteps=...)`), and `bounds` are the config's `sigma_min`/`sigma_max` for
    /// the classes that have them (Euler).
    pub fn new(
        cfg: &SchedulerConfig,
        alphas_cumprod: &[f32],
        spacing: Spacing,
        n: usize,
        custom: Option<&[f64]>,
        bounds: (Option<f64>, Option<f64>),
    ) -> Result<Self> {
        let conversion = Conversion::from_config(cfg)?;
        let timesteps = inference_timesteps(cfg, alphas_cumprod.len(), spacing, n, custom);
        let table = sigma_table(alphas_cumprod);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &table)).collect();
        let mut timesteps = timesteps;
        if let Some(conv) = conversion {
            let sigma_min = bounds.0.unwrap_or(*sigmas.last().expect("n >= 1"));
            let sigma_max = bounds.1.unwrap_or(sigmas[0]);
            sigmas = conv.apply(sigma_min, sigma_max, sigmas.len());
            let logs = log_table(&table);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
        }
        Ok(Discrete { timesteps, sigmas, table, conversion })
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`,
/// interpolating linearly in log-sigma between the two neighbouring table entries.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // index of the maximum of the cumulative count of `log_sigma - log_sigmas[i] >= 0`
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_hits_table_points() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(interp(0.0, &fp), 1.0);
        assert_eq!(interp(1.5, &fp), 3.0);
        assert_eq!(interp(2.0, &fp), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sig: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs = log_table(&sig);
        assert!((sigma_to_t(4.0, &logs) - 3.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }
}
