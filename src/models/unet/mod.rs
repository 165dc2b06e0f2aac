//! `UNet2DConditionModel` for SD1.x/2.x with named injection points ([`UNetControls`]) and one
//! timestep per sample.

pub mod config;
pub mod controls;
pub mod transformer;

use candle_core::{DType, Module, Tensor};
use candle_nn::GroupNorm;

pub use config::UNetConfig;
pub use controls::{ExtraAttention, UNetControls};
use transformer::{Transformer2D, TransformerSpec};

use super::nn::{Conv2d, Linear, conv2d, group_norm, linear};
use super::resnet::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use crate::io::weights::Weights;
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
pub struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimeEmbedding {
    /// Loads `linear_1` and `linear_2` under `w`.
    pub fn load(w: &Weights, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&w.pp("linear_1"), in_dim, dim, true)?,
            linear_2: linear(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    /// [B, in_dim] → [B, dim].
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)?)
    }
}

/// One resnet followed, in attention blocks, by a spatial transformer.
#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock,
    attention: Option<Transformer2D>,
}

impl Layer {
    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor, controls: &UNetControls) -> Result<Tensor> {
        let xs = self.resnet.forward(xs, Some(temb))?;
        match &self.attention {
            Some(attn) => attn.forward(&xs, context, controls),
            None => Ok(xs),
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Downsample>,
    has_attention: bool,
}

#[derive(Debug)]
struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Upsample>,
}

#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock,
    rest: Vec<(Transformer2D, ResnetBlock)>,
}

/// Loads the resnet (and transformer) of layer `j` of a block stored under `w` with module path `id`.
struct LayerLoader<'a> {
    config: &'a UNetConfig,
    w: &'a Weights,
    id: &'a str,
}

impl LayerLoader<'_> {
    fn layer(&self, j: usize, cin: usize, block: &config::BlockConfig, attention: bool, scale: f64) -> Result<Layer> {
        let c = self.config;
        let resnet = ResnetBlock::load(
            &self.w.pp(format!("resnets.{j}")),
            ResnetSpec {
                in_channels: cin,
                out_channels: block.channels,
                temb_channels: Some(c.time_embed_dim),
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                output_scale_factor: scale,
            },
        )?;
        let attention = attention.then(|| self.transformer(j, block)).transpose()?;
        Ok(Layer { resnet, attention })
    }

    fn transformer(&self, j: usize, block: &config::BlockConfig) -> Result<Transformer2D> {
        let c = self.config;
        Transformer2D::load(
            &self.w.pp(format!("attentions.{j}")),
            &format!("{}.attentions.{j}", self.id),
            TransformerSpec {
                channels: block.channels,
                heads: block.heads,
                layers: block.transformer_layers,
                context_dim: block.cross_attention_dim,
                groups: c.norm_num_groups,
                use_linear_projection: c.use_linear_projection,
                only_cross_attention: block.only_cross_attention,
                upcast_attention: c.upcast_attention,
            },
        )
    }
}

