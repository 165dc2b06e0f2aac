//! Half-precision → f32 conversion on all threads: f16/bf16 layer weights are widened at every call
//! on the CPU (see [`crate::io::weights::precision`]), where candle's single-threaded `to_dtype`
//! would cost a noticeable part of a step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::math::simd_dispatch;

/// `t` as f32: in parallel for contiguous f16/bf16 CPU tensors, by candle otherwise.
pub fn to_f32(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::F16 | DType::BF16 if t.device().is_cpu() && t.is_contiguous() && !t.track_op() => {
            t.apply_op1_no_bwd(&Widen)
        }
        _ => t.to_dtype(DType::F32),
    }
}

/// The CPU op behind [`to_f32`].
struct Widen;

/// Values per parallel task.
const CHUNK: usize = 1 << 16;

impl CustomOp1 for Widen {
    fn name(&self) -> &'static str {
        "widen-to-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("widen-to-f32: non-contiguous input");
        };
        let mut out = super::output_buffer(end - start);
        match storage {
            CpuStorage::BF16(data) => {
                out.par_chunks_mut(CHUNK).zip(data[start..end].par_chunks(CHUNK)).for_each(|(d, s)| widen_bf16(d, s))
            }
            CpuStorage::F16(data) => {
                out.par_chunks_mut(CHUNK).zip(data[start..end].par_chunks(CHUNK)).for_each(|(d, s)| widen_f16(d, s))
            }
            other => candle_core::bail!("widen-to-f32: expected f16 or bf16, found {:?}", other.dtype()),
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

simd_dispatch! {
    /// `dst` = `src` widened to f32.
    pub(super) fn widen_bf16(dst: &mut [f32], src: &[bf16]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.to_f32());
    }
}

simd_dispatch! {
    /// `dst` = `src` widened to f32.
    fn widen_f16(dst: &mut [f32], src: &[f16]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.to_f32());
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn matches_candle_to_dtype() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 3.0, (3, 70_001), &Device::Cpu)?;
        for dtype in [DType::BF16, DType::F16] {
            let half = x.to_dtype(dtype)?;
            let diff =
                (to_f32(&half)? - half.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
        let strided = x.to_dtype(DType::BF16)?.t()?;
        assert_eq!(to_f32(&strided)?.dims(), [70_001, 3]);
        Ok(())
    }
}
