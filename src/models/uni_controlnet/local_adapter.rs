//! Uni-ControlNet's local adapter: a copy of the UNet's input half whose first resblock at each
//! level is modulated by multi-scale features of the concatenated condition maps (feature
//! denormalisation, FDN), with ControlNet-style zero convolutions on every skip and the mid block.

use candle_core::{Module, Tensor};

use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;
use crate::models::controlnet::ControlResiduals;
use crate::models::nn::{Conv2d, Linear, conv2d, linear};
use crate::models::resnet::Downsample;
use crate::models::unet::blocks::{BlockLoader, Layer, MidBlock};
use crate::models::unet::encoder::{TimeEmbedding, timestep_embedding};
use crate::models::unet::input::LayerPass;
use crate::models::unet::transformer::Transformer2D;
use crate::models::unet::{Hooks, UNetConfig, UNetControls};
use crate::{Error, Result};

/// GroupNorm groups of the parameter-free norm inside FDN (fixed in Uni-ControlNet).
pub const FDN_GROUPS: usize = 32;
/// Channels of the feature extractor's fixed convolution stack, before its per-level extractors;
/// the second and fourth convolutions have stride 2.
pub const PRE_EXTRACTOR_CHANNELS: [usize; 5] = [32, 64, 64, 128, 128];
/// How much larger than the latents the condition maps are (the stack's two stride-2 steps and
/// the first extractor's).
pub const CONDITION_SCALE: usize = 8;

/// A local adapter's structure.
#[derive(Debug, Clone)]
pub struct LocalAdapterConfig {
    /// The UNet input half it copies, with LDM's norms (32 groups, eps 1e-5) and timestep embedding.
    pub unet: UNetConfig,
    /// Channels of the concatenated condition maps (21 = 7 RGB maps in the public uni.ckpt).
    pub local_channels: usize,
    /// Channels of the feature maps, one per level from the first (192, 256, 384, 512 in uni.ckpt).
    pub inject_channels: Vec<usize>,
    /// The layer index within level i of the FDN resblock fed by feature map i, for each level
    /// that has one (LDM input blocks 1, 4, 7, 10 in uni.ckpt: the first layer of each level).
    pub inject_layers: Vec<usize>,
}

impl LocalAdapterConfig {
    /// The official `inject_layers` numbering: LDM input-block indices of the FDN resblocks.
    pub fn ldm_inject_layers(&self) -> Vec<usize> {
        let mut first = 1;
        let mut out = Vec::new();
        for (level, block) in self.unet.blocks.iter().enumerate() {
            if let Some(&layer) = self.inject_layers.get(level) {
                out.push(first + layer);
            }
            first += block.layers + 1;
        }
        out
    }
}

/// The feature extractor: a fixed convolution stack to a quarter of the condition size, then one
/// stride-2 convolution per level, each output through a 3x3 zero convolution.
#[derive(Debug)]
struct FeatureExtractor {
    pre: Vec<Conv2d>,
    extractors: Vec<Conv2d>,
    zero_convs: Vec<Conv2d>,
}

impl FeatureExtractor {
    fn load(w: &Weights, c: &LocalAdapterConfig) -> Result<Self> {
        let mut cin = c.local_channels;
        let mut pre = Vec::new();
        for (i, &cout) in PRE_EXTRACTOR_CHANNELS.iter().enumerate() {
            let stride = if i % 2 == 1 { 2 } else { 1 };
            pre.push(conv2d(&w.pp(format!("pre_extractor.{}", 2 * i)), cin, cout, 3, stride, 1)?);
            cin = cout;
        }
        let mut extractors = Vec::new();
        let mut zero_convs = Vec::new();
        for (i, &cout) in c.inject_channels.iter().enumerate() {
            extractors.push(conv2d(&w.pp(format!("extractors.{i}.0")), cin, cout, 3, 2, 1)?);
            zero_convs.push(conv2d(&w.pp(format!("zero_convs.{i}")), cout, cout, 3, 1, 1)?);
            cin = cout;
        }
        Ok(Self { pre, extractors, zero_convs })
    }

