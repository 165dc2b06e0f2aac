//! Matrix product on Intel AMX tiles (`TDPBF16PS`: a 16x16 f32 tile += a 16x32 bf16 tile times a
//! 32x16 bf16 tile, 16,384 multiply-adds per instruction), for the `--dtype bf16` products on CPUs
//! that have AMX-BF16 and whose kernel grants the tile state (see [`available`]).
//!
//! Both operands are packed once per product in the layouts the tiles load: the left operand as
//! rows of bf16 pairs (depth padded to whole 32-deep blocks), the right one as 32-column panels of
//! pairs (the VNNI layout: one tile row is 16 columns' pair of consecutive depths). Each task
//! multiplies a 32-row block by a 32-column panel over the whole depth in four accumulator tiles,
//! then adds the result to the output's start (zero, current contents or a bias) with the scale.

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::bf16_gemm::{NR, Operand, pack_rhs};
use super::sgemm::MatRef;
use super::{SharedConst, SharedMut, Start};

/// Rows of one task's output block (two tiles).
const MB: usize = 32;
/// Columns of one task's output block and of a packed right panel (two tiles).
const NB: usize = 32;
const _: () = assert!(NB == NR, "the right panels are bf16_gemm's");
/// Pairs of depths per tile step (a tile row is 64 bytes).
const KP: usize = 16;
/// Products smaller than this many multiply-adds are not worth the packing.
pub const MIN_MACS: usize = 1 << 18;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile data (and
/// `DIFFCTL_NO_AMX` is not set: it keeps the AVX512-BF16 path, to compare or test it).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("DIFFCTL_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave && super::bf16_gemm::available()) {
        return false;
    }
    // XCR0 bits 17 (tile configuration) and 18 (tile data): the kernel saves the tile state.
    // SAFETY: OSXSAVE is set, so XGETBV is enabled.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    // Linux hands out the tile data only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile palette: tmm0-7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

thread_local! {
    /// Whether this thread has loaded [`TileConfig`].
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    /// The calling thread's packing buffers (left rows, right panels), kept between products.
    static SCRATCH: Cell<[Vec<u32>; 2]> = const { Cell::new([Vec::new(), Vec::new()]) };
}

/// Loads the tile configuration on the calling thread (once).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
unsafe fn configure_thread() {
    if CONFIGURED.get() {
        return;
    }
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    // SAFETY: AMX is available (the caller's contract); the configuration is a valid palette 1.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    CONFIGURED.set(true);
}

/// Where a block's four accumulator tiles start: zero, or loaded from `ptr` with rows `stride`
/// floats apart (tile (r, c) from `ptr + 16·r·stride + 16·c`; stride 0 repeats one row).
#[derive(Debug, Clone, Copy)]
enum Accumulators {
    Zero,
    Load(*const f32, usize),
}

/// The output block [32, 32] = its start (`init`) + a left block of 32 rows of `pairs` pairs (`a`,
/// rows `lda` pairs apart) times a right panel [pairs][32] (`b`), stored at `out` (rows `ldo`
/// floats apart): `pairs` a multiple of 16, at least 16.
///
/// # Safety
/// AMX must be configured on this thread; `a` must address 32 rows of `pairs` lanes, `b` pairs x 32
/// lanes, `out` 32 rows of 32 floats and a loaded start what [`Accumulators`] says.
#[cfg(target_arch = "x86_64")]
unsafe fn block_32x32(
    a: *const u32,
    lda: usize,
    b: *const u32,
    pairs: usize,
    init: Accumulators,
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(pairs >= KP && pairs.is_multiple_of(KP));
    // SAFETY: the start tiles lie where the caller says.
    unsafe {
        match init {
            Accumulators::Zero => std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
            Accumulators::Load(c, stride) => std::arch::asm!(
                "tileloadd tmm0, [{c0} + {ldc}*1]",
                "tileloadd tmm1, [{c1} + {ldc}*1]",
                "tileloadd tmm2, [{c2} + {ldc}*1]",
                "tileloadd tmm3, [{c3} + {ldc}*1]",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * stride),
                c3 = in(reg) c.add(16 * stride + 16),
                ldc = in(reg) stride * 4,
                options(nostack, readonly),
            ),
        }
    }
    // SAFETY: every load reads inside the operands and every store inside `out` (the caller's
    // contract): A rows i0..i0 + 16 at 64-byte steps along their pairs, B rows (pairs) 16 at a time.
    unsafe {
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 2048",
            "add {b1}, 2048",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c3} + {ldc}*1], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.add(16 * lda) => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(16) => _,
            steps = inout(reg) pairs / KP => _,
            lda = in(reg) lda * 4,
            ldb = in(reg) NB * 4,
            c0 = in(reg) out,
            c1 = in(reg) out.add(16),
            c2 = in(reg) out.add(16 * ldo),
            c3 = in(reg) out.add(16 * ldo + 16),
            ldc = in(reg) ldo * 4,
            options(nostack),
        );
    }
}

