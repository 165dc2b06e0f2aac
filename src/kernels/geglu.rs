//! GEGLU, `value · gelu(gate)` for `[value | gate]` halves of the last dimension, in one pass over
//! the feed-forward's projection instead of candle's strided GELU and product; its backward pass in
//! one pass too: `d value = dY · gelu(gate)`, `d gate = dY · value · gelu'(gate)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::{self, simd_dispatch};

/// h [.., 2·inner] → [.., inner]: the first half times the exact (erf) GELU of the second half.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        let h = h.contiguous()?;
        return if h.track_op() { h.apply_op1(Geglu) } else { h.apply_op1_no_bwd(&Geglu) };
    }
    let inner = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, inner)? * h.narrow(D::Minus1, inner, inner)?.gelu_erf()?
}

/// The CPU f32 kernel behind [`geglu`].
#[derive(Debug, Clone, Copy)]
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

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(h.detach().apply_op2_no_bwd(&grad.detach().contiguous()?, &GegluBackward)?))
    }
}

/// The gradient of [`geglu`]'s input h [.., 2·inner] from its output's gradient [.., inner].
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = super::contiguous_f32("GEGLU backward", s1, l1)?;
        let grad = super::contiguous_f32("GEGLU backward", s2, l2)?;
        let width = l1.dims().last().copied().unwrap_or(0);
        if 2 * grad.len() != h.len() || width % 2 != 0 {
            candle_core::bail!(
                "GEGLU backward: input {:?} and output gradient {:?} do not match",
                l1.dims(),
                l2.dims()
            );
        }
        let inner = width / 2;
        let mut out = super::output_buffer(h.len());
        let rows_per_task = (65_536 / inner.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * width)
            .zip(h.par_chunks(rows_per_task * width).zip(grad.par_chunks(rows_per_task * inner)))
            .for_each(|(out, (h, grad))| geglu_backward_rows(out, h, grad, inner));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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

simd_dispatch! {
    /// `out` [rows, 2·inner] = [dY · gelu(gate) | dY · value · gelu'(gate)] for `h` [rows, 2·inner] =
    /// [value | gate] and `grad` = dY [rows, inner].
    fn geglu_backward_rows(out: &mut [f32], h: &[f32], grad: &[f32], inner: usize) {
        for ((out, h), grad) in out.chunks_exact_mut(2 * inner).zip(h.chunks_exact(2 * inner)).zip(grad.chunks_exact(inner)) {
            let (value, gate) = h.split_at(inner);
            let (d_value, d_gate) = out.split_at_mut(inner);
            for ((((dv, dg), &v), &g), &dy) in d_value.iter_mut().zip(d_gate).zip(value).zip(gate).zip(grad) {
                let (cdf, pdf) = normal_cdf_pdf(g);
                *dv = dy * g * cdf;
                *dg = dy * v * (cdf + g * pdf);
            }
        }
    }
}

/// Φ(x) and φ(x), the standard normal's distribution and density, with Φ from the erf of [`gelu`]:
/// `gelu(x) = x Φ(x)` and `gelu'(x) = Φ(x) + x φ(x)`.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    // 1/√(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gaussian = math::exp(-z * z);
    // 1 − erf(|x|/√2)
    let complement = poly * gaussian;
    let one_plus_erf = if x >= 0.0 { 2.0 - complement } else { complement };
    (0.5 * one_plus_erf, INV_SQRT_2PI * gaussian)
}

/// The exact GELU `x/2 · (1 + erf(x/√2))` with erf from Abramowitz & Stegun 7.1.26 (absolute error
/// below 1.5e-7). For x < 0, `1 + erf` is computed directly as the small complement, without
/// cancellation.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * normal_cdf_pdf(x).0
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

    /// The gradient through our backward pass against candle's differentiable ops (`gelu_erf`).
    #[test]
    fn gradient_matches_candle() -> candle_core::Result<()> {
        let h = candle_core::Var::from_tensor(&(Tensor::randn(0f32, 1.0, (2, 7, 10), &Device::Cpu)? * 3.0)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 7, 5), &Device::Cpu)?;
        let ours = (geglu(&h)? * &probe)?.sum_all()?.backward()?;
        let plain = ((h.narrow(2, 0, 5)? * h.narrow(2, 5, 5)?.gelu_erf()?)? * &probe)?.sum_all()?.backward()?;
        let (a, b) = (ours.get(&h).expect("gradient"), plain.get(&h).expect("gradient"));
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff:e}");
        Ok(())
    }

    #[test]
    fn odd_width_is_an_error() -> candle_core::Result<()> {
        let h = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
        assert!(geglu(&h).is_err());
        Ok(())
    }
}
