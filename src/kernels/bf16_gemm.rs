//! Matrix product on the CPU's bf16 dot-product instruction (AVX512-BF16 `VDPBF16PS`): f32 or bf16
//! operands are rounded to bf16 (nearest-even) as they are packed, and every product is accumulated in
//! f32. On CPUs that have it this is twice the multiply-add rate of f32 FMA; the `--dtype bf16` layers
//! and attention use it there (see [`available`]).
//!
//! The blocking is [`super::sgemm`]'s: a [KC, NC] block of the right operand is packed into
//! [`NR`]-column panels of bf16 pairs (each panel stays in L1 while it is used), an [MC, KC] block of
//! the left operand into [`MR`]-row tiles of pairs (in L2), and the microkernel multiplies one tile by
//! one panel into an 8x32 tile of the output held in 16 zmm registers. A pair is two bf16 values of
//! consecutive depths in one 32-bit lane, the operand layout `VDPBF16PS` multiplies.

use std::cell::RefCell;
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::sgemm::{MIN_PARALLEL_MACS, MatRef};
use super::{SharedMut, Start};

/// Rows of the register tile (each broadcast from one pair of the left tile).
pub const MR: usize = 8;
/// Columns of the register tile (two zmm registers of 16 f32 lanes).
pub const NR: usize = 32;
/// Largest depth of one packed block (even): a right panel is at most KC/2 · NR pairs = 20 KB.
const KC: usize = 320;
/// Rows of one left block: MC·KC bf16 = 120 KB, in L2.
const MC: usize = 192;
/// Columns of one packed right block (640 KB at KC = 320).
const NC: usize = 1024;

/// Whether this CPU has the bf16 dot product (and the AVX-512 subsets the kernels use).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Where an operand's elements are stored.
#[derive(Debug, Clone, Copy)]
enum Elements {
    F32(*const f32),
    Bf16(*const u16),
}

/// A read-only strided matrix of f32 or bf16 elements: element (i, j) at `i·row_stride +
/// j·col_stride` from the start.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    elements: Elements,
    row_stride: usize,
    col_stride: usize,
}

// SAFETY: an Operand is only read, by every task of a product, while its caller keeps the data alive.
unsafe impl Send for Operand {}
// SAFETY: as above.
unsafe impl Sync for Operand {}

impl From<MatRef> for Operand {
    fn from(m: MatRef) -> Self {
        Self { elements: Elements::F32(m.ptr), row_stride: m.row_stride, col_stride: m.col_stride }
    }
}

impl Operand {
    /// A row-major bf16 matrix (bf16 bit patterns) with rows `row_stride` elements apart.
    pub fn bf16_rows(ptr: *const u16, row_stride: usize) -> Self {
        Self { elements: Elements::Bf16(ptr), row_stride, col_stride: 1 }
    }

    /// The transpose of a row-major bf16 matrix whose rows are `row_stride` elements apart.
    pub fn bf16_transposed(ptr: *const u16, row_stride: usize) -> Self {
        Self { elements: Elements::Bf16(ptr), row_stride: 1, col_stride: row_stride }
    }

    /// Contiguous bf16 rows an even number of elements apart, as AMX tiles load them in place: the
    /// rows as pairs of depths and their stride in pairs.
    pub(crate) fn bf16_row_pairs(self) -> Option<(*const u32, usize)> {
        match self.elements {
            Elements::Bf16(p) if self.col_stride == 1 && self.row_stride.is_multiple_of(2) => {
                Some((p.cast::<u32>(), self.row_stride / 2))
            }
            _ => None,
        }
    }

    /// The sub-matrix starting at element (i, j).
    ///
    /// # Safety
    /// (i, j) must lie inside the matrix.
    pub(crate) unsafe fn at(self, i: usize, j: usize) -> Self {
        let offset = i * self.row_stride + j * self.col_stride;
        // SAFETY: forwarded from the caller.
        let elements = unsafe {
            match self.elements {
                Elements::F32(p) => Elements::F32(p.add(offset)),
                Elements::Bf16(p) => Elements::Bf16(p.add(offset)),
            }
        };
        Self { elements, ..self }
    }

    /// The first element as f32 (a bf16 element widened).
    ///
    /// # Safety
    /// The operand must hold an element.
    pub(crate) unsafe fn value(self) -> f32 {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self.elements {
                Elements::F32(p) => *p,
                Elements::Bf16(p) => bf16::from_bits(*p).to_f32(),
            }
        }
    }

    /// Element (i, j) as bf16 bits, rounded to nearest-even from f32.
    ///
    /// # Safety
    /// (i, j) must lie inside the matrix.
    unsafe fn bits(self, i: usize, j: usize) -> u16 {
        let offset = i * self.row_stride + j * self.col_stride;
        // SAFETY: forwarded from the caller.
        unsafe {
            match self.elements {
                Elements::F32(p) => bf16::from_f32(*p.add(offset)).to_bits(),
                Elements::Bf16(p) => *p.add(offset),
            }
        }
    }

    /// The pair of depths (p, p + 1) of row i, column j as one lane (`p + 1 ≥ depth` gives 0 there),
    /// for a left (`along_rows` false: depth runs along columns) or right operand.
    ///
    /// # Safety
    /// The elements read must lie inside the matrix.
    pub(crate) unsafe fn pair(self, outer: usize, p: usize, depth: usize, depth_along_rows: bool) -> u32 {
        // SAFETY: forwarded from the caller.
        let get = |q: usize| unsafe { if depth_along_rows { self.bits(q, outer) } else { self.bits(outer, q) } };
        let hi = if p + 1 < depth { get(p + 1) } else { 0 };
        get(p) as u32 | (hi as u32) << 16
    }
}

