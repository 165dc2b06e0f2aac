//! The backward pass of fused attention ([`super::attention`]), recomputing instead of storing: the
//! forward pass keeps no probabilities, and per head and block of query rows this pass recomputes
//! the scores `S = scale · Q Kᵀ` and their softmax `P`, then (flash attention's backward)
//!
//! - `dP = dO Vᵀ`, `dS = P ∘ (dP − D)` with `D = rowsum(dO ∘ O)`,
//! - `dQ = scale · dS K`, `dKᵀ += scale · Qᵀ dS`, `dVᵀ += dOᵀ P` (accumulated transposed, so that the
//!   large [rows, Lk] blocks are read by rows; transposed back once per head),
//!
//! all products on [`super::sgemm`] with transposes read in place. A block's scores and their
//! gradient ([rows, Lk] each) are the only scratch; no [Lq, Lk] matrix of the whole head exists.

use candle_core::{CpuStorage, Result, Storage, Tensor, bail};
use rayon::prelude::*;

use super::Start;
use super::attention::Operand;
use super::math::{self, simd_dispatch};
use super::sgemm::{self, MatRef};

/// Most elements of one block's scores: query rows per block are this divided by the key count.
const BLOCK_SCORES: usize = 1 << 18;

/// The gradients of q, k and v (each [B, H, L, D], contiguous) of `out = softmax(q kᵀ · scale) v`
/// (q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv], f32 with a contiguous last dimension; `out`
/// as the forward kernel wrote it, [B, Lq, H, Dv]) for the gradient `grad` of `out`.
pub(super) fn gradients(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = q.device().clone();
    let (out, grad) = (out.contiguous()?, grad.contiguous()?);
    let ((qg, ql), (kg, kl), (vg, vl)) = (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout());
    let ((og, ol), (gg, gl)) = (out.storage_and_layout(), grad.storage_and_layout());
    let (q, k, v) =
        (Operand::new("q", cpu(&qg)?, ql)?, Operand::new("k", cpu(&kg)?, kl)?, Operand::new("v", cpu(&vg)?, vl)?);
    let [b, h, lq, d] = q.dims;
    let [_, _, lk, dv] = v.dims;
    let zeros = |l: usize, c: usize| Tensor::zeros((b, h, l, c), candle_core::DType::F32, &device);
    if b * h * lq * lk * d * dv == 0 {
        return Ok((zeros(lq, d)?, zeros(lk, d)?, zeros(lk, dv)?));
    }
    // out and its gradient [B, Lq, H, Dv] read as [B, H, Lq, Dv].
    let (mut o, mut g) = (Operand::new("output", cpu(&og)?, ol)?, Operand::new("gradient", cpu(&gg)?, gl)?);
    for (name, operand) in [("output", &mut o), ("gradient", &mut g)] {
        if operand.dims != [b, lq, h, dv] {
            bail!("attention backward: {name} {:?} is not [B, Lq, H, Dv] = {:?}", operand.dims, [b, lq, h, dv])
        }
        let [s0, s1, s2, _] = operand.stride;
        (operand.dims, operand.stride) = ([b, h, lq, dv], [s0, s2, s1, 1]);
    }
    let mut grad_q = super::output_buffer(b * h * lq * d);
    let mut grad_k = super::output_buffer(b * h * lk * d);
    let mut grad_v = super::output_buffer(b * h * lk * dv);
    let heads = Heads { q: &q, k: &k, v: &v, o: &o, g: &g, scale };
    let (q_head, k_head, v_head) = (lq * d, lk * d, lk * dv);
    if b * h >= rayon::current_num_threads() {
        // One head per task, its products on that thread.
        grad_q
            .par_chunks_mut(q_head)
            .zip(grad_k.par_chunks_mut(k_head))
            .zip(grad_v.par_chunks_mut(v_head))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| heads.head(bh, dq, dk, dv, false));
    } else {
        grad_q
            .chunks_mut(q_head)
            .zip(grad_k.chunks_mut(k_head))
            .zip(grad_v.chunks_mut(v_head))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| heads.head(bh, dq, dk, dv, true));
    }
    Ok((
        Tensor::from_vec(grad_q, (b, h, lq, d), &device)?,
        Tensor::from_vec(grad_k, (b, h, lk, d), &device)?,
        Tensor::from_vec(grad_v, (b, h, lk, dv), &device)?,
    ))
}

/// The CPU storage behind a tensor.
fn cpu(storage: &Storage) -> Result<&CpuStorage> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => bail!("attention backward: CPU tensors only"),
    }
}

/// What every head's backward pass reads.
struct Heads<'a> {
    q: &'a Operand<'a>,
    k: &'a Operand<'a>,
    v: &'a Operand<'a>,
    o: &'a Operand<'a>,
    g: &'a Operand<'a>,
    scale: f32,
}

