//! Where and how the networks compute: the device, the precision policy (what `--precision`
//! and `--quantize` mean on it) and the [`Backend`] that turns both, with the CPU's instruction
//! sets, into the kernel every layer uses.

mod backend;
pub mod device;
mod graph;
mod precision;

pub use backend::{Backend, Kernel, LayerKind};
pub use graph::UnetGraph;

/// glibc returns every block over 128 KB–32 MB to the OS when freed, and takes fresh zeroed pages
/// for the next: a UNet forward allocates and frees gigabytes of same-sized activations, so the
/// kernel would spend a good part of a CPU run clearing pages. This has blocks up to 32 MB (the
/// most glibc allows) served from the heap and freed memory kept there, for a little more peak
/// RSS, and one arena for all threads, so memory one thread freed serves the next allocation
/// of any other (per-thread arenas each kept their own freed blocks: a higher peak, no faster;
/// docs/PERFORMANCE.md). Every binary calls it first thing, before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
pub use precision::{Part, PartPrecision, Precision, PrecisionPolicy, Quantization};