    /// Condition maps [B, local_channels, 8h, 8w] → one feature map per level, the i-th
    /// [B, inject_channels[i], h / 2^i, w / 2^i].
    fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = xs.clone();
        for conv in &self.pre {
            xs = candle_nn::ops::silu(&conv.forward(&xs)?)?;
        }
        let mut features = Vec::with_capacity(self.extractors.len());
        for (extractor, zero_conv) in self.extractors.iter().zip(&self.zero_convs) {
            xs = candle_nn::ops::silu(&extractor.forward(&xs)?)?;
            features.push(zero_conv.forward(&xs)?);
        }
        Ok(features)
    }
}

/// Feature denormalisation: a parameter-free GroupNorm whose output is scaled and shifted per
/// position by 3x3 convolutions of the level's condition features, `norm(x)·(1 + γ(f)) + β(f)`.
#[derive(Debug)]
struct Fdn {
    norm: GroupNorm,
    conv_gamma: Conv2d,
    conv_beta: Conv2d,
}

impl Fdn {
    fn load(w: &Weights, channels: usize, feature_channels: usize) -> Result<Self> {
        if !channels.is_multiple_of(FDN_GROUPS) {
            return Err(Error::invalid(format!(
                "{}: FDN normalises {channels} channels in {FDN_GROUPS} groups, which does not divide them",
                w.key("")
            )));
        }
        let ones = Tensor::ones(channels, w.dtype(), w.device())?;
        let zeros = Tensor::zeros(channels, w.dtype(), w.device())?;
        Ok(Self {
            norm: GroupNorm::new(ones, zeros, FDN_GROUPS, 1e-5)?,
            conv_gamma: conv2d(&w.pp("conv_gamma"), feature_channels, channels, 3, 1, 1)?,
            conv_beta: conv2d(&w.pp("conv_beta"), feature_channels, channels, 3, 1, 1)?,
        })
    }

    /// xs [B, C, H, W] modulated by features [B, F, H, W].
    fn forward(&self, xs: &Tensor, features: &Tensor) -> Result<Tensor> {
        let gamma = (self.conv_gamma.forward(features)? + 1.0)?;
        let beta = self.conv_beta.forward(features)?;
        Ok(self.norm.forward(xs)?.mul(&gamma)?.add(&beta)?)
    }
}

