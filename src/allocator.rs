//! A global allocator for tensor workloads: the system allocator, tuned so that the large buffers a
//! diffusion step allocates and frees by the hundred are reused instead of being handed back to the
//! kernel and faulted in (zeroed) again, and backed by transparent huge pages.
//!
//! A binary opts in with
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: diffctl::allocator::TensorAllocator = diffctl::allocator::TensorAllocator;
//! ```
//! and calls [`configure`] first thing in `main`. On Linux with glibc, [`configure`] serves
//! allocations up to 32 MB from the heap and keeps freed heap memory for reuse, and
//! [`TensorAllocator`] asks for huge pages on every allocation of at least [`HUGE_PAGE`] bytes
//! (`madvise(MADV_HUGEPAGE)`, the same as glibc's `glibc.malloc.hugetlb=1` tunable). Within the
//! scope of a [`LargeBlockCache`] (the VAE decoder and each UNet step open one), freed blocks larger than glibc's heap
//! serves (its own mappings, unmapped when freed and zeroed by the kernel when mapped again) are kept
//! and handed out again for requests of about their size. Elsewhere all of this leaves the system
//! allocator as it is. On SD1.5 UNet steps the heap settings remove about nine in ten page faults;
//! in the VAE decoder, whose activations are 32–256 MB each, the cache removes most of the page
//! zeroing that had been a sixth of its time (README, *Performance*).

use std::alloc::{GlobalAlloc, Layout, System};

/// The transparent huge page size on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// Smallest block a [`LargeBlockCache`] keeps: glibc's largest mmap threshold, above which it maps
/// every block afresh (and the kernel zeroes each page on first touch).
pub const CACHED_MIN: usize = 32 << 20;

/// While alive, freed blocks of at least [`CACHED_MIN`] bytes are kept, up to `bytes` in all (the
/// oldest go first), for reuse by allocations of about their size through [`TensorAllocator`]. For
/// work whose large buffers come and go by the dozen in a few sizes, run again and again (the VAE
/// decoder): the cache trades that much memory for the kernel's page zeroing. Blocks kept stay
/// after the scope ends, for the next run, until reused or [`release_free_memory`] frees them.
#[derive(Debug)]
#[must_use = "freed blocks are kept only while this is alive"]
pub struct LargeBlockCache {
    previous: usize,
}

impl LargeBlockCache {
    /// Starts keeping freed large blocks, up to `bytes`.
    pub fn keep_up_to(bytes: usize) -> Self {
        Self { previous: large_blocks::set_limit(bytes) }
    }
}

impl Drop for LargeBlockCache {
    fn drop(&mut self) {
        large_blocks::set_limit(self.previous);
    }
}

