//! Winograd convolution (Lavin & Gray) for 3x3 stride-1 pad-1 convolutions: F(4x4, 3x3) (points 0,
//! ±1, ±2, ∞; 36 multiplies per 4x4 output tile instead of 144, 4x less arithmetic than direct
//! convolution) or F(6x6, 3x3) (points 0, ±1, ±2, ±½, ∞; 64 per 6x6 tile instead of 324, 5.06x
//! less) for inputs of few channels and images large enough that its 6x6 tiles overhang the edges
//! little ([`WinogradTile::for_image`]), both on [`sgemm`]; and F(2x2, 3x3) (points 0, ±1, ∞; 16
//! per 2x2 tile instead of 36, 2.25x less) on [`bf16_gemm`] for bf16 weights.
//!
//! The output tiles, numbered over the whole batch, go in chunks; for each chunk the input patches
//! are transformed to V [Cin, points, chunk], one GEMM per point multiplies the transformed weights
//! U [points, Cout, Cin] with V, and the output transform writes the tiles. U is made once per call
//! (per block of output channels when it is large).
//!
//! Products in bf16 (V and U rounded to bf16, f32 sums) suit only F(2x2, 3x3), whose transforms add
//! and subtract: its error is 1.7x a bf16 direct convolution's (3.9e-3 against 2.4e-3 of the output's
//! RMS, 256 channels). F(4x4, 3x3)'s transforms amplified the rounding to 5e-2 of max |out|, so F(4x4)
//! and F(6x6) widen bf16 weights and keep U and the products in f32.

use std::cell::RefCell;

use half::slice::HalfBitsSliceExt;
use rayon::prelude::*;

use super::super::bf16_gemm::{self, Lhs, MR, PackedLhs, PackedRhs, Rhs};
use super::super::math::simd_dispatch;
use super::super::sgemm::{self, MatRef};
use super::super::{LayerWeight, SharedMut, Start, output_buffer};
use super::{Dims, SCRATCH_ELEMS};

/// Target size (f32 elements) of each Winograd buffer of one rayon task (V or M, ~2 MB: they stay in
/// cache between the transforms and the GEMMs); measured best among 0.125–4 M.
const TASK_SCRATCH_ELEMS: usize = 512 << 10;
/// Fewest tiles per rayon task's chunk: thinner GEMMs lose more than the cache gains.
const MIN_TASK_TILES: usize = 32;
/// Columns of the f32 GEMM's AVX-512 register panel: chunks are whole multiples of it, so that the
/// products take that tile (see `sgemm`).
const PANEL_TILES: usize = 32;
/// Upper bound (f32 elements) of the transformed weights held at once.
const WEIGHT_SCRATCH_ELEMS: usize = 10 << 20;
/// Most input channels for F(6x6, 3x3). On 2 threads of a Zen 4 (`cargo bench --bench kernels -- conv`)
/// it took 0.85–0.9 of F(4x4)'s time on the VAE's 256- and 128-channel layers at 256x256 and 512x512,
/// but no less on the 320- and 512-channel ones: the chunks of tiles that keep V and M in cache get
/// thinner and each point's U larger.
const MAX_F6X6_CHANNELS: usize = 256;

/// The output tile of a Winograd convolution: F(m x m, 3x3) computes m x m outputs from an
/// (m + 2) x (m + 2) input patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2x2, 3x3): 16 points; products on bf16 dot products for bf16 weights.
    F2x2,
    /// F(4x4, 3x3): 36 points.
    F4x4,
    /// F(6x6, 3x3): 64 points.
    F6x6,
}

impl WinogradTile {
    /// The tile for an H x W image of `channels` input channels: F(6x6) where its multiplies, counting
    /// the tiles that overhang the image's edges, are fewer than F(4x4)'s (from 64x64 up: 0.84 of them;
    /// at 32x32 a tie) and the input has at most [`MAX_F6X6_CHANNELS`]; F(4x4) otherwise.
    pub fn for_image(h: usize, w: usize, channels: usize) -> Self {
        let multiplies = |t: Self| h.div_ceil(t.side()) * w.div_ceil(t.side()) * t.points();
        if channels <= MAX_F6X6_CHANNELS && multiplies(Self::F6x6) < multiplies(Self::F4x4) {
            Self::F6x6
        } else {
            Self::F4x4
        }
    }

    /// Outputs per tile side (m), as its [`Transforms`] define it.
    fn side(self) -> usize {
        match self {
            Self::F2x2 => F2::SIDE,
            Self::F4x4 => F4::SIDE,
            Self::F6x6 => F6::SIDE,
        }
    }

    /// Points of the transform domain per tile, (m + 2)².
    fn points(self) -> usize {
        let alpha = match self {
            Self::F2x2 => F2::ALPHA,
            Self::F4x4 => F4::ALPHA,
            Self::F6x6 => F6::ALPHA,
        };
        alpha * alpha
    }
}

/// Tiles processed side by side in SIMD lanes by the Winograd transforms.
const LANES: usize = 8;
/// One value for each of [`LANES`] tiles.
type Lanes = [f32; LANES];
/// The largest input patch side (F(6x6)'s 8); smaller transforms use a prefix of such arrays.
const MAX_ALPHA: usize = 8;
/// The largest output tile side (F(6x6)'s 6).
const MAX_SIDE: usize = 6;

