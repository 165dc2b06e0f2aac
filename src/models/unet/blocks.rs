//! The UNet's blocks (diffusers' `CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`), shared by the UNet and the ControlNet.

use candle_core::Tensor;

use super::config::{BlockConfig, UNetConfig};
use super::input::LayerPass;
use super::transformer::{Transformer2D, TransformerSpec};
use crate::Result;
use crate::io::weights::Weights;
use crate::models::resnet::{Downsample, ResnetBlock, ResnetSpec, Upsample};

/// One resnet followed, in attention blocks, by a spatial transformer.
#[derive(Debug)]
pub(crate) struct Layer {
    /// The resnet's module path, e.g. `down_blocks.0.resnets.1`.
    resnet_id: String,
    resnet: ResnetBlock,
    attention: Option<Transformer2D>,
}

impl Layer {
    /// xs [B, Cin, H, W] → [B, C, H, W] through the resnet and the transformer, with the pass's hooks.
    pub(crate) fn forward(&self, xs: &Tensor, pass: &mut LayerPass) -> Result<Tensor> {
        let xs = self.resnet.forward(xs, Some(&pass.temb))?;
        let xs = pass.output(&self.resnet_id, xs)?;
        match &self.attention {
            Some(attn) => attn.forward(&xs, pass),
            None => Ok(xs),
        }
    }

    /// The ids of its hook points.
    pub(crate) fn hook_points(&self) -> Vec<String> {
        let mut ids = vec![self.resnet_id.clone()];
        ids.extend(self.attention.iter().flat_map(Transformer2D::hook_points));
        ids
    }
}

/// A down block: layers, then an optional strided-conv downsampler.
#[derive(Debug)]
pub(crate) struct DownBlock {
    /// The module path, `down_blocks.{i}`.
    pub(crate) id: String,
    pub(crate) layers: Vec<Layer>,
    pub(crate) downsample: Option<Downsample>,
    pub(crate) has_attention: bool,
}

/// An up block: layers that each take one skip connection, then an optional upsampler.
#[derive(Debug)]
pub(crate) struct UpBlock {
    /// The module path, `up_blocks.{i}`.
    pub(crate) id: String,
    pub(crate) layers: Vec<Layer>,
    pub(crate) upsample: Option<Upsample>,
}

/// Resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
pub(crate) struct MidBlock {
    /// The module path, `mid_block`.
    id: String,
    /// The resnets' module paths, `mid_block.resnets.{j}`.
    resnet_ids: Vec<String>,
    first: ResnetBlock,
    rest: Vec<(Transformer2D, ResnetBlock)>,
}

impl MidBlock {
    /// xs [B, C, h, w] → [B, C, h, w], with the pass's hooks (the block's output included).
    pub(crate) fn forward(&self, xs: &Tensor, pass: &mut LayerPass) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, Some(&pass.temb))?;
        xs = pass.output(&self.resnet_ids[0], xs)?;
        for ((attn, resnet), id) in self.rest.iter().zip(&self.resnet_ids[1..]) {
            xs = resnet.forward(&attn.forward(&xs, pass)?, Some(&pass.temb))?;
            xs = pass.output(id, xs)?;
        }
        pass.output(&self.id, xs)
    }

    /// The ids of its hook points.
    pub(crate) fn hook_points(&self) -> Vec<String> {
        let mut ids = vec![self.id.clone()];
        ids.extend(self.resnet_ids.iter().cloned());
        ids.extend(self.rest.iter().flat_map(|(attn, _)| attn.hook_points()));
        ids
    }
}

/// Loads the layers of one block stored under `w`, whose diffusers module path is `id`.
pub(crate) struct BlockLoader<'a> {
    pub(crate) config: &'a UNetConfig,
    pub(crate) w: Weights,
    pub(crate) id: String,
}

impl BlockLoader<'_> {
    fn resnet(&self, j: usize, cin: usize, channels: usize, scale: f64) -> Result<ResnetBlock> {
        let c = self.config;
        ResnetBlock::load(
            &self.w.pp(format!("resnets.{j}")),
            ResnetSpec {
                in_channels: cin,
                out_channels: channels,
                temb_channels: Some(c.time_embed_dim),
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                output_scale_factor: scale,
            },
        )
    }

    /// The transformer of layer `j` of `block`.
    pub(crate) fn transformer(&self, j: usize, block: &BlockConfig) -> Result<Transformer2D> {
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

    /// Layer `j` of `block` taking `cin` channels, with a transformer when `attention`.
    pub(crate) fn layer(&self, j: usize, cin: usize, block: &BlockConfig, attention: bool) -> Result<Layer> {
        let resnet = self.resnet(j, cin, block.channels, self.config.resnet_out_scale_factor)?;
        let attention = attention.then(|| self.transformer(j, block)).transpose()?;
        Ok(Layer { resnet_id: format!("{}.resnets.{j}", self.id), resnet, attention })
    }

    /// Down block `block` taking `cin` channels; `last` blocks have no downsampler.
    pub(crate) fn down_block(&self, block: &BlockConfig, cin: usize, last: bool) -> Result<DownBlock> {
        let layers = (0..block.layers)
            .map(|j| self.layer(j, if j == 0 { cin } else { block.channels }, block, block.has_attention))
            .collect::<Result<_>>()?;
        let downsample = (!last)
            .then(|| {
                Downsample::load(
                    &self.w.pp("downsamplers.0"),
                    block.channels,
                    block.channels,
                    self.config.downsample_padding,
                )
            })
            .transpose()?;
        Ok(DownBlock { id: self.id.clone(), layers, downsample, has_attention: block.has_attention })
    }

    /// The mid block at the channels and heads of the last down block.
    pub(crate) fn mid_block(&self, last: &BlockConfig) -> Result<MidBlock> {
        let mid = BlockConfig { layers: 1, ..last.clone() };
        let scale = self.config.mid_block_scale_factor;
        let first = self.resnet(0, last.channels, last.channels, scale)?;
        let rest = vec![(self.transformer(0, &mid)?, self.resnet(1, last.channels, last.channels, scale)?)];
        let resnet_ids = (0..=rest.len()).map(|j| format!("{}.resnets.{j}", self.id)).collect();
        Ok(MidBlock { id: self.id.clone(), resnet_ids, first, rest })
    }

    /// Up block mirroring `block`: `prev` channels come from below, `skip_in` is the channel count
    /// of the skip its last layer takes.
    pub(crate) fn up_block(
        &self,
        block: &BlockConfig,
        prev: usize,
        skip_in: usize,
        attention: bool,
        last: bool,
    ) -> Result<UpBlock> {
        let layers = (0..=block.layers)
            .map(|j| {
                let skip = if j == block.layers { skip_in } else { block.channels };
                let resnet_in = if j == 0 { prev } else { block.channels };
                self.layer(j, resnet_in + skip, block, attention)
            })
            .collect::<Result<_>>()?;
        let upsample =
            (!last).then(|| Upsample::load(&self.w.pp("upsamplers.0"), block.channels, block.channels)).transpose()?;
        Ok(UpBlock { id: self.id.clone(), layers, upsample })
    }
}
