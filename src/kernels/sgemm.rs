//! f32 matrix product for the CPU kernels: BLIS-style blocking around a register-tile microkernel,
//! 6x32 in 12 zmm registers with AVX-512, else 6x16 in 12 ymm registers with AVX2+FMA.
//!
//! The product is cut into blocks that stay in cache: a [KC, NC] block of the right operand is packed
//! into NR-column panels (each panel stays in L1 while it is used), and the microkernel multiplies six
//! rows of an [MC, KC] block of the left operand (in L2, read in place when it is row-major) by one
//! panel into a 6xNR tile of the output held in registers. On Zen 4 the AVX-512 tile measured 5-10 %
//! faster than the AVX2 one on the UNet's linear layers; narrow products keep the AVX2 tile. The
//! `gemm` crate serves CPUs without AVX2 and FMA.

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{SharedMut, Start};

/// Rows of the output tile every microkernel holds in registers (broadcast from the left rows).
const MR: usize = 6;
/// Columns of the widest register tile.
const MAX_NR: usize = 32;
/// Below this many multiply-adds a product runs on one thread whatever the caller asks (both GEMMs).
pub(crate) const MIN_PARALLEL_MACS: usize = 1 << 20;

/// A register tile's microkernel and the cache blocking around it.
#[derive(Clone, Copy)]
struct Kernel {
    /// Columns of the register tile.
    nr: usize,
    /// Largest depth of one packed block: an [KC, NR] right panel stays in L1 with the left rows it
    /// meets. Deeper products are cut into equal blocks no deeper than this, so that each output tile
    /// is loaded and stored as few times as possible (k = 320 is one block, not 256 + 64).
    kc: usize,
    /// Rows of one left block (MC·KC floats in L2 with room for the output tiles).
    mc: usize,
    /// Columns of one packed right block (in L2/L3).
    nc: usize,
    /// acc = Σₚ lhs[0..MR, p] ⊗ rhs[p, 0..nr] (lhs rows `lds` apart, rhs packed), then dst = `start` +
    /// scale · acc. Safety: as [`microkernel_avx2`].
    tile: unsafe fn(usize, *const f32, usize, *const f32, *mut f32, usize, Start, f32),
}

/// The AVX2+FMA tile: 6x16 (12 ymm accumulators), a 20 KB panel at KC = 320.
const AVX2: Kernel = Kernel { nr: 16, kc: 320, mc: 144, nc: 2048, tile: microkernel_avx2 };
/// The AVX-512 tile: 6x32 (12 zmm accumulators), a 24 KB panel at KC = 192.
const AVX512: Kernel = Kernel { nr: 32, kc: 192, mc: 144, nc: 1024, tile: microkernel_avx512::<2> };

/// Narrowest product that takes the AVX-512 tile unless its columns fill whole 32-column panels:
/// narrower ones (the attention's P·V with 40 or 80 value channels) waste less of the 16-wide AVX2
/// tile. Whole panels (Winograd's chunks of 32 or 64 tiles) measured about 10 % faster on AVX-512.
const MIN_AVX512_COLUMNS: usize = 128;

/// The microkernel for a product with `n` output columns on this CPU, if it has one.
fn kernel(n: usize) -> Option<Kernel> {
    static FEATURES: OnceLock<(bool, bool)> = OnceLock::new();
    let (avx2, avx512) = *FEATURES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            (avx2, avx2 && is_x86_feature_detected!("avx512f"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (false, false)
        }
    });
    match (avx2, avx512) {
        (_, true) if n >= MIN_AVX512_COLUMNS || (n > 0 && n.is_multiple_of(AVX512.nr)) => Some(AVX512),
        (true, _) => Some(AVX2),
        _ => None,
    }
}

/// A read-only strided matrix: element (i, j) lies at `ptr + i·row_stride + j·col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef {
    /// Element (0, 0).
    pub ptr: *const f32,
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive columns.
    pub col_stride: usize,
}

// SAFETY: a MatRef is only read, by every task of a product, while its caller keeps the data alive.
unsafe impl Send for MatRef {}
// SAFETY: as above.
unsafe impl Sync for MatRef {}

