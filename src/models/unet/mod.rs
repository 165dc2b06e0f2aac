//! `UNet2DConditionModel` for SD1.x/2.x: one call ([`UNetInput`]) carries the conditioning, the
//! control mechanisms' contributions ([`UNetControls`]), read/write layer hooks by id ([`hooks`]) and
//! the execution policy ([`DeepCache`]); one timestep per sample.

pub mod blocks;
pub mod config;
pub mod controls;
pub mod deep_cache;
pub mod encoder;
pub mod hooks;
pub mod input;
pub mod layer_ids;
pub mod transformer;

use std::collections::BTreeSet;

use candle_core::{Module, Tensor};

pub use config::UNetConfig;
pub use controls::{AttentionStreams, ExtraAttention, UNetControls};
pub use deep_cache::DeepCache;
pub use encoder::{EncoderOutput, UNetEncoder, timestep_embedding};
pub use hooks::{AttentionLayerView, Hooks, UNetHook};
pub use input::{Conditioning, UNetInput};
pub use layer_ids::CrossAttentionLayer;

use input::LayerPass;

use super::nn::{Conv2d, conv2d, group_norm};
use crate::allocator::LargeBlockCache;
use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;
use crate::{Error, Result};

/// Freed activations and scratch a step keeps for the next (see [`LargeBlockCache`]): at 512x512
/// with guidance the feed-forward projections (84 and 42 MB) and the 32x32 Winograd weights (59 MB)
/// come and go in every transformer and resnet block, and mapping them afresh has the kernel zero
/// their pages every time.
const STEP_BLOCK_CACHE: usize = 512 << 20;
use blocks::{BlockLoader, UpBlock};

/// The conditional UNet: noisy latents, per-sample timesteps and a text context in, noise (or v)
/// prediction out, with control mechanisms contributing through [`UNetControls`].
#[derive(Debug)]
pub struct UNet {
    encoder: UNetEncoder,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Every id a hook may name.
    hook_points: BTreeSet<String>,
}

