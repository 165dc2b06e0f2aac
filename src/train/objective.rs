//! The denoising objective of diffusers' training scripts (`train_text_to_image(_lora).py`,
//! `train_dreambooth(_lora).py`, `train_controlnet.py`, ...): a clean latent is noised to a
//! timestep with the scheduler's training schedule (DDPMScheduler's `add_noise`), the model predicts
//! the noise (ε) or the velocity (v) as the scheduler's `prediction_type` says, and the loss is the
//! mean squared error, optionally weighted per sample by min-SNR-γ (Hang et al. 2023, the scripts'
//! `--snr_gamma`). Everything is f32, as the scripts compute it. The T2I-Adapter script's variant,
//! on the Euler scheduler's noise levels with a σ⁻²-weighted loss on the denoised latents, is here
//! too.

use candle_core::{D, DType, Tensor};

use crate::schedulers::SchedulerConfig;
use crate::schedulers::betas::{LINEAR_DEFAULTS, Train};
use crate::{Error, Result};

/// What the model is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The noise that was added (`epsilon`).
    Noise,
    /// The velocity `sqrt(ᾱ)·noise − sqrt(1 − ᾱ)·x₀` (`v_prediction`).
    Velocity,
}

/// The noising schedule, target and loss weighting of one training run.
#[derive(Debug, Clone)]
pub struct DenoisingObjective {
    /// `alphas_cumprod[t]`, f32 as diffusers keeps it.
    alphas_cumprod: Vec<f32>,
    target: Target,
    /// min-SNR-γ: each sample's loss is weighted by min(SNR, γ) / SNR (ε) or / (SNR + 1) (v).
    snr_gamma: Option<f32>,
}

