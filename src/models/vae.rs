//! `AutoencoderKL`: the VAE that maps images to latents and back.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use serde::Deserialize;

use super::attention::scaled_dot_product;
use super::nn::{Conv2d, Linear, conv2d, group_norm, linear};
use super::resnet::{Downsample, ResnetBlock, ResnetSpec, Upsample};
use super::vae_tiling::Tiling;
use crate::allocator::LargeBlockCache;
use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;
use crate::kernels::transpose::transpose_last_two;
use crate::{Error, Result};

/// Freed activations the decoder keeps for reuse while it runs (see [`LargeBlockCache`]): at 512x512
/// they are 32–256 MB each, in a handful of sizes, and mapping them afresh had the kernel zeroing
/// pages for a sixth of the decode; this much covers every size of a 512x512 decode.
const DECODE_BLOCK_CACHE: usize = 2 << 30;

/// The fields of a diffusers `AutoencoderKL` `config.json` that change the math.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "d3")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "d3")]
    pub out_channels: usize,
    /// Encoder block types (all `DownEncoderBlock2D`).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block types (all `UpDecoderBlock2D`).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    /// Activation (only `silu`).
    #[serde(default = "dsilu")]
    pub act_fn: String,
    /// Latent channels.
    #[serde(default = "d4")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided before decoding.
    #[serde(default = "dscale")]
    pub scaling_factor: f64,
    /// Subtracted after encoding (before scaling) and added back before decoding, when set.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Run in f32 when the model runs in f16 (SDXL's VAE overflows f16), as diffusers does.
    #[serde(default = "dtrue")]
    pub force_upcast: bool,
    /// Whether `quant_conv` exists.
    #[serde(default = "dtrue")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "dtrue")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    #[serde(default = "dtrue")]
    pub mid_block_add_attention: bool,
    /// Image size the VAE was trained at (the first entry when the config gives a list); tiled
    /// decoding cuts latents into tiles of `sample_size / scale_factor`.
    #[serde(default = "d32", deserialize_with = "int_or_first_of_list")]
    pub sample_size: usize,
    /// No autoencoder: the model works in pixel space and its latents are the images (see
    /// [`VaeConfig::pixels`]).
    #[serde(skip)]
    pub pixel_space: bool,
}

/// Reads `32` or `[32, 32]` as 32, as diffusers reads `sample_size`.
fn int_or_first_of_list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrList {
        Int(usize),
        List(Vec<usize>),
    }
    match IntOrList::deserialize(d)? {
        IntOrList::Int(n) => Ok(n),
        IntOrList::List(l) => {
            l.first().copied().ok_or_else(|| serde::de::Error::custom("sample_size is an empty list"))
        }
    }
}

fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn dscale() -> f64 {
    0.18215
}
fn dtrue() -> bool {
    true
}
fn dsilu() -> String {
    "silu".into()
}

/// The most blocks a VAE config may declare.
const MAX_BLOCKS: usize = 8;
/// The largest width or count a VAE config may declare.
const MAX_SIZE: usize = 1 << 20;