/// The first 16 rows of [`block_32x32`] with zero start: the output block [16, 32] (rows 128 bytes
/// apart in `out`) of 16 left rows times a right panel, for a last row block of at most 16 rows
/// (half the tile products of a 32-row block).
///
/// # Safety
/// AMX must be configured on this thread; `a` must address 16 rows of `pairs` lanes, `b` pairs x 32
/// lanes, `out` 16 x 32 floats.
#[cfg(target_arch = "x86_64")]
unsafe fn block_16x32(a: *const u32, lda: usize, b: *const u32, pairs: usize, out: *mut f32) {
    debug_assert!(pairs >= KP && pairs.is_multiple_of(KP));
    // SAFETY: as block_32x32's, over 16 rows of A.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a0}, 64",
            "add {b0}, 2048",
            "add {b1}, 2048",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            a0 = inout(reg) a => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(16) => _,
            steps = inout(reg) pairs / KP => _,
            lda = in(reg) lda * 4,
            ldb = in(reg) NB * 4,
            c0 = in(reg) out,
            c1 = in(reg) out.add(16),
            ldc = in(reg) NB * 4,
            options(nostack),
        );
    }
}

/// A left operand packed for the tiles, once for many products: `rows` rows, padded with zero rows
/// to whole 32-row blocks, of `pairs` pairs of depths (the depth padded with zeros to whole tile steps).
#[derive(Debug, Default)]
pub struct PackedRows {
    data: Vec<u32>,
    rows: usize,
    pairs: usize,
}

impl PackedRows {
    /// Packs `scale` · `lhs` [rows, depth] (on the calling thread).
    ///
    /// # Safety
    /// `lhs` must address rows x depth elements.
    pub unsafe fn pack(&mut self, lhs: Operand, rows: usize, depth: usize, scale: f32) {
        let pairs = depth.div_ceil(2).next_multiple_of(KP);
        self.data.resize(rows.next_multiple_of(MB) * pairs, 0);
        let mut scaled = Vec::new();
        for (i, row) in self.data.chunks_mut(pairs).enumerate() {
            // SAFETY: row i of lhs, `depth` elements, when i < rows (the caller's contract).
            unsafe {
                if scale == 1.0 || i >= rows {
                    pack_tile_row(lhs, (i, rows, depth), row);
                } else {
                    scaled.clear();
                    scaled.extend((0..depth).map(|p| scale * lhs.at(i, p).value()));
                    pack_tile_row(MatRef::rows(scaled.as_ptr(), depth).into(), (0, 1, depth), row);
                }
            }
        }
        (self.rows, self.pairs) = (rows, pairs);
    }
}

/// A right operand packed for the tiles: 32-column panels (columns past the operand's zero), each
/// `pairs` pairs of depths deep (the VNNI layout: pair pp of column j of panel q at
/// `(q·pairs + pp)·32 + j`), the depth padded with zeros to whole tile steps.
#[derive(Debug, Default)]
pub struct PackedPanels {
    data: Vec<u32>,
    cols: usize,
    pairs: usize,
}

impl PackedPanels {
    /// Packs `rhs` [depth, cols] (on the calling thread).
    ///
    /// # Safety
    /// `rhs` must address depth x cols elements.
    pub unsafe fn pack(&mut self, rhs: Operand, depth: usize, cols: usize) {
        let pairs = depth.div_ceil(2).next_multiple_of(KP);
        self.data.resize(cols.div_ceil(NB) * pairs * NB, 0);
        for (q, panel) in self.data.chunks_mut(pairs * NB).enumerate() {
            // SAFETY: rhs is [depth, cols] (the caller's contract).
            unsafe { pack_tile_panel(rhs, (q, depth, cols), panel) };
        }
        (self.cols, self.pairs) = (cols, pairs);
    }

