//! Fused, blocked scaled dot-product attention on the CPU: `softmax(q kᵀ · scale) v` without a mask.
//!
//! The work is split into tasks of (batch, block of query rows); a task loops over the heads and,
//! for each, over chunks of keys (flash attention): the chunk's score block
//! `S = scale · log2(e) · Q_blk K_chunkᵀ` comes from [`super::sgemm`], becomes unnormalised probabilities in
//! place (vectorised exp2 against the running row max), and `P V_chunk` is accumulated by it
//! straight into the output, whose rows are rescaled when a row's max grows and divided by their
//! probability sums at the end. The score block lives in a per-thread scratch buffer that stays in
//! cache; no call ever allocates a [Lq, Lk] matrix.
//!
//! With bf16 products ([`super::bf16_gemm`], for models whose layers are bf16) the same flash
//! attention runs key-major: the keys and the transposed values of each head are packed in bf16 once
//! per call, a task packs its queries once per head, the chunk's scores are `Sᵀ = K_chunk Qᵀ`
//! [len, n] (the softmax then runs across rows, vectorised over the queries), and `Oᵀ [dv, n] +=
//! Vᵀ_chunk Pᵀ`; scores, probabilities' sums and outputs stay f32.
//!
//! Inputs may have any strides as long as the last dimension is contiguous (the free
//! `split_heads` view is read in place). The output is written as [B, Lq, H, D] so that merging
//! the heads back to [B, Lq, H·D] is a free reshape.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::bf16_gemm::{self, PackedLhs, PackedRhs};
use super::math::{self, simd_dispatch};
use super::sgemm::{MatRef, matmul};

/// Keys per chunk of the online softmax: a [rows, chunk] score block and the chunk's keys and values
/// stay in a core's L2 cache.
const KEY_CHUNK: usize = 256;

/// Fewest query rows per task (below this the matrix product's register tiles run mostly empty).
const MIN_BLOCK_ROWS: usize = 32;
/// Most query rows per task (also the size of the per-head row-sum buffer on the stack).
const MAX_BLOCK_ROWS: usize = 256;

thread_local! {
    /// Per-thread score block [rows, KEY_CHUNK], reused across tasks and calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch of the bf16 path, reused across tasks and calls.
    static BF16_SCRATCH: RefCell<Bf16Scratch> = RefCell::new(Bf16Scratch::default());
}

/// A task's buffers on the bf16 path: packed Qᵀ [d, n] and Pᵀ [len, n], Sᵀ [len, n] and Oᵀ [dv, n].
#[derive(Default)]
struct Bf16Scratch {
    queries: PackedRhs,
    probabilities: PackedRhs,
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// `softmax(q kᵀ · scale) v` for q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] on the CPU,
/// returning [B, H, Lq, Dv] in q's dtype (a transposed view of a contiguous [B, Lq, H, Dv]).
///
/// f16 and bf16 inputs are upcast to f32 (scores are always computed in f32) and the output is
/// cast back. Inputs whose last dimension is strided are made contiguous first; any other layout
/// is read in place. With `bf16_products` the two matrix products round their operands to bf16
/// where the CPU has bf16 dot products ([`bf16_gemm::available`]; f32 products elsewhere).
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bf16_products: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let prepare = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        if t.stride().last() == Some(&1) { Ok(t) } else { t.contiguous() }
    };
    let op = Attention {
        log2_scale: (scale * std::f64::consts::LOG2_E) as f32,
        bf16: bf16_products && bf16_gemm::available(),
    };
    let out = prepare(q)?.apply_op3_no_bwd(&prepare(k)?, &prepare(v)?, &op)?;
    out.to_dtype(dtype)?.transpose(1, 2)
}

/// The candle op: q, k, v as in [`scaled_dot_product`], output [B, Lq, H, Dv] contiguous.
struct Attention {
    /// The attention scale times log2(e), so that softmax is taken with powers of 2.
    log2_scale: f32,
    /// Whether the products run on bf16 dot products.
    bf16: bool,
}

/// A rank-4 f32 operand read through its layout: `data[offset + Σ index·stride]`, last stride 1.
struct Operand<'a> {
    data: &'a [f32],
    offset: usize,
    dims: [usize; 4],
    stride: [usize; 4],
}