impl VaeConfig {
    /// Reads and validates a VAE `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let c: Self = crate::io::read_json(path)?;
        let n = c.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(path, "block_out_channels is empty"));
        }
        // Real VAEs have 4 blocks of at most 512 channels; the bounds keep the size arithmetic (a
        // factor of 2 per block) from overflowing on a hostile config.
        if n > MAX_BLOCKS {
            return Err(Error::config(path, format!("{n} blocks in block_out_channels (at most {MAX_BLOCKS})")));
        }
        let sizes = c.block_out_channels.iter().chain([&c.latent_channels, &c.layers_per_block, &c.sample_size]);
        if let Some(v) = sizes.into_iter().find(|&&v| v > MAX_SIZE) {
            return Err(Error::config(path, format!("a width or count of {v} is not plausible (at most {MAX_SIZE})")));
        }
        if c.act_fn != "silu" {
            return Err(Error::config(path, format!("unsupported VAE act_fn {:?}", c.act_fn)));
        }
        for (field, types, expected) in [
            ("down_block_types", &c.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &c.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !types.is_empty() && (types.len() != n || types.iter().any(|t| t != expected)) {
                return Err(Error::config(
                    path,
                    format!("unsupported VAE {field} {types:?} (expected {n} × {expected})"),
                ));
            }
        }
        if !(c.scaling_factor.is_finite() && c.scaling_factor > 0.0) {
            return Err(Error::config(path, format!("scaling_factor {} must be a positive number", c.scaling_factor)));
        }
        if c.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err(Error::config(path, "shift_factor must be a finite number"));
        }
        if c.norm_num_groups == 0 {
            return Err(Error::config(path, "norm_num_groups must be at least 1"));
        }
        if let Some(ch) = c.block_out_channels.iter().find(|ch| *ch % c.norm_num_groups != 0) {
            return Err(Error::config(
                path,
                format!("block_out_channels entry {ch} is not divisible by norm_num_groups = {}", c.norm_num_groups),
            ));
        }
        Ok(c)
    }

    /// The "autoencoder" of a pixel-space model (a diffusers folder whose `model_index.json` lists
    /// its `vae` as `[null, null]`): the identity on RGB images in [-1, 1], scale factor 1, no
    /// scaling.
    pub fn pixels() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: Vec::new(),
            up_block_types: Vec::new(),
            block_out_channels: vec![3],
            layers_per_block: 0,
            act_fn: dsilu(),
            latent_channels: 3,
            norm_num_groups: 1,
            scaling_factor: 1.0,
            shift_factor: None,
            force_upcast: false,
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: false,
            sample_size: d32(),
            pixel_space: true,
        }
    }

    /// How much smaller latents are than images (2 per down-sampling block).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Single-head self-attention over pixels with a GroupNorm, as in the VAE mid block.
#[derive(Debug)]
struct PixelAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    /// The dtype of the layer weights (see [`scaled_dot_product`]).
    layer_dtype: DType,
}

