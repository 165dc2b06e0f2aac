//! 2-D convolution for CPU f32 inputs, NCHW in and out, on [`super::sgemm`], or on
//! [`super::bf16_gemm`] for bf16 weights where the CPU has bf16 dot products.
//!
//! [`conv2d`] picks one of three algorithms ([`ConvPath`]):
//! - 1x1, stride 1, no padding: one GEMM per batch item, out[b] = W [Cout, Cin] @ x[b] [Cin, H·W].
//! - im2col: the patches of a band of output rows as columns [Cin·k·k, rows·Wo], then
//!   W [Cout, Cin·k·k] @ columns written straight into the NCHW output.
//! - Winograd F(4x4, 3x3) or F(6x6, 3x3) ([`winograd`]) for the large 3x3 stride-1 pad-1
//!   convolutions: one GEMM [Cout, Cin] @ [Cin, tiles] per point of the transform, 4x–5x less
//!   arithmetic than direct convolution; for bf16 weights on smaller images F(2x2, 3x3) on bf16
//!   products (2.25x less arithmetic at twice the rate).
//!
//! Scratch is bounded (tens of MB at most) and reused within a call; nothing is cached between calls.
//! Other devices use candle's `conv2d`; f16/bf16 inputs are computed in f32 and rounded back.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::amx;
use super::bf16_gemm::{self, Lhs, Operand, PackedLhs, PackedRhs, Rhs};
use super::sgemm::{self, MatRef};
use super::{LayerWeight, Start, kernel_weight};

mod winograd;
pub use winograd::WinogradTile;

/// The algorithm [`conv2d`] uses for a convolution on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPath {
    /// 1x1 stride 1 pad 0: a plain GEMM per batch item.
    Pointwise,
    /// im2col into bounded column bands, then GEMM.
    Im2col,
    /// Winograd F(m x m, 3x3) for 3x3 stride 1 pad 1, on the tile [`WinogradTile::for_image`] picks.
    Winograd(WinogradTile),
}

/// Smallest number of 4x4 output tiles (over the whole batch) for which Winograd beats im2col,
/// measured with `cargo bench --bench kernels -- conv` (2 threads, Zen 3).
const WINOGRAD_MIN_TILES: usize = 32;
/// The same for bf16 weights on bf16 dot products, against F(2x2, 3x3) on bf16 products (2 threads,
/// Zen 4, single convolutions timed alone): on the UNet's 32x32 layers (batch 2, 128
/// tiles) F(2x2) took 0.65–0.75 of F(4x4)'s time; at 64x64 (batch 1 and 2, 256 and 512 tiles) the
/// two tied, and on the VAE's 128-channel 512x512 layer F(2x2) was 1.4x slower than F(6x6).
const WINOGRAD_MIN_TILES_BF16: usize = 256;
/// Smallest number of 2x2 output tiles (over the batch) for F(2x2, 3x3) on bf16 products, where
/// F(4x4) would have too few: at 32 (the UNet's 8x8 layers, batch 2) it took 0.63 of bf16 im2col's
/// time, at 128 (16x16) 0.7.
const WINOGRAD_F2X2_MIN_TILES: usize = 32;
/// Smallest input channel count for Winograd: below it the GEMMs are too thin to pay for the transforms.
const WINOGRAD_MIN_CIN: usize = 16;
/// Upper bound (f32 elements) of one scratch buffer: im2col columns, transformed input or GEMM output.
const SCRATCH_ELEMS: usize = 4 << 20;

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
    let amx_im2col = bf16_products && amx::available();
    let tiles = |side: usize| b * h.div_ceil(side) * w.div_ceil(side);
    if k == 1 && stride == 1 && padding == 0 {
        ConvPath::Pointwise
    } else if k != 3 || stride != 1 || padding != 1 || cin < WINOGRAD_MIN_CIN {
        ConvPath::Im2col
    } else if tiles(4) >= min_tiles {
        // On AMX tiles im2col's one large product beats Winograd's F(4x4) point products (measured
        // on a 2-core Xeon with AMX-BF16: 0.2-0.7 of their time on the UNet's and VAE's 3x3 layers);
        // F(6x6), on the VAE's largest images with few channels, stays ahead (0.5-0.7 of im2col's).
        match WinogradTile::for_image(h, w, cin) {
            WinogradTile::F6x6 => ConvPath::Winograd(WinogradTile::F6x6),
            _ if amx_im2col => ConvPath::Im2col,
            tile => ConvPath::Winograd(tile),
        }
    } else if amx_im2col {
        ConvPath::Im2col
    } else if bf16_products && tiles(2) >= WINOGRAD_F2X2_MIN_TILES {
        ConvPath::Winograd(WinogradTile::F2x2)
    } else {
        ConvPath::Im2col
    }
}

