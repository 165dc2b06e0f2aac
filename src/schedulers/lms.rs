//! Linear multistep sampling in sigma space (k-diffusion's `sample_lms`, order 4), as diffusers'
//! `LMSDiscreteScheduler`.
//!
//! Each step keeps the last (up to four) derivatives d = (x − x0) / sigma and moves by
//! sum_k c_k d_{i−k}, where c_k integrates the Lagrange basis polynomial of sigma_{i−k} over
//! the step's sigma interval [sigma_i, sigma_{i+1}]. diffusers integrates numerically
//! (`scipy.integrate.quad`, exact for these polynomials); we integrate exactly with Gauss–Legendre
//! quadrature. Sigmas and `init_noise_sigma` as Euler's.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train};
use super::euler::{euler_init_noise_sigma, predict_x0};
use super::sigmas::Discrete;
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

/// The order diffusers' pipelines use (`step`'s default).
const ORDER: usize = 4;

pub(crate) struct Lms {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "LMSDiscreteScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let train = Train::new(cfg, &LINEAR_DEFAULTS, false)?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let d = Discrete::new(cfg, &train.alphas_cumprod, spacing, n, None, (None, None))?;
        let mut sigmas: Vec<f32> = d.sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Lms {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            timesteps: d.timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            prediction,
            derivatives: Vec::new(),
        })
    }

    /// ∫_{sigma_t}^{sigma_{t+1}} prod_{k != current} (tau − sigma_{t−k}) / (sigma_{t−current} −
    /// sigma_{t−k}) dtau, by 3-point Gauss–Legendre (exact up to degree 5; the integrand has
    /// degree at most 3).
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |i: usize| self.sigmas[i] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let node = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * node) + 8.0 / 9.0 * basis(mid) + 5.0 / 9.0 * basis(mid + half * node))
    }
}

impl Scheduler for Lms {
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
        let sigma = self.sigmas[i];
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        self.derivatives.push(div(&(sample - x0)?, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let mut prev = sample.clone();
        let mut sum: Option<Tensor> = None;
        for (k, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = mul(derivative, self.coefficient(order, i, k) as f32)?;
            sum = Some(match sum {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        if let Some(sum) = sum {
            prev = (prev + sum)?;
        }
        Ok(prev)
    }
}