    /// Room for a [depth, cols] operand that the caller writes: the panels and their depth in
    /// pairs. The caller writes pairs 0..⌈depth/2⌉ of every column of each panel (zeros past
    /// `cols`); the padding pairs after them are zero.
    pub fn panels_mut(&mut self, depth: usize, cols: usize) -> (&mut [u32], usize) {
        let (pairs, filled) = (depth.div_ceil(2).next_multiple_of(KP), depth.div_ceil(2));
        self.data.resize(cols.div_ceil(NB) * pairs * NB, 0);
        if filled < pairs {
            self.data.chunks_mut(pairs * NB).for_each(|panel| panel[filled * NB..].fill(0));
        }
        (self.cols, self.pairs) = (cols, pairs);
        (&mut self.data, pairs)
    }
}

/// Row i of a [rows, depth] left operand in the tiles' layout into `row` (its whole padded length):
/// the row's pairs of depths, then zeros; a row past `rows` is all zeros.
///
/// # Safety
/// `lhs` must address rows x depth elements.
unsafe fn pack_tile_row(lhs: Operand, (i, rows, depth): (usize, usize, usize), row: &mut [u32]) {
    if i < rows {
        // SAFETY: row i < rows of lhs, `depth` elements (the caller's contract).
        unsafe { lhs.pack_row_pairs(i, depth, row) };
        row[depth.div_ceil(2)..].fill(0);
    } else {
        row.fill(0);
    }
}

/// Panel q (columns 32q..) of a [depth, cols] right operand in the tiles' layout into `panel` (its
/// whole padded length), zeros past the depth and past the columns.
///
/// # Safety
/// `rhs` must address depth x cols elements.
unsafe fn pack_tile_panel(rhs: Operand, (q, depth, cols): (usize, usize, usize), panel: &mut [u32]) {
    // SAFETY: columns q·NB.. < cols of rhs, `depth` depths (the caller's contract).
    unsafe { pack_rhs(rhs.at(0, q * NB), depth, NB.min(cols - q * NB), panel) };
    panel[depth.div_ceil(2) * NB..].fill(0);
}

/// dst [m, n] = `start` + `scale` · lhs [m, k] · rhs [k, n] on AMX tiles, bf16 products
/// accumulated in f32; split over rayon's threads with `parallel`.
///
/// # Safety
/// [`available`] must be true; `lhs`, `rhs` and `dst` must address matrices of these sizes (dst rows
/// `ldd` apart, unit column stride) that do not overlap; no one else may access `dst` during the
/// call; a bias of `start` must hold m rows or n columns.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: dst [m, n] and the bias (the caller's contract).
        return unsafe { start.fill(dst, ldd, (m, n)) };
    }
    let pairs = k.div_ceil(2).next_multiple_of(KP);
    let (row_blocks, panels) = (m.div_ceil(MB), n.div_ceil(NB));
    // The packing buffers are reused across calls (fresh pages cost the kernel's zeroing); they are
    // taken out of the thread's slot while in use, so a nested call on this thread gets its own.
    let [mut a, mut b] = SCRATCH.take();
    // Left: read in place where its rows are already what the tiles load (a bf16 weight of whole
    // blocks: rows of pairs, depth a whole number of tile steps); else packed with row i's pairs at
    // a[i·pairs ..], rows past m and depths past k zero.
    let in_place = lhs.bf16_row_pairs().filter(|_| m.is_multiple_of(MB) && k.is_multiple_of(2 * KP));
    let a_len = if in_place.is_some() { 0 } else { row_blocks * MB * pairs };
    a.resize(a.len().max(a_len), 0);
    // SAFETY (both): lhs is [m, k] and rhs [k, n] (the caller's contract).
    let pack_row = |(i, row): (usize, &mut [u32])| unsafe { pack_tile_row(lhs, (i, m, k), row) };
    // Right: [`PackedPanels`]' layout.
    b.resize(b.len().max(panels * pairs * NB), 0);
    let pack_panel = |(q, panel): (usize, &mut [u32])| unsafe { pack_tile_panel(rhs, (q, k, n), panel) };
    let (a_packed, b_packed) = (&mut a[..a_len], &mut b[..panels * pairs * NB]);
    if parallel {
        a_packed.par_chunks_mut(pairs).enumerate().for_each(pack_row);
        b_packed.par_chunks_mut(pairs * NB).enumerate().for_each(pack_panel);
    } else {
        a_packed.chunks_mut(pairs).enumerate().for_each(pack_row);
        b_packed.chunks_mut(pairs * NB).enumerate().for_each(pack_panel);
    }
    let (a_rows, lda) = match in_place {
        Some((rows, lda)) => (rows, lda),
        None => (a_packed.as_ptr(), pairs),
    };
    // The larger operand is walked once: each of its blocks meets every block of the other (which
    // stays in cache) before the next is read.
    let order = if panels * NB > row_blocks * MB { Order::PanelsOuter } else { Order::RowsOuter };
    // SAFETY: AMX is available and dst as the caller promised; the left rows and the panels hold
    // whole blocks of `pairs` pairs, zero past k.
    unsafe {
        blocks((m, n, pairs), (a_rows, lda), (b_packed.as_ptr(), pairs), (dst, ldd), start, scale, order, parallel)
    };
    SCRATCH.set([a, b]);
}