/// 2-D convolution (cross-correlation, as PyTorch) with optional bias: x [B, Cin, H, W], weight
/// [Cout, Cin, k, k], bias [Cout] → [B, Cout, (H + 2p − k)/s + 1, (W + 2p − k)/s + 1].
///
/// CPU f32/f16/bf16 inputs run the kernels of this module (in f32, the weight in f32 or bf16, see
/// [`kernel_weight`]); anything else runs candle's `conv2d`. Inputs that track gradients run them
/// too when f32, stride 1 and "same" padding (every convolution of a UNet but its down-samplers),
/// with the backward pass of [`Conv2dOp`]; candle's `conv2d` otherwise.
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let supported = matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16);
    let tracked = super::tracks_gradients(&[xs, weight]) || bias.is_some_and(Tensor::track_op);
    let differentiable = xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && stride == 1
        && weight.dims().get(2).is_some_and(|&k| 2 * padding + 1 == k);
    if !xs.device().is_cpu() || !supported || (tracked && !differentiable) {
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
    if tracked {
        let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(bias) => xs.apply_op3(&weight, &bias.to_dtype(DType::F32)?.contiguous()?, op),
            None => xs.apply_op2(&weight, op),
        };
    }
    let ys = match bias {
        Some(bias) => f32c(xs)?.apply_op3_no_bwd(&kernel_weight(weight)?, &f32c(bias)?, &op)?,
        None => f32c(xs)?.apply_op2_no_bwd(&kernel_weight(weight)?, &op)?,
    };
    ys.to_dtype(xs.dtype())
}

/// The candle custom op behind [`conv2d`]: CustomOp2 (x, weight) or CustomOp3 (x, weight, bias).
/// The two-input form has a backward pass for stride 1 and "same" padding, on the same kernels: the
/// input's gradient is the convolution of the output's gradient with the kernel flipped and its
/// channels swapped, and the weight's gradient one product [Cout, H·W] @ [H·W, Cin] per tap over the
/// input shifted by that tap.
#[derive(Debug, Clone, Copy)]
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

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(xs, weight, grad)
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

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_weight) = self.backward(xs, weight, grad)?;
        // Summed over each channel's plane first (contiguous), then over the batch.
        let (b, cout, h, w) = grad.dims4()?;
        let grad_bias = match bias.track_op() {
            true => Some(grad.detach().contiguous()?.reshape((b, cout, h * w))?.sum(2)?.sum(0)?),
            false => None,
        };
        Ok((grad_xs, grad_weight, grad_bias))
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
    /// The gradients of input and weight for the output's gradient `grad` (stride 1, same padding),
    /// each `None` where that operand takes no part in the gradient computation (a frozen layer's
    /// weight, the first layer's input).
    fn backward(&self, xs: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (needs_xs, needs_weight) = (xs.track_op(), weight.track_op());
        let (xs, weight, grad) = (xs.detach(), weight.detach(), grad.detach().contiguous()?);
        let (_, cin, _, _) = xs.dims4()?;
        let (cout, _, k, _) = weight.dims4()?;
        if self.stride != 1 || 2 * self.padding + 1 != k {
            bail!(
                "conv2d backward: only stride 1 with same padding (k = {k}, stride {}, padding {})",
                self.stride,
                self.padding
            );
        }
        // The kernel flipped in both spatial dimensions, in- and out-channels swapped.
        let grad_xs = match needs_xs {
            true => {
                let flipped = weight.contiguous()?.apply_op1_no_bwd(&FlippedKernel)?;
                Some(conv2d(&grad, &flipped, None, 1, k - 1 - self.padding)?)
            }
            false => None,
        };
        let grad_weight = match needs_weight {
            true => Some(
                xs.contiguous()?
                    .apply_op2_no_bwd(&grad, &WeightGradient { k, stride: 1, padding: self.padding })?
                    .reshape((cout, cin, k, k))?,
            ),
            false => None,
        };
        Ok((grad_xs, grad_weight))
    }

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
            ConvPath::Winograd(tile) => winograd::winograd(tile, &d, x, weight, bias, &mut out),
            ConvPath::Im2col => im2col(&d, x, weight, bias, &mut out),
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, ho, wo))))
    }
}

