//! Heun's method in sigma space (Karras et al. 2022, Algorithm 1 without churn), as diffusers'
//! `HeunDiscreteScheduler`.
//!
//! Each step takes two model calls: an Euler step from sigma_i to sigma_{i+1}, then a second
//! evaluation there and a step from sigma_i again with the mean of both derivatives. diffusers
//! lists every timestep but the first twice (`[t0, t1, t1, t2, t2, ...]`, 2n − 1 entries, sigmas
//! likewise with the final 0), and the loop calls the model and [`Scheduler::step`] once per entry;
//! the last step is a plain Euler step to sigma = 0. Sigmas and `init_noise_sigma` as Euler's
//! (no `sigma_min`/`sigma_max` bounds: the class has none).

use candle_core::Tensor;

use super::betas::{K_DEFAULTS, Spacing, Train};
use super::euler::{euler_init_noise_sigma, predict_x0};
use super::sigmas::Discrete;
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct Heun {
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]`.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    clip: Option<f32>,
    /// After a first-order entry: its derivative, dt and input sample.
    first: Option<(Tensor, f32, Tensor)>,
}

/// Repeats every element but the first (and, with `keep_last`, the last) twice, as diffusers'
/// `cat([x[:1], x[1:-1].repeat_interleave(2), x[-1:]])`.
pub(crate) fn interleave<T: Copy>(x: &[T], keep_last: bool) -> Vec<T> {
    let mut out = vec![x[0]];
    let end = if keep_last { x.len() - 1 } else { x.len() };
    for &v in &x[1..end] {
        out.extend([v, v]);
    }
    if keep_last {
        out.push(x[x.len() - 1]);
    }
    out
}

impl Heun {
    /// `custom` timesteps replace the spacing (diffusers' `set_timesteps(timesteps=...)`).
    pub fn new(cfg: &SchedulerConfig, n: usize, custom: Option<&[f64]>) -> Result<Self> {
        const CLASS: &str = "HeunDiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let train = Train::new(cfg, &K_DEFAULTS, false)?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let d = Discrete::new(cfg, &train.alphas_cumprod, spacing, n, custom, (None, None))?;
        let mut sigmas: Vec<f32> = d.sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let sigmas = interleave(&sigmas, true);
        let ts: Vec<f64> = d.timesteps.iter().map(|&t| t as f32 as f64).collect();
        let timesteps = interleave(&ts, false);
        let clip = cfg.clip_sample.unwrap_or(false).then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Heun {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            timesteps,
            sigmas,
            prediction,
            clip,
            first: None,
        })
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        super::scale_at_sigma(sample, sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        super::add_noise_at_sigma(original, noise, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = step_index;
        let (sigma_input, sigma_next) = match self.first {
            None => (self.sigmas[i], self.sigmas[i + 1]),
            Some(_) => (self.sigmas[i], self.sigmas[i]),
        };
        let x0 = predict_x0(self.prediction, model_output, sample, sigma_input)?;
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        Ok(match self.first.take() {
            None => {
                let sigma = self.sigmas[i];
                let derivative = div(&(sample - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + mul(&derivative, dt)?)?;
                self.first = Some((derivative, dt, sample.clone()));
                prev
            }
            Some((prev_derivative, dt, first_sample)) => {
                let derivative = div(&(sample - x0)?, sigma_next)?;
                let derivative = div(&(prev_derivative + derivative)?, 2.0)?;
                (first_sample + mul(&derivative, dt)?)?
            }
        })
    }
}