/// dst [m, n] = `start` + `scale` · lhs [m, k] · rhs [k, n] on AMX tiles, on the calling thread,
/// with operands packed in advance: rows `row0..row0 + m` and depths `depth0..depth0 + k` of `lhs`,
/// all of `rhs` (depth k, at least n columns). `row0` must be a multiple of 32 and `depth0` even;
/// the depths that a last partial tile step reads past k must be zero in one of the operands (each
/// packing pads its own depth with zeros).
///
/// # Safety
/// [`available`] must be true; `dst` must address m rows (`ldd` apart) of n elements that no one
/// else accesses during the call; a bias of `start` must hold m rows or n columns.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_packed(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    start: Start,
    (lhs, row0, depth0): (&PackedRows, usize, usize),
    rhs: &PackedPanels,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (pairs, pair0) = (k.div_ceil(2).next_multiple_of(KP), depth0 / 2);
    assert!(row0.is_multiple_of(MB) && depth0.is_multiple_of(2), "AMX: block origin ({row0}, {depth0}) not aligned");
    assert!(
        row0 + m <= lhs.rows && pair0 + pairs <= lhs.pairs && n <= rhs.cols && pairs <= rhs.pairs,
        "AMX: a [{m}, {n}, {k}] product from ({row0}, {depth0}) overruns its packed operands"
    );
    if k == 0 {
        // SAFETY: dst [m, n] and the bias (the caller's contract).
        return unsafe { start.fill(dst, ldd, (m, n)) };
    }
    let a = lhs.data[row0 * lhs.pairs + pair0..].as_ptr();
    // SAFETY: AMX is available and dst as the caller promised; rows row0.. up to a whole block lie
    // in lhs's padded rows, `pairs` pairs from pair0 in its rows and in rhs's panels (checked above).
    unsafe {
        let order = Order::RowsOuter;
        blocks((m, n, pairs), (a, lhs.pairs), (rhs.data.as_ptr(), rhs.pairs), (dst, ldd), start, scale, order, false)
    };
}

/// Which operand's blocks the task order walks once.
#[derive(Debug, Clone, Copy)]
enum Order {
    RowsOuter,
    PanelsOuter,
}