impl DenoisingObjective {
    /// The objective of a model whose scheduler config is `cfg`, read as the training scripts'
    /// `DDPMScheduler.from_pretrained(.., subfolder="scheduler")` reads it; `snr_gamma` turns on
    /// min-SNR-γ weighting.
    pub fn new(cfg: &SchedulerConfig, snr_gamma: Option<f64>) -> Result<Self> {
        let train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        let target = match cfg.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Target::Noise,
            "v_prediction" => Target::Velocity,
            other => {
                return Err(cfg.bad_value(
                    "prediction_type",
                    format!("`{other}`"),
                    "training supports epsilon and v_prediction",
                ));
            }
        };
        if let Some(gamma) = snr_gamma
            && !(gamma.is_finite() && gamma > 0.0)
        {
            return Err(Error::invalid(format!("the min-SNR gamma must be a positive number, got {gamma}")));
        }
        Ok(Self { alphas_cumprod: train.alphas_cumprod, target, snr_gamma: snr_gamma.map(|g| g as f32) })
    }

    /// The number of training timesteps (timesteps are drawn from 0 to this, exclusive).
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// What the model predicts.
    pub fn target_kind(&self) -> Target {
        self.target
    }

    /// `(sqrt(ᾱ_t), sqrt(1 − ᾱ_t))` of each sample's timestep as [B, 1, 1, 1] tensors, in f32 as
    /// diffusers computes them.
    fn coefficients(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut alpha = Vec::with_capacity(timesteps.len());
        let mut sigma = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let ac = self.alpha_cumprod(t)?;
            alpha.push(ac.sqrt());
            sigma.push((1.0 - ac).sqrt());
        }
        let column = |v: Vec<f32>| Tensor::from_vec(v, (timesteps.len(), 1, 1, 1), like.device());
        Ok((column(alpha)?, column(sigma)?))
    }

    /// ᾱ_t, or an error for a timestep outside the schedule.
    fn alpha_cumprod(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::invalid(format!("timestep {t} is outside the schedule's {} steps", self.alphas_cumprod.len()))
        })
    }

    /// `sqrt(ᾱ_t)·latents + sqrt(1 − ᾱ_t)·noise` per sample ([B, C, H, W], one timestep each).
    pub fn add_noise(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (alpha, sigma) = self.coefficients(timesteps, latents)?;
        Ok((latents.broadcast_mul(&alpha)? + noise.broadcast_mul(&sigma)?)?)
    }

    /// What the model's output is compared with: the noise, or the velocity.
    pub fn target(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.target {
            Target::Noise => Ok(noise.clone()),
            Target::Velocity => {
                let (alpha, sigma) = self.coefficients(timesteps, latents)?;
                Ok((noise.broadcast_mul(&alpha)? - latents.broadcast_mul(&sigma)?)?)
            }
        }
    }

    /// The mean squared error of `prediction` against `target` [B, ..], each sample's mean weighted
    /// by min-SNR-γ when that is on, then averaged over the batch: a scalar.
    pub fn loss(&self, prediction: &Tensor, target: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let squared = (prediction.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?;
        let Some(gamma) = self.snr_gamma else {
            return Ok(squared.mean_all()?);
        };
        let per_sample = squared.flatten_from(1)?.mean(D::Minus1)?;
        let weights = timesteps
            .iter()
            .map(|&t| {
                let ac = self.alpha_cumprod(t)?;
                // diffusers' compute_snr, in f32.
                let snr = (ac.sqrt() / (1.0 - ac).sqrt()).powi(2);
                Ok(match self.target {
                    Target::Noise => snr.min(gamma) / snr,
                    Target::Velocity => snr.min(gamma) / (snr + 1.0),
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        let weights = Tensor::from_vec(weights, timesteps.len(), prediction.device())?;
        Ok((per_sample * weights)?.mean_all()?)
    }
    /// DreamBooth's prior-preservation loss for a batch whose first half are instance images and
    /// second half class images (diffusers' `train_dreambooth(_lora).py`): [`Self::loss`] of each
    /// half, the class half's times `prior_weight`, summed.
    pub fn prior_preservation_loss(
        &self,
        prediction: &Tensor,
        target: &Tensor,
        timesteps: &[usize],
        prior_weight: f64,
    ) -> Result<Tensor> {
        let batch = prediction.dim(0)?;
        if batch % 2 != 0 || timesteps.len() != batch {
            return Err(Error::invalid(format!(
                "prior preservation needs an even batch of instance then class images, got {batch} with {} timesteps",
                timesteps.len()
            )));
        }
        let half = batch / 2;
        let part = |t: &Tensor, start: usize| t.narrow(0, start, half);
        let instance = self.loss(&part(prediction, 0)?, &part(target, 0)?, &timesteps[..half])?;
        let prior = self.loss(&part(prediction, half)?, &part(target, half)?, &timesteps[half..])?;
        Ok((instance + (prior * prior_weight)?)?)
    }
    /// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) of each timestep, the Euler scheduler's noise level.
    pub fn sigmas(&self, timesteps: &[usize]) -> Result<Vec<f32>> {
        timesteps.iter().map(|&t| Ok(((1.0 - self.alpha_cumprod(t)?) / self.alpha_cumprod(t)?).sqrt())).collect()
    }

    /// The objective of diffusers' `train_t2i_adapter_sdxl.py`, on Euler's noise levels: the model
    /// sees `noisy / sqrt(σ² + 1)` for `noisy = latents + σ·noise` ([`Self::euler_noisy`]), its ε
    /// prediction gives `denoised = noisy − σ·prediction`, and the loss is each sample's mean of
    /// σ⁻²·(denoised − latents)², averaged over the batch.
    pub fn euler_denoised_loss(
        &self,
        prediction: &Tensor,
        noisy: &Tensor,
        latents: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let column = self.sigma_column(timesteps, latents)?;
        let denoised = (noisy - prediction.broadcast_mul(&column)?)?;
        let squared = (denoised - latents)?.sqr()?.broadcast_div(&column.sqr()?)?;
        Ok(squared.flatten_from(1)?.mean(D::Minus1)?.mean_all()?)
    }

    /// `(latents + σ·noise, the same divided by sqrt(σ² + 1))`: the Euler-noised latents and the
    /// model's input for [`Self::euler_denoised_loss`].
    pub fn euler_noisy(&self, latents: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let column = self.sigma_column(timesteps, latents)?;
        let noisy = (latents + noise.broadcast_mul(&column)?)?;
        let input = noisy.broadcast_div(&(column.sqr()? + 1.0)?.sqrt()?)?;
        Ok((noisy, input))
    }

    /// σ of each sample as a [B, 1, 1, 1] tensor.
    fn sigma_column(&self, timesteps: &[usize], like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.sigmas(timesteps)?, (timesteps.len(), 1, 1, 1), like.device())?)
    }
}
