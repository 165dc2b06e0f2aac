//! Ancestral DPM-Solver-2 (k-diffusion's `sample_dpm_2_ancestral`, eta = 1), as diffusers'
//! `KDPM2AncestralDiscreteScheduler`.
//!
//! Each step splits the move from sigma_i to sigma_{i+1} into a deterministic DPM-Solver-2 step
//! down to sigma_down = sqrt(sigma_{i+1}^2 − sigma_up^2) through the log-midpoint of sigma_i and
//! sigma_down, and fresh noise of std sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 − sigma_{i+1}^2) /
//! sigma_i^2), drawn after the second model call. Entries interleave as in DPM2 (2n − 1, the
//! midpoints' timesteps between); the last step goes to sigma = 0 in one call, without noise.

use candle_core::Tensor;

use super::betas::{K_DEFAULTS, Spacing, Train};
use super::euler::{euler_init_noise_sigma, predict_x0};
use super::heun::interleave;
use super::kdpm2::lerp_half;
use super::sigmas::{Conversion, Discrete, log_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct Kdpm2Ancestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    first_sample: Option<Tensor>,
}

impl Kdpm2Ancestral {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "KDPM2AncestralDiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        let train = Train::new(cfg, &K_DEFAULTS, false)?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let d = Discrete::new(cfg, &train.alphas_cumprod, spacing, n, None, (None, None))?;
        let mut s: Vec<f32> = d.sigmas.iter().map(|&v| v as f32).collect();
        s.push(0.0);
        let len = s.len();
        let next = |k: usize| if k + 1 < len { s[k + 1] } else { 0.0 };
        let up: Vec<f32> = (0..len)
            .map(|k| {
                let (from, to) = (s[k], next(k));
                (to * to * (from * from - to * to) / (from * from)).sqrt()
            })
            .collect();
        let mut down: Vec<f32> = (0..len).map(|k| (next(k) * next(k) - up[k] * up[k]).sqrt()).collect();
        down[len - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..len).map(|k| lerp_half(s[k].ln(), down[k].ln()).exp()).collect();
        interpol[len - 2] = 0.0;
        interpol[len - 1] = 0.0;
        let ts: Vec<f64> = match d.conversion {
            Some(Conversion::Karras) => d.timesteps.iter().map(|t| t.round_ties_even()).collect(),
            Some(_) => d.timesteps.clone(),
            None => d.timesteps.iter().map(|&t| t as f32 as f64).collect(),
        };
        let logs = log_table(&d.table);
        let ts_interpol: Vec<f64> = interpol.iter().map(|&v| sigma_to_t(v as f64, &logs)).collect();
        let mut timesteps = vec![ts[0]];
        for k in 1..ts.len() {
            timesteps.extend([ts_interpol[k - 1], ts[k]]);
        }
        let sigmas = interleave(&s, true);
        Ok(Kdpm2Ancestral {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            timesteps,
            sigmas,
            sigmas_interpol: interleave(&interpol, true),
            sigmas_up: interleave(&up, true),
            sigmas_down: interleave(&down, true),
            prediction,
            first_sample: None,
        })
    }
}

impl Scheduler for Kdpm2Ancestral {
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
        let sigma = match self.first_sample {
            None => self.sigmas[step_index],
            Some(_) => self.sigmas_interpol[step_index - 1],
        };
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = step_index;
        Ok(match self.first_sample.take() {
            None => {
                let (sigma, sigma_interpol) = (self.sigmas[i], self.sigmas_interpol[i]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
                let derivative = div(&(sample - x0)?, sigma)?;
                self.first_sample = Some(sample.clone());
                (sample + mul(&derivative, sigma_interpol - sigma)?)?
            }
            Some(first) => {
                let sigma = self.sigmas[i - 1];
                let sigma_interpol = self.sigmas_interpol[i - 1];
                let (sigma_up, sigma_down) = (self.sigmas_up[i - 1], self.sigmas_down[i - 1]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma_interpol)?;
                let derivative = div(&(sample - x0)?, sigma_interpol)?;
                let prev = (first + mul(&derivative, sigma_down - sigma)?)?;
                let z = noise.sample(model_output.dims(), model_output.device())?;
                (prev + mul(&z, sigma_up)?)?
            }
        })
    }
}