impl MatRef {
    /// A row-major matrix with rows `row_stride` elements apart.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row_stride, col_stride: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` elements apart: element (i, j)
    /// is the stored (j, i).
    pub fn transposed(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row_stride: 1, col_stride: row_stride }
    }

    /// The sub-matrix starting at element (i, j).
    ///
    /// # Safety
    /// (i, j) must lie inside the matrix the pointer addresses.
    unsafe fn at(self, i: usize, j: usize) -> Self {
        // SAFETY: forwarded from the caller.
        Self { ptr: unsafe { self.ptr.add(i * self.row_stride + j * self.col_stride) }, ..self }
    }
}

/// dst [m, n] = `start` + `scale` · lhs [m, k] · rhs [k, n], where dst has rows `dst_row_stride` elements
/// apart and unit column stride. With `parallel` the product is split over
/// the rayon threads (the caller must not be inside a rayon task that others wait on for it to be
/// useful); without, it runs on the calling thread.
///
/// # Safety
/// `lhs`, `rhs` and `dst` must address matrices of these sizes and strides; `dst` must not overlap
/// them, nor be read or written by anyone else during the call; a bias of `start` must hold m rows or
/// n columns.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    start: Start,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = if parallel && m * n * k >= MIN_PARALLEL_MACS { rayon::current_num_threads() } else { 1 };
    let nr = kernel(n).map_or(16, |kernel| kernel.nr);
    let dst = SharedMut(dst);
    let run = |(i0, j0, rows, cols): (usize, usize, usize, usize)| {
        // SAFETY: each task gets a disjoint block of dst and reads inside lhs and rhs (the caller's
        // contract), at offsets inside the matrices.
        unsafe {
            let out = dst.get().add(i0 * dst_row_stride + j0);
            product((rows, cols, k), out, dst_row_stride, start.at(i0, j0), lhs.at(i0, 0), rhs.at(0, j0), scale)
        }
    };
    if threads <= 1 {
        return run((0, 0, m, n));
    }
    split(m, n, threads, (MR, nr)).into_par_iter().for_each(run);
}

/// Splits an [m, n] output into one strip per thread along its longer side, in whole register tiles
/// of `tile` (rows, columns): (first row, first column, rows, columns) of each strip.
pub(crate) fn split(m: usize, n: usize, threads: usize, tile: (usize, usize)) -> Vec<(usize, usize, usize, usize)> {
    if m >= n {
        let rows = m.div_ceil(threads).next_multiple_of(tile.0);
        (0..m).step_by(rows).map(|i0| (i0, 0, rows.min(m - i0), n)).collect()
    } else {
        let cols = n.div_ceil(threads).next_multiple_of(tile.1);
        (0..n).step_by(cols).map(|j0| (0, j0, m, cols.min(n - j0))).collect()
    }
}

