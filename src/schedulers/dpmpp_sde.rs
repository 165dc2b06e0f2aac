//! DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, A1111's "DPM++ SDE"), as diffusers'
//! `DPMSolverSDEScheduler` (eta = 1, s_noise = 1, r = 1/2).
//!
//! Each step from sigma_i to sigma_{i+1} takes two model calls. With t = −log sigma_i,
//! t_next = −log sigma_{i+1} and the midpoint s = t + (t_next − t)/2, both calls take an ancestral
//! DPM-Solver++ step from the step's input x, with x0 from their own model call:
//! - to sigma_to: sigma_up = min(sigma_to, sqrt(sigma_to^2 (sigma_from^2 − sigma_to^2) /
//!   sigma_from^2)), sigma_down = sqrt(sigma_to^2 − sigma_up^2), and
//!   x' = (sigma_down / sigma_from) x − expm1(t − t_down) x0 + sigma_up · z (t_down = −log sigma_down),
//!   where sigma_from = e^{−t};
//! - the first call (model at sigma_i) steps to sigma_mid = e^{−s}; the second (model at sigma_mid,
//!   on the first call's output) steps from x again, to e^{−t_next}.
//!
//! diffusers draws z from a torchsde Brownian tree over [sigma_min, sigma_max] (its increment
//! over [sigma_from, sigma_to], normalised); here each z is one standard-normal draw from the
//! [`NoiseSource`], so seeded runs differ from diffusers' for the same seed while a replay of its
//! draws matches it. The last step, to sigma = 0, is one Euler step in one call.
//!
//! Timesteps interleave the midpoints' (fractional) timesteps, `[t0, t_mid0, t1, t_mid1, ...,
//! t_{n-1}]` (2n − 1 entries), and the loop calls the model and [`Scheduler::step`] once per
//! entry. Sigmas as diffusers builds them for this class: the training sigmas interpolated at
//! float64 timesteps (`linspace` by default), or a Karras, exponential or beta schedule (timesteps
//! mapped back from the sigmas); `init_noise_sigma` as Euler's.

use candle_core::Tensor;

use super::betas::{K_DEFAULTS, Spacing, Train, spaced_timesteps};
use super::euler::{euler_init_noise_sigma, predict_x0};
use super::heun::interleave;
use super::sigmas::{Conversion, interp, log_table, sigma_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

pub(crate) struct DpmPpSde {
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]`.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// After a step's first call: the step's input sample and the midpoint sigma.
    pending: Option<(Tensor, f32)>,
}

impl DpmPpSde {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "DPMSolverSDEScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        let train = Train::new(cfg, &K_DEFAULTS, false)?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let conversion = Conversion::from_config(cfg)?;
        let table = sigma_table(&train.alphas_cumprod);
        let logs = log_table(&table);
        // float64 timesteps (this class does not round them to float32 as Euler does)
        let mut ts = spaced_timesteps(spacing, table.len(), n, cfg.steps_offset.unwrap_or(0));
        let mut s: Vec<f64> = ts.iter().map(|&t| interp(t, &table)).collect();
        if let Some(conv) = conversion {
            s = conv.apply(s[n - 1], s[0], n);
            ts = s.iter().map(|&v| sigma_to_t(v, &logs)).collect();
        }
        // the midpoint timesteps, from the float64 sigmas
        let mut timesteps = vec![ts[0]];
        for k in 1..n {
            let (t, t_next) = (-s[k - 1].ln(), -s[k].ln());
            let mid = (-(t + (t_next - t) * 0.5)).exp();
            timesteps.extend([sigma_to_t(mid, &logs), ts[k]]);
        }
        let mut s32: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        s32.push(0.0);
        let sigmas = interleave(&s32, true);
        Ok(DpmPpSde {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            timesteps,
            sigmas,
            prediction,
            pending: None,
        })
    }
}

impl Scheduler for DpmPpSde {
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
        let sigma = match &self.pending {
            None => self.sigmas[step_index],
            Some((_, mid)) => *mid,
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
        let pending = self.pending.take();
        let (sigma, sigma_next) = match pending {
            None => (self.sigmas[i], self.sigmas[i + 1]),
            Some(_) => (self.sigmas[i - 1], self.sigmas[i]),
        };
        // float32 scalar arithmetic, as diffusers' 0-dim tensors
        let (t, t_next) = (-sigma.ln(), -sigma_next.ln());
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = if pending.is_none() { sigma } else { (-t_proposed).exp() };
        let x0 = predict_x0(self.prediction, model_output, sample, sigma_input)?;
        if sigma_next == 0.0 {
            // Euler step
            let derivative = div(&(sample - x0)?, sigma)?;
            return Ok((sample + mul(&derivative, sigma_next - sigma)?)?);
        }
        let (t_to, from) = match &pending {
            None => (t_proposed, sample),
            Some((first, _)) => (t_next, first),
        };
        let (sigma_from, sigma_to) = ((-t).exp(), (-t_to).exp());
        let up =
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt();
        // Python's min(sigma_to, up)
        let sigma_up = if up < sigma_to { up } else { sigma_to };
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let ancestral_t = -sigma_down.ln();
        let x = (mul(from, (-ancestral_t).exp() / (-t).exp())? - mul(&x0, (t - ancestral_t).exp_m1())?)?;
        let z = noise.sample(sample.dims(), sample.device())?;
        let x = (x + mul(&z, sigma_up)?)?;
        if pending.is_none() {
            self.pending = Some((sample.clone(), sigma_to));
        }
        Ok(x)
    }
}