/// The products of every 32-row block of the left rows (`lda` pairs apart) with every 32-column
/// panel (`panel_pairs` pairs apart), `pairs` pairs deep, each written to dst through the start and
/// scale.
///
/// # Safety
/// [`available`] must be true; the left operand must hold ⌈m/32⌉ whole blocks and the right ⌈n/32⌉
/// panels of `pairs` readable pairs; dst as in [`matmul`].
#[allow(clippy::too_many_arguments)]
unsafe fn blocks(
    (m, n, pairs): (usize, usize, usize),
    (a, lda): (*const u32, usize),
    (b, panel_pairs): (*const u32, usize),
    (dst, ldd): (*mut f32, usize),
    start: Start,
    scale: f32,
    order: Order,
    parallel: bool,
) {
    let (a, b, dst) = (SharedConst(a), SharedConst(b), SharedMut(dst));
    let task = |(t, q): (usize, usize)| {
        let (i0, j0) = (t * MB, q * NB);
        let (corner, out) = ((MB.min(m - i0), NB.min(n - j0)), dst.get().wrapping_add(i0 * ldd + j0));
        let (lhs, rhs) = (a.get().wrapping_add(t * MB * lda), b.get().wrapping_add(q * panel_pairs * NB));
        // SAFETY: AMX is available, the block and panel hold `pairs` pairs and the output corner
        // lies inside dst (the caller's contract); a whole block's start tiles lie in dst or the
        // bias (or the block buffer), as `Accumulators` reads them.
        unsafe {
            configure_thread();
            // Written in full before it is read (by the tiles or the bias rows); not zeroed.
            let mut block = std::mem::MaybeUninit::<[f32; MB * NB]>::uninit();
            let block_ptr = block.as_mut_ptr().cast::<f32>();
            if corner == (MB, NB) && scale == 1.0 {
                // A whole block: the tiles start from the output's start and are stored in place.
                let init = match start.at(i0, j0) {
                    Start::Zero => Accumulators::Zero,
                    Start::Current => Accumulators::Load(out, ldd),
                    Start::ColumnBias(bias) => Accumulators::Load(bias, 0),
                    Start::RowBias(bias) => {
                        for i in 0..MB {
                            std::slice::from_raw_parts_mut(block_ptr.add(i * NB), NB).fill(*bias.add(i));
                        }
                        Accumulators::Load(block_ptr, NB)
                    }
                };
                block_32x32(lhs, lda, rhs, pairs, init, out, ldd);
            } else {
                // An edge block through the buffer; a last one of at most 16 rows takes half the tiles.
                let rows = if corner.0 <= MB / 2 {
                    block_16x32(lhs, lda, rhs, pairs, block_ptr);
                    MB / 2
                } else {
                    block_32x32(lhs, lda, rhs, pairs, Accumulators::Zero, block_ptr, NB);
                    MB
                };
                let written = std::slice::from_raw_parts(block_ptr, rows * NB);
                super::store_corner(written, NB, out, ldd, corner, start.at(i0, j0), scale);
            }
        }
    };
    let (row_blocks, panels) = (m.div_ceil(MB), n.div_ceil(NB));
    let tasks: Vec<(usize, usize)> = match order {
        Order::PanelsOuter => (0..panels).flat_map(|q| (0..row_blocks).map(move |t| (t, q))).collect(),
        Order::RowsOuter => (0..row_blocks).flat_map(|t| (0..panels).map(move |q| (t, q))).collect(),
    };
    if parallel {
        tasks.into_par_iter().for_each(task);
    } else {
        tasks.into_iter().for_each(task);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure_thread() {
    unreachable!("AMX runs only on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_16x32(_: *const u32, _: usize, _: *const u32, _: usize, _: *mut f32) {
    unreachable!("AMX runs only on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_32x32(_: *const u32, _: usize, _: *const u32, _: usize, _: Accumulators, _: *mut f32, _: usize) {
    unreachable!("AMX runs only on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sgemm::MatRef;
    use crate::kernels::tests::{StartKind, bf16_round as round, values};
    use half::bf16;

    /// Against an f64 triple loop over the bf16-rounded operands: f32 left and right (row-major),
    /// or bf16 left rows (a convolution's weight, read in place when its shape allows) or bf16 right
    /// stored transposed (a linear layer's weight).
    fn check(
        (m, n, k): (usize, usize, usize),
        (bf16_lhs, bf16_rhs): (bool, bool),
        kind: StartKind,
        scale: f32,
        parallel: bool,
    ) {
        let a = values(m * k, 1);
        let a16: Vec<u16> = a.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let b = values(k * n, 2);
        let b16t: Vec<u16> = (0..n * k).map(|idx| bf16::from_f32(b[(idx % k) * n + idx / k]).to_bits()).collect();
        let ldd = n + 5;
        let initial = values(m * ldd, 3);
        let (row_bias, column_bias) = (values(m, 6), values(n, 7));
        let lhs = if bf16_lhs { Operand::bf16_rows(a16.as_ptr(), k) } else { MatRef::rows(a.as_ptr(), k).into() };
        let rhs =
            if bf16_rhs { Operand::bf16_transposed(b16t.as_ptr(), k) } else { MatRef::rows(b.as_ptr(), n).into() };
        let mut out = initial.clone();
        // SAFETY: AMX checked by the caller; lhs [m, k], rhs [k, n], out [m, ldd].
        unsafe {
            matmul((m, n, k), out.as_mut_ptr(), ldd, kind.start(&row_bias, &column_bias), lhs, rhs, scale, parallel)
        };
        for i in 0..m {
            for j in 0..ldd {
                let got = out[i * ldd + j] as f64;
                let expected = if j >= n {
                    initial[i * ldd + j] as f64
                } else {
                    let dot: f64 = (0..k).map(|p| round(a[i * k + p]) * round(b[p * n + j])).sum();
                    scale as f64 * dot + kind.expected(initial[i * ldd + j], &row_bias, &column_bias, (i, j))
                };
                assert!(
                    (got - expected).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                    "({m}, {n}, {k}) bf16 lhs {bf16_lhs} rhs {bf16_rhs} {kind:?}: [{i}, {j}] = {got}, expected {expected}"
                );
            }
        }
    }

    /// A sub-block of operands packed in advance (rows from a whole block, depths from an even
    /// offset, a partial last tile step) against the f64 loop; the right operand both packed and
    /// written through `panels_mut`.
    #[test]
    fn packed_operands_give_sub_block_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX-BF16 (or the kernel does not grant the tile state)");
            return;
        }
        let (rows, depth, n) = (70, 300, 45);
        let (row0, depth0, m, k) = (32, 64, 38, 221);
        let a = values(rows * depth, 1);
        let b = values(k * n, 2);
        let mut lhs = PackedRows::default();
        let mut rhs = PackedPanels::default();
        // SAFETY: a is [rows, depth] and b [k, n], row-major.
        unsafe {
            lhs.pack(MatRef::rows(a.as_ptr(), depth).into(), rows, depth, 1.0);
            rhs.pack(MatRef::rows(b.as_ptr(), n).into(), k, n);
        }
        let mut written = PackedPanels::default();
        // Stale contents first: panels_mut must zero the padding pairs again.
        written.panels_mut(k, n).0.fill(u32::MAX);
        let (panels, pairs) = written.panels_mut(k, n);
        for (q, panel) in panels.chunks_mut(pairs * NB).enumerate() {
            for pp in 0..k.div_ceil(2) {
                for j in 0..NB {
                    let (col, get) = (q * NB + j, |p: usize| if p < k { b[p * n + q * NB + j] } else { 0.0 });
                    panel[pp * NB + j] =
                        if col < n { crate::kernels::bf16_gemm::pair(get(2 * pp), get(2 * pp + 1)) } else { 0 };
                }
            }
        }
        for right in [&rhs, &written] {
            let mut out = vec![0f32; m * n];
            // SAFETY: AMX checked; out is [m, n].
            unsafe { matmul_packed((m, n, k), out.as_mut_ptr(), n, Start::Zero, (&lhs, row0, depth0), right, 0.5) };
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 =
                        (0..k).map(|p| round(a[(row0 + i) * depth + depth0 + p]) * round(b[p * n + j])).sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - 0.5 * dot).abs() <= 1e-5 * (1.0 + k as f64).sqrt(),
                        "[{i}, {j}] = {got}, expected {}",
                        0.5 * dot
                    );
                }
            }
        }
    }

    #[test]
    fn matches_a_product_of_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX-BF16 (or the kernel does not grant the tile state)");
            return;
        }
        // (64, 40, 96) and (96, 33, 64) read a bf16 left operand in place (whole 32-row blocks, depth
        // a multiple of 32); the others pack it.
        let shapes = [(1, 1, 1), (32, 32, 32), (33, 31, 33), (16, 48, 64), (70, 90, 300), (5, 200, 7), (64, 64, 0)];
        for dims in shapes.into_iter().chain([(64, 40, 96), (96, 33, 64), (64, 17, 48)]) {
            for operands in [(false, false), (false, true), (true, false)] {
                for kind in StartKind::ALL {
                    // Whole 32x32 blocks with scale 1 start and store their tiles in place.
                    for scale in [0.5, 1.0] {
                        check(dims, operands, kind, scale, false);
                    }
                }
            }
        }
        check((300, 130, 700), (false, true), StartKind::ColumnBias, 1.0, true);
        check((257, 320, 1280), (false, false), StartKind::Current, 1.0, true);
        check((320, 300, 2880), (true, false), StartKind::RowBias, 0.5, true);
        check((320, 300, 2880), (true, false), StartKind::RowBias, 1.0, true);
    }
}