/// [`System`] plus a huge-page hint for large allocations (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct TensorAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments, or hands out a block
// `System` allocated and this allocator got back through `dealloc` (owned by no one else, at least
// as large as asked and aligned as asked); the hint only changes how the kernel backs the pages of
// a block this allocator just returned.
unsafe impl GlobalAlloc for TensorAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(ptr) = large_blocks::take(layout) {
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        advise_huge_pages(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(ptr) = large_blocks::take(layout) {
            // SAFETY: the block holds at least layout.size() bytes and is ours.
            unsafe { ptr.write_bytes(0, layout.size()) };
            return ptr;
        }
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise_huge_pages(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller gives up the block, which System allocated.
        if unsafe { large_blocks::keep(ptr, layout) } {
            return;
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (a cached block handed out is a block of
        // System's, which realloc accepts whatever size was asked of it).
        let ptr = unsafe { System.realloc(ptr, layout, new_size) };
        advise_huge_pages(ptr, new_size);
        ptr
    }
}

/// The cache of freed large blocks behind [`TensorAllocator`] (glibc only: a block's true size is
/// read with `malloc_usable_size`, and evicted blocks go back with `free`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod large_blocks {
    use super::{CACHED_MIN, Layout};
    use std::sync::Mutex;

    /// Most blocks held at once.
    const SLOTS: usize = 64;

    /// Freed blocks (address, usable size), oldest first, their total size, and the most it may be.
    struct Cache {
        blocks: [(usize, usize); SLOTS],
        len: usize,
        bytes: usize,
        limit: usize,
    }

    /// The process-wide cache; its lock never allocates.
    static CACHE: Mutex<Cache> = Mutex::new(Cache { blocks: [(0, 0); SLOTS], len: 0, bytes: 0, limit: 0 });

    fn lock() -> std::sync::MutexGuard<'static, Cache> {
        CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    impl Cache {
        /// Takes block i out of the cache, keeping the others in order.
        fn remove(&mut self, i: usize) -> (usize, usize) {
            let block = self.blocks[i];
            self.blocks.copy_within(i + 1..self.len, i);
            self.len -= 1;
            self.bytes -= block.1;
            block
        }

        /// Removes the oldest blocks while `more` says so, into `out`; returns how many.
        fn evict_oldest(&mut self, out: &mut [usize; SLOTS], more: impl Fn(&Cache) -> bool) -> usize {
            let mut n = 0;
            while self.len > 0 && more(self) {
                out[n] = self.remove(0).0;
                n += 1;
            }
            n
        }
    }

    /// Frees blocks taken out of the cache (outside its lock).
    fn free(blocks: &[usize]) {
        for &ptr in blocks {
            // SAFETY: a cached block was malloc's, freed by its user, and is no longer cached.
            unsafe { libc::free(ptr as *mut libc::c_void) };
        }
    }

    /// Sets the most bytes kept from now on (0: none); returns the old limit. Blocks already held
    /// stay until they are handed out or [`clear`]ed.
    pub fn set_limit(limit: usize) -> usize {
        std::mem::replace(&mut lock().limit, limit)
    }

    /// Frees every cached block.
    pub fn clear() {
        let mut evicted = [0usize; SLOTS];
        let n = lock().evict_oldest(&mut evicted, |_| true);
        free(&evicted[..n]);
    }

    /// A cached block for `layout`: the smallest one at least as large (and at most a quarter
    /// larger, so no block is spent on a much smaller request) at the layout's alignment.
    pub fn take(layout: Layout) -> Option<*mut u8> {
        let size = layout.size();
        if size < CACHED_MIN {
            return None;
        }
        let mut cache = lock();
        let fits = |&(ptr, usable): &(usize, usize)| {
            usable >= size && usable - size <= size / 4 && ptr.is_multiple_of(layout.align())
        };
        let (i, _) = cache.blocks[..cache.len].iter().enumerate().filter(|(_, b)| fits(b)).min_by_key(|(_, b)| b.1)?;
        Some(cache.remove(i).0 as *mut u8)
    }

    /// Keeps the freed block `ptr` if it is large and a cache is open; returns whether it did (else
    /// the caller frees it). Blocks evicted to make room are freed here.
    ///
    /// # Safety
    /// `ptr` must be a block of glibc's malloc that no one uses any more.
    pub unsafe fn keep(ptr: *mut u8, layout: Layout) -> bool {
        if layout.size() < CACHED_MIN {
            return false;
        }
        // SAFETY: ptr is a live malloc block (the caller's contract).
        let usable = unsafe { libc::malloc_usable_size(ptr as *mut libc::c_void) };
        let mut evicted = [0usize; SLOTS];
        let n = {
            let mut cache = lock();
            if usable > cache.limit {
                return false;
            }
            let n = cache.evict_oldest(&mut evicted, |c| c.len == SLOTS || c.bytes + usable > c.limit);
            let len = cache.len;
            cache.blocks[len] = (ptr as usize, usable);
            cache.len += 1;
            cache.bytes += usable;
            n
        };
        free(&evicted[..n]);
        true
    }

    /// The bytes the cache holds.
    #[cfg(test)]
    pub fn bytes() -> usize {
        lock().bytes
    }
}

/// Without glibc there is no cache: nothing is kept, nothing handed out.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod large_blocks {
    use super::Layout;

    pub fn set_limit(_: usize) -> usize {
        0
    }

    pub fn clear() {}

    pub fn take(_: Layout) -> Option<*mut u8> {
        None
    }

    pub unsafe fn keep(_: *mut u8, _: Layout) -> bool {
        false
    }

    #[cfg(test)]
    pub fn bytes() -> usize {
        0
    }
}

/// Marks the whole huge pages inside the block `ptr..ptr + size` for transparent huge pages; a
/// no-op for small or null blocks and off Linux.
fn advise_huge_pages(ptr: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !ptr.is_null() && size >= HUGE_PAGE {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside a block the allocator owns; MADV_HUGEPAGE changes how
            // its pages are backed, never their contents, and a failure (no THP support) is harmless.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, size);
}

/// Tunes glibc's malloc for tensor workloads: blocks up to 32 MB (the most glibc allows) come from
/// the heap rather than from fresh mappings, and freed heap memory is kept (up to 2 GB at the top)
/// for the next step's buffers. Call it once at the start of `main`, before other threads start;
/// a no-op off Linux/glibc.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc parameters; called before the program starts threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands the free memory the allocator holds back to the operating system (the blocks a
/// [`LargeBlockCache`] kept, and glibc's `malloc_trim`), for use after dropping a large model part:
/// freed memory is kept for reuse, which the next stage may not want in the sizes it was freed in.
/// A no-op off Linux/glibc.
pub fn release_free_memory() {
    large_blocks::clear();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and huge-page-sized blocks allocate, keep their contents through a realloc, and free.
    #[test]
    fn allocates_reallocates_and_frees() {
        for size in [64, HUGE_PAGE + 4096, 3 * HUGE_PAGE] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: non-zero size; the block is written within bounds and freed with its layout.
            unsafe {
                let zeroed = TensorAllocator.alloc_zeroed(layout);
                assert!(!zeroed.is_null());
                assert!(std::slice::from_raw_parts(zeroed, size).iter().all(|&b| b == 0));
                TensorAllocator.dealloc(zeroed, layout);

                let ptr = TensorAllocator.alloc(layout);
                assert!(!ptr.is_null());
                ptr.write_bytes(7, size);
                let grown = TensorAllocator.realloc(ptr, layout, 2 * size);
                assert!(!grown.is_null());
                assert!(std::slice::from_raw_parts(grown, size).iter().all(|&b| b == 7));
                TensorAllocator.dealloc(grown, Layout::from_size_align(2 * size, 64).unwrap());
            }
        }
    }

    /// Inside a cache's scope a freed large block is handed out again for a request of about its
    /// size (zeroed when asked), not for a much smaller one; nothing is kept outside a scope, and
    /// `release_free_memory` empties the cache.
    #[test]
    fn large_blocks_are_reused_inside_a_cache_scope() {
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        let layout = Layout::from_size_align(CACHED_MIN * 3 / 2, 64).unwrap();
        let slightly_smaller = Layout::from_size_align(CACHED_MIN * 3 / 2 - 4096, 64).unwrap();
        let much_smaller = Layout::from_size_align(CACHED_MIN, 64).unwrap();
        // SAFETY: non-zero sizes; each block is written within bounds and freed with a layout of
        // at most its size.
        unsafe {
            let ptr = TensorAllocator.alloc(layout);
            TensorAllocator.dealloc(ptr, layout);
            assert_eq!(large_blocks::bytes(), 0, "nothing kept without a cache");

            let cache = LargeBlockCache::keep_up_to(1 << 30);
            let ptr = TensorAllocator.alloc(layout);
            assert!(!ptr.is_null());
            ptr.write_bytes(7, layout.size());
            TensorAllocator.dealloc(ptr, layout);
            assert_eq!(large_blocks::bytes() >= layout.size(), glibc);
            let again = TensorAllocator.alloc_zeroed(slightly_smaller);
            if glibc {
                assert_eq!(again, ptr, "the freed block is reused");
            }
            assert!(std::slice::from_raw_parts(again, slightly_smaller.size()).iter().all(|&b| b == 0));
            TensorAllocator.dealloc(again, slightly_smaller);
            let other = TensorAllocator.alloc(much_smaller);
            assert_ne!(other, again, "a third smaller request gets a block of its own");
            other.write_bytes(1, much_smaller.size());
            TensorAllocator.dealloc(other, much_smaller);
            drop(cache);
            let kept = large_blocks::bytes();
            let outside = TensorAllocator.alloc(much_smaller);
            TensorAllocator.dealloc(outside, much_smaller);
            assert_eq!(large_blocks::bytes() < kept, glibc, "a block reused after the scope is not kept again");
            release_free_memory();
            assert_eq!(large_blocks::bytes(), 0, "emptied by release_free_memory");
        }
    }
}