impl Operand {
    /// Row i's depths 0..k as pairs, `out[pp]` = (2pp, 2pp + 1) (0 past k): the row layout AMX
    /// tiles load. Contiguous f32 rows convert in a vectorised loop, contiguous bf16 rows copy.
    ///
    /// # Safety
    /// Row i must lie inside the matrix with k elements; `out` must hold ⌈k/2⌉ lanes.
    pub(crate) unsafe fn pack_row_pairs(self, i: usize, k: usize, out: &mut [u32]) {
        // SAFETY: row i (the caller's contract).
        let row = unsafe { self.at(i, 0) };
        let out = &mut out[..k.div_ceil(2)];
        match row.elements {
            Elements::F32(p) if row.col_stride == 1 => {
                // SAFETY: the row's k floats (the caller's contract).
                let src = unsafe { std::slice::from_raw_parts(p, k) };
                // 32 floats (16 pairs) per instruction where the CPU converts to bf16 itself.
                let done = if available() {
                    // SAFETY: AVX512-BF16 checked; src has k floats and out ⌈k/2⌉ lanes.
                    unsafe { convert_row_pairs(src, out) }
                } else {
                    0
                };
                for (o, c) in out[done..].iter_mut().zip(src[2 * done..].chunks_exact(2)) {
                    *o = pair(c[0], c[1]);
                }
                if k % 2 == 1 {
                    out[k / 2] = pair(src[k - 1], 0.0);
                }
            }
            Elements::Bf16(p) if row.col_stride == 1 => {
                for (pp, o) in out.iter_mut().enumerate() {
                    // SAFETY: depths 2pp, 2pp + 1 (when < k) of the row.
                    *o = unsafe { pair_contiguous_bf16(p, 2 * pp, k) };
                }
            }
            _ => {
                for (pp, o) in out.iter_mut().enumerate() {
                    // SAFETY: as above.
                    *o = unsafe { row.pair(0, 2 * pp, k, false) };
                }
            }
        }
    }
}

/// A left operand packed once for many products (a convolution's weights, the attention's keys and
/// transposed values): [`MR`]-row tiles of bf16 pairs over the whole depth.
#[derive(Debug, Default)]
pub struct PackedLhs {
    data: Vec<u32>,
    rows: usize,
    depth: usize,
}

impl PackedLhs {
    /// Packs `lhs` [rows, depth].
    ///
    /// # Safety
    /// `lhs` must address rows x depth elements.
    pub unsafe fn pack(&mut self, lhs: Operand, rows: usize, depth: usize) {
        let pairs = depth.div_ceil(2);
        self.data.resize(rows.div_ceil(MR) * pairs * MR, 0);
        (self.rows, self.depth) = (rows, depth);
        if pairs == 0 {
            return;
        }
        self.data.par_chunks_mut(pairs * MR).enumerate().for_each(|(t, tile)| {
            let i0 = t * MR;
            // SAFETY: rows i0.. of lhs (the caller's contract).
            unsafe { pack_lhs_tile(lhs.at(i0, 0), MR.min(rows - i0), depth, tile) };
        });
    }

    /// The tiles of a [rows, depth] operand, for a producer that writes them itself: tile t holds the
    /// pair of depths pp of rows t·MR.. at `[(t·⌈depth/2⌉ + pp)·MR ..][..MR]` (each lane from
    /// [`pair`]), rows past `rows` zero.
    pub fn tiles_mut(&mut self, rows: usize, depth: usize) -> &mut [u32] {
        self.data.resize(rows.div_ceil(MR) * depth.div_ceil(2) * MR, 0);
        (self.rows, self.depth) = (rows, depth);
        &mut self.data
    }

    /// The packed rows i0.. (a multiple of [`MR`]) from depth p0 (even): [kc/2][MR] pairs per tile,
    /// tiles `stride` pairs apart.
    fn tiles(&self, i0: usize, p0: usize) -> (*const u32, usize) {
        let stride = self.depth.div_ceil(2) * MR;
        (self.data[i0 / MR * stride + p0 / 2 * MR..].as_ptr(), stride)
    }
}

/// The left operand of [`matmul`]: strided, or packed in advance.
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    /// Packed per block as the product runs.
    Strided(Operand),
    /// Packed in advance with [`PackedLhs::pack`] (whose rows and depth must match the product's).
    Packed(&'a PackedLhs),
}

/// A right operand packed once for many products (the attention's queries and probabilities), or
/// once for all threads of one (a convolution's columns): [`NR`]-column panels of bf16 pairs over the
/// whole depth.
#[derive(Debug, Default)]
pub struct PackedRhs {
    data: Vec<u32>,
    depth: usize,
    cols: usize,
}

