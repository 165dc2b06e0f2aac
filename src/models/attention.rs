//! Scaled dot-product attention shared by the text encoder, the UNet and the VAE.

use candle_core::{DType, Tensor};

use crate::{Result, kernels};

/// Upper bound on the elements of one block of attention scores, so that long sequences
/// (4096 latent tokens at 512x512) never materialise the whole score matrix at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 25;

/// Splits [B, L, H*D] into heads: [B, H, L, D], a strided view (no copy).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = xs.dims3()?;
    Ok(xs.reshape((b, l, heads, c / heads))?.transpose(1, 2)?)
}

/// Merges heads back: [B, H, L, D] -> [B, L, H*D].
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = xs.dims4()?;
    Ok(xs.transpose(1, 2)?.reshape((b, l, h * d))?)
}

/// `softmax(q kᵀ · scale + mask) v` for q [B, H, Lq, D], k and v [B, H, Lk, D]; `mask` is added to
/// the scores ([Lq, Lk], broadcast). With `upcast`, scores are computed in f32 whatever the inputs'
/// dtype (diffusers' `upcast_attention`). Inputs may be strided views such as [`split_heads`]'.
///
/// Without a mask on the CPU this is the fused kernel [`kernels::attention::scaled_dot_product`],
/// which always computes scores in f32, its products on bf16 dot products for models whose layers
/// are bf16 (`layer_dtype`) where the CPU has them, and has a backward pass for f32 inputs that
/// track gradients; otherwise plain candle ops, long queries in blocks.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    upcast: bool,
    layer_dtype: DType,
) -> Result<Tensor> {
    let tracked = kernels::tracks_gradients(&[q, k, v]);
    let kernel_dtype = match tracked {
        true => q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32,
        false => matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16),
    };
    if mask.is_none() && q.device().is_cpu() && kernel_dtype {
        return Ok(kernels::attention::scaled_dot_product(q, k, v, scale, layer_dtype == DType::BF16)?);
    }
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let block = (MAX_SCORE_ELEMENTS / (b * h * lk).max(1)).clamp(1, lq);
    if block >= lq {
        return attend(q, k, v, scale, mask, upcast);
    }
    let mut outs = Vec::with_capacity(lq.div_ceil(block));
    for start in (0..lq).step_by(block) {
        let len = block.min(lq - start);
        let mask = mask.map(|m| m.narrow(0, start, len)).transpose()?;
        outs.push(attend(&q.narrow(2, start, len)?, k, v, scale, mask.as_ref(), upcast)?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>, upcast: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    // candle's fused softmax has no backward pass: the composed one where gradients flow.
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

/// An additive causal mask [L, L]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> =
        (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(data, (len, len), device)?)
}
