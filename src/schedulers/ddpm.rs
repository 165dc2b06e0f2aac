//! DDPM ancestral sampling (Ho et al. 2020), as diffusers' `DDPMScheduler`.
//!
//! The posterior mean of q(x_prev | x_t, x0) plus, for every step whose timestep is > 0, fresh noise
//! scaled by the `variance_type` standard deviation (`fixed_small`, `fixed_small_log`,
//! `fixed_large`). `prev` is the next timestep of the schedule (-1 after the last, where
//! `alphas_cumprod` is taken as 1).

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train, integer_timesteps};
use super::x0_limit::X0Limit;
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

#[derive(Clone, Copy)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

pub(crate) struct Ddpm {
    train: Train,
    timesteps: Vec<f64>,
    ints: Vec<i64>,
    prediction: Prediction,
    clip: Option<X0Limit>,
    variance: Variance,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "DDPMScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let variance = match cfg.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            other => {
                return Err(cfg.bad_value(
                    "variance_type",
                    format!("`{other}`"),
                    "DDPMScheduler here supports fixed_small, fixed_small_log, fixed_large",
                ));
            }
        };
        let train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        let spacing = Spacing::from_config(cfg, Spacing::Leading)?;
        let ints = integer_timesteps(cfg, spacing, train.num_train_timesteps, n, cfg.steps_offset.unwrap_or(0))?;
        let clip = X0Limit::from_config(cfg, true);
        Ok(Ddpm { timesteps: ints.iter().map(|&v| v as f64).collect(), train, ints, prediction, clip, variance })
    }
}

impl Scheduler for Ddpm {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        super::add_noise_at(&self.train, self.ints[step_index], original, noise)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.ints[step_index];
        let prev = self.ints.get(step_index + 1).copied().unwrap_or(-1);
        let ac = &self.train.alphas_cumprod;
        let a_t = ac[t as usize];
        let a_prev = if prev >= 0 { ac[prev as usize] } else { 1.0 };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let x0 = match self.prediction {
            Prediction::Epsilon => div(&(sample - mul(model_output, b_t.sqrt())?)?, a_t.sqrt())?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => (mul(sample, a_t.sqrt())? - mul(model_output, b_t.sqrt())?)?,
        };
        let x0 = match &self.clip {
            Some(limit) => limit.apply(&x0)?,
            None => x0,
        };
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let sample_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mean = lin2(x0_coeff, &x0, sample_coeff, sample)?;
        if t <= 0 {
            return Ok(mean);
        }
        let z = noise.sample(model_output.dims(), model_output.device())?;
        // `_get_variance` (recomputes the same quantities, in float32)
        let beta_t = 1.0 - a_t / a_prev;
        let var = ((1.0 - a_prev) / (1.0 - a_t) * beta_t).max(1e-20);
        let std = match self.variance {
            Variance::Small => var.sqrt(),
            Variance::SmallLog => (0.5 * var.ln()).exp(),
            Variance::Large => beta_t.sqrt(),
        };
        Ok((mean + mul(&z, std)?)?)
    }
}