/// The conditional UNet: noisy latents, per-sample timesteps and a text context in, noise (or v)
/// prediction out, with control mechanisms contributing through [`UNetControls`].
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimeEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Loads a UNet with diffusers key names from `w`.
    pub fn load(w: &Weights, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.blocks.len();
        let ch0 = c.blocks[0].channels;
        let conv_in = conv2d(&w.pp("conv_in"), c.in_channels, ch0, c.conv_in_kernel, 1, c.conv_in_kernel / 2)?;
        let time_embedding = TimeEmbedding::load(&w.pp("time_embedding"), ch0, c.time_embed_dim)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut cin = ch0;
        for (i, block) in c.blocks.iter().enumerate() {
            let (bw, id) = (w.pp(format!("down_blocks.{i}")), format!("down_blocks.{i}"));
            let loader = LayerLoader { config: c, w: &bw, id: &id };
            let layers = (0..block.layers)
                .map(|j| {
                    loader.layer(
                        j,
                        if j == 0 { cin } else { block.channels },
                        block,
                        block.has_attention,
                        c.resnet_out_scale_factor,
                    )
                })
                .collect::<Result<_>>()?;
            let downsample = (i + 1 < n)
                .then(|| {
                    Downsample::load(&bw.pp("downsamplers.0"), block.channels, block.channels, c.downsample_padding)
                })
                .transpose()?;
            down_blocks.push(DownBlock { layers, downsample, has_attention: block.has_attention });
            cin = block.channels;
        }

        let last = &c.blocks[n - 1];
        let mid_block = if c.has_mid_block {
            let (mw, id) = (w.pp("mid_block"), "mid_block".to_string());
            let loader = LayerLoader { config: c, w: &mw, id: &id };
            let mid = config::BlockConfig { layers: 1, ..last.clone() };
            let resnet =
                |j: usize| loader.layer(j, last.channels, &mid, false, c.mid_block_scale_factor).map(|l| l.resnet);
            Some(MidBlock { first: resnet(0)?, rest: vec![(loader.transformer(0, &mid)?, resnet(1)?)] })
        } else {
            None
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = last.channels;
        for i in 0..n {
            let block = &c.blocks[n - 1 - i];
            let skip_in = c.blocks[(n - 1 - i).saturating_sub(1)].channels;
            let (bw, id) = (w.pp(format!("up_blocks.{i}")), format!("up_blocks.{i}"));
            let loader = LayerLoader { config: c, w: &bw, id: &id };
            let layers = (0..=block.layers)
                .map(|j| {
                    let skip = if j == block.layers { skip_in } else { block.channels };
                    let resnet_in = if j == 0 { prev } else { block.channels };
                    loader.layer(j, resnet_in + skip, block, c.up_has_attention[i], c.resnet_out_scale_factor)
                })
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < n)
                .then(|| Upsample::load(&bw.pp("upsamplers.0"), block.channels, block.channels))
                .transpose()?;
            up_blocks.push(UpBlock { layers, upsample });
            prev = block.channels;
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            norm_out: group_norm(&w.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?,
            conv_out: conv2d(&w.pp("conv_out"), ch0, c.out_channels, c.conv_out_kernel, 1, c.conv_out_kernel / 2)?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// How many skip connections the down path produces (the length of
    /// [`UNetControls::down_residuals`]).
    pub fn num_skips(&self) -> usize {
        1 + self.down_blocks.iter().map(|b| b.layers.len() + usize::from(b.downsample.is_some())).sum::<usize>()
    }

    /// The time embedding [B, time_embed_dim] of per-sample `timesteps` [B].
    pub fn embed_time(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let c = &self.config;
        let t =
            timestep_embedding(timesteps, c.blocks[0].channels, c.flip_sin_to_cos, c.freq_shift)?.to_dtype(dtype)?;
        self.time_embedding.forward(&t)
    }

    /// Predicts noise (or v) for `sample` [B, C, h, w] at `timesteps` [B] (one per sample) given
    /// `context` [B, S, D], with the contributions of control mechanisms in `controls`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        controls: &UNetControls,
    ) -> Result<Tensor> {
        let (b, ch, _, _) = sample.dims4()?;
        if ch != self.config.in_channels {
            return Err(Error::invalid(format!("UNet expects {} latent channels, got {ch}", self.config.in_channels)));
        }
        if timesteps.dims() != [b] {
            return Err(Error::invalid(format!(
                "UNet expects one timestep per sample ({b}), got shape {:?}",
                timesteps.dims()
            )));
        }
        let dtype = sample.dtype();
        let temb = self.embed_time(timesteps, dtype)?;
        let sample = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };

        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        let mut intrablock = controls.down_intrablock_residuals.iter();
        for block in &self.down_blocks {
            let count = block.layers.len();
            for (j, layer) in block.layers.iter().enumerate() {
                xs = layer.forward(&xs, &temb, context, controls)?;
                if block.has_attention
                    && j + 1 == count
                    && let Some(r) = intrablock.next()
                {
                    xs = (xs + r)?;
                }
                skips.push(xs.clone());
            }
            if let Some(down) = &block.downsample {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
            if !block.has_attention
                && let Some(r) = intrablock.next()
            {
                // diffusers adds in place, so the block's last skip sees the residual too.
                xs = (xs + r)?;
                *skips.last_mut().expect("skips is never empty") = xs.clone();
            }
        }

        if let Some(residuals) = &controls.down_residuals {
            if residuals.len() != skips.len() {
                return Err(Error::invalid(format!(
                    "control gave {} down residuals, the UNet has {} skip connections",
                    residuals.len(),
                    skips.len()
                )));
            }
            skips = skips.iter().zip(residuals).map(|(s, r)| Ok((s + r)?)).collect::<Result<_>>()?;
        }

        if let Some(mid) = &self.mid_block {
            xs = mid.first.forward(&xs, Some(&temb))?;
            for (attn, resnet) in &mid.rest {
                xs = resnet.forward(&attn.forward(&xs, context, controls)?, Some(&temb))?;
            }
            if let Some(r) = intrablock.next()
                && r.dims() == xs.dims()
            {
                xs = (xs + r)?;
            }
        }
        if let Some(r) = &controls.mid_residual {
            xs = (xs + r)?;
        }

        for block in &self.up_blocks {
            for layer in &block.layers {
                let skip = skips.pop().ok_or_else(|| Error::invalid("UNet skip connections exhausted"))?;
                xs = layer.forward(&Tensor::cat(&[&xs, &skip], 1)?, &temb, context, controls)?;
            }
            if let Some(up) = &block.upsample {
                let target = skips.last().ok_or_else(|| Error::invalid("UNet skip connections exhausted"))?;
                let (_, _, h, w) = target.dims4()?;
                xs = up.forward(&xs, (h, w))?;
            }
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
