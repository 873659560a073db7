//! An oversize length prefix is rejected before any payload buffer is
//! allocated. This test binary installs a global allocator that records the
//! largest allocation request, so it holds a single test to keep other
//! threads' allocations out of the measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use zerolease_protocol::{FrameError, FrameReader, MAX_FRAME_LEN};

struct Recording;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only additionally records the requested size in an atomic.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which
        // `System.alloc` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (all our
        // allocations are forwarded to it).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds
        // the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

#[test]
fn oversize_length_is_rejected_without_allocating_it() {
    // Control: a frame at the bound does allocate its payload, so the
    // recorder would see a buggy reader.
    let mut at_bound = (MAX_FRAME_LEN as u32).to_be_bytes().to_vec();
    at_bound.resize(4 + MAX_FRAME_LEN, 0);
    LARGEST.store(0, Ordering::SeqCst);
    FrameReader::new(&at_bound[..]).read_frame().unwrap();
    assert!(LARGEST.load(Ordering::SeqCst) >= MAX_FRAME_LEN);
    drop(at_bound);

    for announced in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        // The header is followed by enough bytes that a reader which
        // allocated first would succeed, not fail on truncation.
        let mut wire = announced.to_be_bytes().to_vec();
        wire.resize(4 + MAX_FRAME_LEN + 1, 0xAA);
        LARGEST.store(0, Ordering::SeqCst);
        let result = FrameReader::new(&wire[..]).read_frame();
        let largest = LARGEST.load(Ordering::SeqCst);
        assert!(
            matches!(result, Err(FrameError::TooLarge { .. })),
            "{result:?}"
        );
        assert!(largest < 4096, "allocated {largest} bytes for {announced}");
    }

    // A smaller per-reader bound applies the same way.
    let wire = 100u32.to_be_bytes();
    LARGEST.store(0, Ordering::SeqCst);
    let result = FrameReader::with_max_len(&wire[..], 99).read_frame();
    assert!(matches!(
        result,
        Err(FrameError::TooLarge { len: 100, max: 99 })
    ));
    assert!(LARGEST.load(Ordering::SeqCst) < 100);
}