impl UNet {
    /// Loads a UNet with diffusers key names from `w`.
    pub fn load(w: &Weights, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.blocks.len();
        if c.up_has_attention.len() != n {
            return Err(Error::invalid(format!(
                "the UNet config lists {} up blocks for {n} down blocks",
                c.up_has_attention.len()
            )));
        }
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = c.blocks[n - 1].channels;
        for i in 0..n {
            let block = &c.blocks[n - 1 - i];
            let skip_in = c.blocks[(n - 1 - i).saturating_sub(1)].channels;
            let id = format!("up_blocks.{i}");
            let loader = BlockLoader { config: c, w: w.pp(&id), id };
            up_blocks.push(loader.up_block(block, prev, skip_in, c.up_has_attention[i], i + 1 == n)?);
            prev = block.channels;
        }
        let ch0 = c.blocks[0].channels;
        let encoder = UNetEncoder::load(w, config)?;
        let mut hook_points: BTreeSet<String> = encoder.hook_points().into_iter().collect();
        for block in &up_blocks {
            hook_points.extend(block.layers.iter().flat_map(|l| l.hook_points()));
            hook_points.insert(block.id.clone());
        }
        Ok(Self {
            encoder,
            up_blocks,
            norm_out: group_norm(&w.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?,
            conv_out: conv2d(&w.pp("conv_out"), ch0, c.out_channels, c.conv_out_kernel, 1, c.conv_out_kernel / 2)?,
            hook_points,
        })
    }

    /// Every id a [`UNetHook`] may name: `conv_in`, each block, resnet, transformer, transformer
    /// block and attention layer by its diffusers module path.
    pub fn hook_points(&self) -> &BTreeSet<String> {
        &self.hook_points
    }

    /// The model's configuration.
    pub fn config(&self) -> &UNetConfig {
        self.encoder.config()
    }

    /// How many skip connections the down path produces (the length of
    /// [`UNetControls::down_residuals`]).
    pub fn num_skips(&self) -> usize {
        self.encoder.num_skips()
    }

    /// Predicts noise (or v) for the input's sample [B, C, h, w] at its timesteps [B] (one per
    /// sample), given its conditioning, with the control mechanisms' contributions and hooks. Under
    /// DeepCache, a call the cache marks for refreshing runs the whole UNet and keeps the deep
    /// feature; the others run only the shallow branch around the cached feature.
    pub fn forward(&self, input: UNetInput) -> Result<Tensor> {
        let UNetInput { sample, timesteps, conditioning, controls, hooks, deep_cache } = input;
        let b = sample.dim(0)?;
        if timesteps.dims() != [b] {
            return Err(Error::invalid(format!(
                "the UNet expects one timestep per sample ({b}), got shape {:?}",
                timesteps.dims()
            )));
        }
        conditioning.check_batch(b)?;
        let sample = match &conditioning.extra_channels {
            Some(extra) => Tensor::cat(&[sample, &extra.to_dtype(sample.dtype())?], 1)?,
            None => sample.clone(),
        };
        let empty = UNetControls::default();
        let controls = controls.unwrap_or(&empty);
        let total = self.num_skips();
        let _reuse = LargeBlockCache::keep_up_to(STEP_BLOCK_CACHE);
        let temb = self.encoder.embed_time(timesteps, conditioning, sample.dtype())?;
        let mut pass = LayerPass { temb, context: &conditioning.context, controls, hooks };
        // Under DeepCache: the skip whose up layer takes the cached feature, and that feature when
        // this call reuses it.
        let (resume_skip, cached, capture) = match deep_cache {
            Some(cache) => {
                let skip = cache.resume_skip(total)?;
                let cached = cache.next_call(&sample);
                let capture = if cached.is_none() { Some((cache, skip)) } else { None };
                (Some(skip), cached, capture)
            }
            None => (None, None, None),
        };
        let stop = cached.as_ref().and(resume_skip);
        let EncoderOutput { hidden, mut skips } = self.encoder.forward(&sample, &mut pass, stop)?;

        if let Some(residuals) = &controls.down_residuals {
            if residuals.len() != total {
                return Err(Error::invalid(format!(
                    "control gave {} down residuals, the UNet has {total} skip connections",
                    residuals.len()
                )));
            }
            skips = skips.iter().zip(residuals).map(|(s, r)| Ok(s.broadcast_add(r)?)).collect::<Result<_>>()?;
        }
        let xs = match cached {
            Some(feature) => feature,
            None => match &controls.mid_residual {
                Some(r) => hidden.broadcast_add(r)?,
                None => hidden,
            },
        };
        self.up_path(xs, skips, &mut pass, capture)
    }

    /// The up blocks and the output head on `xs`, consuming `skips` from the last: with fewer skips
    /// than the down path makes (a DeepCache partial call), from the up layer that takes the last
    /// of them. With `capture` (a refreshing DeepCache call), the input of the up layer that takes
    /// skip `resume_skip` is kept in the cache.
    fn up_path(
        &self,
        mut xs: Tensor,
        mut skips: Vec<Tensor>,
        pass: &mut LayerPass,
        mut capture: Option<(&mut DeepCache, usize)>,
    ) -> Result<Tensor> {
        let first = self.num_skips() - skips.len();
        let mut layer_index = 0;
        for block in &self.up_blocks {
            let runs = layer_index + block.layers.len() > first;
            for layer in &block.layers {
                if layer_index >= first {
                    if let Some((cache, resume_skip)) = capture.as_mut()
                        && skips.len() == *resume_skip + 1
                    {
                        cache.keep(xs.clone());
                    }
                    let skip = skips.pop().ok_or_else(|| Error::invalid("UNet skip connections exhausted"))?;
                    xs = layer.forward(&Tensor::cat(&[&xs, &skip], 1)?, pass)?;
                }
                layer_index += 1;
            }
            if let Some(up) = &block.upsample
                && layer_index > first
            {
                let target = skips.last().ok_or_else(|| Error::invalid("UNet skip connections exhausted"))?;
                let (_, _, h, w) = target.dims4()?;
                xs = up.forward(&xs, (h, w))?;
            }
            if runs {
                xs = pass.output(&block.id, xs)?;
            }
        }
        let xs = self.norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
