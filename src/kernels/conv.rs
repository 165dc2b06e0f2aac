//! 2-D convolution for CPU f32 inputs, NCHW in and out, on [`super::sgemm`], or on
//! [`super::bf16_gemm`] for bf16 weights where the CPU has bf16 dot products.
//!
//! [`conv2d`] picks one of three algorithms ([`ConvPath`]):
//! - 1x1, stride 1, no padding: one GEMM per batch item, out[b] = W [Cout, Cin] @ x[b] [Cin, H·W].
//! - im2col: the patches of a band of output rows as columns [Cin·k·k, rows·Wo], then
//!   W [Cout, Cin·k·k] @ columns written straight into the NCHW output.
//! - Winograd F(4x4, 3x3) (Lavin & Gray, points 0, ±1, ±2) for the large 3x3 stride-1 pad-1
//!   convolutions: 36 GEMMs [Cout, Cin] @ [Cin, tiles] instead of 144 multiplies per 4x4 output tile,
//!   4x less arithmetic than direct convolution.
//!
//! Scratch is bounded (tens of MB at most) and reused within a call; nothing is cached between calls.
//! Other devices use candle's `conv2d`; f16/bf16 inputs are computed in f32 and rounded back.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use half::slice::HalfBitsSliceExt;
use rayon::prelude::*;

use super::bf16_gemm::{self, Lhs, Operand, PackedLhs, PackedRhs, Rhs};
use super::math::simd_dispatch;
use super::sgemm::{self, MatRef};
use super::{LayerWeight, SharedMut, Start, kernel_weight};

/// The algorithm [`conv2d`] uses for a convolution on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPath {
    /// 1x1 stride 1 pad 0: a plain GEMM per batch item.
    Pointwise,
    /// im2col into bounded column bands, then GEMM.
    Im2col,
    /// Winograd F(4x4, 3x3) for 3x3 stride 1 pad 1.
    Winograd,
}

/// Smallest number of 4x4 output tiles (over the whole batch) for which Winograd beats im2col,
/// measured with `cargo bench --bench kernels -- conv` (2 threads, Zen 3).
const WINOGRAD_MIN_TILES: usize = 32;
/// The same for bf16 weights on bf16 dot products: im2col then runs twice as fast, while Winograd
/// keeps f32 products (2 threads, Zen 4: the UNet's 16x16 layers, 32 tiles, take half the time on
/// im2col, its 32x32 ones, 128 tiles, three quarters on Winograd).
const WINOGRAD_MIN_TILES_BF16: usize = 128;
/// Smallest input channel count for Winograd: below it the GEMMs are too thin to pay for the transforms.
const WINOGRAD_MIN_CIN: usize = 16;
/// Upper bound (f32 elements) of one scratch buffer: im2col columns, transformed input or GEMM output.
const SCRATCH_ELEMS: usize = 4 << 20;
/// Target size (f32 elements) of each Winograd buffer of one rayon task (V or M, ~2 MB: they stay in
/// cache between the transforms and the GEMMs); measured best among 0.125–4 M.
const TASK_SCRATCH_ELEMS: usize = 512 << 10;
/// Fewest tiles per rayon task's chunk: thinner GEMMs lose more than the cache gains.
const MIN_TASK_TILES: usize = 32;
/// Upper bound (f32 elements) of the transformed weights held at once.
const WEIGHT_SCRATCH_ELEMS: usize = 10 << 20;

/// The path [`conv2d`] takes for x [B, Cin, H, W] on the CPU with a [Cout, Cin, k, k] kernel,
/// `bf16_products` when the weight is bf16 and the CPU has bf16 dot products.
#[allow(clippy::too_many_arguments)]
pub fn cpu_path(
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bf16_products: bool,
) -> ConvPath {
    let min_tiles = if bf16_products { WINOGRAD_MIN_TILES_BF16 } else { WINOGRAD_MIN_TILES };
    if k == 1 && stride == 1 && padding == 0 {
        ConvPath::Pointwise
    } else if k == 3
        && stride == 1
        && padding == 1
        && cin >= WINOGRAD_MIN_CIN
        && b * h.div_ceil(4) * w.div_ceil(4) >= min_tiles
    {
        ConvPath::Winograd
    } else {
        ConvPath::Im2col
    }
}

