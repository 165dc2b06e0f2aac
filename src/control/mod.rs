//! Control mechanisms: each is a small module implementing [`Control`], organised by where its
//! condition enters the model (see the README's *Architecture*). The sampling loop calls every
//! control at the same stages and knows none of them by name:
//!
//! 1. [`Control::prepare`] once, before the prompts are encoded: check against the model and the
//!    request, make constant tensors (VAE-encoded references, condition features), attach owned
//!    resources (a LoRA), each through [`GenerationSetup`];
//! 2. [`Control::edit_context`] once: the text-embedding point, with the words of the prompts;
//! 3. per step, [`Control::step_context`] (a context that changes at a step),
//!    [`Control::contribute`] (residuals and attention streams, after any reference pass the
//!    control runs through the UNet itself), [`Control::hook`] (read/write layer hooks for the main
//!    pass), then [`Control::after_step`] with the new latents;
//! 4. [`Control::finish`] when the generation ends, however it ends.

pub mod cross_attention;
pub mod input_channels;
pub mod residual;
pub mod self_attention;
pub mod tokens;
pub mod weights;

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::models::nn::LayerRegistry;
use crate::models::unet::{Conditioning, UNet, UNetControls, UNetHook};
use crate::models::vae::Vae;
use crate::prompt::PromptWord;
use crate::schedulers::{NoiseSource, Scheduler};

/// What a mechanism sees once, before the prompts are encoded.
pub struct GenerationSetup<'a> {
    /// The UNet being sampled (its config, its hook points, reference passes).
    pub unet: &'a UNet,
    /// The latent autoencoder (to encode reference images).
    pub vae: &'a Vae,
    /// The UNet's and text encoder's layers by module path, where weight-level resources attach.
    pub layers: &'a LayerRegistry,
    /// Images per prompt.
    pub batch: usize,
    /// Whether the UNet batch holds the unconditional half followed by the conditional half.
    pub guided: bool,
    /// The image size in pixels, (height, width).
    pub image_size: (usize, usize),
    /// The latent size, (height, width).
    pub latent_size: (usize, usize),
    /// The dtype the networks compute in.
    pub dtype: DType,
    /// The device the model runs on.
    pub device: &'a Device,
    /// The generation's noise (after the starting latents were drawn), for mechanisms that sample.
    pub noise: &'a mut dyn NoiseSource,
}

/// What a mechanism sees when it edits the text context before sampling.
#[derive(Debug, Clone, Copy)]
pub struct ContextInfo<'a> {
    /// Whether the context holds the unconditional rows followed by the conditional rows.
    pub guided: bool,
    /// Images per prompt: the context has 2·batch rows with guidance, batch rows without.
    pub batch: usize,
    /// The words of the prompt and the context rows (within each image's 77) they became.
    pub prompt_words: &'a [PromptWord],
    /// The same for the negative prompt (empty without guidance).
    pub negative_words: &'a [PromptWord],
}

/// What a mechanism sees at one denoising step.
pub struct StepContext<'a> {
    /// The UNet being sampled (for mechanisms that run a reference pass through it).
    pub unet: &'a UNet,
    /// The scheduler (forward noising for reference latents, input scaling).
    pub scheduler: &'a dyn Scheduler,
    /// The generation's noise source: draws made here come in the loop's order.
    pub noise: &'a mut dyn NoiseSource,
    /// Index of this step among the steps that run, from 0.
    pub step_index: usize,
    /// Number of steps that run (fewer than the schedule's when img2img starts part-way).
    pub num_steps: usize,
    /// The scheduler's index of this step (for [`Scheduler::add_noise`] and
    /// [`Scheduler::scale_model_input`]).
    pub scheduler_step: usize,
    /// The model timestep of this step.
    pub timestep: f64,
    /// This step's timestep for every row of the UNet batch, [N].
    pub timesteps: &'a Tensor,
    /// The scaled UNet input [N, C, h, w]; with guidance N = 2B, unconditional half first.
    pub latents: &'a Tensor,
    /// The conditioning of this step, in the same batch layout.
    pub conditioning: &'a Conditioning,
    /// Whether the batch holds the unconditional half followed by the conditional half.
    pub guided: bool,
}

/// A control mechanism. Only [`Control::name`] and [`Control::contribute`] are required; every
/// other stage defaults to doing nothing.
pub trait Control {
    /// A short name for progress and error messages (e.g. "controlnet").
    fn name(&self) -> &str;

    /// Once per generation, before the prompts are encoded: checks, constant tensors, resources
    /// the control owns until [`Control::finish`] (or until it is dropped).
    fn prepare(&mut self, _setup: &mut GenerationSetup) -> Result<()> {
        Ok(())
    }

    /// The text-embedding injection point: edits the encoded prompts [N, S, D] once before sampling
    /// (append tokens, replace rows, project), in the batch layout `info` describes; the result is
    /// the context every step starts from. Mechanisms edit in the order they are listed.
    fn edit_context(&mut self, context: Tensor, _info: &ContextInfo) -> Result<Tensor> {
        Ok(context)
    }

    /// The context for step `step_index` when it differs from `context`, the one the step would use
    /// (e.g. a context that switches at a given step); `None` keeps it.
    fn step_context(&mut self, _step_index: usize, _context: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The contributions for this step (empty when the mechanism is inactive at this step). A
    /// mechanism may run the UNet here on its own input (a reference pass).
    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls>;

    /// The read/write layer hooks this mechanism installs in this step's main UNet call; their ids
    /// are checked against the UNet when the generation starts.
    fn hook(&mut self) -> Option<&mut dyn UNetHook> {
        None
    }

    /// After step `step_index`, with the new latents [B, C, h, w].
    fn after_step(&mut self, _step_index: usize, _latents: &Tensor) -> Result<()> {
        Ok(())
    }

    /// When the generation ends (successfully or not): releases what [`Control::prepare`] took.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
