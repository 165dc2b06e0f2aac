//! One UNet call's input: the sample, per-sample timesteps, the conditioning, the run-time controls,
//! the layer hooks and the execution policy, in one value handed down unchanged from the UNet to its
//! attention layers.

use candle_core::Tensor;

use super::controls::UNetControls;
use super::deep_cache::DeepCache;
use super::hooks::Hooks;
use crate::{Error, Result};

/// What the UNet is conditioned on, beside the timestep.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The text context [B, S, D] the cross-attention layers attend to.
    pub context: Tensor,
    /// Pooled text embeddings [B, P] for the UNet's `add_embedding` (SDXL's `text_embeds`).
    pub pooled: Option<Tensor>,
    /// Micro-conditioning time ids [B, N] for the UNet's `add_embedding` (SDXL's `time_ids`).
    pub time_ids: Option<Tensor>,
    /// Condition latents [B, C', h, w] concatenated to the sample along channels before `conv_in`
    /// (inpainting UNets: mask and masked-image latents; IC-Light: the foreground latents).
    pub extra_channels: Option<Tensor>,
}

impl Conditioning {
    /// Conditioning on a text context [B, S, D] alone.
    pub fn text(context: Tensor) -> Self {
        Self { context, pooled: None, time_ids: None, extra_channels: None }
    }

    /// The rows `start..start + len` of every tensor (a part of the batch, e.g. one CFG half).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let part = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(t.as_ref().map(|t| t.narrow(0, start, len)).transpose()?)
        };
        Ok(Self {
            context: self.context.narrow(0, start, len)?,
            pooled: part(&self.pooled)?,
            time_ids: part(&self.time_ids)?,
            extra_channels: part(&self.extra_channels)?,
        })
    }

    /// Checks every tensor has `batch` rows.
    pub(crate) fn check_batch(&self, batch: usize) -> Result<()> {
        let parts = [Some(&self.context), self.pooled.as_ref(), self.time_ids.as_ref(), self.extra_channels.as_ref()];
        let names = ["text context", "pooled embeddings", "time ids", "extra input channels"];
        for (t, name) in parts.into_iter().zip(names) {
            if let Some(t) = t
                && t.dims().first() != Some(&batch)
            {
                return Err(Error::invalid(format!(
                    "the UNet input has batch {batch}, its {name} have shape {:?}",
                    t.dims()
                )));
            }
        }
        Ok(())
    }
}

/// One UNet call. Build it with [`UNetInput::new`] and the `with_*` methods.
pub struct UNetInput<'a, 'h> {
    /// Noisy latents [B, C, h, w].
    pub sample: &'a Tensor,
    /// One timestep per sample, [B].
    pub timesteps: &'a Tensor,
    /// What the call is conditioned on.
    pub conditioning: &'a Conditioning,
    /// Data the control mechanisms contribute (residuals, extra cross-attention streams).
    pub controls: Option<&'a UNetControls>,
    /// Read/write hooks by layer id.
    pub hooks: Hooks<'h>,
    /// How to execute: exactly, or under DeepCache.
    pub deep_cache: Option<&'a mut DeepCache>,
}

impl<'a, 'h> UNetInput<'a, 'h> {
    /// A plain call on `sample` [B, C, h, w] at `timesteps` [B] with `conditioning`.
    pub fn new(sample: &'a Tensor, timesteps: &'a Tensor, conditioning: &'a Conditioning) -> Self {
        Self { sample, timesteps, conditioning, controls: None, hooks: Hooks::none(), deep_cache: None }
    }

    /// With the control mechanisms' contributions.
    pub fn with_controls(mut self, controls: &'a UNetControls) -> Self {
        self.controls = Some(controls);
        self
    }

    /// With layer hooks.
    pub fn with_hooks(mut self, hooks: Hooks<'h>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Under DeepCache, when `cache` is given.
    pub fn with_deep_cache(mut self, cache: Option<&'a mut DeepCache>) -> Self {
        self.deep_cache = cache;
        self
    }
}

/// What every layer of one call sees: the time embedding, the context, the controls and the hooks.
pub(crate) struct LayerPass<'a, 'h> {
    /// The time embedding [B, time_embed_dim].
    pub temb: Tensor,
    /// The text context [B, S, D].
    pub context: &'a Tensor,
    /// The control mechanisms' contributions.
    pub controls: &'a UNetControls,
    /// The call's hooks.
    pub hooks: Hooks<'h>,
}

impl LayerPass<'_, '_> {
    /// `xs` after the hooks at module `id`'s output.
    pub fn output(&mut self, id: &str, xs: Tensor) -> Result<Tensor> {
        self.hooks.at_output(id, xs)
    }
}