thread_local! {
    /// Each thread's scratch: the left block copied row-major when it is not ([MC, KC]), the left
    /// rows of a partial register tile zero-padded ([MR, KC]), and the packed right block [KC, NC].
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// [`matmul`] on the calling thread.
///
/// # Safety
/// As [`matmul`].
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
) {
    let Some(kernel) = kernel(n) else {
        // SAFETY: forwarded from the caller's contract.
        return unsafe { fallback((m, n, k), dst, ldd, start, lhs, rhs, scale) };
    };
    let Kernel { nr, kc: max_kc, mc: max_mc, nc: max_nc, .. } = kernel;
    if k == 0 {
        // SAFETY: dst [m, n] and the bias (the caller's contract).
        return unsafe { start.fill(dst, ldd, (m, n)) };
    }
    SCRATCH.with_borrow_mut(|[copied_lhs, edge_lhs, packed_rhs]| {
        let kc_max = k.div_ceil(k.div_ceil(max_kc));
        let grow = |v: &mut Vec<f32>, len: usize| v.resize(v.len().max(len), 0.0);
        if lhs.col_stride != 1 {
            grow(copied_lhs, max_mc.min(m) * kc_max);
        }
        grow(edge_lhs, MR * kc_max);
        grow(packed_rhs, max_nc.min(n).next_multiple_of(nr) * kc_max);
        for j0 in (0..n).step_by(max_nc) {
            let nc = max_nc.min(n - j0);
            let panels = nc.div_ceil(nr);
            for p0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - p0);
                // SAFETY: the blocks lie inside the operands (the caller's contract).
                unsafe { pack_rhs(rhs.at(p0, j0), kc, nc, nr, packed_rhs) };
                let block_start = start.for_depth(p0);
                for i0 in (0..m).step_by(max_mc) {
                    let mc = max_mc.min(m - i0);
                    // The block's rows, row-major: read in place, or copied when the operand is not.
                    // SAFETY: the block lies inside lhs (the caller's contract).
                    let block = unsafe { lhs.at(i0, p0) };
                    let (rows_ptr, rows_stride) = if block.col_stride == 1 {
                        (block.ptr, block.row_stride)
                    } else {
                        // SAFETY: as above.
                        unsafe { copy_rows(block, mc, kc, copied_lhs) };
                        (copied_lhs.as_ptr(), kc)
                    };
                    let full = mc / MR * MR;
                    if full < mc {
                        // SAFETY: rows full..mc of the block, kc elements each.
                        unsafe {
                            copy_rows(
                                MatRef::rows(rows_ptr.add(full * rows_stride), rows_stride),
                                mc - full,
                                kc,
                                edge_lhs,
                            )
                        };
                        edge_lhs[(mc - full) * kc..MR * kc].fill(0.0);
                    }
                    for jp in 0..panels {
                        let cols = nr.min(nc - jp * nr);
                        let rhs_panel = &packed_rhs[jp * nr * kc..][..nr * kc];
                        for i in (0..mc).step_by(MR) {
                            let rows = MR.min(mc - i);
                            // A whole tile's rows in place, a partial one's from the zero-padded copy.
                            let (tile_lhs, tile_stride) = if rows == MR {
                                // SAFETY: rows i..i + MR of the block.
                                (unsafe { rows_ptr.add(i * rows_stride) }, rows_stride)
                            } else {
                                (edge_lhs.as_ptr(), kc)
                            };
                            // SAFETY: the tile (i0 + i, j0 + jp·NR) of rows x cols lies inside dst; the
                            // left rows hold MR x kc readable elements.
                            unsafe {
                                let tile = dst.add((i0 + i) * ldd + j0 + jp * nr);
                                let lhs_rows = MatRef::rows(tile_lhs, tile_stride);
                                let start = block_start.at(i0 + i, j0 + jp * nr);
                                write_tile(&kernel, kc, lhs_rows, rhs_panel, tile, ldd, (rows, cols), start, scale);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Copies `rows` x `kc` elements of `src` into `out` row-major (rows `kc` apart).
///
/// # Safety
/// `src` must address at least rows x kc elements.
unsafe fn copy_rows(src: MatRef, rows: usize, kc: usize, out: &mut [f32]) {
    for (i, row) in out[..rows * kc].chunks_exact_mut(kc).enumerate() {
        for (p, x) in row.iter_mut().enumerate() {
            // SAFETY: (i, p) inside the rows x kc block (the caller's contract).
            *x = unsafe { *src.ptr.add(i * src.row_stride + p * src.col_stride) };
        }
    }
}

/// Packs rhs [kc, nc] into `nr`-column panels: panel q holds, for each step p, row p's elements of its
/// columns at `out[q·kc·nr + p·nr ..][..nr]`, columns past `nc` zero.
///
/// # Safety
/// `rhs` must address at least kc x nc elements.
unsafe fn pack_rhs(rhs: MatRef, kc: usize, nc: usize, nr: usize, out: &mut [f32]) {
    for (q, panel) in out[..nc.next_multiple_of(nr) * kc].chunks_exact_mut(nr * kc).enumerate() {
        let cols = nr.min(nc - q * nr);
        if rhs.col_stride == 1 && cols == nr {
            // Whole panel rows as fixed-size copies (a `memmove` call per row otherwise).
            /// # Safety
            /// As [`pack_rhs`], with N = nr and panel q whole.
            unsafe fn copy<const N: usize>(panel: &mut [f32], rhs: MatRef, q: usize) {
                for (p, step) in panel.chunks_exact_mut(N).enumerate() {
                    // SAFETY: row p < kc, columns q·N..(q + 1)·N ≤ nc (the caller's contract).
                    let src = unsafe { &*(rhs.at(p, q * N).ptr as *const [f32; N]) };
                    <&mut [f32; N]>::try_from(step).expect("panel rows of N").copy_from_slice(src);
                }
            }
            // SAFETY: forwarded from the caller; cols == nr.
            unsafe {
                match nr {
                    16 => copy::<16>(panel, rhs, q),
                    32 => copy::<32>(panel, rhs, q),
                    _ => unreachable!("register tiles are 16 or 32 columns wide"),
                }
            }
        } else if rhs.col_stride == 1 {
            for (p, step) in panel.chunks_exact_mut(nr).enumerate() {
                // SAFETY: row p < kc, columns q·nr.. q·nr + cols ≤ nc (the caller's contract).
                let src = unsafe { std::slice::from_raw_parts(rhs.at(p, q * nr).ptr, cols) };
                step[..cols].copy_from_slice(src);
                step[cols..].fill(0.0);
            }
        } else {
            // SAFETY: rows < kc and columns q·nr.. q·nr + cols ≤ nc lie inside rhs (the caller's
            // contract); the panel holds kc rows of nr.
            unsafe { copy_block(rhs.at(0, q * nr), kc, cols, panel, nr) };
            for step in panel.chunks_exact_mut(nr) {
                step[cols..].fill(0.0);
            }
        }
    }
}

/// dst[i·ldd + j] = src(i, j) for i < rows, j < cols. A transposed source (unit row stride: the
/// linear layers' weights, the attention's queries and values) goes through 8x8 register
/// transposes where the CPU has AVX.
///
/// # Safety
/// `src` must address rows x cols elements; `dst` must hold (rows − 1)·ldd + cols elements, cols ≤ ldd.
pub(crate) unsafe fn copy_block(src: MatRef, rows: usize, cols: usize, dst: &mut [f32], ldd: usize) {
    #[cfg(target_arch = "x86_64")]
    let fast = if src.row_stride == 1 && is_x86_feature_detected!("avx") { cols / 8 * 8 } else { 0 };
    #[cfg(not(target_arch = "x86_64"))]
    let fast = 0;
    assert!(cols <= ldd && (rows == 0 || dst.len() >= (rows - 1) * ldd + cols));
    if fast > 0 {
        // SAFETY: the CPU has AVX; columns < fast and rows lie inside src (the caller's contract),
        // and dst holds them (checked above).
        unsafe { transpose_columns_8(src, rows, fast / 8, ldd, dst) };
    }
    for j in fast..cols {
        // SAFETY: column j < cols of src (the caller's contract).
        let col = unsafe { src.at(0, j) };
        for (i, x) in dst.iter_mut().skip(j).step_by(ldd).take(rows).enumerate() {
            // SAFETY: row i < rows of that column.
            *x = unsafe { *col.ptr.add(i * col.row_stride) };
        }
    }
}

/// Copies `groups` groups of 8 columns of `rhs` (contiguous depths: unit row stride) into the first
/// 8·groups columns of `panel` (rows nr apart, `panel[p·nr + j]`): 8 depths at a time through an 8x8
/// register transpose, the last kc mod 8 depths one by one.
///
/// # Safety
/// The CPU must have AVX; `rhs` must address kc x 8·groups elements with unit row stride; `panel`
/// must hold (kc − 1)·nr + 8·groups elements with 8·groups ≤ nr.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_columns_8(rhs: MatRef, kc: usize, groups: usize, nr: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(8 * groups <= nr && (kc == 0 || panel.len() >= (kc - 1) * nr + 8 * groups));
    let out = panel.as_mut_ptr();
    for g in 0..groups {
        let j0 = 8 * g;
        // SAFETY (whole loop): columns j0..j0 + 8 and depths < kc lie inside rhs (the caller's
        // contract), panel rows p < kc, columns j0..j0 + 8 inside the panel (checked above).
        let col = |c: usize| unsafe { rhs.ptr.add((j0 + c) * rhs.col_stride) };
        for p0 in (0..kc - kc % 8).step_by(8) {
            unsafe {
                let r: [__m256; 8] = std::array::from_fn(|c| _mm256_loadu_ps(col(c).add(p0)));
                for (i, row) in transpose_8x8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((p0 + i) * nr + j0), row);
                }
            }
        }
        for p in kc - kc % 8..kc {
            for c in 0..8 {
                unsafe { *out.add(p * nr + j0 + c) = *col(c).add(p) };
            }
        }
    }
}

/// Multiplies MR row-major left rows [MR, kc] by a packed right panel [kc, nr] into the `rows` x
/// `cols` corner of the tile at `dst`: `start` + `scale` · product.
///
/// # Safety
/// The CPU must run `kernel`; `lhs` must address MR x kc elements; `dst` must address `rows` rows
/// (`ldd` apart) of `cols` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn write_tile(
    kernel: &Kernel,
    kc: usize,
    lhs: MatRef,
    rhs: &[f32],
    dst: *mut f32,
    ldd: usize,
    (rows, cols): (usize, usize),
    start: Start,
    scale: f32,
) {
    let nr = kernel.nr;
    if rows == MR && cols == nr {
        // SAFETY: forwarded; the whole tile lies inside dst.
        return unsafe { (kernel.tile)(kc, lhs.ptr, lhs.row_stride, rhs.as_ptr(), dst, ldd, start, scale) };
    }
    let mut tile = [0f32; MR * MAX_NR];
    // SAFETY: `tile` holds a whole MR x nr tile with rows nr apart.
    unsafe { (kernel.tile)(kc, lhs.ptr, lhs.row_stride, rhs.as_ptr(), tile.as_mut_ptr(), nr, Start::Zero, scale) };
    // SAFETY: forwarded from the caller.
    unsafe { super::store_corner(&tile, nr, dst, ldd, (rows, cols), start, 1.0) };
}

/// The AVX2 6x16 register tile: acc = Σₚ lhs[0..6, p] ⊗ rhs[p, 0..16] with lhs rows `lds` apart and
/// the right panel packed, then dst = `start` + scale · acc.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `lhs` must address MR rows of kc elements, `rhs` kc·NR floats and
/// `dst` a whole MR x NR tile with rows `ldd` apart; a bias of `start` must hold the tile's rows or
/// columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel_avx2(
    kc: usize,
    lhs: *const f32,
    lds: usize,
    rhs: *const f32,
    dst: *mut f32,
    ldd: usize,
    start: Start,
    scale: f32,
) {
    use std::arch::x86_64::*;
    for i in 0..MR {
        // The tile's output lines are fetched while the products run (hints only, never faults).
        _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(i * ldd) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(i * ldd + 15) as *const i8);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // SAFETY: rows 0..MR of lhs (the caller's contract).
    let rows: [*const f32; MR] = std::array::from_fn(|i| unsafe { lhs.add(i * lds) });
    let step = |p: usize, acc: &mut [[__m256; 2]; MR]| {
        // SAFETY: p < kc, inside both panels (the caller's contract).
        unsafe {
            let b0 = _mm256_loadu_ps(rhs.add(p * 16));
            let b1 = _mm256_loadu_ps(rhs.add(p * 16 + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*rows[i].add(p));
                row[0] = _mm256_fmadd_ps(a, b0, row[0]);
                row[1] = _mm256_fmadd_ps(a, b1, row[1]);
            }
        }
    };
    // Four steps per iteration keep the loop overhead off the FMA ports.
    let mut p = 0;
    while p + 4 <= kc {
        for u in 0..4 {
            step(p + u, &mut acc);
        }
        p += 4;
    }
    while p < kc {
        step(p, &mut acc);
        p += 1;
    }
    let scale = _mm256_set1_ps(scale);
    for (i, row) in acc.iter().enumerate() {
        for (h, &sum) in row.iter().enumerate() {
            // SAFETY: row i, columns 8h..8h + 8 of the tile (the caller's contract).
            // (and the bias's row i or columns 8h..8h + 8).
            unsafe {
                let out = dst.add(i * ldd + 8 * h);
                let value = match start {
                    Start::Zero => _mm256_mul_ps(sum, scale),
                    Start::Current => _mm256_fmadd_ps(sum, scale, _mm256_loadu_ps(out)),
                    Start::RowBias(b) => _mm256_fmadd_ps(sum, scale, _mm256_set1_ps(*b.add(i))),
                    Start::ColumnBias(b) => _mm256_fmadd_ps(sum, scale, _mm256_loadu_ps(b.add(8 * h))),
                };
                _mm256_storeu_ps(out, value);
            }
        }
    }
}

/// The AVX-512 6x(16·NV) register tile: as [`microkernel_avx2`] with a panel of 16·NV columns.
///
/// # Safety
/// The CPU must have AVX-512F; `lhs` must address MR rows of kc elements, `rhs` kc·16·NV floats and
/// `dst` a whole MR x 16·NV tile with rows `ldd` apart; a bias of `start` must hold the tile's rows or
/// columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel_avx512<const NV: usize>(
    kc: usize,
    lhs: *const f32,
    lds: usize,
    rhs: *const f32,
    dst: *mut f32,
    ldd: usize,
    start: Start,
    scale: f32,
) {
    use std::arch::x86_64::*;
    for i in 0..MR {
        for h in 0..NV {
            // The tile's output lines are fetched while the products run (hints only, never faults).
            _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(i * ldd + 16 * h) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: rows 0..MR of lhs (the caller's contract).
    let rows: [*const f32; MR] = std::array::from_fn(|i| unsafe { lhs.add(i * lds) });
    for p in 0..kc {
        // SAFETY: p < kc, inside both panels (the caller's contract).
        unsafe {
            let mut b = [_mm512_setzero_ps(); NV];
            for (h, bh) in b.iter_mut().enumerate() {
                *bh = _mm512_loadu_ps(rhs.add(p * 16 * NV + 16 * h));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*rows[i].add(p));
                for (r, &bh) in row.iter_mut().zip(&b) {
                    *r = _mm512_fmadd_ps(a, bh, *r);
                }
            }
        }
    }
    // SAFETY: dst addresses the whole tile (the caller's contract); the CPU has AVX-512F.
    unsafe { store_zmm_tile(&acc, dst, ldd, start, scale) };
}

/// dst = `start` + scale · acc for a register tile of R rows of NV zmm registers, the epilogue of the
/// AVX-512 microkernels (this one's and [`super::bf16_gemm`]'s). Inlined into them, so it is compiled
/// with their AVX-512 features.
///
/// # Safety
/// The CPU must have AVX-512F; `dst` must address R rows (`ldd` apart) of 16·NV floats; a bias of
/// `start` must hold the tile's rows or columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_zmm_tile<const R: usize, const NV: usize>(
    acc: &[[std::arch::x86_64::__m512; NV]; R],
    dst: *mut f32,
    ldd: usize,
    start: Start,
    scale: f32,
) {
    use std::arch::x86_64::*;
    // SAFETY: the CPU has AVX-512F and every row i, columns 16h..16h + 16, lies inside dst (and the
    // bias's row i or columns 16h..16h + 16, the caller's contract).
    unsafe {
        let scale = _mm512_set1_ps(scale);
        for (i, row) in acc.iter().enumerate() {
            for (h, &sum) in row.iter().enumerate() {
                let out = dst.add(i * ldd + 16 * h);
                let value = match start {
                    Start::Zero => _mm512_mul_ps(sum, scale),
                    Start::Current => _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(out)),
                    Start::RowBias(b) => _mm512_fmadd_ps(sum, scale, _mm512_set1_ps(*b.add(i))),
                    Start::ColumnBias(b) => _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(b.add(16 * h))),
                };
                _mm512_storeu_ps(out, value);
            }
        }
    }
}

