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
//! (`madvise(MADV_HUGEPAGE)`, the same as glibc's `glibc.malloc.hugetlb=1` tunable). Elsewhere both
//! leave the system allocator as it is. On SD1.5 UNet steps this removes about nine in ten page
//! faults (README, *Performance*).

use std::alloc::{GlobalAlloc, Layout, System};

/// The transparent huge page size on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// [`System`] plus a huge-page hint for large allocations (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct TensorAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments; the hint only changes how
// the kernel backs the pages of a block this allocator just returned.
unsafe impl GlobalAlloc for TensorAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc(layout) };
        advise_huge_pages(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise_huge_pages(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { System.realloc(ptr, layout, new_size) };
        advise_huge_pages(ptr, new_size);
        ptr
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

/// Hands the free memory the allocator holds back to the operating system (glibc's `malloc_trim`),
/// for use after dropping a large model part: [`configure`] keeps freed memory for reuse, which
/// the next stage may not want in the sizes it was freed in. A no-op off Linux/glibc.
pub fn release_free_memory() {
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
}