/// The kernel of a convolution's input gradient: W [Cout, Cin, k, k] flipped in both spatial
/// dimensions, its channels swapped: [Cin, Cout, k, k].
struct FlippedKernel;

impl candle_core::CustomOp1 for FlippedKernel {
    fn name(&self) -> &'static str {
        "diffctl-conv2d-flipped-kernel"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = super::contiguous_f32("conv2d flipped kernel", storage, layout)?;
        let (cout, cin, k, _) = layout.shape().dims4()?;
        let kk = k * k;
        // Written in full: every (ci, co) tap block.
        let mut out = super::output_buffer(w.len());
        out.par_chunks_mut((cout * kk).max(1)).enumerate().for_each(|(ci, block)| {
            for (co, taps) in block.chunks_exact_mut(kk).enumerate() {
                let src = &w[(co * cin + ci) * kk..][..kk];
                taps.iter_mut().zip(src.iter().rev()).for_each(|(t, &x)| *t = x);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((cin, cout, k, k))))
    }
}

/// The gradient of a convolution's weight, [Cout, Cin·k·k], from its input x [B, Cin, H, W] and the
/// gradient of its output [B, Cout, Ho, Wo]: per batch item and band of output rows, the input's
/// im2col columns [Cin·k·k, n] (x itself for a 1x1 kernel) and `dW += dY_band [Cout, n] · columnsᵀ`,
/// the columns read transposed in place.
struct WeightGradient {
    k: usize,
    stride: usize,
    padding: usize,
}

impl candle_core::CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "diffctl-conv2d-weight-gradient"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("conv2d weight gradient", s1, l1)?;
        let grad = super::contiguous_f32("conv2d weight gradient", s2, l2)?;
        let (b, cin, h, w) = l1.shape().dims4()?;
        let (_, cout, ho, wo) = l2.shape().dims4()?;
        let WeightGradient { k, stride, padding } = *self;
        let d = Dims { b, cin, h, w, cout, k, stride, padding, ho, wo };
        let kk = cin * k * k;
        let mut out = vec![0f32; cout * kk];
        let plane_out = ho * wo;
        let band_rows = (SCRATCH_ELEMS / (kk * wo)).clamp(1, ho);
        let pointwise = k == 1 && stride == 1 && padding == 0;
        // Each band's columns are written in full before its product reads them.
        let mut cols = super::output_buffer(if pointwise { 0 } else { kk * band_rows * wo });
        for (xb, gb) in x.chunks(cin * h * w).zip(grad.chunks(cout * plane_out)) {
            for oy0 in (0..ho).step_by(band_rows) {
                let rows = band_rows.min(ho - oy0);
                let n = rows * wo;
                let columns = if pointwise {
                    MatRef::transposed(xb[oy0 * wo..].as_ptr(), plane_out)
                } else {
                    let cols = &mut cols[..kk * n];
                    cols.par_chunks_mut(n).enumerate().for_each(|(r, col)| {
                        let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
                        im2col_row(&d, &xb[ci * h * w..(ci + 1) * h * w], ky, kx, oy0, col);
                    });
                    MatRef::transposed(cols.as_ptr(), n)
                };
                let grad_band = MatRef::rows(gb[oy0 * wo..].as_ptr(), plane_out);
                // SAFETY: the gradient band is rows of gb [Cout, Ho·Wo] from column oy0·Wo, n wide; the
                // columns [kk, n] (x's rows of HW for 1x1) read transposed; out [Cout, kk] is our own.
                unsafe {
                    sgemm::matmul((cout, kk, n), out.as_mut_ptr(), kk, Start::Current, grad_band, columns, 1.0, true)
                };
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((cout, kk))))
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
    Bf16 {
        weight: PackedLhs,
        columns: PackedRhs,
    },
    /// bf16 on AMX tiles (which pack their operands per product).
    Amx(&'a [u16]),
}