/// The transpose of an 8x8 block of 32-bit lanes, row i in register i (f32 here; the bf16 GEMM's
/// pairs through casts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(crate) fn transpose_8x8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    std::array::from_fn(|i| {
        if i < 4 {
            _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[i - 4], u[i])
        }
    })
}

/// Stand-ins for targets other than x86-64, never called there ([`kernel`] is None).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_columns_8(_: MatRef, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("f32 packing runs only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel_avx2(_: usize, _: *const f32, _: usize, _: *const f32, _: *mut f32, _: usize, _: Start, _: f32) {
    unreachable!("the f32 microkernels run only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel_avx512<const NV: usize>(
    _: usize,
    _: *const f32,
    _: usize,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: Start,
    _: f32,
) {
    unreachable!("the f32 microkernels run only on x86-64")
}

/// [`product`] on the `gemm` crate, for CPUs without AVX2 and FMA.
///
/// # Safety
/// As [`matmul`].
unsafe fn fallback(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    lhs: MatRef,
    rhs: MatRef,
    scale: f32,
) {
    let stride = |s: usize| s as isize;
    // A bias is written first, then accumulated into (the current contents need no filling).
    let accumulate = !matches!(start, Start::Zero);
    if accumulate {
        // SAFETY: dst [m, n] and the bias (the caller's contract).
        unsafe { start.fill(dst, ldd, (m, n)) };
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            stride(ldd),
            accumulate,
            lhs.ptr,
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.ptr,
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{StartKind, values};

    /// Checks one product against a plain triple loop in f64.
    fn check(
        (m, n, k): (usize, usize, usize),
        lhs_transposed: bool,
        rhs_transposed: bool,
        kind: StartKind,
        parallel: bool,
    ) {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let ldd = n + 3;
        let start = values(m * ldd, 3);
        let lhs = if lhs_transposed { MatRef::transposed(a.as_ptr(), m) } else { MatRef::rows(a.as_ptr(), k) };
        let rhs = if rhs_transposed { MatRef::transposed(b.as_ptr(), k) } else { MatRef::rows(b.as_ptr(), n) };
        let mut out = start.clone();
        // SAFETY: the operands are a [m, k], b [k, n] (possibly stored transposed), out [m, ldd].
        let (row_bias, column_bias) = (values(m, 4), values(n, 5));
        unsafe {
            matmul((m, n, k), out.as_mut_ptr(), ldd, kind.start(&row_bias, &column_bias), lhs, rhs, 0.5, parallel)
        };
        let at = |x: &MatRef, i: usize, j: usize| unsafe { *x.ptr.add(i * x.row_stride + j * x.col_stride) } as f64;
        for i in 0..m {
            for j in 0..ldd {
                let got = out[i * ldd + j] as f64;
                let expected = if j >= n {
                    start[i * ldd + j] as f64
                } else {
                    let dot: f64 = (0..k).map(|p| at(&lhs, i, p) * at(&rhs, p, j)).sum();
                    0.5 * dot + kind.expected(start[i * ldd + j], &row_bias, &column_bias, (i, j))
                };
                assert!(
                    (got - expected).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                    "({m}, {n}, {k}) lhsᵀ {lhs_transposed} rhsᵀ {rhs_transposed} {kind:?}: \
                     [{i}, {j}] = {got}, expected {expected}"
                );
            }
        }
    }

    #[test]
    fn matches_a_plain_product_on_edges_blocks_and_strides() {
        // Narrow products take the AVX2 tile, wide ones (n ≥ 128) and whole 32-column panels (n = 32,
        // 64) the AVX-512 one where the CPU has it.
        for dims in [
            (1, 1, 1),
            (9, 32, 7),
            (20, 64, 250),
            (6, 16, 4),
            (7, 17, 5),
            (13, 40, 40),
            (150, 33, 300),
            (5, 2100, 9),
            (12, 16, 0),
            (70, 200, 400),
            (7, 130, 5),
        ] {
            for (lt, rt) in [(false, false), (false, true), (true, false)] {
                for kind in StartKind::ALL {
                    check(dims, lt, rt, kind, false);
                }
            }
        }
        check((300, 70, 130), false, true, StartKind::Current, true);
        check((40, 500, 64), false, false, StartKind::Zero, true);
        check((300, 700, 130), false, true, StartKind::ColumnBias, true);
        check((300, 70, 700), false, false, StartKind::RowBias, true);
    }
}