/// The three 1-D transforms of one F(m, 3): y = Aᵀ [(G g) ⊙ (Bᵀ d)], each applied to [`LANES`]
/// tiles at once and to rows and columns in turn for the 2-D F(m x m, 3x3).
trait Transforms {
    /// Outputs m.
    const SIDE: usize;
    /// Input patch side and points per dimension, m + 2.
    const ALPHA: usize = Self::SIDE + 2;
    /// G g: ALPHA values from the three taps.
    fn g(g: &[Lanes; 3]) -> [Lanes; MAX_ALPHA];
    /// Bᵀ d: ALPHA values from ALPHA inputs.
    fn b(d: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_ALPHA];
    /// Aᵀ m: SIDE outputs from ALPHA products.
    fn a(m: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_SIDE];
}

/// F(2, 3) with points 0, ±1, ∞.
struct F2;

impl Transforms for F2 {
    const SIDE: usize = 2;

    #[inline(always)]
    fn g(g: &[Lanes; 3]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
        for l in 0..LANES {
            let [g0, g1, g2] = [g[0][l], g[1][l], g[2][l]];
            o[0][l] = g0;
            o[1][l] = 0.5 * (g0 + g1 + g2);
            o[2][l] = 0.5 * (g0 - g1 + g2);
            o[3][l] = g2;
        }
        o
    }

    #[inline(always)]
    fn b(d: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
        for l in 0..LANES {
            let [d0, d1, d2, d3] = [d[0][l], d[1][l], d[2][l], d[3][l]];
            o[0][l] = d0 - d2;
            o[1][l] = d1 + d2;
            o[2][l] = d2 - d1;
            o[3][l] = d1 - d3;
        }
        o
    }

    #[inline(always)]
    fn a(m: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_SIDE] {
        let mut o = [[0f32; LANES]; MAX_SIDE];
        for l in 0..LANES {
            let [m0, m1, m2, m3] = [m[0][l], m[1][l], m[2][l], m[3][l]];
            o[0][l] = m0 + m1 + m2;
            o[1][l] = m1 - m2 - m3;
        }
        o
    }
}

/// F(4, 3) with points 0, ±1, ±2, ∞.
struct F4;

impl Transforms for F4 {
    const SIDE: usize = 4;

    #[inline(always)]
    fn g(g: &[Lanes; 3]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
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

    #[inline(always)]
    fn b(d: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
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

    #[inline(always)]
    fn a(m: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_SIDE] {
        let mut o = [[0f32; LANES]; MAX_SIDE];
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
}

/// F(6, 3) with points 0, ±1, ±2, ±½, ∞; Bᵀ's rows in pairs that share their even and odd parts.
struct F6;

impl Transforms for F6 {
    const SIDE: usize = 6;

    #[inline(always)]
    fn g(g: &[Lanes; 3]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
        for l in 0..LANES {
            let [g0, g1, g2] = [g[0][l], g[1][l], g[2][l]];
            o[0][l] = g0;
            o[1][l] = -2.0 / 9.0 * (g0 + g1 + g2);
            o[2][l] = -2.0 / 9.0 * (g0 - g1 + g2);
            o[3][l] = g0 / 90.0 + g1 / 45.0 + 2.0 / 45.0 * g2;
            o[4][l] = g0 / 90.0 - g1 / 45.0 + 2.0 / 45.0 * g2;
            o[5][l] = 32.0 / 45.0 * g0 + 16.0 / 45.0 * g1 + 8.0 / 45.0 * g2;
            o[6][l] = 32.0 / 45.0 * g0 - 16.0 / 45.0 * g1 + 8.0 / 45.0 * g2;
            o[7][l] = g2;
        }
        o
    }

    #[inline(always)]
    fn b(d: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_ALPHA] {
        let mut o = [[0f32; LANES]; MAX_ALPHA];
        for l in 0..LANES {
            let [d0, d1, d2, d3, d4, d5, d6, d7] =
                [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l], d[6][l], d[7][l]];
            o[0][l] = d0 - d6 + 5.25 * (d4 - d2);
            o[7][l] = d7 - d1 + 5.25 * (d3 - d5);
            let (even, odd) = (d2 + d6 - 4.25 * d4, d1 + d5 - 4.25 * d3);
            o[1][l] = even + odd;
            o[2][l] = even - odd;
            let (even, odd) = (0.25 * d2 - 1.25 * d4 + d6, 0.5 * d1 - 2.5 * d3 + 2.0 * d5);
            o[3][l] = even + odd;
            o[4][l] = even - odd;
            let (even, odd) = (4.0 * d2 - 5.0 * d4 + d6, 2.0 * d1 - 2.5 * d3 + 0.5 * d5);
            o[5][l] = even + odd;
            o[6][l] = even - odd;
        }
        o
    }

    #[inline(always)]
    fn a(m: &[Lanes; MAX_ALPHA]) -> [Lanes; MAX_SIDE] {
        let mut o = [[0f32; LANES]; MAX_SIDE];
        for l in 0..LANES {
            let [m0, m1, m2, m3, m4, m5, m6, m7] =
                [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l], m[6][l], m[7][l]];
            let (s12, d12, s34, d34, s56, d56) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4, m5 + m6, m5 - m6);
            o[0][l] = m0 + s12 + s34 + s56;
            o[1][l] = d12 + 2.0 * d34 + 0.5 * d56;
            o[2][l] = s12 + 4.0 * s34 + 0.25 * s56;
            o[3][l] = d12 + 8.0 * d34 + 0.125 * d56;
            o[4][l] = s12 + 16.0 * s34 + 0.0625 * s56;
            o[5][l] = d12 + 32.0 * d34 + 0.03125 * d56 + m7;
        }
        o
    }
}