/// 2-D convolution (cross-correlation, as PyTorch) with optional bias: x [B, Cin, H, W], weight
/// [Cout, Cin, k, k], bias [Cout] → [B, Cout, (H + 2p − k)/s + 1, (W + 2p − k)/s + 1].
///
/// CPU f32/f16/bf16 inputs run the kernels of this module (in f32, the weight in f32 or bf16, see
/// [`kernel_weight`]); anything else runs candle's `conv2d`.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let supported = matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !xs.device().is_cpu() || !supported {
        let ys = xs.conv2d(&weight.to_dtype(xs.dtype())?, padding, stride, 1, 1)?;
        return match bias {
            Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        };
    }
    let (_, cin, h, w) = xs.dims4()?;
    let (cout, w_cin, kh, kw) = weight.dims4()?;
    if w_cin != cin || kh != kw || stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        bail!(
            "conv2d: input {:?} and weight {:?} with stride {stride} and padding {padding} do not fit (square kernel, \
             weight in-channels = input channels, kernel no larger than the padded input)",
            xs.dims(),
            weight.dims()
        );
    }
    if let Some(bias) = bias
        && bias.dims() != [cout]
    {
        bail!("conv2d: bias {:?} does not match weight {:?} (expected [{cout}])", bias.dims(), weight.dims());
    }
    let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let op = Conv2dOp { stride, padding };
    let ys = match bias {
        Some(bias) => f32c(xs)?.apply_op3_no_bwd(&kernel_weight(weight)?, &f32c(bias)?, &op)?,
        None => f32c(xs)?.apply_op2_no_bwd(&kernel_weight(weight)?, &op)?,
    };
    ys.to_dtype(xs.dtype())
}

/// The candle custom op behind [`conv2d`]: CustomOp2 (x, weight) or CustomOp3 (x, weight, bias).
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "diffctl-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "diffctl-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(s1, l1, s2, l2, Some((s3, l3)))
    }
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl Conv2dOp {
    fn forward(
        &self,
        xs: &CpuStorage,
        x_layout: &Layout,
        ws: &CpuStorage,
        w_layout: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("conv2d", xs, x_layout)?;
        let weight = super::layer_weight("conv2d", ws, w_layout)?;
        let bias = bias.map(|(s, l)| super::contiguous_f32("conv2d", s, l)).transpose()?;
        let (b, cin, h, w) = x_layout.shape().dims4()?;
        let (cout, _, k, _) = w_layout.shape().dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        let ho = (h + 2 * padding - k) / stride + 1;
        let wo = (w + 2 * padding - k) / stride + 1;
        let d = Dims { b, cin, h, w, cout, k, stride, padding, ho, wo };
        // Written in full by every path.
        let mut out = super::output_buffer(b * cout * ho * wo);
        let bf16_products = matches!(weight, LayerWeight::Bf16(_));
        match cpu_path(b, cin, h, w, k, stride, padding, bf16_products) {
            ConvPath::Pointwise => pointwise(&d, x, weight, bias, &mut out),
            ConvPath::Winograd => winograd(&d, x, weight, bias, &mut out),
            ConvPath::Im2col => im2col(&d, x, weight, bias, &mut out),
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, ho, wo))))
    }
}

/// Where the products W @ columns of one batch item start: each output channel (a row) at its bias.
fn channel_bias(bias: Option<&[f32]>) -> Start {
    bias.map_or(Start::Zero, |b| Start::RowBias(b.as_ptr()))
}

/// The weight matrix W [Cout, Cin·k·k] as the 1x1 and im2col products read it: f32 in place, or bf16
/// packed once per call (then shared by every batch item, band and thread), with room for the columns
/// it multiplies packed once for all threads.
enum WeightMatrix<'a> {
    F32(&'a [f32]),
    Bf16 { weight: PackedLhs, columns: PackedRhs },
}

impl<'a> WeightMatrix<'a> {
    /// W [m, k] (row-major) from the layer's weight.
    fn new(weight: LayerWeight<'a>, (m, k): (usize, usize)) -> Self {
        match weight {
            LayerWeight::F32(w) => WeightMatrix::F32(w),
            LayerWeight::Bf16(w) => {
                let mut weight = PackedLhs::default();
                // SAFETY: w holds the m x k weight, row-major.
                unsafe { weight.pack(Operand::bf16_rows(w.as_ptr(), k), m, k) };
                WeightMatrix::Bf16 { weight, columns: PackedRhs::default() }
            }
        }
    }

