//! The single-threaded f32 GEMM the portable kernels call on raw strided buffers (the `gemm`
//! crate, which picks its own microkernel for the CPU).

/// `dst (m×n) (+)= lhs (m×k) · rhs (k×n)` on raw strided f32 buffers, single-threaded (callers
/// parallelise over independent work).
///
/// # Safety
/// The pointers must cover the given extents with the given row/column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
) {
    gemm::gemm(
        m, n, k,
        dst, 1, dst_rs as isize, accumulate,
        lhs, lhs_cs as isize, lhs_rs as isize,
        rhs, 1, rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, gemm::Parallelism::None,
    )
}