/// A resblock whose two norms are FDNs (Uni-ControlNet's `LocalResBlock`): stored like an LDM
/// resblock without `in_layers.0`/`out_layers.0`, plus `norm_in`/`norm_out`.
#[derive(Debug)]
struct LocalResBlock {
    norm_in: Fdn,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm_out: Fdn,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl LocalResBlock {
    /// Loads a block stored under `w` with the diffusers resnet names (`conv1`, `time_emb_proj`,
    /// `conv2`, `conv_shortcut`) plus `norm_in`/`norm_out`.
    fn load(w: &Weights, cin: usize, cout: usize, temb: usize, feature_channels: usize) -> Result<Self> {
        Ok(Self {
            norm_in: Fdn::load(&w.pp("norm_in"), cin, feature_channels)?,
            conv1: conv2d(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: linear(&w.pp("time_emb_proj"), temb, cout, true)?,
            norm_out: Fdn::load(&w.pp("norm_out"), cout, feature_channels)?,
            conv2: conv2d(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(conv2d(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
        })
    }

    /// xs [B, Cin, H, W], time embedding [B, T] and features [B, F, H, W] → [B, Cout, H, W].
    fn forward(&self, xs: &Tensor, temb: &Tensor, features: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&candle_nn::ops::silu(&self.norm_in.forward(xs, features)?)?)?;
        let t = self.time_emb_proj.forward(&candle_nn::ops::silu(temb)?)?;
        let h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm_out.forward(&h, features)?)?)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((skip + h)?)
    }
}

/// An FDN resblock (+ transformer) fed by feature map `feature`.
#[derive(Debug)]
struct LocalLayer {
    resnet: LocalResBlock,
    attention: Option<Transformer2D>,
    feature: usize,
}

/// One layer of the adapter's down path.
#[derive(Debug)]
enum AdapterLayer {
    /// A standard resnet (+ transformer) layer, as in the UNet.
    Plain(Box<Layer>),
    /// An FDN resblock layer.
    Local(Box<LocalLayer>),
}

/// One level: its layers and the downsampler after them (all but the last level).
#[derive(Debug)]
struct Level {
    layers: Vec<AdapterLayer>,
    downsample: Option<Downsample>,
}

/// A loaded local adapter.
#[derive(Debug)]
pub struct LocalAdapter {
    config: LocalAdapterConfig,
    time_embedding: TimeEmbedding,
    conv_in: Conv2d,
    feature_extractor: FeatureExtractor,
    levels: Vec<Level>,
    mid_block: MidBlock,
    zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
}

impl LocalAdapter {
    /// Loads the adapter from `w` under diffusers-style names: the UNet input half
    /// (`time_embedding`, `conv_in`, `down_blocks`, `mid_block`; FDN resblocks add `norm_in`/`norm_out`),
    /// `controlnet_down_blocks.N` / `controlnet_mid_block` for the zero convolutions, and
    /// `feature_extractor.*` as uni.ckpt names it.
    pub fn load(w: &Weights, config: &LocalAdapterConfig) -> Result<Self> {
        let c = &config.unet;
        let n = c.blocks.len();
        if !c.has_mid_block {
            return Err(Error::invalid("a Uni-ControlNet local adapter needs a UNet with a mid block"));
        }
        let fed = config.inject_layers.len();
        if fed > n || fed > config.inject_channels.len() {
            return Err(Error::invalid(format!(
                "Uni-ControlNet local adapter: {fed} FDN resblocks for {n} levels and {} feature maps",
                config.inject_channels.len()
            )));
        }
        let ch0 = c.blocks[0].channels;
        let mut levels = Vec::with_capacity(n);
        let mut cin = ch0;
        let mut skip_channels = vec![ch0];
        for (i, block) in c.blocks.iter().enumerate() {
            let id = format!("down_blocks.{i}");
            let loader = BlockLoader { config: c, w: w.pp(&id), id };
            let mut layers = Vec::with_capacity(block.layers);
            for j in 0..block.layers {
                let layer_in = if j == 0 { cin } else { block.channels };
                let layer = if config.inject_layers.get(i) == Some(&j) {
                    let resnet = LocalResBlock::load(
                        &loader.w.pp(format!("resnets.{j}")),
                        layer_in,
                        block.channels,
                        c.time_embed_dim,
                        config.inject_channels[i],
                    )?;
                    let attention = block.has_attention.then(|| loader.transformer(j, block)).transpose()?;
                    AdapterLayer::Local(Box::new(LocalLayer { resnet, attention, feature: i }))
                } else {
                    AdapterLayer::Plain(Box::new(loader.layer(j, layer_in, block, block.has_attention)?))
                };
                layers.push(layer);
                skip_channels.push(block.channels);
            }
            let downsample = (i + 1 < n)
                .then(|| {
                    Downsample::load(
                        &loader.w.pp("downsamplers.0"),
                        block.channels,
                        block.channels,
                        c.downsample_padding,
                    )
                })
                .transpose()?;
            if downsample.is_some() {
                skip_channels.push(block.channels);
            }
            levels.push(Level { layers, downsample });
            cin = block.channels;
        }
        let mid_block =
            BlockLoader { config: c, w: w.pp("mid_block"), id: "mid_block".into() }.mid_block(&c.blocks[n - 1])?;
        let zero_convs = skip_channels
            .iter()
            .enumerate()
            .map(|(i, &ch)| conv2d(&w.pp(format!("controlnet_down_blocks.{i}")), ch, ch, 1, 1, 0))
            .collect::<Result<_>>()?;
        let last = c.blocks[n - 1].channels;
        Ok(Self {
            config: config.clone(),
            time_embedding: TimeEmbedding::load(&w.pp("time_embedding"), ch0, c.time_embed_dim)?,
            conv_in: conv2d(&w.pp("conv_in"), c.in_channels, ch0, c.conv_in_kernel, 1, c.conv_in_kernel / 2)?,
            feature_extractor: FeatureExtractor::load(&w.pp("feature_extractor"), config)?,
            levels,
            mid_block,
            zero_convs,
            mid_zero_conv: conv2d(&w.pp("controlnet_mid_block"), last, last, 1, 1, 0)?,
        })
    }

    /// The adapter's structure.
    pub fn config(&self) -> &LocalAdapterConfig {
        &self.config
    }

    /// The condition features for maps `local` [B, local_channels, 8h, 8w]: one per level,
    /// [B, inject_channels[i], h / 2^i, w / 2^i].
    pub fn features(&self, local: &Tensor) -> Result<Vec<Tensor>> {
        let channels = local.dim(1)?;
        if channels != self.config.local_channels {
            return Err(Error::invalid(format!(
                "the local adapter takes {} condition channels, got {channels}",
                self.config.local_channels
            )));
        }
        self.feature_extractor.forward(local)
    }

    /// Residuals (unscaled) for `sample` [B, C, h, w] at `timesteps` [B] with `context` [B, S, D]
    /// (the text context with any global tokens) and the condition `features` made by
    /// [`Self::features`] from maps [B or 1, local_channels, 8h, 8w] (computed once per generation:
    /// the maps do not change between steps): one residual per UNet skip connection, then the mid
    /// block's.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        features: &[Tensor],
    ) -> Result<ControlResiduals> {
        let (b, _, h, w) = sample.dims4()?;
        let first = features.first().ok_or_else(|| Error::invalid("no local condition features"))?;
        let (_, _, fh, fw) = first.dims4()?;
        if (fh, fw) != (h, w) {
            return Err(Error::invalid(format!(
                "local condition maps are {}x{}, the latents ({w}x{h}) need {}x{}",
                fw * CONDITION_SCALE,
                fh * CONDITION_SCALE,
                w * CONDITION_SCALE,
                h * CONDITION_SCALE
            )));
        }
        let dtype = sample.dtype();
        let features = features
            .iter()
            .map(|f| Ok(if f.dim(0)? == b { f.to_dtype(dtype)? } else { f.to_dtype(dtype)?.repeat((b, 1, 1, 1))? }))
            .collect::<Result<Vec<_>>>()?;
        let c = &self.config.unet;
        let t = timestep_embedding(timesteps, c.blocks[0].channels, c.flip_sin_to_cos, c.freq_shift)?;
        let temb = self.time_embedding.forward(&t.to_dtype(dtype)?)?;
        let controls = UNetControls::default();
        let mut pass = LayerPass { temb, context, controls: &controls, hooks: Hooks::none() };
        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for level in &self.levels {
            for layer in &level.layers {
                xs = match layer {
                    AdapterLayer::Plain(layer) => layer.forward(&xs, &mut pass)?,
                    AdapterLayer::Local(layer) => {
                        let xs = layer.resnet.forward(&xs, &pass.temb, &features[layer.feature])?;
                        match &layer.attention {
                            Some(attn) => attn.forward(&xs, &mut pass)?,
                            None => xs,
                        }
                    }
                };
                skips.push(xs.clone());
            }
            if let Some(down) = &level.downsample {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
        }
        let hidden = self.mid_block.forward(&xs, &mut pass)?;
        let down = skips.iter().zip(&self.zero_convs).map(|(s, conv)| Ok(conv.forward(s)?)).collect::<Result<_>>()?;
        Ok(ControlResiduals { down, mid: self.mid_zero_conv.forward(&hidden)? })
    }
}
