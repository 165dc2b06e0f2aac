//! CPU compute kernels for the hot operations of a diffusion step, each a candle custom op with a
//! plain-candle fallback for other devices and dtypes, and a parity test against the plain op.
//!
//! - [`attention`]: fused, blocked scaled dot-product attention that never materialises the whole
//!   score matrix; [`attention_backward`] its gradients, recomputing the scores block by block.
//! - [`bf16_gemm`]: the matrix product on the bf16 dot-product instruction (AVX512-BF16), for bf16 layers.
//! - [`conv`]: 2-D convolution on [`sgemm`] or [`bf16_gemm`] (NCHW in and out), with Winograd
//!   F(4x4, 3x3) or F(6x6, 3x3) for the large stride-1 3x3 convolutions.
//! - [`convert`]: f16/bf16 → f32 on all threads, for half-precision weights widened per call.
//! - [`geglu`]: the feed-forward's `value · gelu(gate)` in one pass.
//! - [`group_norm`]: GroupNorm with an optional fused SiLU.
//! - [`layer_norm`]: LayerNorm with its backward pass (training).
//! - [`linear`]: linear layers, bias written before the product.
//! - [`math`]: vectorisable exp/SiLU and the AVX2 dispatch the kernels share.
//! - [`matmul`]: 2-D products with either operand transposed in place (gradients).
//! - [`sgemm`]: the f32 matrix product every kernel and linear layer runs on.
//! - [`transpose`]: [B, R, S] → [B, S, R] in blocks (the transformer's NCHW ↔ tokens changes).

pub mod amx;
pub mod attention;
pub mod attention_backward;
pub mod bf16_gemm;
pub mod conv;
pub mod convert;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod math;
pub mod matmul;
pub mod sgemm;
pub mod transpose;

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::slice::HalfFloatSliceExt;

/// The f32 data a contiguous `layout` covers in `storage`, or an error naming the kernel `op`.
fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} kernel: non-contiguous input"),
    }
}

/// A layer's weight as the CPU kernels read it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LayerWeight<'a> {
    /// Multiplied with f32 FMA ([`sgemm`]).
    F32(&'a [f32]),
    /// bf16 bit patterns, multiplied with bf16 dot products ([`bf16_gemm`]).
    Bf16(&'a [u16]),
}

/// A layer weight in the form its CPU kernel takes: kept in bf16 where the CPU multiplies bf16
/// natively ([`bf16_gemm::available`]), else f32 (half precision widened on all threads).
pub(crate) fn kernel_weight(weight: &Tensor) -> candle_core::Result<Tensor> {
    match weight.dtype() {
        DType::BF16 if weight.device().is_cpu() && bf16_gemm::available() => weight.contiguous(),
        DType::F16 | DType::BF16 => convert::to_f32(&weight.contiguous()?),
        _ => weight.to_dtype(DType::F32)?.contiguous(),
    }
}

/// The contiguous weight behind a storage made by [`kernel_weight`].
fn layer_weight<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<LayerWeight<'a>> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::BF16(data), Some((start, end))) => Ok(LayerWeight::Bf16(data[start..end].reinterpret_cast())),
        (CpuStorage::BF16(_), None) => candle_core::bail!("{op} kernel: non-contiguous weight"),
        _ => contiguous_f32(op, storage, layout).map(LayerWeight::F32),
    }
}

/// Whether any of `tensors` takes part in a gradient computation (a variable, or computed from one):
/// the kernels then run their differentiable form where they have one, else candle's ops.
pub fn tracks_gradients(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.track_op())
}

/// An output or scratch buffer of `len` f32 that the kernel then writes in full, without the zeroing
/// pass of `vec![0.0; len]` (candle's CPU backend allocates its outputs the same way). Callers must
/// write every element before anything reads it.
// Deliberately uninitialised: every caller writes the whole buffer first (see above).
#[allow(clippy::uninit_vec)]
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; f32 has no invalid bit patterns, and every caller writes each
    // element before the buffer is read (see the call sites).
    unsafe { out.set_len(len) };
    out
}

/// What a product's output holds before the products are added to it ([`sgemm::matmul`],
/// [`bf16_gemm::matmul`]): a bias is added as each output tile is first written, so no pass fills the
/// output with it and the products do not read it back.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Nothing: the output is overwritten.
    Zero,
    /// Its current contents: the products accumulate.
    Current,
    /// A bias per output row (a convolution's output channels): row i starts at `bias[i]`.
    RowBias(*const f32),
    /// A bias per output column (a linear layer's output features): column j starts at `bias[j]`.
    ColumnBias(*const f32),
}

// SAFETY: a Start only reads its bias, which every user keeps alive and unchanged for the product.
unsafe impl Send for Start {}
// SAFETY: as above.
unsafe impl Sync for Start {}

impl Start {
    /// The start of the output block from row i, column j.
    pub(crate) fn at(self, i: usize, j: usize) -> Self {
        match self {
            Start::RowBias(b) => Start::RowBias(b.wrapping_add(i)),
            Start::ColumnBias(b) => Start::ColumnBias(b.wrapping_add(j)),
            other => other,
        }
    }

