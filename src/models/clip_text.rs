//! CLIP text encoder (transformers' `CLIPTextModel`), with the token-embedding injection point
//! exposed: callers may edit token embeddings before the transformer runs (textual inversion and
//! image-derived pseudo-words).

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, LayerNorm};
use serde::Deserialize;

use super::attention::{causal_mask, merge_heads, scaled_dot_product, split_heads};
use super::nn::{Linear, layer_norm, linear};
use crate::io::weights::Weights;
use crate::{Error, Result};

/// The activation between the two MLP layers.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP, SD2.x).
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    /// Applies the activation.
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Activation::Gelu => xs.gelu_erf()?,
            Activation::GeluTanh => xs.gelu()?,
        })
    }
}

/// The fields of a transformers `CLIPTextConfig` that change the math.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Rows of the token-embedding table.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Rows of the position-embedding table (the longest sequence).
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Reads and validates a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = crate::io::read_json(path)?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            ));
        }
        Ok(config)
    }
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl SelfAttention {
    fn load(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: linear(&w.pp("q_proj"), d, d, true)?,
            k: linear(&w.pp("k_proj"), d, d, true)?,
            v: linear(&w.pp("v_proj"), d, d, true)?,
            out: linear(&w.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
            scale: ((d / c.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(xs)?, self.heads)?;
        let k = split_heads(&self.k.forward(xs)?, self.heads)?;
        let v = split_heads(&self.v.forward(xs)?, self.heads)?;
        let attn = scaled_dot_product(&q, &k, &v, self.scale, Some(mask), false)?;
        Ok(self.out.forward(&merge_heads(&attn)?)?)
    }
}

/// One pre-norm transformer layer: self-attention and MLP, each with a residual.
pub(crate) struct EncoderLayer {
    norm1: LayerNorm,
    attn: SelfAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn load(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            norm1: layer_norm(&w.pp("layer_norm1"), d, c.layer_norm_eps)?,
            attn: SelfAttention::load(&w.pp("self_attn"), c)?,
            norm2: layer_norm(&w.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: linear(&w.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: linear(&w.pp("mlp.fc2"), c.intermediate_size, d, true)?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let h = self.act.forward(&self.fc1.forward(&self.norm2.forward(&xs)?)?)?;
        Ok((&xs + self.fc2.forward(&h)?)?)
    }
}

/// The CLIP text transformer with a causal mask.
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextEncoder {
    /// Loads the weights of a `CLIPTextModel` (keys under `text_model.`).
    pub fn load(w: &Weights, config: &ClipTextConfig) -> Result<Self> {
        // transformers 5 saves the keys without the `text_model.` prefix the public checkpoints use.
        let w = if w.contains("embeddings.token_embedding.weight") { w.clone() } else { w.pp("text_model") };
        let c = config;
        let emb = w.pp("embeddings");
        let token_embedding =
            Embedding::new(emb.pp("token_embedding").get((c.vocab_size, c.hidden_size), "weight")?, c.hidden_size);
        let position_embedding =
            emb.pp("position_embedding").get((c.max_position_embeddings, c.hidden_size), "weight")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<_>>()?;
        let final_norm = layer_norm(&w.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?;
        Ok(Self { token_embedding, position_embedding, layers, final_norm, config: config.clone() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Token embeddings [B, L, D] of `ids` [B, L] (u32): the token-level injection point.
    pub fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let max = ids.max_all()?.to_dtype(candle_core::DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(Error::invalid(format!(
                "token id {max} is outside the text encoder's vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        Ok(self.token_embedding.forward(ids)?)
    }

    /// Encodes token embeddings [B, L, D] (from [`Self::token_embeddings`], possibly edited).
    /// With `clip_skip` = 0 this is the last hidden state; with `clip_skip` = n the output of the
    /// layer n before the last, passed through the final LayerNorm (diffusers' `clip_skip`).
    pub fn encode_embeddings(&self, embeddings: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let len = embeddings.dim(1)?;
        if len > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        if clip_skip >= self.layers.len() {
            return Err(Error::invalid(format!(
                "clip skip {clip_skip} must be less than the text encoder's {} layers",
                self.layers.len()
            )));
        }
        let mut xs = embeddings.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, xs.device())?;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(self.final_norm.forward(&xs)?)
    }

    /// Encodes token ids [B, L] to hidden states [B, L, D].
    pub fn encode(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.encode_embeddings(&self.token_embeddings(ids)?, clip_skip)
    }
}
