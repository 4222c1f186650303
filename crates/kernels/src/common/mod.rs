//! What several kernel families share: the vectorised-loop dispatch and math, output buffers,
//! the padded convolution grid, and the GEMM call of the portable kernels.

#[macro_use]
mod simd;
mod buffer;
mod gemm;
mod grid;
#[cfg(test)]
pub(crate) mod testing;

pub(crate) use buffer::{bias_f32, contiguous_f32, output_buffer, store_normalized, with_heads, HeadsShape, SendPtr};
pub(crate) use gemm::gemm_f32;
pub(crate) use grid::PaddedGrid;
pub(crate) use simd::{bf16_bits, fast_exp, gelu_erf, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, MAGIC};

/// What a product does with each block of its result while the block is in cache (the AMX and
/// AVX-512 matrices).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Epilogue {
    /// `y = x·wᵀ + bias`.
    Bias,
    /// `[a, g] = x·wᵀ + bias` split in halves; `y = a · GELU_erf(g)` (n/2 columns).
    Geglu,
}
