//! DPM-Solver++(2S) ancestral, k-diffusion's `sample_dpmpp_2s_ancestral` (eta = 1, s_noise = 1).
//! diffusers has no such class (its `DPMSolverSinglestepScheduler` is deterministic), so this
//! restates k-diffusion's math on `EulerDiscreteScheduler`'s sigmas and timesteps (every
//! schedule Euler takes), and the parity fixture restates it likewise in Python.
//!
//! For each step from sigma_i to sigma_{i+1}: sigma_up = min(sigma_{i+1},
//! sqrt(sigma_{i+1}^2 (sigma_i^2 − sigma_{i+1}^2) / sigma_i^2)), sigma_down = sqrt(sigma_{i+1}^2 −
//! sigma_up^2). With t = −log sigma_i, h = −log sigma_down − t and the midpoint s = t + h/2:
//! - the model at sigma_i gives x0; x_2 = (e^{−s} / e^{−t}) x − expm1(−h/2) x0 is returned as the
//!   sample for a second model call at sigma_mid = e^{−s} (its timestep mapped back from the
//!   sigma table),
//! - that call gives x0_2; x = (e^{−t_next} / e^{−t}) x − expm1(−h) x0_2, plus sigma_up · z when
//!   sigma_{i+1} > 0.
//!
//! When sigma_down is 0 (the last step to sigma = 0) the step is one Euler step in one call.
//! Entries are `[t0, t_mid0, t1, t_mid1, ..., t_{n-1}]` (2n − 1), one model call each.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Train};
use super::euler::{Euler, floor_zero_snr, predict_x0};
use super::sigmas::{log_table, sigma_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, mul};
use crate::Result;

/// One model call: the step it belongs to, the sigma the model sees, and whether it is the
/// second (midpoint) call of a 2S step.
#[derive(Clone, Copy)]
struct Entry {
    step: usize,
    sigma: f32,
    second: bool,
}

/// The per-step quantities of k-diffusion's loop (float32 as its tensors).
#[derive(Clone, Copy)]
struct StepCoefficients {
    sigma_up: f32,
    sigma_down: f32,
    t: f32,
    t_next: f32,
    h: f32,
}

pub(crate) struct DpmPp2sAncestral {
    timesteps: Vec<f64>,
    entries: Vec<Entry>,
    sigmas: Vec<f32>,
    steps: Vec<StepCoefficients>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The step's input sample while its midpoint call is pending.
    pending: Option<Tensor>,
}

impl DpmPp2sAncestral {
    /// `custom` timesteps as Euler's.
    pub fn new(cfg: &SchedulerConfig, n: usize, custom: Option<&[f64]>) -> Result<Self> {
        let euler = Euler::new(cfg, n, custom)?;
        let mut train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        floor_zero_snr(&mut train);
        let logs = log_table(&sigma_table(&train.alphas_cumprod));
        let sigmas = euler.sigmas;
        let mut timesteps = Vec::new();
        let mut entries = Vec::new();
        let mut steps = Vec::new();
        for i in 0..sigmas.len() - 1 {
            let (from, to) = (sigmas[i], sigmas[i + 1]);
            let sigma_up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
            let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
            let (t, t_next) = (-from.ln(), -sigma_down.ln());
            let h = t_next - t;
            steps.push(StepCoefficients { sigma_up, sigma_down, t, t_next, h });
            timesteps.push(euler.timesteps[i]);
            entries.push(Entry { step: i, sigma: from, second: false });
            if sigma_down != 0.0 {
                let sigma_mid = (-(t + h * 0.5)).exp();
                timesteps.push(sigma_to_t(sigma_mid as f64, &logs) as f32 as f64);
                entries.push(Entry { step: i, sigma: sigma_mid, second: true });
            }
        }
        Ok(DpmPp2sAncestral {
            timesteps,
            entries,
            sigmas,
            steps,
            init_noise_sigma: euler.init_noise_sigma,
            prediction: euler.prediction,
            pending: None,
        })
    }
}

impl Scheduler for DpmPp2sAncestral {
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
        let sigma = self.entries[step_index].sigma;
        super::scale_at_sigma(sample, sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        Ok((original + mul(noise, self.entries[step_index].sigma)?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let entry = self.entries[step_index];
        let c = self.steps[entry.step];
        let sigma = self.sigmas[entry.step];
        let denoised = predict_x0(self.prediction, model_output, sample, entry.sigma)?;
        let x = if c.sigma_down == 0.0 {
            // Euler step
            let d = div(&(sample - denoised)?, sigma)?;
            (sample + mul(&d, c.sigma_down - sigma)?)?
        } else if !entry.second {
            let s = c.t + c.h * 0.5;
            self.pending = Some(sample.clone());
            let x_2 = (mul(sample, (-s).exp() / (-c.t).exp())? - mul(&denoised, (-c.h * 0.5).exp_m1())?)?;
            return Ok(x_2);
        } else {
            let x = self.pending.take().expect("the step's first call ran");
            (mul(&x, (-c.t_next).exp() / (-c.t).exp())? - mul(&denoised, (-c.h).exp_m1())?)?
        };
        if self.sigmas[entry.step + 1] > 0.0 {
            let z = noise.sample(model_output.dims(), model_output.device())?;
            return Ok((x + mul(&z, c.sigma_up)?)?);
        }
        Ok(x)
    }
}