impl PixelAttention {
    fn load(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 name the projections query/key/value/proj_attn.
        let legacy = !w.contains("to_q.weight") && w.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            norm: group_norm(&w.pp("group_norm"), groups, channels, 1e-6)?,
            q: linear(&w.pp(name("to_q", "query")), channels, channels, true)?,
            k: linear(&w.pp(name("to_k", "key")), channels, channels, true)?,
            v: linear(&w.pp(name("to_v", "value")), channels, channels, true)?,
            out: linear(&w.pp(name("to_out.0", "proj_attn")), channels, channels, true)?,
            layer_dtype: w.layer_dtype(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = transpose_last_two(&self.norm.forward(xs)?.reshape((b, c, h * w))?)?;
        let heads = |t: Tensor| -> Result<Tensor> { Ok(t.unsqueeze(1)?) };
        let q = heads(self.q.forward(&tokens)?)?;
        let k = heads(self.k.forward(&tokens)?)?;
        let v = heads(self.v.forward(&tokens)?)?;
        let attn = scaled_dot_product(&q, &k, &v, (c as f64).powf(-0.5), None, true, self.layer_dtype)?.squeeze(1)?;
        let out = transpose_last_two(&self.out.forward(&attn)?)?.reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// Resnet, optional attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnet_1: ResnetBlock,
    attention: Option<PixelAttention>,
    resnet_2: ResnetBlock,
}

impl MidBlock {
    fn load(w: &Weights, channels: usize, c: &VaeConfig) -> Result<Self> {
        let spec = resnet_spec(channels, channels, c);
        Ok(Self {
            resnet_1: ResnetBlock::load(&w.pp("resnets.0"), spec)?,
            attention: c
                .mid_block_add_attention
                .then(|| PixelAttention::load(&w.pp("attentions.0"), channels, c.norm_num_groups))
                .transpose()?,
            resnet_2: ResnetBlock::load(&w.pp("resnets.1"), spec)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_1.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            xs = attn.forward(&xs)?;
        }
        self.resnet_2.forward(&xs, None)
    }
}

fn resnet_spec(cin: usize, cout: usize, c: &VaeConfig) -> ResnetSpec {
    ResnetSpec {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups: c.norm_num_groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

/// GroupNorm → SiLU → conv head shared by encoder and decoder.
#[derive(Debug)]
struct OutputHead {
    norm: GroupNorm,
    conv: Conv2d,
}

impl OutputHead {
    fn load(w: &Weights, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: group_norm(&w.pp("conv_norm_out"), groups, cin, 1e-6)?,
            conv: conv2d(&w.pp("conv_out"), cin, cout, 3, 1, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(&self.norm.forward_silu(xs)?)?)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    head: OutputHead,
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    head: OutputHead,
}

/// The networks of an `AutoencoderKL`.
#[derive(Debug)]
struct Autoencoder {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

/// The VAE with both halves loaded, or the identity of a pixel-space model.
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    /// `None` in pixel space.
    autoencoder: Option<Autoencoder>,
    tiling: Option<Tiling>,
    /// The dtype it computes in; inputs are converted to it.
    dtype: candle_core::DType,
}

impl Autoencoder {
    /// Loads the encoder and decoder with diffusers key names.
    fn load(w: &Weights, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let lc = c.latent_channels;

        let ew = w.pp("encoder");
        let mut blocks = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bw = ew.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        &bw.pp(format!("resnets.{j}")),
                        resnet_spec(if j == 0 { cin } else { cout }, cout, c),
                    )
                })
                .collect::<Result<_>>()?;
            let down = (i + 1 < n).then(|| Downsample::load(&bw.pp("downsamplers.0"), cout, cout, 0)).transpose()?;
            blocks.push((resnets, down));
            cin = cout;
        }
        let encoder = Encoder {
            conv_in: conv2d(&ew.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(&ew.pp("mid_block"), ch[n - 1], c)?,
            head: OutputHead::load(&ew, ch[n - 1], 2 * lc, c.norm_num_groups)?,
        };

        let dw = w.pp("decoder");
        let mut blocks = Vec::with_capacity(n);
        let mut prev = ch[n - 1];
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let bw = dw.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        &bw.pp(format!("resnets.{j}")),
                        resnet_spec(if j == 0 { prev } else { cout }, cout, c),
                    )
                })
                .collect::<Result<_>>()?;
            let up = (i + 1 < n).then(|| Upsample::load(&bw.pp("upsamplers.0"), cout, cout)).transpose()?;
            blocks.push((resnets, up));
            prev = cout;
        }
        let decoder = Decoder {
            conv_in: conv2d(&dw.pp("conv_in"), lc, ch[n - 1], 3, 1, 1)?,
            mid: MidBlock::load(&dw.pp("mid_block"), ch[n - 1], c)?,
            blocks,
            head: OutputHead::load(&dw, ch[0], c.out_channels, c.norm_num_groups)?,
        };
        Ok(Self {
            encoder,
            quant_conv: c.use_quant_conv.then(|| conv2d(&w.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)).transpose()?,
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| conv2d(&w.pp("post_quant_conv"), lc, lc, 1, 1, 0))
                .transpose()?,
            decoder,
        })
    }
}

impl Vae {
    /// Loads an `AutoencoderKL` with diffusers key names from `w` (nothing for
    /// [`VaeConfig::pixels`]).
    pub fn load(w: &Weights, config: &VaeConfig) -> Result<Self> {
        let autoencoder = (!config.pixel_space).then(|| Autoencoder::load(w, config)).transpose()?;
        Ok(Self {
            config: config.clone(),
            autoencoder,
            tiling: None,
            dtype: crate::io::weights::precision(w.dtype(), w.device()).0,
        })
    }

    /// Decodes in overlapping tiles from now on (diffusers' `enable_tiling`), bounding the decoder's
    /// memory whatever the image size; `tile_pixels` overrides the tile side (default: the config's
    /// `sample_size`).
    pub fn enable_tiling(&mut self, tile_pixels: Option<usize>) -> Result<()> {
        let pixels = tile_pixels.unwrap_or(self.config.sample_size);
        self.tiling = Some(Tiling::new(pixels, self.config.scale_factor())?);
        Ok(())
    }

    /// Decodes in one pass again.
    pub fn disable_tiling(&mut self) {
        self.tiling = None;
    }

