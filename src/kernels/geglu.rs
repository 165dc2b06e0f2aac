//! GEGLU, `value · gelu(gate)` for `[value | gate]` halves of the last dimension, in one pass over
//! the feed-forward's projection instead of candle's strided GELU and product.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::{self, simd_dispatch};

/// h [.., 2·inner] → [.., inner]: the first half times the exact (erf) GELU of the second half.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 && !h.track_op() {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let inner = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, inner)? * h.narrow(D::Minus1, inner, inner)?.gelu_erf()?
}

/// The CPU f32 kernel behind [`geglu`].
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("GEGLU needs an even last dimension, got {dims:?}");
        }
        let h = super::contiguous_f32("GEGLU", storage, layout)?;
        let inner = width / 2;
        let mut out = super::output_buffer(h.len() / 2);
        // Rows in groups of about 64k values per task.
        let rows_per_task = (65_536 / inner.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * inner)
            .zip(h.par_chunks(rows_per_task * width))
            .for_each(|(out, h)| geglu_rows(out, h, inner));
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

simd_dispatch! {
    /// `out` [rows, inner] = value · gelu(gate) for `h` [rows, 2·inner] = [value | gate].
    fn geglu_rows(out: &mut [f32], h: &[f32], inner: usize) {
        for (out, h) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
            let (value, gate) = h.split_at(inner);
            for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
                *o = v * gelu(g);
            }
        }
    }
}

/// The exact GELU `x/2 · (1 + erf(x/√2))` with erf from Abramowitz & Stegun 7.1.26 (absolute error
/// below 1.5e-7). For x < 0, `1 + erf` is computed directly as the small complement, without
/// cancellation.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    // 1 − erf(|x|/√2)
    let complement = poly * math::exp(-z * z);
    let one_plus_erf = if x >= 0.0 { 2.0 - complement } else { complement };
    0.5 * x * one_plus_erf
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    // Inputs of std 3, so products up to ~100: measured max |diff| 1.9e-6, i.e. ~2e-8 relative.
    #[test]
    fn matches_candle_gelu_erf() -> candle_core::Result<()> {
        let h = (Tensor::randn(0f32, 1.0, (2, 7, 10), &Device::Cpu)? * 3.0)?;
        let plain = (h.narrow(2, 0, 5)? * h.narrow(2, 5, 5)?.gelu_erf()?)?;
        let ours = geglu(&h)?;
        assert_eq!(ours.dims(), [2, 7, 5]);
        let diff = (ours - plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 5e-6, "max |diff| {diff:e}");
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 / 200.0).collect();
        let want = Tensor::new(xs.as_slice(), &Device::Cpu)?.gelu_erf()?.to_vec1::<f32>()?;
        let worst = xs.iter().zip(&want).map(|(&x, &w)| (gelu(x) - w).abs()).fold(0f32, f32::max);
        assert!(worst < 5e-7, "gelu max |diff| {worst:e}");
        Ok(())
    }

    #[test]
    fn odd_width_is_an_error() -> candle_core::Result<()> {
        let h = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
        assert!(geglu(&h).is_err());
        Ok(())
    }
}
