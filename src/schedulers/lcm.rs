//! Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.
//!
//! Timesteps are a subset of the distillation schedule (`original_inference_steps` points, every
//! `num_train_timesteps / original_inference_steps`-th timestep), ignoring `timestep_spacing` and
//! `steps_offset`. Each step predicts x0, applies the consistency boundary condition
//! denoised = c_out * x0 + c_skip * x with c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(s^2 + sd^2),
//! s = t * timestep_scaling, sd = 0.5, and, except on the last step, re-noises the result to the
//! next timestep with fresh noise. The final output is `denoised`.

use candle_core::Tensor;

use super::betas::{LCM_DEFAULTS, Train, check_range, np_linspace};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

pub(crate) struct Lcm {
    train: Train,
    timesteps: Vec<f64>,
    ints: Vec<i64>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<f32>,
    timestep_scaling: f32,
}

/// The timesteps of the consistency-distilled schedulers (LCM, TCD): `n` of the
/// `original_inference_steps` distillation timesteps (every `T / original`-th, descending), picked
/// at `floor(linspace(0, original, n, endpoint=False))`.
pub(crate) fn distilled_timesteps(cfg: &SchedulerConfig, t: usize, n: usize, name: &str) -> Result<Vec<i64>> {
    let original = cfg.original_inference_steps.unwrap_or(50);
    if original == 0 || original > t {
        return Err(cfg.bad_value(
            "original_inference_steps",
            original,
            &format!("must be between 1 and num_train_timesteps = {t}"),
        ));
    }
    if n > original {
        return Err(
            cfg.error(format!("{name} can take at most `original_inference_steps` = {original} steps, got {n}"))
        );
    }
    let k = (t / original) as i64;
    let mut origin: Vec<i64> = (1..=original as i64).map(|i| i * k - 1).collect();
    origin.reverse();
    let ints: Vec<i64> =
        np_linspace(0.0, origin.len() as f64, n, false).into_iter().map(|x| origin[x.floor() as usize]).collect();
    check_range(cfg, &ints, t)?;
    Ok(ints)
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "LCMScheduler";
        cfg.reject_thresholding(CLASS)?;
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        let train = Train::new(cfg, &LCM_DEFAULTS, true)?;
        let ints = distilled_timesteps(cfg, train.num_train_timesteps, n, "LCM")?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { train.alphas_cumprod[0] };
        let clip = cfg.clip_sample.unwrap_or(false).then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Lcm {
            timesteps: ints.iter().map(|&v| v as f64).collect(),
            train,
            ints,
            final_alpha_cumprod,
            prediction,
            clip,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 { self.train.alphas_cumprod[t as usize] } else { self.final_alpha_cumprod }
    }
}

impl Scheduler for Lcm {
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
        let prev = self.ints.get(step_index + 1).copied().unwrap_or(t);
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        // boundary-condition scalings, float32 like the 0-dim tensors in diffusers
        // (`0.25 / x` on a tensor is `x.reciprocal() * 0.25` in torch)
        let s = t as f32 * self.timestep_scaling;
        let sd2 = 0.25f32;
        let c_skip = (1.0 / (s * s + sd2)) * sd2;
        let c_out = s / (s * s + sd2).sqrt();
        let x0 = match self.prediction {
            Prediction::Epsilon => div(&(sample - mul(model_output, b_t.sqrt())?)?, a_t.sqrt())?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => (mul(sample, a_t.sqrt())? - mul(model_output, b_t.sqrt())?)?,
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let denoised = lin2(c_out, &x0, c_skip, sample)?;
        if step_index + 1 == self.ints.len() {
            return Ok(denoised);
        }
        let z = noise.sample(model_output.dims(), model_output.device())?;
        lin2(a_prev.sqrt(), &denoised, b_prev.sqrt(), &z)
    }
}