impl Heads<'_> {
    /// Head `bh` (= b·H + h): its dQ [Lq, D] into `dq`, dK [Lk, D] and dV [Lk, Dv] into `dk` and
    /// `dv`; the products split over the threads with `parallel`.
    fn head(&self, bh: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], parallel: bool) {
        let Self { q, k, v, o, g, scale } = *self;
        let [_, h, lq, d] = q.dims;
        let [_, _, lk, dvs] = v.dims;
        let (bi, hi) = (bh / h, bh % h);
        let rows = (BLOCK_SCORES / lk).clamp(1, lq);
        let mut probabilities = vec![0f32; rows * lk];
        let mut grad_scores = vec![0f32; rows * lk];
        let mut deltas = vec![0f32; rows];
        // dKᵀ [D, Lk] and dVᵀ [Dv, Lk], accumulated over the query blocks.
        let (mut dk_t, mut dv_t) = (vec![0f32; d * lk], vec![0f32; dvs * lk]);
        let keys = MatRef::rows(k.row(bi, hi, 0), k.stride[2]);
        for i0 in (0..lq).step_by(rows) {
            let n = rows.min(lq - i0);
            let (p, ds) = (&mut probabilities[..n * lk], &mut grad_scores[..n * lk]);
            let queries = MatRef::rows(q.row(bi, hi, i0), q.stride[2]);
            let grad_out = MatRef::rows(g.row(bi, hi, i0), g.stride[2]);
            // SAFETY: every MatRef addresses rows of head (bi, hi) inside its operand's storage, as the
            // layouts guarantee; p, ds, dq, dk and dv are this task's own, of the sizes given.
            unsafe {
                // P [n, Lk] = softmax(scale · Q_blk Kᵀ).
                let keys_t = MatRef::transposed(k.row(bi, hi, 0), k.stride[2]);
                sgemm::matmul((n, lk, d), p.as_mut_ptr(), lk, Start::Zero, queries, keys_t, scale, parallel);
                softmax_rows(p, lk);
                // dP [n, Lk] = dO_blk Vᵀ.
                let values_t = MatRef::transposed(v.row(bi, hi, 0), v.stride[2]);
                sgemm::matmul((n, lk, dvs), ds.as_mut_ptr(), lk, Start::Zero, grad_out, values_t, 1.0, parallel);
                for (i, delta) in deltas[..n].iter_mut().enumerate() {
                    let oi = std::slice::from_raw_parts(o.row(bi, hi, i0 + i), dvs);
                    let gi = std::slice::from_raw_parts(g.row(bi, hi, i0 + i), dvs);
                    *delta = oi.iter().zip(gi).map(|(a, b)| a * b).sum();
                }
                // dS = P ∘ (dP − D).
                score_gradients(ds, p, &deltas[..n], lk);
                let ds_rows = MatRef::rows(ds.as_ptr(), lk);
                // dQ_blk [n, D] = scale · dS K.
                sgemm::matmul((n, d, lk), dq[i0 * d..].as_mut_ptr(), d, Start::Zero, ds_rows, keys, scale, parallel);
                // dKᵀ [D, Lk] += scale · Q_blkᵀ dS; dVᵀ [Dv, Lk] += dO_blkᵀ P: the transposed small
                // block on the left, the [n, Lk] blocks read by rows.
                let queries_t = MatRef::transposed(q.row(bi, hi, i0), q.stride[2]);
                sgemm::matmul((d, lk, n), dk_t.as_mut_ptr(), lk, Start::Current, queries_t, ds_rows, scale, parallel);
                let grad_out_t = MatRef::transposed(g.row(bi, hi, i0), g.stride[2]);
                let p_rows = MatRef::rows(p.as_ptr(), lk);
                sgemm::matmul((dvs, lk, n), dv_t.as_mut_ptr(), lk, Start::Current, grad_out_t, p_rows, 1.0, parallel);
            }
        }
        transpose_into(dk, &dk_t, d, lk);
        transpose_into(dv, &dv_t, dvs, lk);
    }
}

/// `dst` [cols, rows] = the transpose of `src` [rows, cols].
fn transpose_into(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    for (i, row) in src.chunks_exact(cols).enumerate().take(rows) {
        for (j, &x) in row.iter().enumerate() {
            dst[j * rows + i] = x;
        }
    }
}

simd_dispatch! {
    /// Each row of `s` [rows, cols] replaced by its softmax.
    fn softmax_rows(s: &mut [f32], cols: usize) {
        for row in s.chunks_exact_mut(cols) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for x in row.iter_mut() {
                *x = math::exp(*x - max);
            }
            let inv = 1.0 / math::sum(row);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

simd_dispatch! {
    /// `ds` [rows, cols] (holding dP) replaced by `P ∘ (dP − D)`, D one value per row.
    fn score_gradients(ds: &mut [f32], p: &[f32], deltas: &[f32], cols: usize) {
        for ((ds, p), &delta) in ds.chunks_exact_mut(cols).zip(p.chunks_exact(cols)).zip(deltas) {
            for (x, &p) in ds.iter_mut().zip(p) {
                *x = p * (*x - delta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    /// Gradients of q, k and v through the fused kernel against candle's composed differentiable
    /// ops, on strided head views as the models pass them (self- and cross-attention, one head per
    /// thread and fewer heads than threads, query blocks that do not divide the queries).
    #[test]
    fn gradients_match_candle() {
        let dev = Device::Cpu;
        for (b, h, lq, lk, d) in [(2, 3, 67, 67, 16), (1, 1, 300, 77, 40), (1, 2, 2100, 130, 8)] {
            let q = Var::randn(0f32, 1.0, (b, lq, h * d), &dev).unwrap();
            let k = Var::randn(0f32, 1.0, (b, lk, h * d), &dev).unwrap();
            let v = Var::randn(0f32, 1.0, (b, lk, h * d), &dev).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev).unwrap();
            let heads = |t: &Var| t.as_tensor().reshape((b, (), h, d)).unwrap().transpose(1, 2).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let ours = grads(
                super::super::attention::scaled_dot_product(&heads(&q), &heads(&k), &heads(&v), scale, false).unwrap(),
            );
            let scores =
                (heads(&q).contiguous().unwrap().matmul(&heads(&k).contiguous().unwrap().t().unwrap()).unwrap()
                    * scale)
                    .unwrap();
            let plain =
                candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&heads(&v).contiguous().unwrap()).unwrap();
            let plain = grads(plain);
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, c) = (ours.get(var).unwrap(), plain.get(var).unwrap());
                let err = (a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let top = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err <= 1e-5 * top.max(1.0), "({b}, {h}, {lq}, {lk}, {d}) d{name}: error {err} (max {top})");
            }
        }
    }
}