    /// dst [m, n] = `start` + W [m, k] @ rhs [k, n], on the product for the weight's dtype, over all
    /// threads. With bf16 products and no fewer rows than columns (the split between threads is then
    /// by rows, and each would pack all of rhs), rhs is packed first, once, by all threads.
    ///
    /// # Safety
    /// (m, k) must be the weight's shape; `rhs`, `dst` and `start` as in [`sgemm::matmul`].
    unsafe fn times(&mut self, (m, n, k): (usize, usize, usize), dst: *mut f32, ldd: usize, start: Start, rhs: MatRef) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                WeightMatrix::F32(w) => {
                    sgemm::matmul((m, n, k), dst, ldd, start, MatRef::rows(w.as_ptr(), k), rhs, 1.0, true)
                }
                WeightMatrix::Bf16 { weight, columns } => {
                    let rhs = if m >= n {
                        columns.pack(rhs.into(), k, n, true);
                        Rhs::Packed(columns)
                    } else {
                        Rhs::Strided(rhs.into())
                    };
                    bf16_gemm::matmul((m, n, k), dst, ldd, start, Lhs::Packed(weight), rhs, 1.0, true)
                }
            }
        }
    }
}

impl LayerWeight<'_> {
    /// Output channel `co`'s [Cin·k·k] weights as f32 (`scratch` holds the widened copy of bf16 ones).
    fn channel<'s>(&'s self, co: usize, len: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match *self {
            LayerWeight::F32(w) => &w[co * len..][..len],
            LayerWeight::Bf16(w) => {
                scratch.resize(len, 0.0);
                super::convert::widen_bf16(scratch, w[co * len..][..len].reinterpret_cast());
                scratch
            }
        }
    }
}

/// 1x1 stride-1 convolution: out[b] [Cout, H·W] = bias + W [Cout, Cin] @ x[b] [Cin, H·W].
fn pointwise(d: &Dims, x: &[f32], weight: LayerWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    let mut weight = WeightMatrix::new(weight, (d.cout, d.cin));
    let hw = d.h * d.w;
    let start = channel_bias(bias);
    for (xb, ob) in x.chunks(d.cin * hw).zip(out.chunks_mut(d.cout * hw)) {
        // SAFETY: ob is [Cout, HW], weight [Cout, Cin], xb [Cin, HW], all row-major and disjoint; the
        // bias holds Cout values (checked by `conv2d`).
        unsafe { weight.times((d.cout, hw, d.cin), ob.as_mut_ptr(), hw, start, MatRef::rows(xb.as_ptr(), hw)) };
    }
}

/// General convolution: per batch item and band of output rows, columns [Cin·k·k, rows·Wo] then
/// out[b][:, band] = bias + W [Cout, Cin·k·k] @ columns.
fn im2col(d: &Dims, x: &[f32], weight: LayerWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    let kk = d.cin * d.k * d.k;
    let mut weight = WeightMatrix::new(weight, (d.cout, kk));
    let plane_out = d.ho * d.wo;
    let start = channel_bias(bias);
    let band_rows = (SCRATCH_ELEMS / (kk * d.wo)).clamp(1, d.ho);
    let mut cols = vec![0f32; kk * band_rows * d.wo];
    for (xb, ob) in x.chunks(d.cin * d.h * d.w).zip(out.chunks_mut(d.cout * plane_out)) {
        for oy0 in (0..d.ho).step_by(band_rows) {
            let rows = band_rows.min(d.ho - oy0);
            let n = rows * d.wo;
            let cols = &mut cols[..kk * n];
            cols.par_chunks_mut(n).enumerate().for_each(|(r, col)| {
                let (ci, ky, kx) = (r / (d.k * d.k), r / d.k % d.k, r % d.k);
                im2col_row(d, &xb[ci * d.h * d.w..(ci + 1) * d.h * d.w], ky, kx, oy0, col);
            });
            // SAFETY: the destination is rows oy0.. of ob [Cout, Ho·Wo] (row stride Ho·Wo), weight is
            // [Cout, kk] and cols [kk, n], row-major and disjoint; the bias holds Cout values.
            unsafe {
                let dst = ob[oy0 * d.wo..].as_mut_ptr();
                weight.times((d.cout, n, kk), dst, plane_out, start, MatRef::rows(cols.as_ptr(), n))
            };
        }
    }
}