impl PackedRhs {
    /// Packs `rhs` [depth, cols], with `parallel` over rayon's threads.
    ///
    /// # Safety
    /// `rhs` must address depth x cols elements; the CPU must have AVX512-BF16 ([`available`]).
    pub unsafe fn pack(&mut self, rhs: Operand, depth: usize, cols: usize, parallel: bool) {
        let panel_len = depth.div_ceil(2) * NR;
        self.data.resize(cols.div_ceil(NR) * panel_len, 0);
        (self.depth, self.cols) = (depth, cols);
        if panel_len == 0 {
            return;
        }
        // SAFETY (both arms): panel q holds columns q·NR.. of rhs (the caller's contract).
        let pack_panel = |(q, panel): (usize, &mut [u32])| unsafe {
            pack_rhs(rhs.at(0, q * NR), depth, NR.min(cols - q * NR), panel)
        };
        if parallel {
            self.data.par_chunks_mut(panel_len).enumerate().for_each(pack_panel);
        } else {
            self.data.chunks_mut(panel_len).enumerate().for_each(pack_panel);
        }
    }
}

impl PackedRhs {
    /// The panels of a [depth, cols] operand, for a producer that writes them itself: panel q holds
    /// the pair of depths pp of columns q·NR.. at `[(q·⌈depth/2⌉ + pp)·NR ..][..NR]` (each lane from
    /// [`pair`]), columns past `cols` zero.
    pub fn panels_mut(&mut self, depth: usize, cols: usize) -> &mut [u32] {
        self.data.resize(cols.div_ceil(NR) * depth.div_ceil(2) * NR, 0);
        (self.depth, self.cols) = (depth, cols);
        &mut self.data
    }
}

/// The lane holding `lo` and `hi` (consecutive depths) rounded to bf16, nearest-even; for finite
/// values (no NaN handling). Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn pair(lo: f32, hi: f32) -> u32 {
    let round = |x: f32| {
        let bits = x.to_bits();
        (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    };
    round(lo) | round(hi) << 16
}

/// dst [m, n] = `start` + `scale` · lhs [m, k] · rhs [k, n] on the calling thread,
/// both operands packed in advance: lhs is the packed rows `row0`.. (a multiple of [`MR`]) at depths
/// `p0`.. (even), rhs the whole packed matrix (k ≤ its depth, n ≤ its columns). No cache blocking:
/// for products whose packed operands stay in cache (the attention's).
///
/// # Safety
/// The CPU must have AVX512-BF16; `dst` must address m rows (`ldd` apart) of n elements that no one
/// else reads or writes during the call; a bias of `start` must hold m rows or n columns.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_packed(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    (lhs, row0, p0): (&PackedLhs, usize, usize),
    rhs: &PackedRhs,
    scale: f32,
) {
    assert!(
        row0 % MR == 0 && p0 % 2 == 0 && row0 + m <= lhs.rows && p0 + k <= lhs.depth.next_multiple_of(2),
        "packed left operand [{}, {}] has no rows {row0}..+{m} at depths {p0}..+{k}",
        lhs.rows,
        lhs.depth
    );
    assert!(
        k <= rhs.depth && n <= rhs.cols,
        "packed right operand [{}, {}] is smaller than [{k}, {n}]",
        rhs.depth,
        rhs.cols
    );
    let (tiles, tile_stride) = lhs.tiles(row0, p0);
    let (pairs, panel_len) = (k.div_ceil(2), rhs.depth.div_ceil(2) * NR);
    for q in 0..n.div_ceil(NR) {
        let panel = rhs.data[q * panel_len..].as_ptr();
        for t in 0..m.div_ceil(MR) {
            let size = (MR.min(m - t * MR), NR.min(n - q * NR));
            // SAFETY: tile t and panel q hold `pairs` pairs (checked above); the output tile lies
            // inside dst (the caller's contract).
            unsafe {
                let tile = dst.add(t * MR * ldd + q * NR);
                let start = start.at(t * MR, q * NR);
                write_tile(pairs, tiles.add(t * tile_stride), panel, tile, ldd, size, start, scale);
            }
        }
    }
}

/// The right operand of [`matmul`]: strided, or packed in advance.
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    /// Packed per block as the product runs, by each thread for the columns it computes.
    Strided(Operand),
    /// Packed in advance with [`PackedRhs::pack`] (whose depth and columns must match the product's),
    /// once for all threads: for products split by rows, which would each pack all of a strided one.
    Packed(&'a PackedRhs),
}

