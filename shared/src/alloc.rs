//! The process-wide allocator: mimalloc, asked the cheapest way for each request.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to `mi_malloc_aligned`, whose fast
//! path covers only blocks up to 1 KiB; anything larger (a request's boxed future, a header map's
//! table) fell to mimalloc's generic aligned path, which over-allocates by the alignment and
//! marks the page as holding interior pointers: about 1,300 instructions of a worker's request.
//! Rust's own `System` allocator avoids the same trap with the same rule as below: an
//! alignment that plain `malloc` already gives needs no aligned call. mimalloc's size classes
//! on 64-bit targets are multiples of two words from 16 bytes on, laid out from a 16-byte
//! aligned page start, so a block of more than 8 bytes is 16-byte aligned and a smaller one
//! word aligned (`MI_MAX_ALIGN_SIZE`; its debug builds assert it in `mi_page_malloc_zero`).
//! The one build that gives this up, a guarded debug build run with
//! `MIMALLOC_GUARDED_PRECISE=1`, is not one the gateway makes.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use libmimalloc_sys as mi;

/// The alignment every `mi_malloc` block of at least this many bytes has (`MI_MAX_ALIGN_SIZE`).
const MALLOC_ALIGN: usize = 16;

/// mimalloc, called through `mi_malloc` when the layout needs no more than it guarantees.
pub struct Mimalloc;

/// Whether plain `mi_malloc(size)` is aligned enough for `align`: a block is aligned to the
/// smaller of 16 and its size rounded up to a word, so an alignment no larger than either holds.
#[inline]
fn malloc_aligns(size: usize, align: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every pointer handed out comes from mimalloc and goes back to `mi_free` or
// `mi_realloc*`, which accept any mimalloc block whatever call made it.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if malloc_aligns(layout.size(), layout.align()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if malloc_aligns(layout.size(), layout.align()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if malloc_aligns(new_size, layout.align()) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment the rule sends to `mi_malloc` comes back aligned, also after
    /// `realloc` across the 1 KiB boundary where mimalloc's aligned fast path stops.
    #[test]
    fn blocks_are_aligned_as_asked() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1usize, 3, 8, 12, 16, 24, 40, 100, 1000, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: the layout is non-zero in size; each block is freed once.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} aligned {align}");
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "alloc_zeroed {size} aligned {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    let r = a.realloc(p, layout, size * 3 + 1);
                    assert_eq!(r as usize % align, 0, "realloc {size} aligned {align}");
                    assert!(
                        (0..size).all(|i| *r.add(i) == 0xa5),
                        "realloc kept the bytes"
                    );
                    a.dealloc(r, Layout::from_size_align(size * 3 + 1, align).unwrap());
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
