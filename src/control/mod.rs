//! Control mechanisms: each is a small module that turns its inputs (images, embeddings, weights)
//! into contributions at the UNet's injection points ([`UNetControls`]); the sampling loop sums
//! what every active mechanism contributes at each step and knows none of them by name.

pub mod cross_attention;
pub mod residual;
pub mod tokens;
pub mod weights;

use candle_core::Tensor;

use crate::Result;
use crate::models::unet::{UNet, UNetControls};

/// What a mechanism sees at one denoising step.
pub struct StepContext<'a> {
    /// The UNet being sampled (for mechanisms that run a reference pass through it).
    pub unet: &'a UNet,
    /// Index of this step, from 0.
    pub step_index: usize,
    /// Number of steps in the run.
    pub num_steps: usize,
    /// The model timestep of this step.
    pub timestep: f64,
    /// The scaled UNet input [N, C, h, w]; with guidance N = 2B, unconditional half first.
    pub latents: &'a Tensor,
    /// The text context [N, S, D], in the same batch layout.
    pub context: &'a Tensor,
    /// Whether the batch holds the unconditional half followed by the conditional half.
    pub guided: bool,
}

/// What a mechanism sees when it edits the text context before sampling.
#[derive(Debug, Clone, Copy)]
pub struct ContextInfo {
    /// Whether the context holds the unconditional rows followed by the conditional rows.
    pub guided: bool,
    /// Images per prompt: the context has 2·batch rows with guidance, batch rows without.
    pub batch: usize,
}

/// A control mechanism that contributes to the UNet at every step.
pub trait Control {
    /// A short name for progress and error messages (e.g. "controlnet").
    fn name(&self) -> &str;
    /// The text-embedding injection point: edits the encoded prompts [N, S, D] once before sampling
    /// (append tokens, replace rows, project), in the batch layout `info` describes; the result is
    /// the context every step sees. Mechanisms edit in the order they are listed. The default
    /// leaves the context unchanged.
    fn edit_context(&mut self, context: Tensor, _info: &ContextInfo) -> Result<Tensor> {
        Ok(context)
    }
    /// The contributions for this step (empty when the mechanism is inactive at this step).
    fn contribute(&mut self, step: &StepContext) -> Result<UNetControls>;
}