impl<'a> Operand<'a> {
    fn new(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            bail!("attention kernel: {name} must be f32, found {:?}", storage.dtype())
        };
        let (Ok(dims), Ok(stride)) = (<[usize; 4]>::try_from(layout.dims()), <[usize; 4]>::try_from(layout.stride()))
        else {
            bail!("attention kernel: {name} must be rank 4 [B, H, L, D], found shape {:?}", layout.dims())
        };
        if stride[3] != 1 && dims[3] > 1 {
            bail!("attention kernel: {name}'s last dimension must be contiguous, found strides {stride:?}")
        }
        Ok(Self { data, offset: layout.start_offset(), dims, stride })
    }

    /// Pointer to row `row` of head (b, h).
    fn row(&self, b: usize, h: usize, row: usize) -> *const f32 {
        // `wrapping_add` keeps this safe to compute; callers only dereference rows inside the layout.
        self.data.as_ptr().wrapping_add(self.offset + b * self.stride[0] + h * self.stride[1] + row * self.stride[2])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (Operand::new("q", qs, ql)?, Operand::new("k", ks, kl)?, Operand::new("v", vs, vl)?);
        let [b, h, lq, d] = q.dims;
        let [_, _, lk, dv] = v.dims;
        if k.dims != [b, h, lk, d] || v.dims[..2] != [b, h] {
            bail!(
                "attention kernel: q {:?}, k {:?}, v {:?} do not fit [B, H, Lq, D], [B, H, Lk, D], [B, H, Lk, Dv]",
                q.dims,
                k.dims,
                v.dims
            )
        }
        if b * lq * h * dv == 0 || lk == 0 {
            return Ok((CpuStorage::F32(vec![0f32; b * lq * h * dv]), Shape::from((b, lq, h, dv))));
        }
        // Written in full: every row of every head by its task.
        let mut out = super::output_buffer(b * lq * h * dv);
        // Query rows per task: MAX_BLOCK_ROWS, but at least 4 tasks per thread when the queries
        // allow it.
        let per_thread = (b * lq).div_ceil(4 * rayon::current_num_threads()).max(MIN_BLOCK_ROWS);
        let rows = MAX_BLOCK_ROWS.min(per_thread).min(lq);
        if self.bf16 {
            let packed = PackedHeads::new(&k, &v);
            out.par_chunks_mut(lq * h * dv).enumerate().for_each(|(bi, batch)| {
                batch.par_chunks_mut(rows * h * dv).enumerate().for_each(|(blk, chunk)| {
                    attend_block_bf16(&q, &packed, self.log2_scale, bi, blk * rows, chunk);
                })
            });
            return Ok((CpuStorage::F32(out), Shape::from((b, lq, h, dv))));
        }
        // out [B, Lq, H, Dv]: a batch is a contiguous [Lq, H, Dv] slab, a task `rows` of its rows.
        out.par_chunks_mut(lq * h * dv).enumerate().for_each(|(bi, batch)| {
            batch.par_chunks_mut(rows * h * dv).enumerate().for_each(|(blk, chunk)| {
                attend_block(&q, &k, &v, self.log2_scale, bi, blk * rows, chunk);
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((b, lq, h, dv))))
    }
}

/// Computes query rows `row0..row0 + n` of batch `bi` for every head into `out` [n, H, Dv];
/// `log2_scale` is the attention scale times log2(e).
///
/// Keys are taken [`KEY_CHUNK`] at a time with an online softmax (flash attention): each chunk's
/// scores stay in the core's cache, and the output rows and their running max and sum are rescaled
/// when a later chunk raises a row's max.
fn attend_block(q: &Operand, k: &Operand, v: &Operand, log2_scale: f32, bi: usize, row0: usize, out: &mut [f32]) {
    let [_, heads, _, d] = q.dims;
    let [_, _, lk, dv] = v.dims;
    let n = out.len() / (heads * dv);
    let chunk = KEY_CHUNK.min(lk);
    SCORES.with_borrow_mut(|scores| {
        if scores.len() < n * chunk {
            scores.resize(n * chunk, 0.0);
        }
        let mut maxes = [0f32; MAX_BLOCK_ROWS];
        let mut sums = [0f32; MAX_BLOCK_ROWS];
        for hi in 0..heads {
            let dst = &mut out[hi * dv..];
            maxes[..n].fill(f32::NEG_INFINITY);
            sums[..n].fill(0.0);
            for c0 in (0..lk).step_by(chunk) {
                let len = chunk.min(lk - c0);
                let s = &mut scores[..n * len];
                // SAFETY: q rows row0..row0+n and k rows c0..c0+len (d columns each) of head (bi, hi)
                // lie inside their storages, as their candle layouts guarantee; `s` is [n, len]
                // row-major, and nothing else aliases it during the call.
                unsafe {
                    // S [n, len] = scale · log2(e) · Q_blk [n, d] · K_chunkᵀ [d, len], so that
                    // exp(scale·q·k − m) is 2^(S − m / ln 2).
                    matmul(
                        (n, len, d),
                        s.as_mut_ptr(),
                        len,
                        false,
                        MatRef::rows(q.row(bi, hi, row0), q.stride[2]),
                        MatRef::transposed(k.row(bi, hi, c0), k.stride[2]),
                        log2_scale,
                        false,
                    );
                }
                let stats = RunningStats { maxes: &mut maxes[..n], sums: &mut sums[..n] };
                online_softmax_step(s, len, stats, dst, heads * dv, dv, c0 == 0);
                // SAFETY: as above for v rows c0..c0+len (dv columns); the destination is rows of
                // stride H·Dv starting at column hi·Dv of `out`, dv columns each, all inside `out`,
                // which nothing else aliases.
                unsafe {
                    // O_blk [n, dv] (+)= P [n, len] · V_chunk [len, dv].
                    matmul(
                        (n, dv, len),
                        dst.as_mut_ptr(),
                        heads * dv,
                        c0 > 0,
                        MatRef::rows(s.as_ptr(), len),
                        MatRef::rows(v.row(bi, hi, c0), v.stride[2]),
                        1.0,
                        false,
                    );
                }
            }
            for (i, &sum) in sums[..n].iter().enumerate() {
                let inv = 1.0 / sum;
                dst[i * heads * dv..][..dv].iter_mut().for_each(|o| *o *= inv);
            }
        }
    });
}

/// Every head's keys K [Lk, D] and transposed values Vᵀ [Dv, Lk] packed in bf16 (index b·H + h).
struct PackedHeads {
    keys: Vec<PackedLhs>,
    values_t: Vec<PackedLhs>,
    lk: usize,
    dv: usize,
}

impl PackedHeads {
    fn new(k: &Operand, v: &Operand) -> Self {
        let [b, h, lk, d] = k.dims;
        let dv = v.dims[3];
        let pack = |(bh, (keys, values_t)): (usize, (&mut PackedLhs, &mut PackedLhs))| {
            let (bi, hi) = (bh / h, bh % h);
            // SAFETY: the rows of head (bi, hi) lie inside the storages, as their layouts guarantee;
            // Vᵀ's element (c, key) is V's (key, c).
            unsafe {
                keys.pack(MatRef::rows(k.row(bi, hi, 0), k.stride[2]).into(), lk, d);
                values_t.pack(MatRef::transposed(v.row(bi, hi, 0), v.stride[2]).into(), dv, lk);
            }
        };
        let mut keys: Vec<PackedLhs> = (0..b * h).map(|_| PackedLhs::default()).collect();
        let mut values_t: Vec<PackedLhs> = (0..b * h).map(|_| PackedLhs::default()).collect();
        keys.par_iter_mut().zip(values_t.par_iter_mut()).enumerate().for_each(pack);
        Self { keys, values_t, lk, dv }
    }
}

/// [`attend_block`] on bf16 products, key-major (see the module documentation).
fn attend_block_bf16(q: &Operand, packed: &PackedHeads, log2_scale: f32, bi: usize, row0: usize, out: &mut [f32]) {
    let [_, heads, _, d] = q.dims;
    let (lk, dv) = (packed.lk, packed.dv);
    let n = out.len() / (heads * dv);
    let chunk = KEY_CHUNK.min(lk);
    BF16_SCRATCH.with_borrow_mut(|scratch| {
        scratch.scores.resize(chunk * n, 0.0);
        scratch.out.resize(dv * n, 0.0);
        let mut maxes = [0f32; MAX_BLOCK_ROWS];
        let mut sums = [0f32; MAX_BLOCK_ROWS];
        for hi in 0..heads {
            let (keys, values_t) = (&packed.keys[bi * heads + hi], &packed.values_t[bi * heads + hi]);
            // SAFETY: query rows row0..row0 + n of head (bi, hi) lie inside q's storage; Qᵀ's element
            // (p, j) is Q's (j, p).
            unsafe { scratch.queries.pack(MatRef::transposed(q.row(bi, hi, row0), q.stride[2]).into(), d, n) };
            maxes[..n].fill(f32::NEG_INFINITY);
            sums[..n].fill(0.0);
            for c0 in (0..lk).step_by(chunk) {
                let len = chunk.min(lk - c0);
                let s = &mut scratch.scores[..len * n];
                // SAFETY: s is [len, n]; the packed keys hold rows c0..c0 + len (c0 a multiple of the
                // chunk, itself of the register tile) over depth d; the CPU has bf16 dot products.
                unsafe {
                    // Sᵀ [len, n] = scale · log2(e) · K_chunk [len, d] · Qᵀ [d, n].
                    let dims = (len, n, d);
                    bf16_gemm::matmul_packed(
                        dims,
                        s.as_mut_ptr(),
                        n,
                        false,
                        (keys, c0, 0),
                        &scratch.queries,
                        log2_scale,
                    );
                }
                let stats = RunningStats { maxes: &mut maxes[..n], sums: &mut sums[..n] };
                let panels = scratch.probabilities.panels_mut(len, n);
                softmax_columns(s, n, stats, &mut scratch.out, c0 == 0, panels);
                // SAFETY: Vᵀ is packed over all Lk depths, read from c0 (even); Pᵀ holds [len, n].
                unsafe {
                    // Oᵀ [dv, n] (+)= Vᵀ_chunk [dv, len] · Pᵀ [len, n].
                    let dst = scratch.out.as_mut_ptr();
                    bf16_gemm::matmul_packed(
                        (dv, n, len),
                        dst,
                        n,
                        c0 > 0,
                        (values_t, 0, c0),
                        &scratch.probabilities,
                        1.0,
                    );
                }
            }
            for (c, channel) in scratch.out.chunks_exact(n).enumerate() {
                for (i, (&o, &sum)) in channel.iter().zip(&sums[..n]).enumerate() {
                    out[(i * heads + hi) * dv + c] = o / sum;
                }
            }
        }
    });
}

simd_dispatch! {
    /// One key chunk's step of the online softmax on the key-major score block `scores` [len, n] (in
    /// log2 units, one column per query): each query's running max rises to cover the chunk, its
    /// scores become probabilities `2^(score − max)` written as the packed bf16 operand Pᵀ [len, n]
    /// (`panels`, see [`PackedRhs::panels_mut`]), its running sum shrinks by the rise and grows by
    /// their sum, and its output so far (column of `out_t` [dv, n]; none yet for the `first` chunk)
    /// shrinks by the rise.
    fn softmax_columns(scores: &[f32], n: usize, stats: RunningStats, out_t: &mut [f32], first: bool, panels: &mut [u32]) {
        let (mut maxes, mut rescale) = ([0f32; MAX_BLOCK_ROWS], [0f32; MAX_BLOCK_ROWS]);
        let (maxes, rescale) = (&mut maxes[..n], &mut rescale[..n]);
        maxes.copy_from_slice(stats.maxes);
        for row in scores.chunks_exact(n) {
            // `f32::max` is a `vmaxps` here; a select compiles to masked stores, slow on AMD CPUs.
            maxes.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
        }
        for (((r, &m), old), sum) in rescale.iter_mut().zip(&*maxes).zip(stats.maxes.iter_mut()).zip(stats.sums.iter_mut()) {
            *r = math::exp2(*old - m);
            *sum *= *r;
            *old = m;
        }
        let len = scores.len() / n;
        let pairs = len.div_ceil(2);
        let nr = bf16_gemm::NR;
        for pp in 0..pairs {
            let row0 = &scores[2 * pp * n..][..n];
            let row1 = (2 * pp + 1 < len).then(|| &scores[(2 * pp + 1) * n..][..n]);
            for q in 0..n.div_ceil(nr) {
                let cols = nr.min(n - q * nr);
                let lanes = &mut panels[(q * pairs + pp) * nr..][..nr];
                let (m, sum) = (&maxes[q * nr..][..cols], &mut stats.sums[q * nr..][..cols]);
                let r0 = &row0[q * nr..][..cols];
                match row1 {
                    Some(row1) => {
                        let r1 = &row1[q * nr..][..cols];
                        for j in 0..cols {
                            let (a, b) = (math::exp2(r0[j] - m[j]), math::exp2(r1[j] - m[j]));
                            sum[j] += a + b;
                            lanes[j] = bf16_gemm::pair(a, b);
                        }
                    }
                    None => {
                        for j in 0..cols {
                            let a = math::exp2(r0[j] - m[j]);
                            sum[j] += a;
                            lanes[j] = bf16_gemm::pair(a, 0.0);
                        }
                    }
                }
                lanes[cols..].fill(0);
            }
        }
        if !first {
            for channel in out_t.chunks_exact_mut(n) {
                channel.iter_mut().zip(&rescale[..n]).for_each(|(o, &r)| *o *= r);
            }
        }
    }
}

/// The running max and sum of exponentials of each query row of a block.
struct RunningStats<'a> {
    maxes: &'a mut [f32],
    sums: &'a mut [f32],
}