    /// The model's configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The latent distribution of `images` [B, 3, H, W] in [-1, 1]: mean and log-variance, each
    /// [B, lc, H/f, W/f] (unscaled, as diffusers' `latent_dist`); in pixel space the images
    /// themselves, with no spread.
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let images = images.to_dtype(self.dtype)?;
        let Some(a) = &self.autoencoder else {
            return Ok(LatentDistribution { mean: images, logvar: None });
        };
        let e = &a.encoder;
        let mut xs = e.conv_in.forward(&images)?;
        for (resnets, down) in &e.blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = down {
                xs = d.forward(&xs)?;
            }
        }
        let mut moments = e.head.forward(&e.mid.forward(&xs)?)?;
        if let Some(q) = &a.quant_conv {
            moments = q.forward(&moments)?;
        }
        let lc = self.config.latent_channels;
        Ok(LatentDistribution { mean: moments.narrow(1, 0, lc)?, logvar: Some(moments.narrow(1, lc, lc)?) })
    }

    /// Diffusion latents of images [B, 3, H, W] in [-1, 1]: a sample of their latent distribution
    /// drawn with `noise`, shifted and scaled as the pipelines do (`(z − shift) · scaling_factor`).
    pub fn encode_to_latents(&self, images: &Tensor, noise: &mut dyn crate::schedulers::NoiseSource) -> Result<Tensor> {
        let dist = self.encode(images)?;
        let eps = noise.sample(dist.mean.dims(), dist.mean.device())?;
        self.scale_latents(&dist.sample(&eps)?)
    }

    /// Diffusion latents of images [B, 3, H, W] in [-1, 1]: the mean of their latent distribution
    /// (deterministic), shifted and scaled as [`Self::encode_to_latents`]; f32.
    pub fn encode_mean_latents(&self, images: &Tensor) -> Result<Tensor> {
        self.scale_latents(&self.encode(images)?.mean.to_dtype(candle_core::DType::F32)?)
    }

    /// `(z − shift) · scaling_factor`.
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        Ok(((z - c.shift_factor.unwrap_or(0.0))? * c.scaling_factor)?)
    }

    /// Decodes raw latents [B, lc, h, w] (already divided by the scaling factor) to images
    /// [B, 3, h·f, w·f] in about [-1, 1], in tiles when tiling is on and the latents exceed one tile.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _reuse = LargeBlockCache::keep_up_to(DECODE_BLOCK_CACHE);
        match &self.tiling {
            Some(tiling) => tiling.decode(latents, |tile| self.decode_whole(tile)),
            None => self.decode_whole(latents),
        }
    }

    /// Decodes all of `latents` in one pass.
    fn decode_whole(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = latents.to_dtype(self.dtype)?;
        let Some(a) = &self.autoencoder else {
            return Ok(latents);
        };
        let d = &a.decoder;
        let z = match &a.post_quant_conv {
            Some(p) => p.forward(&latents)?,
            None => latents,
        };
        let mut xs = d.mid.forward(&d.conv_in.forward(&z)?)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = up {
                let (_, _, h, w) = xs.dims4()?;
                xs = u.forward(&xs, (2 * h, 2 * w))?;
            }
        }
        d.head.forward(&xs)
    }

    /// Decodes diffusion latents (scaled by `scaling_factor`, shifted by `shift_factor`) to images
    /// in [0, 1], as the pipelines' post-processing does.
    pub fn decode_to_unit_range(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let z = ((latents / c.scaling_factor)? + c.shift_factor.unwrap_or(0.0))?;
        Ok(((self.decode(&z)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// A diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// Mean [B, lc, h, w].
    pub mean: Tensor,
    /// Log-variance [B, lc, h, w], as the encoder gives it; `None` for the point mass of a
    /// pixel-space model.
    pub logvar: Option<Tensor>,
}

impl LatentDistribution {
    /// `mean + std · noise`, with the log-variance clamped to [-30, 20] as diffusers does; `noise`
    /// is standard normal, any dtype, the mean's shape. F32.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let mean = self.mean.to_dtype(candle_core::DType::F32)?;
        let Some(logvar) = &self.logvar else {
            return Ok(mean);
        };
        let std = (logvar.to_dtype(candle_core::DType::F32)?.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        Ok((mean + std.mul(&noise.to_dtype(candle_core::DType::F32)?)?)?)
    }
}
