//! `ControlNetModel`: a trainable copy of the UNet's input half that turns a condition image into
//! residuals for every skip connection and the mid block.

use std::path::Path;

use candle_core::{Module, Tensor};
use serde::Deserialize;

use super::nn::{Conv2d, conv2d};
use super::unet::input::LayerPass;
use super::unet::{Conditioning, EncoderOutput, Hooks, UNetConfig, UNetControls, UNetEncoder, UNetHook};
use crate::io::weights::Weights;
use crate::{Error, Result};

/// The ControlNet-only fields of its `config.json` (the rest is a UNet config).
#[derive(Debug, Clone, Deserialize)]
struct ExtraConfig {
    #[serde(default = "d3")]
    conditioning_channels: usize,
    #[serde(default = "dembed")]
    conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default = "drgb")]
    controlnet_conditioning_channel_order: String,
    #[serde(default)]
    global_pool_conditions: bool,
}

fn d3() -> usize {
    3
}
fn dembed() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn drgb() -> String {
    "rgb".into()
}

/// The fields diffusers' `ControlNetModel.from_unet` copies from the UNet's config.
const FROM_UNET_FIELDS: [&str; 27] = [
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
];

/// A validated ControlNet configuration.
#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    /// The input half it copies (block layout, heads, context width).
    pub unet: UNetConfig,
    /// Channels of the condition image.
    pub conditioning_channels: usize,
    /// Channels of the condition-embedding convolutions; each step after the first halves the size.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// The condition image arrives BGR and is flipped to RGB.
    pub bgr: bool,
    /// Residuals are averaged over space (the "shuffle" ControlNet); implies guess mode.
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    /// Reads and validates a ControlNet `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_json(&crate::io::read_text(path)?, path)
    }

    /// Parses and validates the `config.json` text `text`; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let unet = UNetConfig::from_json(text, path)?;
        let extra: ExtraConfig =
            crate::io::parse_json(text).map_err(|e| Error::config(path, format!("invalid JSON config: {e}")))?;
        let bgr = match extra.controlnet_conditioning_channel_order.as_str() {
            "rgb" => false,
            "bgr" => true,
            other => {
                return Err(Error::config(path, format!("unknown controlnet_conditioning_channel_order `{other}`")));
            }
        };
        if extra.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::config(path, "conditioning_embedding_out_channels is empty"));
        }
        Ok(Self {
            unet,
            conditioning_channels: extra.conditioning_channels,
            conditioning_embedding_out_channels: extra.conditioning_embedding_out_channels,
            bgr,
            global_pool_conditions: extra.global_pool_conditions,
        })
    }

    /// The config of a ControlNet copying the input half of `base`, with a condition embedding
    /// from `conditioning_channels` through `embedding_channels` (original ControlNet files carry
    /// no config of their own).
    pub fn for_base(base: &UNetConfig, conditioning_channels: usize, embedding_channels: Vec<usize>) -> Self {
        Self {
            unet: base.clone(),
            conditioning_channels,
            conditioning_embedding_out_channels: embedding_channels,
            bgr: false,
            global_pool_conditions: false,
        }
    }

    /// The `config.json` diffusers' `ControlNetModel.from_unet` writes for the UNet whose config is
    /// `unet_json`, with a condition embedding from `conditioning_channels` through
    /// `embedding_channels` (RGB order, no pooling).
    pub fn json_from_unet(
        unet_json: &serde_json::Value,
        conditioning_channels: usize,
        embedding_channels: &[usize],
    ) -> serde_json::Value {
        let mut config = serde_json::json!({
            "_class_name": "ControlNetModel",
            "conditioning_channels": conditioning_channels,
            "conditioning_embedding_out_channels": embedding_channels,
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": false,
        });
        for field in std::iter::once("_diffusers_version").chain(FROM_UNET_FIELDS) {
            if let Some(value) = unet_json.get(field) {
                config[field] = value.clone();
            }
        }
        config
    }

    /// Checks that a ControlNet of this config fits `unet`: same skip layout and context width.
    pub fn check_fits(&self, unet: &UNetConfig, name: &str) -> Result<()> {
        let mine = &self.unet;
        let layout = |c: &UNetConfig| c.blocks.iter().map(|b| (b.channels, b.layers)).collect::<Vec<_>>();
        if layout(mine) != layout(unet) {
            return Err(Error::invalid(format!(
                "{name}: an {} ControlNet, block layout (channels, layers) {:?}, does not fit the {} model's UNet {:?}",
                mine.family_name(),
                layout(mine),
                unet.family_name(),
                layout(unet)
            )));
        }
        let (a, b) = (mine.blocks[0].cross_attention_dim, unet.blocks[0].cross_attention_dim);
        if a != b {
            return Err(Error::invalid(format!(
                "{name}: an {} ControlNet with cross_attention_dim {a} does not match the {} model's {b}",
                mine.family_name(),
                unet.family_name()
            )));
        }
        Ok(())
    }

    /// How much smaller the residuals are than the condition image.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// The small conv net mapping the condition image to the first block's channels at latent size.
