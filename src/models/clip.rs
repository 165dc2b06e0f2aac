//! Pieces shared by the CLIP text and vision transformers (transformers' `CLIPEncoderLayer`): the
//! MLP activation and the pre-norm encoder layer.

use candle_core::{DType, Module, Tensor};
use serde::Deserialize;

use super::attention::{merge_heads, scaled_dot_product, split_heads};
use super::nn::{LayerNorm, Linear, layer_norm, linear};
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

/// Checks that a CLIP config's width splits into its heads (`path` names the config in errors).
pub(crate) fn check_heads(path: &std::path::Path, hidden_size: usize, heads: usize) -> Result<()> {
    if heads == 0 || !hidden_size.is_multiple_of(heads) {
        return Err(Error::config(
            path,
            format!("hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"),
        ));
    }
    Ok(())
}

/// The sizes of one encoder layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderSpec {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP activation.
    pub act: Activation,
    /// LayerNorm epsilon.
    pub eps: f64,
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
    /// The dtype of the layer weights (see [`scaled_dot_product`]).
    layer_dtype: DType,
}

impl SelfAttention {
    fn load(w: &Weights, s: &EncoderSpec) -> Result<Self> {
        let d = s.hidden_size;
        Ok(Self {
            q: linear(&w.pp("q_proj"), d, d, true)?,
            k: linear(&w.pp("k_proj"), d, d, true)?,
            v: linear(&w.pp("v_proj"), d, d, true)?,
            out: linear(&w.pp("out_proj"), d, d, true)?,
            heads: s.heads,
            scale: ((d / s.heads) as f64).powf(-0.5),
            layer_dtype: w.layer_dtype(),
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(xs)?, self.heads)?;
        let k = split_heads(&self.k.forward(xs)?, self.heads)?;
        let v = split_heads(&self.v.forward(xs)?, self.heads)?;
        let attn = scaled_dot_product(&q, &k, &v, self.scale, mask, false, self.layer_dtype)?;
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
    /// Loads `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1`, `mlp.fc2` under `w`.
    pub fn load(w: &Weights, s: &EncoderSpec) -> Result<Self> {
        let d = s.hidden_size;
        Ok(Self {
            norm1: layer_norm(&w.pp("layer_norm1"), d, s.eps)?,
            attn: SelfAttention::load(&w.pp("self_attn"), s)?,
            norm2: layer_norm(&w.pp("layer_norm2"), d, s.eps)?,
            fc1: linear(&w.pp("mlp.fc1"), d, s.intermediate_size, true)?,
            fc2: linear(&w.pp("mlp.fc2"), s.intermediate_size, d, true)?,
            act: s.act,
        })
    }

    /// xs [B, L, D] → [B, L, D]; `mask` [L, L] is added to the attention scores.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let h = self.act.forward(&self.fc1.forward(&self.norm2.forward(&xs)?)?)?;
        Ok((&xs + self.fc2.forward(&h)?)?)
    }
}