impl LayerWeight<'_> {
    /// Output channel `co`'s [Cin·k·k] weights as f32 (`scratch` holds the widened copy of bf16 ones).
    fn channel<'s>(&'s self, co: usize, len: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match *self {
            LayerWeight::F32(w) => &w[co * len..][..len],
            LayerWeight::Bf16(w) => {
                scratch.resize(len, 0.0);
                super::super::convert::widen_bf16(scratch, w[co * len..][..len].reinterpret_cast());
                scratch
            }
        }
    }
}

/// Winograd convolution with `tile`, 3x3 stride 1 pad 1 (so Ho = H, Wo = W). The B·⌈H/m⌉·⌈W/m⌉ output
/// tiles go in chunks of `tc` ([`WinogradChunk::run`]), with U [points, cb, Cin] = G g Gᵀ for a block
/// of cb output channels (all Cout when it fits [`WEIGHT_SCRATCH_ELEMS`]).
///
/// With one block and enough tiles, each rayon task runs whole chunks on its own scratch (which stays
/// in cache); otherwise the chunks run one after another, each step parallel inside.
pub(super) fn winograd(
    tile: WinogradTile,
    d: &Dims,
    x: &[f32],
    weight: LayerWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if let (WinogradTile::F2x2, LayerWeight::Bf16(weight)) = (tile, weight) {
        return winograd_bf16(d, x, weight, bias, out);
    }
    let (side, points) = (tile.side(), tile.points());
    let tiles_w = d.w.div_ceil(side);
    let tiles_img = d.h.div_ceil(side) * tiles_w;
    let tiles = d.b * tiles_img;
    let blocks = (points * d.cout * d.cin).div_ceil(WEIGHT_SCRATCH_ELEMS).max(1);
    let cb = d.cout.div_ceil(blocks);
    let geom = TileGeom { h: d.h, w: d.w, side, tiles_w, tiles_img };
    let out = SharedMut(out.as_mut_ptr());
    let mut u = Vec::new();
    let tc = (TASK_SCRATCH_ELEMS / (points * d.cin.max(d.cout))).next_multiple_of(PANEL_TILES).max(MIN_TASK_TILES);
    if blocks == 1 && tiles >= 4 * tc * rayon::current_num_threads() {
        let u = weight_transform(tile, d, weight, (0, cb), &mut u);
        let chunk = WinogradChunk { tile, d, geom, x, u, co0: 0, cb, bias, out, tc, parallel: false };
        let scratch = || (output_buffer(d.cin * points * tc), output_buffer(cb * points * tc));
        (0..tiles).into_par_iter().step_by(tc).for_each_init(scratch, |(v, m), g0| {
            chunk.run(g0, tc.min(tiles - g0), v, m);
        });
        return;
    }
    let tc = (SCRATCH_ELEMS / (points * d.cin.max(cb)) / PANEL_TILES * PANEL_TILES)
        .clamp(LANES, tiles.next_multiple_of(LANES));
    let (mut v, mut m) = (output_buffer(d.cin * points * tc), output_buffer(cb * points * tc));
    for co0 in (0..d.cout).step_by(cb) {
        let cbn = cb.min(d.cout - co0);
        let u = weight_transform(tile, d, weight, (co0, cbn), &mut u);
        let chunk = WinogradChunk { tile, d, geom, x, u, co0, cb: cbn, bias, out, tc, parallel: true };
        for g0 in (0..tiles).step_by(tc) {
            chunk.run(g0, tc.min(tiles - g0), &mut v, &mut m);
        }
    }
}

/// Output channels per rayon task of [`winograd_bf16`]: the task's U (16 x 64 x Cin bf16, 2.6 MB at
/// 1280 channels) and M are made and used on one core.
const BF16_BLOCK_CHANNELS: usize = 64;
/// Upper bound (bf16 elements) of the packed V of one chunk of tiles in [`winograd_bf16`].
const BF16_V_ELEMS: usize = 8 << 20;

thread_local! {
    /// Each thread's buffers for the channel blocks of [`winograd_bf16`], kept across blocks and calls.
    static BLOCK_SCRATCH: RefCell<BlockScratch> = RefCell::new(BlockScratch::default());
}

/// A thread's buffers in [`winograd_bf16`].
#[derive(Default)]
struct BlockScratch {
    /// U of the block: one packed left operand [cb, Cin] per point.
    u: Vec<PackedLhs>,
    /// M [cb, points, tc].
    m: Vec<f32>,
}