/// One im2col row: col [rows·Wo] (rows = col.len() / Wo, from output row `oy0`) holds the input plane
/// [H, W] sample that kernel tap (ky, kx) meets at each output position, 0 in the padding.
fn im2col_row(d: &Dims, plane: &[f32], ky: usize, kx: usize, oy0: usize, col: &mut [f32]) {
    for (dy, row) in col.chunks_mut(d.wo).enumerate() {
        let iy = ((oy0 + dy) * d.stride + ky).wrapping_sub(d.padding);
        if iy >= d.h {
            row.fill(0.0);
            continue;
        }
        let src = &plane[iy * d.w..(iy + 1) * d.w];
        if d.stride == 1 {
            // Output column ox reads input column ox + kx − p: valid for ox in [lo, hi).
            let lo = d.padding.saturating_sub(kx).min(d.wo);
            let hi = (d.w + d.padding).saturating_sub(kx).clamp(lo, d.wo);
            row[..lo].fill(0.0);
            row[lo..hi].copy_from_slice(&src[lo + kx - d.padding..hi + kx - d.padding]);
            row[hi..].fill(0.0);
        } else {
            for (ox, v) in row.iter_mut().enumerate() {
                let ix = (ox * d.stride + kx).wrapping_sub(d.padding);
                *v = if ix < d.w { src[ix] } else { 0.0 };
            }
        }
    }
}

/// Tiles processed side by side in SIMD lanes by the Winograd transforms.
const LANES: usize = 8;
/// One value for each of [`LANES`] tiles.
type Lanes = [f32; LANES];

/// Winograd F(4x4, 3x3), 3x3 stride 1 pad 1 (so Ho = H, Wo = W). The B·⌈H/4⌉·⌈W/4⌉ output tiles
/// (numbered over the whole batch) go in chunks of `tc` ([`WinogradChunk::run`]), with U [cb, 36, Cin]
/// = G g Gᵀ for a block of cb output channels (all Cout when it fits [`WEIGHT_SCRATCH_ELEMS`]).
///
/// With one block and enough tiles, each rayon task runs whole chunks on its own scratch (which stays
/// in cache); otherwise the chunks run one after another, each step parallel inside.
fn winograd(d: &Dims, x: &[f32], weight: LayerWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    let tiles_w = d.w.div_ceil(4);
    let tiles_img = d.h.div_ceil(4) * tiles_w;
    let tiles = d.b * tiles_img;
    let blocks = (36 * d.cout * d.cin).div_ceil(WEIGHT_SCRATCH_ELEMS).max(1);
    let cb = d.cout.div_ceil(blocks);
    let geom = TileGeom { h: d.h, w: d.w, tiles_w, tiles_img };
    let out = SharedMut(out.as_mut_ptr());
    let mut u = Vec::new();
    // A multiple of 16 tiles: the GEMMs' n, in whole AVX2 register tiles.
    let tc = ((TASK_SCRATCH_ELEMS / (36 * d.cin.max(d.cout)) + 8) / 16 * 16).max(MIN_TASK_TILES);
    if blocks == 1 && tiles >= 4 * tc * rayon::current_num_threads() {
        let u = weight_transform(d, weight, (0, cb), &mut u);
        let chunk = WinogradChunk { d, geom, x, u, co0: 0, cb, bias, out, tc, parallel: false };
        let scratch = || (vec![0f32; d.cin * 36 * tc], vec![0f32; cb * 36 * tc]);
        (0..tiles).into_par_iter().step_by(tc).for_each_init(scratch, |(v, m), g0| {
            chunk.run(g0, tc.min(tiles - g0), v, m);
        });
        return;
    }
    let tc = (SCRATCH_ELEMS / (36 * d.cin.max(cb)) / LANES * LANES).clamp(LANES, tiles.next_multiple_of(LANES));
    let (mut v, mut m) = (vec![0f32; d.cin * 36 * tc], vec![0f32; cb * 36 * tc]);
    for co0 in (0..d.cout).step_by(cb) {
        let cbn = cb.min(d.cout - co0);
        let u = weight_transform(d, weight, (co0, cbn), &mut u);
        let chunk = WinogradChunk { d, geom, x, u, co0, cb: cbn, bias, out, tc, parallel: true };
        for g0 in (0..tiles).step_by(tc) {
            chunk.run(g0, tc.min(tiles - g0), &mut v, &mut m);
        }
    }
}