/// dst [m, n] = `start` + `scale` · lhs [m, k] · rhs [k, n] with bf16 products,
/// where dst has rows `dst_row_stride` elements apart and unit column stride. With `parallel` the
/// product is split over the rayon threads; without, it runs on the calling thread.
///
/// # Safety
/// The CPU must have the bf16 dot product ([`available`]); `lhs`, `rhs` and `dst` must address
/// matrices of these sizes and strides; `dst` must not overlap them, nor be read or written by anyone
/// else during the call; a bias of `start` must hold m rows or n columns.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    start: Start,
    lhs: Lhs<'_>,
    rhs: Rhs<'_>,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(available());
    if let Lhs::Packed(packed) = lhs {
        assert!(packed.rows == m && packed.depth == k, "packed left operand of another shape");
    }
    if let Rhs::Packed(packed) = rhs {
        assert!(packed.depth == k && packed.cols == n, "packed right operand of another shape");
    }
    let threads = if parallel && m * n * k >= MIN_PARALLEL_MACS { rayon::current_num_threads() } else { 1 };
    let dst = SharedMut(dst);
    let run = |(i0, j0, rows, cols): (usize, usize, usize, usize)| {
        // SAFETY: each task gets a disjoint block of dst and reads inside lhs and rhs (the caller's
        // contract), at offsets inside the matrices.
        unsafe {
            let out = dst.get().add(i0 * dst_row_stride + j0);
            product((i0, j0, rows, cols, k), out, dst_row_stride, start.at(i0, j0), lhs, rhs, scale)
        }
    };
    if threads <= 1 {
        return run((0, 0, m, n));
    }
    super::sgemm::split(m, n, threads, (MR, NR)).into_par_iter().for_each(run);
}