/// F(2x2, 3x3) with bf16 products for a bf16 `weight` [Cout, Cin, 3, 3] (bit patterns). Per chunk of
/// tiles, V is transformed and packed in bf16 once for all threads (a task per pair of input
/// channels); then each rayon task takes [`BF16_BLOCK_CHANNELS`] output channels through U = G g Gᵀ
/// (packed in bf16 as it is made), the 16 point products and the output transform, so that U never
/// leaves the core.
fn winograd_bf16(d: &Dims, x: &[f32], weight: &[u16], bias: Option<&[f32]>, out: &mut [f32]) {
    const { assert!(MR == LANES) };
    let tile = WinogradTile::F2x2;
    let (side, points, nr) = (tile.side(), tile.points(), bf16_gemm::NR);
    let tiles_w = d.w.div_ceil(side);
    let tiles_img = d.h.div_ceil(side) * tiles_w;
    let tiles = d.b * tiles_img;
    let geom = TileGeom { h: d.h, w: d.w, side, tiles_w, tiles_img };
    let out = SharedMut(out.as_mut_ptr());
    let pairs = d.cin.div_ceil(2);
    // Tiles per chunk: whole register panels, as many as the bound on V allows.
    let tc = (BF16_V_ELEMS / (points * 2 * pairs) / nr * nr).clamp(nr, tiles.next_multiple_of(nr));
    let mut v: Vec<PackedRhs> = (0..points).map(|_| PackedRhs::default()).collect();
    for g0 in (0..tiles).step_by(tc) {
        let n = tc.min(tiles - g0);
        let panels: Vec<SharedMut<u32>> =
            v.iter_mut().map(|p| SharedMut(p.panels_mut(d.cin, n).as_mut_ptr())).collect();
        (0..pairs).into_par_iter().for_each_init(
            || output_buffer(2 * points * tc),
            |pair_v, pp| {
                for (half, vh) in pair_v.chunks_mut(points * tc).enumerate() {
                    let ci = 2 * pp + half;
                    if ci < d.cin {
                        input_transform(tile, &geom, x, d.cin, ci, g0, n, tc, vh);
                    } else {
                        vh.fill(0.0);
                    }
                }
                // SAFETY: pair pp of every point's panels is this task's alone; `panels` address
                // ⌈n/NR⌉ panels of `pairs` pairs each (`panels_mut`).
                unsafe { pack_input_pair(pair_v, points, tc, n, pairs, pp, &panels) };
            },
        );
        let v = &v;
        let blocks = d.cout.div_ceil(BF16_BLOCK_CHANNELS);
        (0..blocks).into_par_iter().for_each(|blk| {
            BLOCK_SCRATCH.with_borrow_mut(|s| {
                let co0 = blk * BF16_BLOCK_CHANNELS;
                let cb = BF16_BLOCK_CHANNELS.min(d.cout - co0);
                s.u.resize_with(points, PackedLhs::default);
                let mut u: Vec<&mut [u32]> = s.u.iter_mut().map(|p| p.tiles_mut(cb, d.cin)).collect();
                let taps = &weight[co0 * d.cin * 9..][..cb * d.cin * 9];
                for (t, rows) in taps.chunks(MR * d.cin * 9).enumerate() {
                    // SAFETY: a bf16 weight means the CPU has AVX512-BF16.
                    unsafe { transform_weight_tile(rows, d.cin, t * pairs * MR, &mut u) };
                }
                if s.m.len() < cb * points * tc {
                    s.m = output_buffer(cb * points * tc);
                }
                let m = &mut s.m[..cb * points * tc];
                for (xi, (u, v)) in s.u.iter().zip(v).enumerate() {
                    // SAFETY: point ξ writes M[:, ξ, :n] of this task's M [cb, points, tc]; U [cb, Cin]
                    // and V [Cin, n] are packed with those sizes; the CPU has AVX512-BF16 (a bf16 weight).
                    unsafe {
                        let dst = m[xi * tc..].as_mut_ptr();
                        bf16_gemm::matmul(
                            (cb, n, d.cin),
                            dst,
                            points * tc,
                            Start::Zero,
                            Lhs::Packed(u),
                            Rhs::Packed(v),
                            1.0,
                            false,
                        )
                    };
                }
                // The output transform reads whole groups of LANES columns; the products write the first n.
                if !n.is_multiple_of(LANES) {
                    for row in m.chunks_mut(tc) {
                        row[n..n.next_multiple_of(LANES)].fill(0.0);
                    }
                }
                for (j, mc) in m.chunks(points * tc).enumerate() {
                    let co = co0 + j;
                    let bias = bias.map_or(0.0, |b| b[co]);
                    // SAFETY: this writes only the tiles g0..g0 + n of output channel `co`, which no other
                    // task writes, and `out` outlives the call.
                    unsafe { output_transform(tile, &geom, out, d.cout, co, bias, g0, n, tc, mc) };
                }
            })
        });
    }
}