/// U [cb, 36, Cin] = G g Gᵀ for the output channels co0..co0 + cb, made in `u`. bf16 weights are
/// widened and their U kept in f32 for f32 products: with bf16 products (inputs and U rounded to bf16)
/// F(4x4, 3x3)'s transforms amplified the rounding to 5e-2 of max |out|, against 1.5e-3 for a bf16
/// direct convolution (`bf16_weights_on_every_path`).
fn weight_transform<'a>(d: &Dims, weight: LayerWeight, (co0, cb): (usize, usize), u: &'a mut Vec<f32>) -> &'a [f32] {
    let cin = d.cin;
    u.resize(cb * 36 * cin, 0.0);
    u.par_chunks_mut(36 * cin).enumerate().for_each_init(Vec::new, |scratch, (j, uc)| {
        transform_channel(weight.channel(co0 + j, cin * 9, scratch), cin, uc, cin);
    });
    u
}

/// One Winograd step over a chunk of tiles for output channels co0..co0 + cb.
struct WinogradChunk<'a> {
    d: &'a Dims,
    geom: TileGeom,
    /// x [B, Cin, H, W].
    x: &'a [f32],
    /// U [cb, 36, Cin].
    u: &'a [f32],
    co0: usize,
    cb: usize,
    /// [Cout].
    bias: Option<&'a [f32]>,
    /// out [B, Cout, H, W].
    out: SharedMut,
    /// Tiles per chunk (a multiple of [`LANES`]).
    tc: usize,
    /// Whether to spread each step of [`WinogradChunk::run`] over rayon's threads.
    parallel: bool,
}

impl WinogradChunk<'_> {
    /// Tiles g0..g0 + n (n ≤ tc): V [Cin, 36, tc] = Bᵀ d B; M[:, ξ, :] [cb, tc] = U[:, ξ, :] [cb, Cin] @
    /// V[:, ξ, :] [Cin, tc] for the 36 points ξ; out = bias + Aᵀ m A, clipped to the image. `v` holds
    /// Cin·36·tc elements, `m` cb·36·tc.
    fn run(&self, g0: usize, n: usize, v: &mut [f32], m: &mut [f32]) {
        let (d, tc) = (self.d, self.tc);
        let input = |(ci, vc): (usize, &mut [f32])| input_transform(&self.geom, self.x, d.cin, ci, g0, n, tc, vc);
        let v = &mut v[..d.cin * 36 * tc];
        if self.parallel {
            v.par_chunks_mut(36 * tc).enumerate().for_each(input);
        } else {
            v.chunks_mut(36 * tc).enumerate().for_each(input);
        }
        let (m, v) = (&mut m[..self.cb * 36 * tc], &*v);
        let m_ptr = SharedMut(m.as_mut_ptr());
        let product = |xi: usize| {
            let dims = (self.cb, n, d.cin);
            let v = MatRef::rows(v[xi * tc..].as_ptr(), 36 * tc);
            // SAFETY: point ξ writes only M[:, ξ, :n] of M [cb, 36, tc]; U [cb, 36, Cin] and V [Cin, 36, tc]
            // are only read, and all three outlive the call.
            unsafe {
                let u = MatRef::rows(self.u[xi * d.cin..].as_ptr(), 36 * d.cin);
                sgemm::matmul(dims, m_ptr.get().add(xi * tc), 36 * tc, Start::Zero, u, v, 1.0, false)
            };
        };
        if self.parallel {
            (0..36).into_par_iter().for_each(product);
        } else {
            (0..36).for_each(product);
        }
        let output = |(j, mc): (usize, &[f32])| {
            let co = self.co0 + j;
            let bias = self.bias.map_or(0.0, |b| b[co]);
            // SAFETY: this writes only the tiles g0..g0 + n of output channel `co`, which no other task
            // writes, and `out` outlives the call.
            unsafe { output_transform(&self.geom, self.out, d.cout, co, bias, g0, n, tc, mc) };
        };
        if self.parallel {
            m.par_chunks(36 * tc).enumerate().for_each(output);
        } else {
            m.chunks(36 * tc).enumerate().for_each(output);
        }
    }
}