thread_local! {
    /// Each thread's scratch: the packed left block [MC/MR][KC/2][MR] and right block [NC/NR][KC/2][NR].
    static SCRATCH: RefCell<[Vec<u32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// The block from row i0, column j0 of the product, m x n, on the calling thread (lhs rows counted
/// from i0, rhs columns from j0; dst and start already offset).
///
/// # Safety
/// As [`matmul`]; i0 is a multiple of [`MR`] when lhs is packed, j0 one of [`NR`] when rhs is.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (i0, j0, m, n, k): (usize, usize, usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    lhs: Lhs<'_>,
    rhs: Rhs<'_>,
    scale: f32,
) {
    if k == 0 {
        // SAFETY: dst [m, n] and the bias (the caller's contract).
        return unsafe { start.fill(dst, ldd, (m, n)) };
    }
    SCRATCH.with_borrow_mut(|[packed_lhs, packed_rhs]| {
        // Equal blocks of even depth, no deeper than KC.
        let kc_max = k.div_ceil(k.div_ceil(KC)).next_multiple_of(2);
        let grow = |v: &mut Vec<u32>, len: usize| v.resize(v.len().max(len), 0);
        grow(packed_lhs, MC.min(m).next_multiple_of(MR) * kc_max / 2);
        if let Rhs::Strided(_) = rhs {
            grow(packed_rhs, NC.min(n).next_multiple_of(NR) * kc_max / 2);
        }
        for c0 in (0..n).step_by(NC) {
            let nc = NC.min(n - c0);
            for p0 in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - p0);
                let pairs = kc.div_ceil(2);
                // The block's panels: panel q at `panels + q·panel_stride`, `pairs` pairs of NR lanes.
                let (panels, panel_stride) = match rhs {
                    Rhs::Strided(rhs) => {
                        // SAFETY: the block lies inside rhs (the caller's contract).
                        unsafe { pack_rhs(rhs.at(p0, j0 + c0), kc, nc, packed_rhs) };
                        (packed_rhs.as_ptr(), pairs * NR)
                    }
                    Rhs::Packed(packed) => {
                        let stride = packed.depth.div_ceil(2) * NR;
                        (packed.data[(j0 + c0) / NR * stride + p0 / 2 * NR..].as_ptr(), stride)
                    }
                };
                let block_start = start.for_depth(p0);
                for b0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - b0);
                    let (tiles, tile_stride) = match lhs {
                        Lhs::Packed(packed) => packed.tiles(i0 + b0, p0),
                        Lhs::Strided(lhs) => {
                            for (t, tile) in
                                packed_lhs[..mc.div_ceil(MR) * pairs * MR].chunks_exact_mut(pairs * MR).enumerate()
                            {
                                // SAFETY: rows i0 + b0 + t·MR.., depths p0..p0 + kc of lhs.
                                unsafe { pack_lhs_tile(lhs.at(i0 + b0 + t * MR, p0), MR.min(mc - t * MR), kc, tile) };
                            }
                            (packed_lhs.as_ptr(), pairs * MR)
                        }
                    };
                    for q in 0..nc.div_ceil(NR) {
                        let cols = NR.min(nc - q * NR);
                        for t in 0..mc.div_ceil(MR) {
                            let rows = MR.min(mc - t * MR);
                            // SAFETY: tile t holds pairs x MR lanes, panel q pairs x NR; the output tile
                            // (b0 + t·MR, c0 + q·NR) of rows x cols lies inside dst.
                            unsafe {
                                let tile = dst.add((b0 + t * MR) * ldd + c0 + q * NR);
                                let (lhs_tile, panel) = (tiles.add(t * tile_stride), panels.add(q * panel_stride));
                                let start = block_start.at(b0 + t * MR, c0 + q * NR);
                                write_tile(pairs, lhs_tile, panel, tile, ldd, (rows, cols), start, scale);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Packs `rows` (≤ MR) rows of `lhs` over depths 0..kc as [kc/2][MR] pairs, rows past `rows` zero.
///
/// # Safety
/// `lhs` must address rows x kc elements.
unsafe fn pack_lhs_tile(lhs: Operand, rows: usize, kc: usize, out: &mut [u32]) {
    let pairs = kc.div_ceil(2);
    let out = &mut out[..pairs * MR];
    if rows < MR {
        out.fill(0);
    }
    if rows == MR && available() {
        if lhs.col_stride == 1 {
            // Rows with contiguous depths: 8 pairs of all the tile's rows at a time, transposed in
            // registers; the depths left over go below.
            let blocks = kc / 16;
            // SAFETY: 16·blocks ≤ kc depths of the MR rows (the caller's contract); AVX512-BF16 checked.
            unsafe { transpose_rows_8(lhs, blocks, out, MR) };
            // SAFETY: the rest of the rows, from depth 16·blocks.
            return unsafe { pack_lhs_rows(lhs, rows, kc, 8 * blocks, out) };
        }
        if let Elements::F32(p) = lhs.elements
            && lhs.row_stride == 1
        {
            // The tile's rows lie side by side in memory: each pair of depths is two runs of MR floats.
            for (pp, lanes) in out.chunks_exact_mut(MR).enumerate() {
                // SAFETY: depths 2pp and 2pp + 1 (when < kc) of the MR rows (the caller's contract).
                unsafe {
                    let run0 = p.add(2 * pp * lhs.col_stride);
                    let run1 = (2 * pp + 1 < kc).then(|| p.add((2 * pp + 1) * lhs.col_stride));
                    interleave_runs_8(run0, run1, lanes);
                }
            }
            return;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { pack_lhs_rows(lhs, rows, kc, 0, out) }
}

/// The pairs `first..` of each of `rows` rows of `lhs` (depths 0..kc) into the tile `out` [pairs][MR],
/// one element at a time.
///
/// # Safety
/// `lhs` must address rows x kc elements.
unsafe fn pack_lhs_rows(lhs: Operand, rows: usize, kc: usize, first: usize, out: &mut [u32]) {
    if first >= kc.div_ceil(2) {
        return;
    }
    for i in 0..rows {
        // SAFETY: row i of lhs (the caller's contract).
        let row = unsafe { lhs.at(i, 0) };
        for (pp, o) in out[first * MR + i..].iter_mut().step_by(MR).enumerate() {
            let p = 2 * (first + pp);
            // SAFETY: depths p and p + 1 (when < kc) of the row.
            *o = unsafe {
                match row.elements {
                    Elements::Bf16(ptr) if row.col_stride == 1 => pair_contiguous_bf16(ptr, p, kc),
                    _ => row.pair(0, p, kc, false),
                }
            };
        }
    }
}

/// Packs depths 0..16·blocks of 8 rows of `lhs` (contiguous depths, f32 or bf16) as pairs: pair pp
/// of row i at `out[pp·stride + i]` (a left tile [pairs][8] with stride [`MR`], or 8 columns of a
/// right panel with stride [`NR`]). Per block, each row's 8 pairs in one register, the 8x8 block
/// transposed.
///
/// # Safety
/// The CPU must have AVX512-BF16; `lhs` must address 8 rows of 16·blocks elements with unit column
/// stride; stride ≥ 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn transpose_rows_8(lhs: Operand, blocks: usize, out: &mut [u32], stride: usize) {
    use std::arch::x86_64::*;
    const { assert!(MR == 8) };
    assert!(stride >= 8 && (blocks == 0 || out.len() >= (8 * blocks - 1) * stride + 8));
    for blk in 0..blocks {
        let p0 = 16 * blk;
        let mut r = [_mm256_setzero_si256(); 8];
        for (i, ri) in r.iter_mut().enumerate() {
            // SAFETY: depths p0..p0 + 16 of row i (the caller's contract).
            *ri = unsafe {
                match lhs.elements {
                    Elements::F32(p) => std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                        p.add(i * lhs.row_stride + p0),
                    ))),
                    Elements::Bf16(p) => _mm256_loadu_si256(p.add(i * lhs.row_stride + p0) as *const __m256i),
                }
            };
        }
        // Transpose the 8x8 block of 32-bit pairs: rows i → lanes, pairs j → registers.
        let columns = super::sgemm::transpose_8x8(r.map(|ri| _mm256_castsi256_ps(ri))).map(|c| _mm256_castps_si256(c));
        for (j, c) in columns.into_iter().enumerate() {
            // SAFETY: pair 8·blk + j's MR lanes lie inside out (checked above).
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add((8 * blk + j) * stride) as *mut __m256i, c) };
        }
    }
}

/// The pair of depths (p, p + 1) of a contiguous bf16 row at `ptr` (0 past `depth`).
///
/// # Safety
/// `ptr` must address the row's `depth` elements.
unsafe fn pair_contiguous_bf16(ptr: *const u16, p: usize, depth: usize) -> u32 {
    // SAFETY: forwarded from the caller.
    unsafe { if p + 1 < depth { (ptr.add(p) as *const u32).read_unaligned() } else { *ptr.add(p) as u32 } }
}

/// Packs rhs [kc, nc] into [`NR`]-column panels of pairs: panel q holds, for each pair of depths
/// pp, its columns' pairs at `out[(q·kc/2 + pp)·NR ..][..NR]`, columns past `nc` zero.
///
/// # Safety
/// `rhs` must address kc x nc elements.
pub(crate) unsafe fn pack_rhs(rhs: Operand, kc: usize, nc: usize, out: &mut [u32]) {
    let pairs = kc.div_ceil(2);
    for (q, panel) in out[..nc.div_ceil(NR) * pairs * NR].chunks_exact_mut(pairs * NR).enumerate() {
        let cols = NR.min(nc - q * NR);
        // SAFETY: columns q·NR.. of rhs (the caller's contract).
        let block = unsafe { rhs.at(0, q * NR) };
        match block.elements {
            Elements::F32(p) if block.col_stride == 1 && cols == NR && available() => {
                for (pp, step) in panel.chunks_exact_mut(NR).enumerate() {
                    // SAFETY: rows 2pp and 2pp + 1 (when < kc), NR columns each; AVX512-BF16 checked.
                    unsafe {
                        let row0 = p.add(2 * pp * block.row_stride);
                        let row1 = (2 * pp + 1 < kc).then(|| p.add((2 * pp + 1) * block.row_stride));
                        interleave_rows_32(row0, row1, step);
                    }
                }
            }
            Elements::Bf16(p) if block.row_stride == 1 => {
                // Depth runs along memory: each column's pairs are contiguous. Whole panels go 8
                // columns at a time through register transposes, 8 pairs at a time; the rest below.
                let first = if cols == NR && available() { 8 * (kc / 16) } else { 0 };
                if first > 0 {
                    for j0 in (0..NR).step_by(8) {
                        // The 8 columns as rows of contiguous depths.
                        let columns = Operand::bf16_rows(p.wrapping_add(j0 * block.col_stride), block.col_stride);
                        // SAFETY: columns j0..j0 + 8 < cols, depths 0..kc of the block; AVX512-BF16
                        // checked.
                        unsafe { transpose_rows_8(columns, kc / 16, &mut panel[j0..], NR) };
                    }
                }
                let rest = &mut panel[first * NR..];
                for j in 0..NR.min(rest.len()) {
                    let lane = rest[j..].iter_mut().step_by(NR);
                    if j >= cols {
                        lane.for_each(|o| *o = 0);
                        continue;
                    }
                    for (pp, o) in lane.enumerate().map(|(pp, o)| (first + pp, o)) {
                        // SAFETY: column j's depths 2pp, 2pp + 1 (when < kc).
                        *o = unsafe { pair_contiguous_bf16(p.add(j * block.col_stride), 2 * pp, kc) };
                    }
                }
            }
            _ => {
                for (pp, step) in panel.chunks_exact_mut(NR).enumerate() {
                    for (j, o) in step.iter_mut().enumerate() {
                        // SAFETY: column j < cols, depths 2pp.. (when < kc).
                        *o = if j < cols { unsafe { block.pair(j, 2 * pp, kc, true) } } else { 0 };
                    }
                }
            }
        }
    }
}

/// Writes the [`NR`] columns of two rows (`row1` None: zeros) as NR pairs (row0's value low).
///
/// # Safety
/// The CPU must have AVX512-BF16; each row must address NR floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_rows_32(row0: *const f32, row1: Option<*const f32>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    // SAFETY: NR floats per row and NR lanes of out (the caller's contract).
    unsafe {
        for h in 0..NR / 16 {
            let a = _mm512_loadu_ps(row0.add(16 * h));
            let b = match row1 {
                Some(r) => _mm512_loadu_ps(r.add(16 * h)),
                None => _mm512_setzero_ps(),
            };
            _mm512_storeu_si512(out[16 * h..].as_mut_ptr() as *mut _, pair_zmm(a, b));
        }
    }
}

/// The whole 16-pair groups of a contiguous f32 row as pairs of consecutive elements rounded to
/// bf16 (nearest-even, as [`pair`]): returns how many pairs it wrote.
///
/// # Safety
/// The CPU must have AVX512-BF16; `out` must hold ⌊src.len() / 2⌋ lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row_pairs(src: &[f32], out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let groups = src.len() / 32;
    for g in 0..groups {
        // SAFETY: floats 32g..32g + 32 of src and lanes 16g..16g + 16 of out (the caller's contract).
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(src.as_ptr().add(32 * g)), _mm512_loadu_ps(src.as_ptr().add(32 * g + 16)));
            // The low 16 bf16 take `lo`: in memory, element order, i.e. the pairs of consecutive elements.
            let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * g) as *mut _, both);
        }
    }
    16 * groups
}

