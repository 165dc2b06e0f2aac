//! CLIP vision encoder (transformers' `CLIPVisionModelWithProjection`): the image embedding and the
//! penultimate hidden states that image-prompt adapters read.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;

use super::clip::{Activation, EncoderLayer, EncoderSpec, check_heads};
use super::nn::{LayerNorm, Linear, layer_norm, linear};
use crate::io::diffusers_folder::open_weights_in;
use crate::io::weights::Weights;
use crate::{Error, Result};

/// The fields of a transformers `CLIPVisionConfig` that change the math (transformers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of every hidden state.
    #[serde(default = "d768")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    /// Number of transformer layers.
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "d3")]
    pub num_channels: usize,
    /// Side of the square input image in pixels.
    #[serde(default = "d224")]
    pub image_size: usize,
    /// Side of one patch in pixels.
    #[serde(default = "d32")]
    pub patch_size: usize,
    /// Width of `image_embeds` (the visual projection's output).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "dact")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "deps")]
    pub layer_norm_eps: f64,
}

fn d3() -> usize {
    3
}
fn d12() -> usize {
    12
}
fn d32() -> usize {
    32
}
fn d224() -> usize {
    224
}
fn d768() -> usize {
    768
}
fn d3072() -> usize {
    3072
}
fn dact() -> Activation {
    Activation::QuickGelu
}
fn deps() -> f64 {
    1e-5
}

/// transformers' default `projection_dim`.
const DEFAULT_PROJECTION_DIM: usize = 512;

impl ClipVisionConfig {
    /// Reads a `config.json`: a `CLIPVisionConfig`, or a `CLIPConfig` whose `vision_config` is used
    /// (with the top-level `projection_dim` when the vision part has none).
    pub fn load(path: &Path) -> Result<Self> {
        let value: serde_json::Value = crate::io::read_json(path)?;
        let (vision, outer_projection) = match value.get("vision_config") {
            Some(v) if v.is_object() => (v.clone(), value.get("projection_dim").and_then(serde_json::Value::as_u64)),
            _ => (value, None),
        };
        let mut config: Self = serde_json::from_value(vision)
            .map_err(|e| Error::config(path, format!("invalid CLIP vision config: {e}")))?;
        config.projection_dim =
            Some(config.projection_dim.or(outer_projection.map(|p| p as usize)).unwrap_or(DEFAULT_PROJECTION_DIM));
        check_heads(path, config.hidden_size, config.num_attention_heads)?;
        if config.patch_size == 0 || !config.image_size.is_multiple_of(config.patch_size) {
            return Err(Error::config(
                path,
                format!("image_size {} is not a multiple of patch_size {}", config.image_size, config.patch_size),
            ));
        }
        if config.num_hidden_layers == 0 {
            return Err(Error::config(path, "num_hidden_layers is 0: an image encoder needs at least one layer"));
        }
        Ok(config)
    }

    /// Width of `image_embeds`.
    pub fn projection_dim(&self) -> usize {
        self.projection_dim.unwrap_or(DEFAULT_PROJECTION_DIM)
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn num_tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// What the encoder computes for a batch of images.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// The projected, post-normed class token [B, projection_dim] (`image_embeds`).
    pub image_embeds: Tensor,
    /// The output of the second-to-last layer [B, tokens, hidden] (`hidden_states[-2]`).
    pub penultimate: Tensor,
}

/// `CLIPVisionModelWithProjection`.
pub struct ClipVisionEncoder {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
    config: ClipVisionConfig,
}

impl ClipVisionEncoder {
    /// Loads an image-encoder folder (`config.json` + `model.safetensors`, its variants or shards, or
    /// `pytorch_model.bin`) as `dtype` on `device`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{}: expected an image-encoder folder (config.json + model.safetensors)",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(format!("{}: missing file", config_path.display())));
        }
        let config = ClipVisionConfig::load(&config_path)?;
        Self::load(&Weights::new(open_weights_in(dir)?, dtype, device), &config)
    }

    /// Loads the weights of a `CLIPVisionModelWithProjection` (keys under `vision_model.`, as
    /// transformers writes them, or without that prefix) plus `visual_projection.weight`.
    pub fn load(w: &Weights, config: &ClipVisionConfig) -> Result<Self> {
        let c = config;
        let vw = if w.contains("embeddings.patch_embedding.weight") { w.clone() } else { w.pp("vision_model") };
        let d = c.hidden_size;
        let emb = vw.pp("embeddings");
        let spec = EncoderSpec {
            hidden_size: d,
            intermediate_size: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(Self {
            patch_embedding: emb
                .pp("patch_embedding")
                .get((d, c.num_channels, c.patch_size, c.patch_size), "weight")?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.pp("position_embedding").get((c.num_tokens(), d), "weight")?,
            pre_norm: layer_norm(&vw.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| EncoderLayer::load(&vw.pp(format!("encoder.layers.{i}")), &spec))
                .collect::<Result<_>>()?,
            post_norm: layer_norm(&vw.pp("post_layernorm"), d, c.layer_norm_eps)?,
            projection: linear(&w.pp("visual_projection"), d, c.projection_dim(), false)?,
            config: config.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.class_embedding.dtype()
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.class_embedding.device()
    }

    /// Encodes preprocessed `pixel_values` [B, channels, image_size, image_size].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let c = &self.config;
        let (b, ch, h, w) = pixel_values.dims4()?;
        if (ch, h, w) != (c.num_channels, c.image_size, c.image_size) {
            return Err(Error::invalid(format!(
                "image encoder expects pixel values [B, {}, {}, {}], got {:?}",
                c.num_channels,
                c.image_size,
                c.image_size,
                pixel_values.dims()
            )));
        }
        let pixels = pixel_values.to_dtype(self.dtype())?;
        let patches = pixels.conv2d(&self.patch_embedding, 0, c.patch_size, 1, 1)?; // [B, D, g, g]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g·g, D]
        let class = self.class_embedding.reshape((1, 1, c.hidden_size))?.repeat((b, 1, 1))?;
        let xs = Tensor::cat(&[class, patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = self.pre_norm.forward(&xs)?;
        let (last, rest) = self.layers.split_last().ok_or_else(|| Error::invalid("the image encoder has no layers"))?;
        for layer in rest {
            xs = layer.forward(&xs, None)?;
        }
        let penultimate = xs.clone();
        let xs = last.forward(&xs, None)?;
        let pooled = self.post_norm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(ClipVisionOutput { image_embeds: self.projection.forward(&pooled)?, penultimate })
    }
}
