//! How the node's allocator gives memory back to the kernel.
//!
//! glibc's malloc serves a request of at least its *mmap threshold* with a mapping of its own,
//! unmapped when freed; anything smaller comes from its arenas, whose free memory stays resident
//! until it is trimmed. By default the threshold is dynamic: each freed mapping raises it to that
//! mapping's size (up to 32 MiB). A deploy frees several such buffers (the component's bytes,
//! its encoding on the way to the store, the artifact), so afterwards every buffer of a later
//! deploy up to 32 MiB lands in an arena and stays there once freed: measured on the 18 MB
//! Python component, 6 MiB of the heap was in use after a deploy and about 60 MiB more was free
//! but resident. A fixed threshold keeps large buffers in mappings of their own for good.
//!
//! The calls' own allocations are far below the threshold (instances' memories are wasmtime's
//! pool, not malloc's), so the hot paths do not change.

/// The fixed mmap threshold: buffers of this size or more are mapped on their own and returned
/// to the kernel when freed.
pub const MMAP_THRESHOLD_BYTES: usize = 1024 * 1024;

/// Fixes the allocator's mmap threshold at [`MMAP_THRESHOLD_BYTES`] (process-wide; idempotent).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes the allocator's parameters; it is thread-safe and takes no
    // pointers. Its answer (1 on success) is not needed: on failure the default stays.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn fix_mmap_threshold() {}

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