simd_dispatch! {
    /// Writes the transformed input of channels 2pp and 2pp + 1 (`pair_v` [2, points, tc], columns
    /// past n ignored) into pair pp of each point's packed V (`panels[ξ]`, see
    /// [`PackedRhs::panels_mut`]), as bf16 pairs; columns past n zero.
    ///
    /// # Safety
    /// Each `panels[ξ]` must address ⌈n/NR⌉ panels of `pairs` pairs, whose pair pp no one else
    /// accesses during the call.
    unsafe fn pack_input_pair(pair_v: &[f32], points: usize, tc: usize, n: usize, pairs: usize, pp: usize, panels: &[SharedMut<u32>]) {
        let nr = bf16_gemm::NR;
        let (lo, hi) = pair_v.split_at(points * tc);
        for (xi, panel) in panels.iter().enumerate() {
            let (lo, hi) = (&lo[xi * tc..][..tc], &hi[xi * tc..][..tc]);
            for q in 0..n.div_ceil(nr) {
                let cols = nr.min(n - q * nr);
                // SAFETY: lanes pp of panel q (the caller's contract).
                let dst = unsafe { std::slice::from_raw_parts_mut(panel.get().add((q * pairs + pp) * nr), nr) };
                for (j, o) in dst.iter_mut().enumerate() {
                    let c = q * nr + j;
                    *o = if j < cols { bf16_gemm::pair(lo[c], hi[c]) } else { 0 };
                }
            }
        }
    }
}

/// U = G g Gᵀ of F(2x2, 3x3) for up to [`MR`] output channels (`taps` [rows, Cin, 3, 3], bf16 bit
/// patterns), written as bf16 pairs into each point's packed U (`u[ξ]`, see
/// [`PackedLhs::tiles_mut`]) at the tile starting at lane `offset`; rows past `rows` zero.
///
/// The 16 lanes of a register hold the kernels of output channel r and input channel 2pp + h at
/// lane 2r + h, so that each point's lanes round to one row of pairs of its tile. Each kernel's
/// taps come in five 32-bit gathers (two bf16 taps each, widened by a shift or a mask).
///
/// # Safety
/// The CPU must have AVX512-BF16 (the bf16 path's condition, [`bf16_gemm::available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn transform_weight_tile(taps: &[u16], cin: usize, offset: usize, u: &mut [&mut [u32]]) {
    use std::arch::x86_64::*;
    let rows = taps.len() / (cin * 9);
    let pairs = cin.div_ceil(2);
    assert!(
        rows <= MR
            && rows * cin * 9 == taps.len()
            && u.len() == F2::ALPHA * F2::ALPHA
            && u.iter().all(|t| t.len() >= offset + pairs * MR)
    );
    let lane_row = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    let lane_half = _mm512_set_epi32(1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    // Each lane's kernel, in bf16 elements from the pair's first kernel of row 0.
    let kernel = _mm512_add_epi32(
        _mm512_mullo_epi32(lane_row, _mm512_set1_epi32((cin * 9) as i32)),
        _mm512_mullo_epi32(lane_half, _mm512_set1_epi32(9)),
    );
    let row_lanes = ((1u32 << (2 * rows)) - 1) as __mmask16;
    let (half, high_bits) = (_mm512_set1_ps(0.5), _mm512_set1_epi32(0xffff_0000u32 as i32));
    // G applied to one column or row of three: (a, (a + b + c)/2, (a − b + c)/2, c).
    let g3 = |a: __m512, b: __m512, c: __m512| {
        let s = _mm512_add_ps(a, c);
        [a, _mm512_mul_ps(_mm512_add_ps(s, b), half), _mm512_mul_ps(_mm512_sub_ps(s, b), half), c]
    };
    for pp in 0..pairs {
        // An odd channel count leaves the last pair's second channel empty.
        let mask = if 2 * pp + 1 < cin { row_lanes } else { row_lanes & 0x5555 };
        // SAFETY: taps 0..9 of the masked lanes' kernels lie inside `taps` (rows < `rows`, channels
        // < cin); each 32-bit read covers taps t and t + 1 ≤ 8 of one kernel.
        let gather = |t: i32| unsafe {
            let index = _mm512_add_epi32(kernel, _mm512_set1_epi32(t));
            _mm512_mask_i32gather_epi32::<2>(_mm512_setzero_si512(), mask, index, taps.as_ptr().add(2 * pp * 9).cast())
        };
        let low = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let high = |v: __m512i| _mm512_castsi512_ps(_mm512_and_si512(v, high_bits));
        let [g01, g23, g45, g67, g78] = [0, 2, 4, 6, 7].map(gather);
        let g = [low(g01), high(g01), low(g23), high(g23), low(g45), high(g45), low(g67), high(g67), high(g78)];
        // Columns: t[c] = G g[:, c]; then rows: U[r] = G t[:, r].
        let t = [0, 1, 2].map(|c| g3(g[c], g[3 + c], g[6 + c]));
        for r in 0..F2::ALPHA {
            for (c, value) in g3(t[0][r], t[1][r], t[2][r]).into_iter().enumerate() {
                let dst = &mut u[r * F2::ALPHA + c][offset + pp * MR..][..MR];
                // SAFETY: dst holds MR lanes of 32 bits, 32 bytes for the 16 bf16 values.
                unsafe {
                    _mm256_storeu_si256(
                        dst.as_mut_ptr().cast(),
                        std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(value)),
                    )
                };
            }
        }
    }
}

/// Stand-in for targets other than x86-64, which have no bf16 path.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_weight_tile(_: &[u16], _: usize, _: usize, _: &mut [&mut [u32]]) {
    unreachable!("bf16 products run only on x86-64")
}