/// Where the Winograd tiles of an image lie.
#[derive(Debug, Clone, Copy)]
struct TileGeom {
    h: usize,
    w: usize,
    tiles_w: usize,
    tiles_img: usize,
}

impl TileGeom {
    /// (batch item, first row, first column) of the 4x4 output tile numbered `g` over the batch.
    fn tile(&self, g: usize) -> (usize, usize, usize) {
        let (b, t) = (g / self.tiles_img, g % self.tiles_img);
        (b, 4 * (t / self.tiles_w), 4 * (t % self.tiles_w))
    }
}

simd_dispatch! {
    /// U = G g Gᵀ for one output channel, [`LANES`] input channels at a time: `out[ξ·xi_stride + ci]`
    /// (point ξ = 6·row + column) from the 3x3 kernels `taps` [Cin, 3, 3].
    fn transform_channel(taps: &[f32], cin: usize, out: &mut [f32], xi_stride: usize) {
        for ci0 in (0..cin).step_by(LANES) {
            let lanes = LANES.min(cin - ci0);
            let mut g = [[0f32; LANES]; 9];
            for l in 0..lanes {
                for (t, gt) in g.iter_mut().enumerate() {
                    gt[l] = taps[(ci0 + l) * 9 + t];
                }
            }
            // Columns: t [6, 3] = G g; then rows: G tᵀ.
            let mut t = [[[0f32; LANES]; 3]; 6];
            for c in 0..3 {
                let col = g_transform(&[g[c], g[3 + c], g[6 + c]]);
                for r in 0..6 {
                    t[r][c] = col[r];
                }
            }
            for (r, tr) in t.iter().enumerate() {
                for (c, val) in g_transform(tr).iter().enumerate() {
                    out[(r * 6 + c) * xi_stride + ci0..][..lanes].copy_from_slice(&val[..lanes]);
                }
            }
        }
    }
}

/// G g for three lane vectors (G [6, 3] of F(4, 3) with points 0, ±1, ±2, ∞).
#[inline(always)]
fn g_transform(g: &[Lanes; 3]) -> [Lanes; 6] {
    let mut o = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let [g0, g1, g2] = [g[0][l], g[1][l], g[2][l]];
        o[0][l] = g0 / 4.0;
        o[1][l] = -(g0 + g1 + g2) / 6.0;
        o[2][l] = -(g0 - g1 + g2) / 6.0;
        o[3][l] = g0 / 24.0 + g1 / 12.0 + g2 / 6.0;
        o[4][l] = g0 / 24.0 - g1 / 12.0 + g2 / 6.0;
        o[5][l] = g2;
    }
    o
}

