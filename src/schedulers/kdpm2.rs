//! DPM-Solver-2 in sigma space (k-diffusion's `sample_dpm_2`), as diffusers'
//! `KDPM2DiscreteScheduler`.
//!
//! Each step takes two model calls: an Euler step from sigma_i to the log-midpoint
//! sigma_mid = exp((log sigma_i + log sigma_{i+1}) / 2), then a second evaluation there whose
//! derivative carries the step from sigma_i all the way to sigma_{i+1}. The timesteps interleave
//! the midpoints' (fractional) timesteps, `[t0, t_mid1, t1, t_mid2, t2, ...]` (2n − 1 entries), and
//! the loop calls the model and [`Scheduler::step`] once per entry; the last step goes to
//! sigma = 0 in one call. Sigmas and `init_noise_sigma` as Euler's (Karras timesteps rounded).

use candle_core::Tensor;

use super::betas::{K_DEFAULTS, Spacing, Train};
use super::euler::{euler_init_noise_sigma, predict_x0};
use super::heun::interleave;
use super::sigmas::{Conversion, Discrete, log_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct Kdpm2 {
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., sn, sn, sn]` with sn = 0.
    sigmas: Vec<f32>,
    /// The log-midpoints toward each sigma, interleaved as `sigmas`.
    sigmas_interpol: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The input sample of the pending first-order entry.
    first_sample: Option<Tensor>,
}

/// torch's `a.lerp(b, 0.5)` in float32 (weight 0.5 takes the `b - (b - a) * (1 - w)` branch).
pub(crate) fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}

impl Kdpm2 {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "KDPM2DiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        let train = Train::new(cfg, &K_DEFAULTS, false)?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let d = Discrete::new(cfg, &train.alphas_cumprod, spacing, n, None, (None, None))?;
        let mut s: Vec<f32> = d.sigmas.iter().map(|&v| v as f32).collect();
        s.push(0.0);
        let interpol: Vec<f32> = (0..s.len())
            .map(|k| {
                let prev = s[(k + s.len() - 1) % s.len()];
                lerp_half(s[k].ln(), prev.ln()).exp()
            })
            .collect();
        let ts: Vec<f64> = match d.conversion {
            Some(Conversion::Karras) => d.timesteps.iter().map(|t| t.round_ties_even()).collect(),
            Some(_) => d.timesteps.clone(),
            None => d.timesteps.iter().map(|&t| t as f32 as f64).collect(),
        };
        let logs = log_table(&d.table);
        let ts_interpol: Vec<f64> = interpol.iter().map(|&v| sigma_to_t(v as f64, &logs)).collect();
        let mut timesteps = vec![ts[0]];
        for k in 1..ts.len() {
            timesteps.extend([ts_interpol[k], ts[k]]);
        }
        let sigmas = interleave(&s, true);
        Ok(Kdpm2 {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            timesteps,
            sigmas,
            sigmas_interpol: interleave(&interpol, true),
            prediction,
            first_sample: None,
        })
    }
}

impl Scheduler for Kdpm2 {
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
            Some(_) => self.sigmas_interpol[step_index],
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = step_index;
        Ok(match self.first_sample.take() {
            None => {
                let (sigma, sigma_interpol) = (self.sigmas[i], self.sigmas_interpol[i + 1]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
                let derivative = div(&(sample - x0)?, sigma)?;
                self.first_sample = Some(sample.clone());
                (sample + mul(&derivative, sigma_interpol - sigma)?)?
            }
            Some(first) => {
                let (sigma, sigma_interpol, sigma_next) = (self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]);
                let x0 = predict_x0(self.prediction, model_output, sample, sigma_interpol)?;
                let derivative = div(&(sample - x0)?, sigma_interpol)?;
                (first + mul(&derivative, sigma_next - sigma)?)?
            }
        })
    }
}