/// U [points, cb, Cin] = G g Gᵀ for the output channels co0..co0 + cb, made in `u` (which keeps its
/// buffer for the next block). Each point's [cb, Cin] matrix is contiguous, so that its GEMM streams
/// it.
fn weight_transform<'a>(
    tile: WinogradTile,
    d: &Dims,
    weight: LayerWeight,
    (co0, cb): (usize, usize),
    u: &'a mut Vec<f32>,
) -> &'a [f32] {
    let (cin, points) = (d.cin, tile.points());
    let len = cb * points * cin;
    if u.len() < len {
        *u = output_buffer(len);
    }
    let u_ptr = SharedMut(u.as_mut_ptr());
    (0..cb).into_par_iter().for_each_init(Vec::new, |scratch, j| {
        // SAFETY: channel j writes U[ξ, j, :] for every point ξ, inside `u` (len elements) and written
        // by no other task.
        unsafe {
            transform_channel(tile, weight.channel(co0 + j, cin * 9, scratch), cin, u_ptr.get().add(j * cin), cb * cin)
        };
    });
    &u[..len]
}

/// One Winograd step over a chunk of tiles for output channels co0..co0 + cb.
struct WinogradChunk<'a> {
    tile: WinogradTile,
    d: &'a Dims,
    geom: TileGeom,
    /// x [B, Cin, H, W].
    x: &'a [f32],
    /// U [points, cb, Cin].
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
    /// Tiles g0..g0 + n (n ≤ tc): V [Cin, points, tc] = Bᵀ d B; M[:, ξ, :] [cb, tc] = U[:, ξ, :] [cb,
    /// Cin] @ V[:, ξ, :] [Cin, tc] for every point ξ; out = bias + Aᵀ m A, clipped to the image. `v`
    /// holds Cin·points·tc elements, `m` cb·points·tc, neither read before this call writes it.
    fn run(&self, g0: usize, n: usize, v: &mut [f32], m: &mut [f32]) {
        let (d, tc, tile) = (self.d, self.tc, self.tile);
        let points = tile.points();
        let input = |(ci, vc): (usize, &mut [f32])| input_transform(tile, &self.geom, self.x, d.cin, ci, g0, n, tc, vc);
        let v = &mut v[..d.cin * points * tc];
        if self.parallel {
            v.par_chunks_mut(points * tc).enumerate().for_each(input);
        } else {
            v.chunks_mut(points * tc).enumerate().for_each(input);
        }
        let (m, v) = (&mut m[..self.cb * points * tc], &*v);
        // The output transform reads whole groups of LANES columns; the GEMMs write the first n.
        if !n.is_multiple_of(LANES) {
            for row in m.chunks_mut(tc) {
                row[n..n.next_multiple_of(LANES)].fill(0.0);
            }
        }
        let m_ptr = SharedMut(m.as_mut_ptr());
        let product = |xi: usize| {
            let dims = (self.cb, n, d.cin);
            let v = MatRef::rows(v[xi * tc..].as_ptr(), points * tc);
            // SAFETY: point ξ writes only M[:, ξ, :n] of M [cb, points, tc]; U [points, cb, Cin] and V
            // [Cin, points, tc] are only read, and all three outlive the call.
            unsafe {
                let u = MatRef::rows(self.u[xi * self.cb * d.cin..].as_ptr(), d.cin);
                sgemm::matmul(dims, m_ptr.get().add(xi * tc), points * tc, Start::Zero, u, v, 1.0, false)
            };
        };
        if self.parallel {
            (0..points).into_par_iter().for_each(product);
        } else {
            (0..points).for_each(product);
        }
        let output = |(j, mc): (usize, &[f32])| {
            let co = self.co0 + j;
            let bias = self.bias.map_or(0.0, |b| b[co]);
            // SAFETY: this writes only the tiles g0..g0 + n of output channel `co`, which no other task
            // writes, and `out` outlives the call.
            unsafe { output_transform(tile, &self.geom, self.out, d.cout, co, bias, g0, n, tc, mc) };
        };
        if self.parallel {
            m.par_chunks(points * tc).enumerate().for_each(output);
        } else {
            m.chunks(points * tc).enumerate().for_each(output);
        }
    }
}

/// Where the Winograd tiles of an image lie.
#[derive(Debug, Clone, Copy)]
struct TileGeom {
    h: usize,
    w: usize,
    /// Outputs per tile side.
    side: usize,
    tiles_w: usize,
    tiles_img: usize,
}

impl TileGeom {
    /// The output tiles from the one numbered `g` over the batch on, in order.
    fn tiles_from(&self, g: usize) -> Tiles {
        let (b, t) = (g / self.tiles_img, g % self.tiles_img);
        Tiles { geom: *self, b, row: t / self.tiles_w, column: t % self.tiles_w }
    }
}

/// A walk over output tiles in their numbering order (row-major within each batch item), without a
/// division per tile.
struct Tiles {
    geom: TileGeom,
    b: usize,
    row: usize,
    column: usize,
}

