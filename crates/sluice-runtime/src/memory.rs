//! How the node gives the allocator's free memory back to the kernel.
//!
//! glibc's malloc keeps freed memory in its arenas, resident, until it is trimmed. A compile in
//! the node ([`CompileIn::Node`](crate::CompileIn)) frees hundreds of MiB for a large component,
//! so it trims when it is done, after what it allocated (the compiler's engine, the component's
//! bytes, the artifact) is freed. The trim cannot release the top of a thread's arena, which is
//! why `serve` compiles in a child process instead ([`compiler`](crate::compiler)).
//!
//! Fixing malloc's mmap threshold when the node starts was tried and left out (BENCHMARKS.md,
//! 2026-12-07): it halves what a deploy of the 21 MiB Python example leaves resident (about 100
//! → 45 MiB), because a fixed threshold also stops glibc from raising its trim threshold, so
//! freed memory at an arena's top goes back to the kernel at once. The same effect makes later
//! large buffers fault their pages in again: async calls with 1 MB bodies took 10-20% more CPU
//! at an 8-16 MiB threshold and 40-60% more at 1 MiB.

/// Returns the allocator's free memory to the kernel (glibc keeps freed memory in its arenas).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it is
    // thread-safe and takes no pointers.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_freed_memory() {}