/// The 16 pairs (a[t], b[t]) of two registers rounded to bf16 (a's value low): [`pair`] on 16 lanes.
///
/// # Safety
/// The CPU must have AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pair_zmm(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // Lane 2t takes element t of the first half (a), lane 2t + 1 element t of the second (b).
    const INTERLEAVE: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut t = 0;
        while t < 16 {
            idx[2 * t] = t as u16;
            idx[2 * t + 1] = 16 + t as u16;
            t += 1;
        }
        idx
    };
    // SAFETY: INTERLEAVE holds 32 u16; the CPU has AVX512-BF16 (the caller's contract).
    unsafe {
        let idx = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const _);
        let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
        _mm512_permutexvar_epi16(idx, both)
    }
}

/// Writes 8 consecutive floats of two runs (`run1` None: zeros) as 8 pairs (run0's value low).
///
/// # Safety
/// The CPU must have AVX512-BF16; each run must address 8 floats, `out` 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn interleave_runs_8(run0: *const f32, run1: Option<*const f32>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    // Lane 2t takes element t of run 0, lane 2t + 1 element t of run 1.
    const INTERLEAVE: [u16; 16] = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15];
    assert!(out.len() >= 8);
    // SAFETY: 8 floats per run, 8 lanes of out (the caller's contract and the check above).
    unsafe {
        let a = _mm256_loadu_ps(run0);
        let b = run1.map_or(_mm256_setzero_ps(), |r| _mm256_loadu_ps(r));
        let both = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(a), b);
        let halves = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(both));
        let idx = _mm256_loadu_si256(INTERLEAVE.as_ptr() as *const _);
        _mm256_storeu_si256(out.as_mut_ptr() as *mut _, _mm256_permutexvar_epi16(idx, halves));
    }
}