impl Tiles {
    /// (batch item, first row, first column) of the next tile.
    fn next_tile(&mut self) -> (usize, usize, usize) {
        let g = self.geom;
        let tile = (self.b, g.side * self.row, g.side * self.column);
        self.column += 1;
        if self.column == g.tiles_w {
            self.column = 0;
            self.row += 1;
            if self.row * g.tiles_w == g.tiles_img {
                self.row = 0;
                self.b += 1;
            }
        }
        tile
    }
}

simd_dispatch! {
    /// U = G g Gᵀ for one output channel: `out[ξ·xi_stride + ci]` (point ξ = row·(m + 2) + column)
    /// from the 3x3 kernels `taps` [Cin, 3, 3].
    ///
    /// # Safety
    /// `out` must address every such element, and no one else access them during the call.
    unsafe fn transform_channel(tile: WinogradTile, taps: &[f32], cin: usize, out: *mut f32, xi_stride: usize) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match tile {
                WinogradTile::F2x2 => transform_channel_with::<F2>(taps, cin, out, xi_stride),
                WinogradTile::F4x4 => transform_channel_with::<F4>(taps, cin, out, xi_stride),
                WinogradTile::F6x6 => transform_channel_with::<F6>(taps, cin, out, xi_stride),
            }
        }
    }
}

/// [`transform_channel`] for one transform, [`LANES`] input channels at a time.
///
/// # Safety
/// As [`transform_channel`].
#[inline(always)]
unsafe fn transform_channel_with<T: Transforms>(taps: &[f32], cin: usize, out: *mut f32, xi_stride: usize) {
    for ci0 in (0..cin).step_by(LANES) {
        let lanes = LANES.min(cin - ci0);
        let mut g = [[0f32; LANES]; 9];
        for l in 0..lanes {
            for (t, gt) in g.iter_mut().enumerate() {
                gt[l] = taps[(ci0 + l) * 9 + t];
            }
        }
        // Columns: t [ALPHA, 3] = G g; then rows: G tᵀ.
        let mut t = [[[0f32; LANES]; 3]; MAX_ALPHA];
        for c in 0..3 {
            let col = T::g(&[g[c], g[3 + c], g[6 + c]]);
            for r in 0..T::ALPHA {
                t[r][c] = col[r];
            }
        }
        for (r, tr) in t.iter().enumerate().take(T::ALPHA) {
            for (c, val) in T::g(tr).iter().enumerate().take(T::ALPHA) {
                // SAFETY: the caller's contract covers point r·ALPHA + c, channels ci0..ci0 + lanes.
                unsafe {
                    std::ptr::copy_nonoverlapping(val.as_ptr(), out.add((r * T::ALPHA + c) * xi_stride + ci0), lanes)
                };
            }
        }
    }
}

simd_dispatch! {
    /// v [points, tc] = Bᵀ d B for input channel `ci` of x [B, Cin, H, W] and tiles g0..g0+n: d is the
    /// tile's (m + 2)² input patch starting one row and column before the output tile, 0 outside the
    /// image. Whole groups of [`LANES`] columns are written (0 past n), so tc must be a multiple of
    /// [`LANES`].
    fn input_transform(tile: WinogradTile, geom: &TileGeom, x: &[f32], cin: usize, ci: usize, g0: usize, n: usize, tc: usize, v: &mut [f32]) {
        let plane = &x[ci * geom.h * geom.w..];
        let batch_stride = cin * geom.h * geom.w;
        match tile {
            WinogradTile::F2x2 => input_transform_with::<F2>(geom, plane, batch_stride, g0, n, tc, v),
            WinogradTile::F4x4 => input_transform_with::<F4>(geom, plane, batch_stride, g0, n, tc, v),
            WinogradTile::F6x6 => input_transform_with::<F6>(geom, plane, batch_stride, g0, n, tc, v),
        }
    }
}

/// [`input_transform`] for one transform; `plane` starts at the channel's plane of batch item 0 and
/// the next item's is `batch_stride` further.
#[inline(always)]
fn input_transform_with<T: Transforms>(
    geom: &TileGeom,
    plane: &[f32],
    batch_stride: usize,
    g0: usize,
    n: usize,
    tc: usize,
    v: &mut [f32],
) {
    let (h, w) = (geom.h, geom.w);
    // Made once: each group of tiles overwrites every patch value of its lanes (lanes past n keep
    // the previous group's, which only reach V's unused columns).
    let mut d = [[[0f32; LANES]; MAX_ALPHA]; MAX_ALPHA];
    let mut t = [[[0f32; LANES]; MAX_ALPHA]; MAX_ALPHA];
    let mut tiles = geom.tiles_from(g0);
    for t0 in (0..n).step_by(LANES) {
        let lanes = LANES.min(n - t0);
        for l in 0..lanes {
            let (b, y0, x0) = tiles.next_tile();
            let plane = &plane[b * batch_stride..][..h * w];
            if y0 >= 1 && y0 + T::ALPHA - 1 <= h && x0 >= 1 && x0 + T::ALPHA - 1 <= w {
                // The whole patch lies inside the image.
                let patch = &plane[(y0 - 1) * w + x0 - 1..][..(T::ALPHA - 1) * w + T::ALPHA];
                for (r, dr) in d.iter_mut().enumerate().take(T::ALPHA) {
                    for (dc, &s) in dr.iter_mut().zip(&patch[r * w..][..T::ALPHA]) {
                        dc[l] = s;
                    }
                }
                continue;
            }
            for (r, dr) in d.iter_mut().enumerate().take(T::ALPHA) {
                let y = (y0 + r).wrapping_sub(1);
                for (c, dc) in dr.iter_mut().enumerate().take(T::ALPHA) {
                    let xx = (x0 + c).wrapping_sub(1);
                    dc[l] = if y < h && xx < w { plane[y * w + xx] } else { 0.0 };
                }
            }
        }
        // Columns: t = Bᵀ d; then rows: (Bᵀ tᵀ)ᵀ = t B.
        for c in 0..T::ALPHA {
            let mut col = [[0f32; LANES]; MAX_ALPHA];
            for r in 0..T::ALPHA {
                col[r] = d[r][c];
            }
            let col = T::b(&col);
            for r in 0..T::ALPHA {
                t[r][c] = col[r];
            }
        }
        for (r, tr) in t.iter().enumerate().take(T::ALPHA) {
            for (c, val) in T::b(tr).iter().enumerate().take(T::ALPHA) {
                v[(r * T::ALPHA + c) * tc + t0..][..LANES].copy_from_slice(val);
            }
        }
    }
}