#[derive(Debug)]
struct ConditionEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditionEmbedding {
    fn load(w: &Weights, c: &ControlNetConfig) -> Result<Self> {
        let ch = &c.conditioning_embedding_out_channels;
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            blocks.push(conv2d(&w.pp(format!("blocks.{}", 2 * i)), ch[i], ch[i], 3, 1, 1)?);
            blocks.push(conv2d(&w.pp(format!("blocks.{}", 2 * i + 1)), ch[i], ch[i + 1], 3, 2, 1)?);
        }
        Ok(Self {
            conv_in: conv2d(&w.pp("conv_in"), c.conditioning_channels, ch[0], 3, 1, 1)?,
            blocks,
            conv_out: conv2d(&w.pp("conv_out"), ch[ch.len() - 1], c.unet.blocks[0].channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for block in &self.blocks {
            xs = candle_nn::ops::silu(&block.forward(&xs)?)?;
        }
        Ok(self.conv_out.forward(&xs)?)
    }
}

/// How a ControlNet's residuals are weighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResidualScale {
    /// Every residual times the scale.
    Uniform(f64),
    /// Guess mode: residual i of n+1 (the mid block last) times `scale · 10^(i/n − 1)`, rising
    /// from 0.1 at the first skip to 1 at the mid block.
    Guess(f64),
    /// sd-webui-controlnet's soft injection: residual i times `scale · 0.825^(12 − i)` (its
    /// 13 factors for SD1.x; an SDXL ControlNet's 10 residuals take the first 10).
    Soft(f64),
}

/// Residuals for a UNet: one per skip connection plus the mid block.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One per skip, in the UNet's order.
    pub down: Vec<Tensor>,
    /// For the mid block's output.
    pub mid: Tensor,
}

impl ControlResiduals {
    /// As UNet injections.
    pub fn into_controls(self) -> UNetControls {
        UNetControls { down_residuals: Some(self.down), mid_residual: Some(self.mid), ..Default::default() }
    }
}

/// A loaded ControlNet.
#[derive(Debug)]
pub struct ControlNet {
    config: ControlNetConfig,
    encoder: UNetEncoder,
    condition_embedding: ConditionEmbedding,
    zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
}

impl ControlNet {
    /// Loads a ControlNet with diffusers key names from `w`.
    pub fn load(w: &Weights, config: &ControlNetConfig) -> Result<Self> {
        let encoder = UNetEncoder::load(w, &config.unet)?;
        let c = &config.unet;
        let mut channels = vec![c.blocks[0].channels];
        for (i, block) in c.blocks.iter().enumerate() {
            channels.extend(std::iter::repeat_n(block.channels, block.layers));
            if i + 1 < c.blocks.len() {
                channels.push(block.channels);
            }
        }
        let zero_convs = channels
            .iter()
            .enumerate()
            .map(|(i, &ch)| conv2d(&w.pp(format!("controlnet_down_blocks.{i}")), ch, ch, 1, 1, 0))
            .collect::<Result<_>>()?;
        let last = c.blocks[c.blocks.len() - 1].channels;
        Ok(Self {
            config: config.clone(),
            condition_embedding: ConditionEmbedding::load(&w.pp("controlnet_cond_embedding"), config)?,
            zero_convs,
            mid_zero_conv: conv2d(&w.pp("controlnet_mid_block"), last, last, 1, 1, 0)?,
            encoder,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// Residuals for `sample` [B, C, h, w] at `timesteps` [B] with `conditioning` (the UNet's: text
    /// context [B, S, D], and SDXL's pooled embeddings and time ids) and the condition image `cond`
    /// [B, 3, h·f, w·f] in [0, 1].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        conditioning: &Conditioning,
        cond: &Tensor,
        scale: ResidualScale,
    ) -> Result<ControlResiduals> {
        let cond = if self.config.bgr { cond.flip(&[1])? } else { cond.clone() };
        let hint = self.condition_embedding.forward(&cond.to_dtype(sample.dtype())?)?;
        let temb = self.encoder.embed_time(timesteps, conditioning, sample.dtype())?;
        let controls = UNetControls::default();
        let mut add_hint = AddToOutput { id: "conv_in", tensor: hint };
        let context = &conditioning.context;
        let mut pass = LayerPass { temb, context, controls: &controls, hooks: Hooks::new(vec![&mut add_hint]) };
        let EncoderOutput { hidden, skips } = self.encoder.forward(sample, &mut pass, None)?;
        let n = skips.len();
        let scales: Vec<f64> = match scale {
            ResidualScale::Uniform(s) => vec![s; n + 1],
            // torch.logspace(-1, 0, n + 1) in f32, times the scale.
            ResidualScale::Guess(s) => (0..=n).map(|i| f64::from(10f32.powf(-1.0 + i as f32 / n as f32)) * s).collect(),
            ResidualScale::Soft(s) => (0..=n).map(|i| s * 0.825f64.powi(12 - i as i32)).collect(),
        };
        let pool = |t: Tensor| -> Result<Tensor> {
            Ok(if self.config.global_pool_conditions { t.mean_keepdim(3)?.mean_keepdim(2)? } else { t })
        };
        let down = skips
            .iter()
            .zip(&self.zero_convs)
            .zip(&scales)
            .map(|((skip, conv), s)| pool((conv.forward(skip)? * *s)?))
            .collect::<Result<_>>()?;
        let mid = pool((self.mid_zero_conv.forward(&hidden)? * scales[n])?)?;
        Ok(ControlResiduals { down, mid })
    }
}

/// A hook adding a tensor to one module's output (the ControlNet's condition embedding at `conv_in`).
struct AddToOutput {
    id: &'static str,
    tensor: Tensor,
}

impl UNetHook for AddToOutput {
    fn layer_ids(&self) -> Vec<String> {
        vec![self.id.to_string()]
    }

    fn at_output(&mut self, _id: &str, output: Tensor) -> Result<Tensor> {
        Ok((output + &self.tensor)?)
    }
}
