//! A failed allocation ends the run with a message and the contract's
//! status 2, not Rust's default abort (SIGABRT, status 134, "memory
//! allocation of N bytes failed").
//!
//! The resource check before a merge or a fit refuses most runs that would
//! not fit; this catches the rest (a limit the check cannot see, such as
//! `ulimit -v`, or memory taken by others meanwhile). Nothing here may
//! allocate: the message is formatted on the stack and written with one
//! system call. What the run was writing is then removed (staging folder,
//! output lock) if that can be done without waiting on a lock held by the
//! failing thread; if the cleanup itself runs out of memory the process
//! ends at once, and the next run on that output removes the leftovers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// The system allocator, with failures reported as above.
pub struct Guarded;

#[global_allocator]
static GLOBAL: Guarded = Guarded;

// SAFETY: every call is forwarded unchanged to the system allocator; a null
// result never returns to the caller (the process ends), which GlobalAlloc
// permits.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Set once the first failure is being handled; a second one (during the
/// cleanup, or on another thread) ends the process at once.
static FAILING: AtomicBool = AtomicBool::new(false);

/// A fixed buffer that formats without allocating (text beyond it is cut).
struct StackText {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cold]
fn out_of_memory(size: usize) -> ! {
    if FAILING.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(crate::error::status::FAILURE) }
    }
    let mut text = StackText {
        buf: [0; 512],
        len: 0,
    };
    let mib = size as f64 / (1024.0 * 1024.0);
    let _ = std::fmt::write(
        &mut text,
        format_args!(
            "error: out of memory: an allocation of {size} bytes ({mib:.1} MiB) failed. \
             Nothing was written; an existing output is unchanged. Free memory, or ask \
             for less (an svd merge to a smaller --rank, --dtype f16/bf16, fewer \
             adapters at once).\n"
        ),
    );
    // SAFETY: writes initialised bytes from a live buffer to stderr.
    unsafe {
        libc::write(2, text.buf.as_ptr().cast(), text.len);
    }
    crate::output::atomic::release_all_now();
    // SAFETY: as above; no destructors or exit handlers (they may allocate).
    unsafe { libc::_exit(crate::error::status::FAILURE) }
}
