//! Euler's method in sigma space (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
//! `EulerDiscreteScheduler`.
//!
//! The model sees `x / sqrt(sigma^2 + 1)`; a step moves along d = (x - x0) / sigma from sigma_i to
//! sigma_{i+1}. Sigmas are the training sigmas interpolated at the (possibly fractional)
//! timesteps (or at given timesteps), or a Karras, exponential or beta schedule (timesteps then
//! mapped back from the sigmas), or log-linear (`interpolation_type = log_linear`); the last sigma is 0 or the smallest
//! training sigma (`final_sigmas_type`). `init_noise_sigma` is the largest sigma for `linspace` and
//! `trailing` spacing and sqrt(max^2 + 1) for `leading`.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train, torch_linspace_f32};
use super::sigmas::{Conversion, Discrete, inference_timesteps, log_table, sigma_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct Euler {
    /// The model timesteps (float32 values).
    pub timesteps: Vec<f64>,
    /// One sigma per timestep, then the final sigma.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
    pub prediction: Prediction,
}

/// The zero-SNR variants replace the last `alphas_cumprod` (exactly 0) by 2^-24 so sigma stays
/// finite (Euler, Euler-ancestral and DPM-Solver do this).
pub(crate) fn floor_zero_snr(train: &mut Train) {
    if train.zero_snr
        && let Some(last) = train.alphas_cumprod.last_mut()
    {
        *last = 2f32.powi(-24);
    }
}

/// `init_noise_sigma` of the Euler schedulers: max sigma for linspace/trailing spacing,
/// sqrt(max^2 + 1) for leading (float32 arithmetic).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// Euler's `x0` prediction (shared with Euler-ancestral).
pub(crate) fn predict_x0(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - mul(model_output, sigma)?)?,
        Prediction::Velocity => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?
        }
        Prediction::Sample => model_output.clone(),
    })
}

impl Euler {
    /// `custom` timesteps replace the spacing (diffusers' `set_timesteps(timesteps=...)`).
    pub fn new(cfg: &SchedulerConfig, n: usize, custom: Option<&[f64]>) -> Result<Self> {
        const CLASS: &str = "EulerDiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        if cfg.timestep_type.as_deref().unwrap_or("discrete") != "discrete" && prediction == Prediction::Velocity {
            return Err(cfg.bad_value(
                "timestep_type",
                format!("`{}`", cfg.timestep_type.as_deref().unwrap_or_default()),
                "only `discrete` timesteps are supported with v_prediction",
            ));
        }
        let log_linear = match cfg.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => false,
            "log_linear" => true,
            other => {
                return Err(cfg.bad_value("interpolation_type", format!("`{other}`"), "valid: linear, log_linear"));
            }
        };
        let mut train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        floor_zero_snr(&mut train);
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let (mut sigmas, timesteps) = if log_linear {
            // the Karras-style conversions apply to the log-linear sigmas as diffusers does
            let table = sigma_table(&train.alphas_cumprod);
            let lo = (*table.last().expect("non-empty") as f64).ln() as f32;
            let hi = (table[0] as f64).ln() as f32;
            let sigmas: Vec<f64> =
                torch_linspace_f32(lo as f64, hi as f64, n + 1).into_iter().map(|v| v.exp() as f64).collect();
            match Conversion::from_config(cfg)? {
                Some(conv) => {
                    let sigma_min = cfg.sigma_min.unwrap_or(*sigmas.last().expect("n >= 1"));
                    let sigma_max = cfg.sigma_max.unwrap_or(sigmas[0]);
                    let sigmas = conv.apply(sigma_min, sigma_max, n);
                    let logs = log_table(&table);
                    let ts = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
                    (sigmas, ts)
                }
                None => (sigmas, inference_timesteps(cfg, train.num_train_timesteps, spacing, n, custom)),
            }
        } else {
            let d = Discrete::new(cfg, &train.alphas_cumprod, spacing, n, custom, (cfg.sigma_min, cfg.sigma_max))?;
            (d.sigmas, d.timesteps)
        };
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| t as f32 as f64).collect();
        let table0 = sigma_table(&train.alphas_cumprod)[0];
        let last = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => 0.0,
            "sigma_min" => table0 as f64,
            other => {
                return Err(cfg.bad_value("final_sigmas_type", format!("`{other}`"), "valid: zero, sigma_min"));
            }
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        Ok(Euler { init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing), timesteps, sigmas, prediction })
    }
}

impl Scheduler for Euler {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        super::add_noise_at_sigma(original, noise, self.sigmas[step_index])
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        super::scale_at_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        // s_churn = 0: gamma = 0 and sigma_hat = sigma.
        let sigma = self.sigmas[step_index];
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let derivative = div(&(sample - x0)?, sigma)?;
        let dt = self.sigmas[step_index + 1] - sigma;
        Ok((sample + mul(&derivative, dt)?)?)
    }
}
