//! The transpose of the last two dimensions, [B, R, S] → [B, S, R], in cache-sized blocks on all
//! threads: the UNet transformer's NCHW ↔ tokens layout changes, which candle's strided copy makes
//! one element at a time.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::simd_dispatch;

/// Rows of the output each task writes (whole blocks of the source's columns).
const BLOCK: usize = 32;

/// xs [B, R, S] → [B, S, R] contiguous (`xs.transpose(1, 2)?.contiguous()`).
pub fn transpose_last_two(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && !xs.track_op() {
        return xs.contiguous()?.apply_op1_no_bwd(&Transpose);
    }
    xs.transpose(1, 2)?.contiguous()
}

/// The CPU f32 kernel behind [`transpose_last_two`].
struct Transpose;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose-last-two"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, r, s) = layout.shape().dims3()?;
        let x = super::contiguous_f32("transpose", storage, layout)?;
        // Written in full: every output row is one column of the source.
        let mut out = super::output_buffer(b * r * s);
        if r > 0 && s > 0 {
            out.par_chunks_mut(s * r).zip(x.par_chunks(r * s)).for_each(|(dst, src)| {
                dst.par_chunks_mut(BLOCK * r).enumerate().for_each(|(t, dst)| transpose_block(src, s, t * BLOCK, dst));
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, s, r))))
    }
}

simd_dispatch! {
    /// dst [rows, R] = columns j0..j0 + rows of the source [R, S] (rows of `s` elements), in 8x8
    /// blocks so that reads and writes both stay within a few cache lines.
    fn transpose_block(src: &[f32], s: usize, j0: usize, dst: &mut [f32]) {
        let r = src.len() / s;
        let rows = dst.len() / r;
        for i0 in (0..r).step_by(8) {
            let ih = 8.min(r - i0);
            for jj0 in (0..rows).step_by(8) {
                let jh = 8.min(rows - jj0);
                for jj in jj0..jj0 + jh {
                    let out = &mut dst[jj * r + i0..][..ih];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = src[(i0 + i) * s + j0 + jj];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_transpose() {
        for (b, r, s) in [(2, 37, 70), (1, 8, 64), (3, 5, 1), (2, 64, 33), (1, 1, 9)] {
            let xs = Tensor::randn(0f32, 1.0, (b, r, s), &Device::Cpu).unwrap();
            let ours = transpose_last_two(&xs).unwrap();
            let plain = xs.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), [b, s, r]);
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                plain.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