/// Multiplies a left tile [pairs][MR] by a right panel [pairs][NR] into the `rows` x `cols` corner of
/// the output tile at `dst`: `start` + `scale` · product.
///
/// # Safety
/// As [`microkernel`], with `dst` addressing only `rows` rows (`ldd` apart) of `cols` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn write_tile(
    pairs: usize,
    lhs: *const u32,
    rhs: *const u32,
    dst: *mut f32,
    ldd: usize,
    (rows, cols): (usize, usize),
    start: Start,
    scale: f32,
) {
    if rows == MR && cols == NR {
        // SAFETY: forwarded; the whole tile lies inside dst.
        return unsafe { microkernel(pairs, lhs, rhs, dst, ldd, start, scale) };
    }
    let mut tile = [0f32; MR * NR];
    // SAFETY: `tile` is a whole MR x NR tile with rows NR apart.
    unsafe { microkernel(pairs, lhs, rhs, tile.as_mut_ptr(), NR, Start::Zero, scale) };
    // SAFETY: forwarded from the caller.
    unsafe { super::store_corner(&tile, NR, dst, ldd, (rows, cols), start, 1.0) };
}

/// The 8x32 register tile: acc = Σ over pairs of lhs[pp][0..8] ⊗ rhs[pp][0..32] (each lane a
/// two-term bf16 dot product), then dst = `start` + scale · acc.
///
/// # Safety
/// The CPU must have AVX512-BF16; `lhs` must address pairs·MR lanes, `rhs` pairs·NR lanes and `dst` a
/// whole MR x NR tile with rows `ldd` apart; a bias of `start` must hold the tile's rows or columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn microkernel(
    pairs: usize,
    lhs: *const u32,
    rhs: *const u32,
    dst: *mut f32,
    ldd: usize,
    start: Start,
    scale: f32,
) {
    use std::arch::x86_64::*;
    for i in 0..MR {
        // The tile's output lines are fetched while the products run (hints only, never faults).
        _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(i * ldd) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(dst.wrapping_add(i * ldd + 16) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for pp in 0..pairs {
        // SAFETY: pair pp of both packed operands (the caller's contract).
        unsafe {
            let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(rhs.add(pp * NR) as *const _));
            let b1 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(rhs.add(pp * NR + 16) as *const _));
            for (i, row) in acc.iter_mut().enumerate() {
                let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*lhs.add(pp * MR + i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], a, b0);
                row[1] = _mm512_dpbf16_ps(row[1], a, b1);
            }
        }
    }
    // SAFETY: dst addresses the whole tile (the caller's contract); the CPU has AVX-512F.
    unsafe { super::sgemm::store_zmm_tile(&acc, dst, ldd, start, scale) };
}

