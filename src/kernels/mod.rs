//! CPU compute kernels for the hot operations of a diffusion step, each a candle custom op with a
//! plain-candle fallback for other devices and dtypes, and a parity test against the plain op.
//!
//! - [`attention`]: fused, blocked scaled dot-product attention that never materialises the whole
//!   score matrix.
//! - [`conv`]: 2-D convolution on the `gemm` crate's microkernels (NCHW in and out), with Winograd
//!   F(4x4, 3x3) for the large stride-1 3x3 convolutions.
//! - [`convert`]: f16/bf16 → f32 on all threads, for half-precision weights widened per call.
//! - [`geglu`]: the feed-forward's `value · gelu(gate)` in one pass.
//! - [`group_norm`]: GroupNorm with an optional fused SiLU.
//! - [`math`]: vectorisable exp/SiLU and the AVX2 dispatch the kernels share.

pub mod attention;
pub mod conv;
pub mod convert;
pub mod geglu;
pub mod group_norm;
pub mod math;

use candle_core::{CpuStorage, Layout};

/// The f32 data a contiguous `layout` covers in `storage`, or an error naming the kernel `op`.
fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} kernel: non-contiguous input"),
    }
}
