//! Ancestral Euler sampling, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's
//! `sample_euler_ancestral` with eta = 1).
//!
//! Each step splits the move from sigma_from to sigma_to into a deterministic Euler step down to
//! sigma_down = sqrt(sigma_to^2 - sigma_up^2) and fresh noise of std
//! sigma_up = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2); noise is drawn at every
//! step (its scale is 0 on the last one). Sigmas, timesteps and `init_noise_sigma` as Euler.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train};
use super::euler::{euler_init_noise_sigma, floor_zero_snr, predict_x0};
use super::sigmas::{inference_timesteps, interp, sigma_table};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "EulerAncestralDiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        let mut train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        floor_zero_snr(&mut train);
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let timesteps = inference_timesteps(cfg, train.num_train_timesteps, spacing, n, None);
        let table = sigma_table(&train.alphas_cumprod);
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, &table) as f32).collect();
        sigmas.push(0.0);
        Ok(EulerAncestral { init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing), timesteps, sigmas, prediction })
    }
}

impl Scheduler for EulerAncestral {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[step_index];
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let (from, to) = (sigma, self.sigmas[step_index + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(sample - x0)?, sigma)?;
        let prev = (sample + mul(&derivative, sigma_down - sigma)?)?;
        let z = noise.sample(model_output.dims(), model_output.device())?;
        Ok((prev + mul(&z, sigma_up)?)?)
    }
}