    /// The start of a depth block: this one for the first, then the partial sums already written.
    pub(crate) fn for_depth(self, p0: usize) -> Self {
        if p0 == 0 { self } else { Start::Current }
    }

    /// The value element (i, j) starts from, `current` being what the output holds there.
    ///
    /// # Safety
    /// A bias must hold row i or column j.
    pub(crate) unsafe fn value(self, i: usize, j: usize, current: f32) -> f32 {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                Start::Zero => 0.0,
                Start::Current => current,
                Start::RowBias(b) => *b.add(i),
                Start::ColumnBias(b) => *b.add(j),
            }
        }
    }

    /// Writes the start values of the `rows` x `cols` output at `dst` (rows `ldd` apart): for a
    /// product of depth 0.
    ///
    /// # Safety
    /// `dst` must address that output, which no one else accesses; a bias must hold its rows or columns.
    pub(crate) unsafe fn fill(self, dst: *mut f32, ldd: usize, (rows, cols): (usize, usize)) {
        if let Start::Current = self {
            return;
        }
        for i in 0..rows {
            // SAFETY: row i < rows, `cols` elements (the caller's contract).
            let out = unsafe { std::slice::from_raw_parts_mut(dst.add(i * ldd), cols) };
            for (j, o) in out.iter_mut().enumerate() {
                // SAFETY: forwarded from the caller.
                *o = unsafe { self.value(i, j, *o) };
            }
        }
    }
}

/// Writes the `rows` x `cols` corner of a register tile computed into `tile` (rows `nr` apart) to
/// `dst` (rows `ldd` apart) as `start + scale · tile`, one vectorised loop per row for each kind of
/// start. For the GEMMs' partial edge tiles.
///
/// # Safety
/// `dst` must address `rows` rows of `cols` elements, `ldd` apart, that no one else accesses; a bias
/// of `start` must hold those rows or columns.
pub(crate) unsafe fn store_corner(
    tile: &[f32],
    nr: usize,
    dst: *mut f32,
    ldd: usize,
    (rows, cols): (usize, usize),
    start: Start,
    scale: f32,
) {
    for (i, row) in tile.chunks_exact(nr).take(rows).enumerate() {
        let row = &row[..cols];
        // SAFETY: row i < rows, `cols` elements (the caller's contract).
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(i * ldd), cols) };
        match start {
            Start::Zero => out.iter_mut().zip(row).for_each(|(o, &t)| *o = scale * t),
            Start::Current => out.iter_mut().zip(row).for_each(|(o, &t)| *o += scale * t),
            Start::RowBias(b) => {
                // SAFETY: the bias holds row i (the caller's contract).
                let b = unsafe { *b.add(i) };
                out.iter_mut().zip(row).for_each(|(o, &t)| *o = b + scale * t);
            }
            Start::ColumnBias(b) => {
                // SAFETY: the bias holds the `cols` columns (the caller's contract).
                let bias = unsafe { std::slice::from_raw_parts(b, cols) };
                out.iter_mut().zip(row).zip(bias).for_each(|((o, &t), &b)| *o = b + scale * t);
            }
        }
    }
}

/// A raw output pointer shared by rayon tasks that write disjoint elements.
#[derive(Debug)]
pub(crate) struct SharedMut<T = f32>(pub(crate) *mut T);
// SAFETY: only used where every task writes elements no other task touches (see the users).
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedMut<T> {}

/// A raw pointer to data that rayon tasks only read while its owner keeps it alive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedConst<T>(pub(crate) *const T);
// SAFETY: only read, while the owner keeps the data alive and unchanged (see the users).
unsafe impl<T> Send for SharedConst<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedConst<T> {}

impl<T> SharedConst<T> {
    /// The pointer (a method, so closures capture the wrapper rather than its field).
    pub(crate) fn get(self) -> *const T {
        self.0
    }
}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Start;

    /// Deterministic values in [-1, 1), for the GEMM tests.
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `x` rounded to bf16 (nearest-even), widened to f64: a bf16 product's operand, for the
    /// reference loops.
    pub(crate) fn bf16_round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// The four [`Start`]s, for the GEMM tests.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum StartKind {
        Zero,
        Current,
        RowBias,
        ColumnBias,
    }

    impl StartKind {
        pub(crate) const ALL: [StartKind; 4] =
            [StartKind::Zero, StartKind::Current, StartKind::RowBias, StartKind::ColumnBias];

        /// The Start of this kind with these biases.
        pub(crate) fn start(self, row_bias: &[f32], column_bias: &[f32]) -> Start {
            match self {
                StartKind::Zero => Start::Zero,
                StartKind::Current => Start::Current,
                StartKind::RowBias => Start::RowBias(row_bias.as_ptr()),
                StartKind::ColumnBias => Start::ColumnBias(column_bias.as_ptr()),
            }
        }

        /// What output element (i, j) should start from, `before` being its value before the product.
        pub(crate) fn expected(
            self,
            before: f32,
            row_bias: &[f32],
            column_bias: &[f32],
            (i, j): (usize, usize),
        ) -> f64 {
            f64::from(match self {
                StartKind::Zero => 0.0,
                StartKind::Current => before,
                StartKind::RowBias => row_bias[i],
                StartKind::ColumnBias => column_bias[j],
            })
        }
    }
}