impl<'a> WeightMatrix<'a> {
    /// W [m, k] (row-major) from the layer's weight.
    fn new(weight: LayerWeight<'a>, (m, k): (usize, usize)) -> Self {
        match weight {
            LayerWeight::F32(w) => WeightMatrix::F32(w),
            LayerWeight::Bf16(w) if amx::available() => WeightMatrix::Amx(w),
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
                WeightMatrix::Amx(w) => {
                    let w = Operand::bf16_rows(w.as_ptr(), k);
                    if m * n * k >= amx::MIN_MACS {
                        amx::matmul((m, n, k), dst, ldd, start, w, rhs.into(), 1.0, true)
                    } else {
                        bf16_gemm::matmul(
                            (m, n, k),
                            dst,
                            ldd,
                            start,
                            Lhs::Strided(w),
                            Rhs::Strided(rhs.into()),
                            1.0,
                            true,
                        )
                    }
                }
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
    // Each band's columns are written in full before its product reads them.
    let mut cols = super::output_buffer(kk * band_rows * d.wo);
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// The backward pass against candle's differentiable `conv2d` (im2col / transposed
    /// convolution): the gradients of input, weight and bias, for 3x3 (on Winograd and on im2col)
    /// and 1x1 kernels.
    #[test]
    fn backward_matches_candle() {
        let dev = Device::Cpu;
        for (b, cin, h, w, cout, k) in [(2, 16, 12, 12, 24, 3), (3, 5, 7, 9, 4, 3), (2, 8, 6, 5, 12, 1)] {
            let padding = k / 2;
            let x = Var::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let weight = Var::randn(0f32, 0.2, (cout, cin, k, k), &dev).unwrap();
            let bias = Var::randn(0f32, 1.0, cout, &dev).unwrap();
            // A weighted sum, so that every output element's gradient differs.
            let mix = Tensor::randn(0f32, 1.0, (b, cout, h, w), &dev).unwrap();
            let grads = |ys: Tensor| {
                let g = (ys * &mix).unwrap().sum_all().unwrap().backward().unwrap();
                [x.as_tensor(), weight.as_tensor(), bias.as_tensor()].map(|t| g.get(t).unwrap().clone())
            };
            let ours = grads(conv2d(x.as_tensor(), weight.as_tensor(), Some(bias.as_tensor()), 1, padding).unwrap());
            let candle = grads(
                x.as_tensor()
                    .conv2d(weight.as_tensor(), padding, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                    .unwrap(),
            );
            for (name, (o, c)) in ["input", "weight", "bias"].iter().zip(ours.iter().zip(&candle)) {
                let err = (o - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let max = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err <= 1e-5 * max.max(1.0), "{k}x{k} {name} gradient: error {err} (max {max})");
            }
        }
    }

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
    /// unit-variance inputs and 1/√fan-in weights: F(4x4) measured 2e-6–4e-6 for Cin ≤ 384 and 1e-5
    /// for Cin = 560, F(6x6) 4e-6–8e-6 and 1.3e-5–1.7e-5 (the ±2 and ±½ points amplify rounding; it
    /// grows slowly with Cin). im2col/1x1: < 1e-6. Bound asserted: 5e-5.
    #[test]
    fn winograd_matches_candle() {
        use WinogradTile::{F4x4, F6x6};
        for (b, cin, h, w, cout, tile) in [
            (2, 32, 29, 27, 24, F6x6),
            (2, 16, 32, 32, 16, F4x4),
            (1, 64, 30, 34, 8, F6x6),
            (2, 24, 16, 16, 8, F4x4),
            (1, 16, 64, 64, 512, F6x6),
            // Chunks per rayon task (many tiles, wide layer; with 2 threads) and two output-channel
            // blocks.
            (4, 16, 32, 32, 384, F4x4),
            (1, 256, 96, 96, 32, F6x6),
            (1, 560, 32, 32, 560, F4x4),
            (1, 320, 64, 64, 32, F4x4),
            (1, 256, 36, 36, 700, F6x6),
        ] {
            assert_eq!(cpu_path(b, cin, h, w, 3, 1, 1, false), ConvPath::Winograd(tile));
            let err = rel_err((b, cin, h, w, cout, 3, 1, 1));
            assert!(err < 5e-5, "{b}x{cin}x{h}x{w} → {cout} {tile:?}: {err}");
        }
    }

    /// F(2x2, 3x3)'s transforms on f32 products, which no weight dtype picks (bf16 weights take it
    /// with bf16 products), so that they are checked without bf16 rounding: cut tiles, bias.
    #[test]
    fn winograd_f2x2_transforms_match_candle() {
        let dev = Device::Cpu;
        let (b, cin, h, w, cout) = (2, 20, 11, 14, 12);
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
        let weight = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
        let plain = x.conv2d(&weight, 1, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap());
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = Dims { b, cin, h, w, cout, k: 3, stride: 1, padding: 1, ho: h, wo: w };
        let mut out = vec![0f32; b * cout * h * w];
        let (x, weight, bias) = (flat(&x), flat(&weight), flat(&bias));
        winograd::winograd(WinogradTile::F2x2, &d, &x, LayerWeight::F32(&weight), Some(&bias), &mut out);
        let expected = flat(&plain.unwrap());
        let top = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = out.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / top;
        assert!(err < 5e-5, "{err}");
    }

    /// F(2x2, 3x3) on bf16 products where F(4x4) has too few tiles: odd channel counts and image
    /// sides (cut tiles), blocks of output channels that end in a partial register tile, and two
    /// chunks of tiles (the second not a whole group of lanes). Error relative to max |out| against
    /// candle's f32 convolution of the same weights: measured 2.2e-3–3.5e-3, about twice bf16 im2col's.
    /// Bound: 1e-2.
    #[test]
    fn winograd_f2x2_bf16_matches_candle() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU has no bf16 dot product, so F(2x2, 3x3) is never chosen");
            return;
        }
        if amx::available() {
            eprintln!(
                "skipped: with AMX the 3x3 layers take im2col; `DIFFCTL_NO_AMX=1 cargo test --lib kernels::` \
                 (run by .ci/run) checks F(2x2, 3x3)"
            );
            return;
        }
        for dims in [(2, 64, 16, 16, 72), (1, 33, 15, 13, 20), (2, 16, 8, 8, 8), (1, 1100, 44, 44, 24)] {
            let (b, cin, h, w, cout) = dims;
            assert_eq!(cpu_path(b, cin, h, w, 3, 1, 1, true), ConvPath::Winograd(WinogradTile::F2x2), "{dims:?}");
            let err = rel_err_with((b, cin, h, w, cout, 3, 1, 1), DType::BF16);
            assert!(err < 1e-2, "{dims:?}: {err}");
        }
    }

    /// bf16 weights with f32 inputs on every path: 1x1, im2col and Winograd F(2x2) on bf16 dot
    /// products where the CPU has them (the inputs rounded to bf16 as well), else the weights
    /// widened; Winograd F(4x4) and F(6x6) always on f32 products. Error relative to max |out|
    /// against candle's f32 convolution of the same weights: measured ≤ 1.3e-3 direct, ≤ 3.5e-3
    /// F(2x2), ≤ 1.4e-5 F(4x4). Bound: 5e-3.
    #[test]
    fn bf16_weights_on_every_path() {
        for dims in [
            (2, 24, 13, 9, 16, 1, 1, 0),
            (2, 8, 13, 9, 12, 3, 2, 1),
            (2, 8, 13, 9, 12, 3, 1, 1),
            (1, 320, 4, 4, 64, 3, 1, 1),
            (1, 320, 32, 32, 64, 3, 1, 1),
            (2, 32, 29, 27, 24, 3, 1, 1),
            // F(4x4) Winograd for bf16 weights too (≥ 256 tiles).
            (2, 32, 64, 60, 16, 3, 1, 1),
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
