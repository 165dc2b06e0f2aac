//! The UNet's input half — time embedding, `conv_in`, down blocks and mid block — shared by the
//! UNet and the ControlNet (a trainable copy of exactly this half).

use candle_core::{DType, Module, Tensor};

use super::blocks::{BlockLoader, DownBlock, MidBlock};
use super::config::UNetConfig;
use super::input::{Conditioning, LayerPass};
use crate::io::weights::Weights;
use crate::models::nn::{Conv2d, Linear, conv2d, linear};
use crate::{Error, Result};

/// Sinusoidal timestep embedding [B] → [B, dim] (diffusers' `get_timestep_embedding`).
pub fn timestep_embedding(timesteps: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    // f32 arithmetic in the same order as diffusers, for bit-close embeddings at large timesteps.
    let log_period = -(10000f64.ln() as f32);
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / denominator).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    Ok(if dim % 2 == 1 { emb.pad_with_zeros(1, 0, 1)? } else { emb })
}

/// `TimestepEmbedding`: Linear → SiLU → Linear.
#[derive(Debug)]
pub(crate) struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimeEmbedding {
    /// Loads `linear_1` (`in_dim` → `dim`) and `linear_2` under `w`.
    pub(crate) fn load(w: &Weights, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&w.pp("linear_1"), in_dim, dim, true)?,
            linear_2: linear(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// [B, in_dim] → [B, dim].
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)?)
    }
}

/// What the input half produces: the mid-block output and every skip connection.
pub struct EncoderOutput {
    /// The mid block's output (or the last down block's, without a mid block) [B, C, h', w'].
    pub hidden: Tensor,
    /// Skip connections in order: `conv_in`'s output, each layer's output, each downsampler's.
    pub skips: Vec<Tensor>,
}

/// Time embedding, `conv_in`, down blocks and mid block.
#[derive(Debug)]
pub struct UNetEncoder {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimeEmbedding,
    /// SDXL's `add_embedding` (pooled text embeddings and time ids into the time embedding).
    add_embedding: Option<TimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
}

impl UNetEncoder {
    /// Loads the input half with diffusers key names from `w`.
    pub fn load(w: &Weights, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.blocks.len();
        let ch0 = c.blocks[0].channels;
        let mut down_blocks = Vec::with_capacity(n);
        let mut cin = ch0;
        for (i, block) in c.blocks.iter().enumerate() {
            let id = format!("down_blocks.{i}");
            let loader = BlockLoader { config: c, w: w.pp(&id), id };
            down_blocks.push(loader.down_block(block, cin, i + 1 == n)?);
            cin = block.channels;
        }
        let mid_block = c
            .has_mid_block
            .then(|| {
                BlockLoader { config: c, w: w.pp("mid_block"), id: "mid_block".into() }.mid_block(&c.blocks[n - 1])
            })
            .transpose()?;
        Ok(Self {
            config: config.clone(),
            conv_in: conv2d(&w.pp("conv_in"), c.in_channels, ch0, c.conv_in_kernel, 1, c.conv_in_kernel / 2)?,
            time_embedding: TimeEmbedding::load(&w.pp("time_embedding"), ch0, c.time_embed_dim)?,
            add_embedding: c
                .add_embedding
                .map(|a| TimeEmbedding::load(&w.pp("add_embedding"), a.input_dim, c.time_embed_dim))
                .transpose()?,
            down_blocks,
            mid_block,
        })
    }

    /// The configuration this half was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// How many skip connections the down path produces.
    pub fn num_skips(&self) -> usize {
        1 + self.down_blocks.iter().map(|b| b.layers.len() + usize::from(b.downsample.is_some())).sum::<usize>()
    }

