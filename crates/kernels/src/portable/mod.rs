//! The CPU kernels in plain Rust, f32: loops written for LLVM to vectorise and compiled for
//! AVX-512, AVX2 + FMA or the baseline by `dispatch!`, products through the `gemm` crate. The
//! fallback on every CPU, and the default path of the ops nobody beats them at.

mod attention;
mod conv;
mod geglu;
mod norm;
mod permute;

pub(crate) use attention::{attention, softmax_last_dim, softmax_rows, SoftmaxRows};
pub(crate) use conv::{conv3x3_taps, temporal_conv};
pub(crate) use geglu::{geglu, geglu_rows};
pub(crate) use norm::group_norm;
pub(crate) use permute::{moves_innermost, permute};
