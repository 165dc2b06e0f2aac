//! Trajectory Consistency Distillation sampling (Zheng et al. 2024), as diffusers' `TCDScheduler`
//! with its default `eta` = 0.3 (the "gamma" of the paper).
//!
//! Timesteps as LCM's. Each step predicts x0 and eps at t, moves them to the intermediate
//! timestep s = floor((1 − eta) · t_prev) (`pred_noised = sqrt(a_s) x0 + sqrt(1 − a_s) eps`), and,
//! except on the last step, re-noises from s to t_prev with fresh noise:
//! x_prev = sqrt(a_prev / a_s) pred_noised + sqrt(1 − a_prev / a_s) z.

use candle_core::Tensor;

use super::betas::{LCM_DEFAULTS, Train};
use super::lcm::distilled_timesteps;
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

/// diffusers' default `eta` of `TCDScheduler.step`.
const ETA: f32 = 0.3;

pub(crate) struct Tcd {
    train: Train,
    timesteps: Vec<f64>,
    ints: Vec<i64>,
    prediction: Prediction,
}

impl Tcd {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "TCDScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let train = Train::new(cfg, &LCM_DEFAULTS, true)?;
        let ints = distilled_timesteps(cfg, train.num_train_timesteps, n, "TCD")?;
        Ok(Tcd { timesteps: ints.iter().map(|&v| v as f64).collect(), train, ints, prediction })
    }
}

impl Scheduler for Tcd {
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
        let ac = &self.train.alphas_cumprod;
        let t = self.ints[step_index];
        let prev = self.ints.get(step_index + 1).copied().unwrap_or(0);
        // `(1 - eta) * prev_timestep` is a float32 tensor product in diffusers
        let s = ((1.0 - ETA as f64) as f32 * prev as f32).floor() as usize;
        let (a_t, a_prev, a_s) = (ac[t as usize], ac[prev as usize], ac[s]);
        let (b_t, b_s) = (1.0 - a_t, 1.0 - a_s);
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
        let pred_noised = lin2(a_s.sqrt(), &x0, b_s.sqrt(), &eps)?;
        if step_index + 1 == self.ints.len() {
            return Ok(pred_noised);
        }
        let z = noise.sample(model_output.dims(), model_output.device())?;
        lin2((a_prev / a_s).sqrt(), &pred_noised, (1.0 - a_prev / a_s).sqrt(), &z)
    }
}
