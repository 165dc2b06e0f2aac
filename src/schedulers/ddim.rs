//! DDIM (Song et al. 2021), deterministic (eta = 0), as diffusers' `DDIMScheduler`.
//!
//! x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
//! where `prev = t - num_train_timesteps / num_inference_steps` whatever the spacing (as diffusers),
//! and a negative `prev` uses 1 (`set_alpha_to_one`) or `alphas_cumprod[0]`.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train, integer_timesteps};
use super::x0_limit::X0Limit;
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

pub(crate) struct Ddim {
    train: Train,
    timesteps: Vec<f64>,
    ints: Vec<i64>,
    step_ratio: i64,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<X0Limit>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "DDIMScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        let t = train.num_train_timesteps;
        let spacing = Spacing::from_config(cfg, Spacing::Leading)?;
        let ints = integer_timesteps(cfg, spacing, t, n, cfg.steps_offset.unwrap_or(0))?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { train.alphas_cumprod[0] };
        let clip = X0Limit::from_config(cfg, true);
        Ok(Ddim {
            timesteps: ints.iter().map(|&v| v as f64).collect(),
            step_ratio: (t / n) as i64,
            train,
            ints,
            final_alpha_cumprod,
            prediction,
            clip,
        })
    }
}

impl Scheduler for Ddim {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.ints[step_index];
        let prev = t - self.step_ratio;
        let ac = &self.train.alphas_cumprod;
        let a_t = ac[t as usize];
        let a_prev = if prev >= 0 { ac[prev as usize] } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                (div(&(sample - mul(model_output, b_t.sqrt())?)?, a_t.sqrt())?, model_output.clone())
            }
            Prediction::Sample => {
                let eps = div(&(sample - mul(model_output, a_t.sqrt())?)?, b_t.sqrt())?;
                (model_output.clone(), eps)
            }
            Prediction::Velocity => (
                (mul(sample, a_t.sqrt())? - mul(model_output, b_t.sqrt())?)?,
                lin2(a_t.sqrt(), model_output, b_t.sqrt(), sample)?,
            ),
        };
        let x0 = match &self.clip {
            Some(limit) => limit.apply(&x0)?,
            None => x0,
        };
        // eta = 0: std_dev_t = 0, so the direction coefficient is sqrt(1 - a_prev - 0).
        lin2(a_prev.sqrt(), &x0, (1.0 - a_prev - 0.0).sqrt(), &eps)
    }
}
