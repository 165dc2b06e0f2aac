//! Building blocks shared by the UNet, the VAE and the ControlNet: diffusers' `ResnetBlock2D`,
//! `Downsample2D` and `Upsample2D`.

use candle_core::{Module, Tensor};

use super::nn::{Conv2d, Linear, conv2d, group_norm, linear};
use crate::Result;
use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;

/// Shapes and norms of one [`ResnetBlock`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for blocks without one (the VAE).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The output is divided by this (diffusers' `output_scale_factor`).
    pub output_scale_factor: f64,
}

/// GroupNorm → SiLU → conv, twice, with the time embedding added in between and a residual.
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    /// Loads a block stored under `w` (keys `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
    /// `conv_shortcut`).
    pub fn load(w: &Weights, s: ResnetSpec) -> Result<Self> {
        let (cin, cout) = (s.in_channels, s.out_channels);
        Ok(Self {
            norm1: group_norm(&w.pp("norm1"), s.groups, cin, s.eps)?,
            conv1: conv2d(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: s.temb_channels.map(|t| linear(&w.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: group_norm(&w.pp("norm2"), s.groups, cout, s.eps)?,
            conv2: conv2d(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(conv2d(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
            output_scale_factor: s.output_scale_factor,
        })
    }

    /// xs [B, Cin, H, W] and the time embedding temb [B, T] → [B, Cout, H, W].
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        Ok(if self.output_scale_factor == 1.0 { out } else { (out / self.output_scale_factor)? })
    }
}

/// Strided 3x3 convolution halving H and W. diffusers' VAE uses padding 0 with an explicit
/// (0, 1, 0, 1) pad; the UNet uses symmetric padding (`downsample_padding`).
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample {
    /// Loads `conv` under `w` with the given padding (0 means the VAE's asymmetric padding).
    pub fn load(w: &Weights, channels: usize, out_channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(&w.pp("conv"), channels, out_channels, 3, 2, padding)?, asymmetric_pad: padding == 0 })
    }

    /// [B, C, H, W] → [B, C', ceil(H/2), ceil(W/2)].
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            Ok(self.conv.forward(&xs)?)
        } else {
            Ok(self.conv.forward(xs)?)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3x3 convolution.
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` under `w`.
    pub fn load(w: &Weights, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(&w.pp("conv"), channels, out_channels, 3, 1, 1)? })
    }

    /// Upsamples [B, C, H, W] to `size` (H', W') (twice the input unless a skip connection of odd
    /// size asks otherwise) and convolves.
    pub fn forward(&self, xs: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        Ok(self.conv.forward(&upsample_nearest(xs, size)?)?)
    }
}

/// Nearest-neighbour upsampling of [B, C, H, W] to `size`. Where gradients flow and the size is a
/// whole multiple, each pixel is repeated by broadcasting: candle's upsampling backward pass
/// overwrites the gradients of the pixels it repeats instead of summing them.
fn upsample_nearest(xs: &Tensor, (height, width): (usize, usize)) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if !xs.track_op() || height % h != 0 || width % w != 0 {
        return xs.upsample_nearest2d(height, width);
    }
    let (sh, sw) = (height / h, width / w);
    xs.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, sh, w, sw))?.reshape((b, c, height, width))
}