simd_dispatch! {
    /// Output channel `co` of out [B, Cout, H, W] for tiles g0..g0+n: bias + Aᵀ m A from
    /// m [points, tc] (this channel's GEMM results, tc a multiple of [`LANES`]), clipped to the image.
    ///
    /// # Safety
    /// `out` must point to a live [B, Cout, H, W] buffer whose channel `co` no one else accesses
    /// during the call.
    unsafe fn output_transform(tile: WinogradTile, geom: &TileGeom, out: SharedMut, cout: usize, co: usize, bias: f32, g0: usize, n: usize, tc: usize, m: &[f32]) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match tile {
                WinogradTile::F2x2 => output_transform_with::<F2>(geom, out, cout, co, bias, g0, n, tc, m),
                WinogradTile::F4x4 => output_transform_with::<F4>(geom, out, cout, co, bias, g0, n, tc, m),
                WinogradTile::F6x6 => output_transform_with::<F6>(geom, out, cout, co, bias, g0, n, tc, m),
            }
        }
    }
}

/// [`output_transform`] for one transform.
///
/// # Safety
/// As [`output_transform`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform_with<T: Transforms>(
    geom: &TileGeom,
    out: SharedMut,
    cout: usize,
    co: usize,
    bias: f32,
    g0: usize,
    n: usize,
    tc: usize,
    m: &[f32],
) {
    let (h, w) = (geom.h, geom.w);
    // Made once, overwritten by each group of tiles.
    let mut t = [[[0f32; LANES]; MAX_ALPHA]; MAX_SIDE];
    let mut y = [[[0f32; LANES]; MAX_SIDE]; MAX_SIDE];
    let mut tiles = geom.tiles_from(g0);
    for t0 in (0..n).step_by(LANES) {
        let lanes = LANES.min(n - t0);
        // Columns: t [SIDE, ALPHA] = Aᵀ m; then rows: y [SIDE, SIDE] = t A.
        for c in 0..T::ALPHA {
            let mut col = [[0f32; LANES]; MAX_ALPHA];
            for (r, val) in col.iter_mut().enumerate().take(T::ALPHA) {
                val.copy_from_slice(&m[(r * T::ALPHA + c) * tc + t0..][..LANES]);
            }
            let col = T::a(&col);
            for r in 0..T::SIDE {
                t[r][c] = col[r];
            }
        }
        for (yr, tr) in y.iter_mut().zip(&t).take(T::SIDE) {
            *yr = T::a(tr);
        }
        for l in 0..lanes {
            let (b, y0, x0) = tiles.next_tile();
            // SAFETY: the tile's first output lies in the H x W plane of (b, co), which the caller
            // reserves for this call, and so do the rows and columns stored from it.
            unsafe {
                let first = out.get().add((b * cout + co) * h * w + y0 * w + x0);
                if y0 + T::SIDE <= h && x0 + T::SIDE <= w {
                    // A whole tile, with constant bounds.
                    store_tile(&y, l, bias, first, w, (T::SIDE, T::SIDE));
                } else {
                    // The image's last row or column of tiles may be cut.
                    store_tile(&y, l, bias, first, w, (T::SIDE.min(h - y0), T::SIDE.min(w - x0)));
                }
            }
        }
    }
}

/// Writes `rows` x `columns` outputs of lane `l` of the tile `y`, plus `bias`, from `first` on (rows
/// `w` apart).
///
/// # Safety
/// `first` must address that many rows and columns, which no one else accesses during the call.
#[inline(always)]
unsafe fn store_tile(
    y: &[[Lanes; MAX_SIDE]; MAX_SIDE],
    l: usize,
    bias: f32,
    first: *mut f32,
    w: usize,
    (rows, columns): (usize, usize),
) {
    for (r, yr) in y.iter().enumerate().take(rows) {
        for (c, yc) in yr.iter().enumerate().take(columns) {
            // SAFETY: (r, c) lies in the block the caller reserves.
            unsafe { *first.add(r * w + c) = yc[l] + bias };
        }
    }
}
