//! Layer constructors over [`Weights`]: each checks the stored shapes against the config.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, GroupNorm, LayerNorm};

use crate::Result;
use crate::io::weights::Weights;

/// A linear layer `y = x Wᵀ + b`; weight-level mechanisms (LoRA) attach here.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(xs)
    }
}

/// A 2-D convolution with bias; weight-level mechanisms (LoRA) attach here.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(xs)
    }
}

/// `nn.Linear(in_dim, out_dim, bias)` stored as `weight` [out, in] and `bias` [out].
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get((out_dim, in_dim), "weight")?;
    let bias = if bias { Some(w.get(out_dim, "bias")?) } else { None };
    Ok(Linear { inner: candle_nn::Linear::new(weight, bias) })
}

/// `nn.Conv2d(in_c, out_c, kernel, stride, padding)` with bias.
pub fn conv2d(w: &Weights, in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    let weight = w.get((out_c, in_c, kernel, kernel), "weight")?;
    let bias = w.get(out_c, "bias")?;
    Ok(Conv2d {
        inner: candle_nn::Conv2d::new(weight, Some(bias), Conv2dConfig { padding, stride, ..Default::default() }),
    })
}

/// `nn.GroupNorm(groups, channels, eps)` with affine weights.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(crate::Error::invalid(format!(
            "{}: GroupNorm with {groups} groups cannot split {channels} channels",
            w.key("")
        )));
    }
    Ok(GroupNorm::new(w.get(channels, "weight")?, w.get(channels, "bias")?, channels, groups, eps)?)
}

/// `nn.LayerNorm(dim, eps)` with affine weights.
pub fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(w.get(dim, "weight")?, w.get(dim, "bias")?, eps))
}

/// A 1x1 projection that is a `Conv2d` in some checkpoints and a `Linear` in others
/// (diffusers' `use_linear_projection`), applied to [B, C, H, W] or [B, L, C] inputs.
#[derive(Debug, Clone)]
pub enum Projection {
    /// Applied to [B, C, H, W].
    Conv(Conv2d),
    /// Applied to [B, L, C].
    Linear(Linear),
}

impl Projection {
    /// Loads the projection in the layout chosen by `use_linear`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(linear(w, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(conv2d(w, in_dim, out_dim, 1, 1, 0)?)
        })
    }

    /// Applies the projection.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Projection::Conv(c) => c.forward(xs)?,
            Projection::Linear(l) => l.forward(xs)?,
        })
    }
}