/// Bᵀ d for six lane vectors (Bᵀ [6, 6] of F(4, 3)).
#[inline(always)]
fn b_transform(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut o = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        o[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        o[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        o[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        o[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        o[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        o[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    o
}

/// Aᵀ m for six lane vectors (Aᵀ [4, 6] of F(4, 3)).
#[inline(always)]
fn a_transform(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut o = [[0f32; LANES]; 4];
    for l in 0..LANES {
        let [m0, m1, m2, m3, m4, m5] = [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]];
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o[0][l] = m0 + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m5;
    }
    o
}

simd_dispatch! {
    /// v [36, tc] = Bᵀ d B for input channel `ci` of x [B, Cin, H, W] and tiles g0..g0+n: d is the
    /// tile's 6x6 input patch starting one row and column before the output tile, 0 outside the image.
    /// Whole groups of [`LANES`] columns are written (0 past n), so tc must be a multiple of [`LANES`].
    fn input_transform(geom: &TileGeom, x: &[f32], cin: usize, ci: usize, g0: usize, n: usize, tc: usize, v: &mut [f32]) {
        let (h, w) = (geom.h, geom.w);
        for t0 in (0..n).step_by(LANES) {
            let lanes = LANES.min(n - t0);
            let mut d = [[[0f32; LANES]; 6]; 6];
            for l in 0..lanes {
                let (b, y0, x0) = geom.tile(g0 + t0 + l);
                let plane = &x[(b * cin + ci) * h * w..][..h * w];
                for (r, dr) in d.iter_mut().enumerate() {
                    let y = (y0 + r).wrapping_sub(1);
                    if y >= h {
                        continue;
                    }
                    let row = &plane[y * w..][..w];
                    for (c, dc) in dr.iter_mut().enumerate() {
                        let xx = (x0 + c).wrapping_sub(1);
                        if xx < w {
                            dc[l] = row[xx];
                        }
                    }
                }
            }
            // Columns: t = Bᵀ d; then rows: (Bᵀ tᵀ)ᵀ = t B.
            let mut t = [[[0f32; LANES]; 6]; 6];
            for c in 0..6 {
                let col = b_transform(&[d[0][c], d[1][c], d[2][c], d[3][c], d[4][c], d[5][c]]);
                for r in 0..6 {
                    t[r][c] = col[r];
                }
            }
            for (r, tr) in t.iter().enumerate() {
                for (c, val) in b_transform(tr).iter().enumerate() {
                    v[(r * 6 + c) * tc + t0..][..LANES].copy_from_slice(val);
                }
            }
        }
    }
}

simd_dispatch! {
    /// Output channel `co` of out [B, Cout, H, W] for tiles g0..g0+n: bias + Aᵀ m A from
    /// m [36, tc] (this channel's GEMM results, tc a multiple of [`LANES`]), clipped to the image.
    ///
    /// # Safety
    /// `out` must point to a live [B, Cout, H, W] buffer whose channel `co` no one else accesses
    /// during the call.
    unsafe fn output_transform(geom: &TileGeom, out: SharedMut, cout: usize, co: usize, bias: f32, g0: usize, n: usize, tc: usize, m: &[f32]) {
        let (h, w) = (geom.h, geom.w);
        for t0 in (0..n).step_by(LANES) {
            let lanes = LANES.min(n - t0);
            let mut mm = [[[0f32; LANES]; 6]; 6];
            for (xi, val) in mm.iter_mut().flatten().enumerate() {
                val.copy_from_slice(&m[xi * tc + t0..][..LANES]);
            }
            // Columns: t [4, 6] = Aᵀ m; then rows: y [4, 4] = t A.
            let mut t = [[[0f32; LANES]; 6]; 4];
            for c in 0..6 {
                let col = a_transform(&[mm[0][c], mm[1][c], mm[2][c], mm[3][c], mm[4][c], mm[5][c]]);
                for r in 0..4 {
                    t[r][c] = col[r];
                }
            }
            let y: [[Lanes; 4]; 4] = [a_transform(&t[0]), a_transform(&t[1]), a_transform(&t[2]), a_transform(&t[3])];
            for l in 0..lanes {
                let (b, y0, x0) = geom.tile(g0 + t0 + l);
                let plane = (b * cout + co) * h * w;
                for (r, yr) in y.iter().enumerate().take(h - y0) {
                    for (c, yc) in yr.iter().enumerate().take(w - x0) {
                        // SAFETY: (y0 + r, x0 + c) lies in the H x W plane of (b, co), which the
                        // caller reserves for this call.
                        unsafe { *out.get().add(plane + (y0 + r) * w + x0 + c) = yc[l] + bias };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// max |ours − candle| / max |candle| for x [B, Cin, H, W] and a Cout x k x k kernel in f32.
    fn rel_err(dims: (usize, usize, usize, usize, usize, usize, usize, usize)) -> f32 {
        rel_err_with(dims, DType::F32)
    }

    /// As [`rel_err`] with the kernel stored in `weight_dtype` (candle convolves its f32 values).
    fn rel_err_with(
        (b, cin, h, w, cout, k, stride, padding): (usize, usize, usize, usize, usize, usize, usize, usize),
        weight_dtype: DType,
    ) -> f32 {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
        let scale = 1.0 / ((cin * k * k) as f64).sqrt();
        let stored =
            Tensor::randn(0f32, scale as f32, (cout, cin, k, k), &dev).unwrap().to_dtype(weight_dtype).unwrap();
        let weight = stored.to_dtype(DType::F32).unwrap();
        let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
        let ours = conv2d(&x, &stored, Some(&bias), stride, padding).unwrap();
        let plain = x
            .conv2d(&weight, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), plain.dims());
        let diff = (ours - &plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let top = plain.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        diff.to_scalar::<f32>().unwrap() / top.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn pointwise_matches_candle() {
        assert_eq!(cpu_path(2, 24, 13, 9, 1, 1, 0, false), ConvPath::Pointwise);
        assert!(rel_err((2, 24, 13, 9, 16, 1, 1, 0)) < 1e-6);
    }

    #[test]
    fn im2col_matches_candle() {
        for (b, cin, h, w, cout, k, s, p) in [
            (2, 8, 13, 9, 12, 3, 1, 1),
            (2, 8, 13, 9, 12, 3, 2, 1),
            (1, 4, 16, 16, 16, 3, 1, 1),
            (2, 3, 7, 11, 5, 1, 2, 0),
            (1, 6, 9, 8, 4, 5, 2, 2),
        ] {
            assert_eq!(cpu_path(b, cin, h, w, k, s, p, false), ConvPath::Im2col);
            let err = rel_err((b, cin, h, w, cout, k, s, p));
            assert!(err < 1e-6, "{b}x{cin}x{h}x{w} → {cout}, k{k} s{s} p{p}: {err}");
        }
    }

    /// Winograd's error relative to direct convolution, max |ours − candle| / max |candle| with
    /// unit-variance inputs and 1/√fan-in weights, measured 2.5e-6–4e-6 for Cin ≤ 64 and 7e-6 for
    /// Cin = 560 (the ±2 points amplify rounding; it grows slowly with Cin). im2col/1x1: < 1e-6.
    /// Bound asserted: 2e-5.
    #[test]
    fn winograd_matches_candle() {
        for (b, cin, h, w, cout) in [
            (2, 32, 29, 27, 24),
            (2, 16, 32, 32, 16),
            (1, 64, 30, 34, 8),
            // Chunks per rayon task (many tiles, wide layer) and two output-channel blocks.
            (1, 16, 64, 64, 512),
            (1, 560, 32, 32, 560),
        ] {
            assert_eq!(cpu_path(b, cin, h, w, 3, 1, 1, false), ConvPath::Winograd);
            let err = rel_err((b, cin, h, w, cout, 3, 1, 1));
            assert!(err < 2e-5, "{b}x{cin}x{h}x{w} → {cout}: {err}");
        }
    }

    /// bf16 weights with f32 inputs on every path: 1x1 and im2col on bf16 dot products where the CPU
    /// has them (the inputs rounded to bf16 as well), else the weights widened; Winograd always on f32
    /// products (see [`weight_transform`]). Error relative to max |out| against candle's f32
    /// convolution of the same weights: measured ≤ 1.3e-3 direct, ≤ 1.4e-5 Winograd. Bound: 5e-3.
    #[test]
    fn bf16_weights_on_every_path() {
        for dims in [
            (2, 24, 13, 9, 16, 1, 1, 0),
            (2, 8, 13, 9, 12, 3, 2, 1),
            (2, 8, 13, 9, 12, 3, 1, 1),
            (1, 320, 4, 4, 64, 3, 1, 1),
            (1, 320, 32, 32, 64, 3, 1, 1),
            (2, 32, 29, 27, 24, 3, 1, 1),
            // Winograd for bf16 weights too (≥ 128 tiles).
            (2, 32, 40, 44, 16, 3, 1, 1),
        ] {
            let (b, cin, h, w, _, k, s, p) = dims;
            let err = rel_err_with(dims, DType::BF16);
            let path = cpu_path(b, cin, h, w, k, s, p, bf16_gemm::available());
            assert!(err < 5e-3, "{dims:?} [{path:?}]: {err}");
        }
    }

    #[test]
    fn half_precision_and_no_bias() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 16, 12, 12), &dev).unwrap();
        let weight = Tensor::randn(0f32, 0.1, (8, 16, 3, 3), &dev).unwrap();
        let plain = x.conv2d(&weight, 1, 1, 1, 1).unwrap();
        let ours =
            conv2d(&x.to_dtype(DType::BF16).unwrap(), &weight.to_dtype(DType::BF16).unwrap(), None, 1, 1).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let diff =
            (ours.to_dtype(DType::F32).unwrap() - plain).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 0.1);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
        let weight = Tensor::zeros((8, 3, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &weight, None, 1, 1).is_err());
        let weight = Tensor::zeros((8, 4, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &weight, Some(&Tensor::zeros(4, DType::F32, &dev).unwrap()), 1, 1).is_err());
        assert!(conv2d(&x, &weight, None, 0, 1).is_err());
        let big = Tensor::zeros((8, 4, 11, 11), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &big, None, 1, 1).is_err());
    }
}