    /// The time embedding [B, time_embed_dim] of per-sample `timesteps` [B], with the added
    /// conditioning of `conditioning` (pooled text embeddings [B, P] and time ids [B, N]) where the
    /// UNet has an `add_embedding` (SDXL: `emb + add_embedding(cat(text_embeds, time_proj(time_ids)))`).
    pub fn embed_time(&self, timesteps: &Tensor, conditioning: &Conditioning, dtype: DType) -> Result<Tensor> {
        let c = &self.config;
        let t =
            timestep_embedding(timesteps, c.blocks[0].channels, c.flip_sin_to_cos, c.freq_shift)?.to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&t)?;
        let (pooled, time_ids) = (conditioning.pooled.as_ref(), conditioning.time_ids.as_ref());
        match (&self.add_embedding, c.add_embedding, pooled, time_ids) {
            (None, _, None, None) => Ok(temb),
            (None, _, _, _) => Err(Error::invalid(
                "this UNet has no added conditioning (`addition_embed_type` is not set): pooled embeddings and time \
                 ids are for SDXL-style UNets",
            )),
            (Some(embedding), Some(config), Some(pooled), Some(time_ids)) => {
                let b = timesteps.dim(0)?;
                let n = time_ids.dim(1)?;
                let ids =
                    timestep_embedding(&time_ids.flatten_all()?, config.time_id_dim, c.flip_sin_to_cos, c.freq_shift)?;
                let ids = ids.reshape((b, n * config.time_id_dim))?;
                let input = Tensor::cat(&[&pooled.to_dtype(DType::F32)?, &ids], 1)?;
                if input.dim(1)? != config.input_dim {
                    return Err(Error::invalid(format!(
                        "the UNet's add_embedding takes {} values (projection_class_embeddings_input_dim), got pooled \
                         embeddings of width {} and {n} time ids of {} each",
                        config.input_dim,
                        pooled.dim(1)?,
                        config.time_id_dim
                    )));
                }
                Ok((temb + embedding.forward(&input.to_dtype(dtype)?)?)?)
            }
            (Some(_), _, _, _) => Err(Error::invalid(
                "this SDXL-style UNet (`addition_embed_type: text_time`) needs pooled text embeddings and time ids",
            )),
        }
    }

    /// The ids of its hook points, in forward order: `conv_in`, then each down block's layers and the
    /// block itself, then the mid block's.
    pub fn hook_points(&self) -> Vec<String> {
        let mut ids = vec!["conv_in".to_string()];
        for block in &self.down_blocks {
            ids.extend(block.layers.iter().flat_map(|l| l.hook_points()));
            ids.push(block.id.clone());
        }
        ids.extend(self.mid_block.iter().flat_map(MidBlock::hook_points));
        ids
    }

    /// Runs `conv_in` on `sample` [B, C, h, w], the down blocks and the mid block with the pass's
    /// hooks. Intra-block residuals in the pass's controls are added where diffusers adds
    /// `down_intrablock_additional_residuals`. With `last_skip`, stops once that skip connection (0:
    /// `conv_in`'s output) is final: the output then holds skips `0..=last_skip` and, as `hidden`,
    /// the last of them.
    pub(crate) fn forward(
        &self,
        sample: &Tensor,
        pass: &mut LayerPass,
        last_skip: Option<usize>,
    ) -> Result<EncoderOutput> {
        let ch = sample.dim(1)?;
        if ch != self.config.in_channels {
            return Err(Error::invalid(format!(
                "the UNet expects {} input channels (latents and any extra condition channels), got {ch}",
                self.config.in_channels
            )));
        }
        let sample = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let mut xs = pass.output("conv_in", self.conv_in.forward(&sample)?)?;
        let mut skips = vec![xs.clone()];
        let reached = |skips: &[Tensor]| last_skip.is_some_and(|last| skips.len() > last);
        if reached(&skips) {
            return Ok(EncoderOutput { hidden: xs, skips });
        }
        let controls = pass.controls;
        let mut intrablock = controls.down_intrablock_residuals.iter();
        for block in &self.down_blocks {
            let count = block.layers.len();
            for (j, layer) in block.layers.iter().enumerate() {
                xs = layer.forward(&xs, pass)?;
                if block.has_attention
                    && j + 1 == count
                    && let Some(r) = intrablock.next()
                {
                    xs = xs.broadcast_add(r)?;
                }
                skips.push(xs.clone());
                // The block's last skip may still take a plain block's residual below.
                let block_last = j + 1 == count && block.downsample.is_none();
                if !block_last && reached(&skips) {
                    return Ok(EncoderOutput { hidden: xs, skips });
                }
            }
            if let Some(down) = &block.downsample {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
            xs = pass.output(&block.id, xs)?;
            if !block.has_attention
                && let Some(r) = intrablock.next()
            {
                // diffusers adds in place, so the block's last skip sees the residual too.
                xs = xs.broadcast_add(r)?;
            }
            *skips.last_mut().expect("skips is never empty") = xs.clone();
            if reached(&skips) {
                return Ok(EncoderOutput { hidden: xs, skips });
            }
        }
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, pass)?;
            if let Some(r) = intrablock.next()
                && r.dims() == xs.dims()
            {
                xs = (xs + r)?;
            }
        }
        Ok(EncoderOutput { hidden: xs, skips })
    }
}