/// Stand-ins for targets other than x86-64, never called there ([`available`] is false).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn microkernel(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: Start, _: f32) {
    unreachable!("the bf16 microkernel runs only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_rows_8(_: Operand, _: usize, _: &mut [u32], _: usize) {
    unreachable!("bf16 packing runs only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_runs_8(_: *const f32, _: Option<*const f32>, _: &mut [u32]) {
    unreachable!("bf16 packing runs only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn convert_row_pairs(_: &[f32], _: &mut [u32]) -> usize {
    unreachable!("bf16 conversion runs only on x86-64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_rows_32(_: *const f32, _: Option<*const f32>, _: &mut [u32]) {
    unreachable!("bf16 packing runs only on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{StartKind, bf16_round as round, values};

    /// One product against a triple loop over the bf16-rounded operands in f64: the only difference
    /// left is the f32 accumulation.
    fn check(
        (m, n, k): (usize, usize, usize),
        layout: (bool, bool),
        kind: StartKind,
        parallel: bool,
        prepack: (bool, bool),
    ) {
        let (lhs_bf16, rhs_bf16) = layout;
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let a16: Vec<u16> = a.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        // rhs stored as its transpose [n, k] when bf16 (the linear layers' weights).
        let b16t: Vec<u16> = (0..n * k).map(|idx| bf16::from_f32(b[(idx % k) * n + idx / k]).to_bits()).collect();
        let ldd = n + 3;
        let start = values(m * ldd, 3);
        let lhs = if lhs_bf16 { Operand::bf16_rows(a16.as_ptr(), k) } else { MatRef::rows(a.as_ptr(), k).into() };
        let rhs =
            if rhs_bf16 { Operand::bf16_transposed(b16t.as_ptr(), k) } else { MatRef::rows(b.as_ptr(), n).into() };
        let (mut packed_lhs, mut packed_rhs) = (PackedLhs::default(), PackedRhs::default());
        let lhs = if prepack.0 {
            // SAFETY: lhs is [m, k].
            unsafe { packed_lhs.pack(lhs, m, k) };
            Lhs::Packed(&packed_lhs)
        } else {
            Lhs::Strided(lhs)
        };
        let rhs = if prepack.1 {
            // SAFETY: rhs is [k, n].
            unsafe { packed_rhs.pack(rhs, k, n, parallel) };
            Rhs::Packed(&packed_rhs)
        } else {
            Rhs::Strided(rhs)
        };
        let mut out = start.clone();
        // SAFETY: the operands are [m, k] and [k, n], out [m, ldd].
        let (row_bias, column_bias) = (values(m, 6), values(n, 7));
        unsafe {
            matmul((m, n, k), out.as_mut_ptr(), ldd, kind.start(&row_bias, &column_bias), lhs, rhs, 0.5, parallel)
        };
        for i in 0..m {
            for j in 0..ldd {
                let got = out[i * ldd + j] as f64;
                let expected = if j >= n {
                    start[i * ldd + j] as f64
                } else {
                    let dot: f64 = (0..k).map(|p| round(a[i * k + p]) * round(b[p * n + j])).sum();
                    0.5 * dot + kind.expected(start[i * ldd + j], &row_bias, &column_bias, (i, j))
                };
                assert!(
                    (got - expected).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                    "({m}, {n}, {k}) {layout:?} {kind:?} prepack {prepack:?}: [{i}, {j}] = {got}, \
                     expected {expected}"
                );
            }
        }
    }

    /// [`matmul_packed`] with a transposed f32 left operand (the attention's Vᵀ) read from packed rows
    /// `row0`.. and depths `p0`.., against a triple loop over the rounded operands.
    fn check_packed((m, n, k): (usize, usize, usize), row0: usize, p0: usize) {
        let (rows, depth) = (row0 + m + 3, p0 + k + 5);
        // lhs [rows, depth] stored transposed: element (i, p) at a[p·rows + i].
        let a = values(rows * depth, 4);
        let b = values(k * n, 5);
        let mut lhs = PackedLhs::default();
        let mut rhs = PackedRhs::default();
        let mut out = vec![0f32; m * n];
        // SAFETY: a is [depth, rows] (the transpose of lhs), b [k, n], out [m, n].
        unsafe {
            lhs.pack(Operand { elements: Elements::F32(a.as_ptr()), row_stride: 1, col_stride: rows }, rows, depth);
            rhs.pack(MatRef::rows(b.as_ptr(), n).into(), k, n, false);
            matmul_packed((m, n, k), out.as_mut_ptr(), n, Start::Zero, (&lhs, row0, p0), &rhs, 2.0);
        }
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| round(a[(p0 + p) * rows + row0 + i]) * round(b[p * n + j])).sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - 2.0 * dot).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                    "[{i}, {j}] = {got}, expected {}",
                    2.0 * dot
                );
            }
        }
    }

    #[test]
    fn matches_a_product_of_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for dims in
            [(1, 1, 1), (8, 32, 4), (9, 33, 5), (13, 40, 40), (200, 70, 700), (20, 64, 333), (5, 1100, 9), (12, 16, 0)]
        {
            for layout in [(false, false), (true, false), (false, true), (true, true)] {
                for kind in StartKind::ALL {
                    check(dims, layout, kind, false, (false, false));
                }
            }
            check(dims, (false, false), StartKind::Current, false, (true, false));
            check(dims, (false, false), StartKind::RowBias, false, (true, true));
            check(dims, (true, true), StartKind::ColumnBias, false, (false, true));
        }
        check((300, 70, 130), (true, false), StartKind::Current, true, (true, false));
        check((300, 70, 700), (true, false), StartKind::RowBias, true, (true, true));
        check((300, 1100, 700), (false, false), StartKind::Current, true, (false, true));
        check_packed((40, 70, 256), 8, 6);
        check_packed((13, 33, 77), 0, 0);
        check((40, 500, 64), (false, true), StartKind::Zero, true, (false, false));
        check((400, 1100, 64), (false, true), StartKind::ColumnBias, true, (false, false));
    }
}