simd_dispatch! {
    /// One key chunk's step of the online softmax on the score block `scores` [n, len] (in log2
    /// units): per row, the running max rises to cover the chunk, the scores become
    /// `2^(score − max)`, the running sum shrinks by the rise and grows by their sum, and the row's
    /// output so far (`dv` values at row · `stride` in `out`; none yet for the `first` chunk) shrinks
    /// by the rise.
    fn online_softmax_step(
        scores: &mut [f32],
        len: usize,
        stats: RunningStats,
        out: &mut [f32],
        stride: usize,
        dv: usize,
        first: bool,
    ) {
        for (i, row) in scores.chunks_exact_mut(len).enumerate() {
            let max = math::max(row).max(stats.maxes[i]);
            let rescale = math::exp2(stats.maxes[i] - max);
            for x in row.iter_mut() {
                *x = math::exp2(*x - max);
            }
            stats.sums[i] = stats.sums[i] * rescale + math::sum(row);
            stats.maxes[i] = max;
            if !first && rescale != 1.0 {
                out[i * stride..][..dv].iter_mut().for_each(|o| *o *= rescale);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor};

    use super::*;

    /// Deterministic pseudo-random values in [-2, 2).
    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The unfused computation on contiguous f32 copies: [B, H, Lq, Dv].
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().contiguous().unwrap();
        let scores = (f(q).matmul(&f(k).t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&f(v)).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
        d.flatten_all().unwrap().max(D::Minus1).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Kernel vs plain candle on contiguous inputs: (B, H, Lq, Lk, D).
    /// Measured max abs diff over these cases: 6.0e-7 (outputs of magnitude ~1; limit 1e-5).
    #[test]
    fn matches_plain_attention() {
        let cases = [
            (2, 3, 67, 67, 40),  // odd length, B·H > 1
            (1, 2, 130, 77, 40), // cross-attention, Lq not a multiple of the block
            (2, 2, 64, 64, 64),
            (1, 2, 33, 45, 80),
            (2, 1, 16, 16, 160),
            (1, 1, 70, 70, 512), // VAE mid block: one head, D = 512
            (1, 1, 1, 1, 8),
            (1, 1, 300, 9, 3), // several query blocks, rows shorter than a vector
        ];
        for (i, (b, h, lq, lk, d)) in cases.into_iter().enumerate() {
            let (q, k, v) = (
                random(&[b, h, lq, d], 3 * i as u64),
                random(&[b, h, lk, d], 3 * i as u64 + 1),
                random(&[b, h, lk, d], 3 * i as u64 + 2),
            );
            let scale = (d as f64).powf(-0.5);
            let ours = scaled_dot_product(&q, &k, &v, scale, false).unwrap();
            let diff = max_abs_diff(&ours, &plain(&q, &k, &v, scale));
            assert!(diff <= 1e-5, "{:?}: max abs diff {diff}", (b, h, lq, lk, d));
        }
    }

    /// The bf16-product path (where the CPU has it) against plain f32 attention on the same cases plus
    /// several key chunks and query blocks. bf16 keeps 8 mantissa bits (relative rounding 2⁻⁹ of q, k,
    /// the probabilities and v); with inputs in [-2, 2) the outputs differ by at most 6.2e-3
    /// (measured). Bound asserted: 2e-2.
    #[test]
    fn bf16_products_stay_within_bf16_rounding() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let cases = [
            (2, 3, 67, 67, 40),
            (1, 2, 130, 77, 40),
            (2, 2, 64, 64, 64),
            (1, 1, 70, 70, 512),
            (1, 2, 600, 700, 40),
            (1, 1, 300, 9, 3),
        ];
        let mut worst = 0f32;
        for (i, (b, h, lq, lk, d)) in cases.into_iter().enumerate() {
            let (q, k, v) = (
                random(&[b, h, lq, d], 5 * i as u64),
                random(&[b, h, lk, d], 5 * i as u64 + 1),
                random(&[b, h, lk, d], 5 * i as u64 + 2),
            );
            let scale = (d as f64).powf(-0.5);
            let ours = scaled_dot_product(&q, &k, &v, scale, true).unwrap();
            let diff = max_abs_diff(&ours, &plain(&q, &k, &v, scale));
            worst = worst.max(diff);
            assert!(diff <= 2e-2, "{:?}: max abs diff {diff}", (b, h, lq, lk, d));
        }
        eprintln!("bf16 attention: worst max abs diff {worst}");
    }

    /// Strided inputs read in place: heads split off [B, L, H·D] (a transposed view), narrowed out
    /// of a fused [B, L, 3·H·D] projection, and a last dimension that is not contiguous.
    /// Measured max abs diff: 7.2e-7 (limit 1e-5).
    #[test]
    fn reads_strided_inputs() {
        let (b, h, lq, lk, d) = (2, 4, 45, 77, 16);
        let split = |t: Tensor| {
            let (b, l, c) = t.dims3().unwrap();
            t.reshape((b, l, h, c / h)).unwrap().transpose(1, 2).unwrap()
        };
        let q = split(random(&[b, lq, h * d], 1));
        let kv = random(&[b, lk, 3 * h * d], 2);
        let k = split(kv.narrow(2, h * d, h * d).unwrap());
        let v = random(&[b, h, d, lk], 3).transpose(2, 3).unwrap();
        assert!(!q.is_contiguous() && !k.is_contiguous() && !v.is_contiguous());
        let ours = scaled_dot_product(&q, &k, &v, 0.25, false).unwrap();
        let diff = max_abs_diff(&ours, &plain(&q, &k, &v, 0.25));
        assert!(diff <= 1e-5, "max abs diff {diff}");
        // The output is [B, Lq, H, D] underneath, so merging the heads needs no copy.
        assert!(ours.transpose(1, 2).unwrap().is_contiguous());
    }

    /// bf16 and f16 inputs are upcast, attended in f32 and cast back: exactly the f32 kernel's
    /// result rounded, and within half a bf16/f16 step of the plain f32 computation.
    #[test]
    fn upcasts_half_precision() {
        let (q, k, v) = (random(&[1, 2, 50, 40], 7), random(&[1, 2, 77, 40], 8), random(&[1, 2, 77, 40], 9));
        for dtype in [DType::BF16, DType::F16] {
            let (qh, kh, vh) = (q.to_dtype(dtype).unwrap(), k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
            let ours = scaled_dot_product(&qh, &kh, &vh, 0.5, false).unwrap();
            assert_eq!(ours.dtype(), dtype);
            let f32_path = scaled_dot_product(
                &qh.to_dtype(DType::F32).unwrap(),
                &kh.to_dtype(DType::F32).unwrap(),
                &vh.to_dtype(DType::F32).unwrap(),
                0.5,
                false,
            )
            .unwrap();
            assert_eq!(max_abs_diff(&ours, &f32_path.to_dtype(dtype).unwrap()), 0.0);
            let step = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
            assert!(max_abs_diff(&ours, &plain(&qh, &kh, &vh, 0.5)) <= step);
        }
    }

    /// Mismatched shapes are errors, not panics.
    #[test]
    fn rejects_mismatched_shapes() {
        let q = random(&[1, 2, 8, 16], 1);
        assert!(scaled_dot_product(&q, &random(&[1, 2, 8, 12], 2), &random(&[1, 2, 8, 16], 3), 1.0, false).is_err());
        assert!(scaled_dot_product(&q, &random(&[1, 2, 8, 16], 2), &random(&[1, 2, 9, 16], 3), 1.0, false).is_err());
        assert!(scaled_dot_product(&random(&[2, 8, 16], 1), &q, &q, 1.0, false).is_err());
    }
}
