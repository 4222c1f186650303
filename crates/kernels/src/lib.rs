//! The kernels of dynamicrafter: the ops where candle's generic ones are slow, for the CPU and
//! for CUDA, each with its reference composition in candle's own ops.
//!
//! The op API ([`group_norm`], [`attention`], [`attention_heads`], [`softmax_last_dim`],
//! [`conv3x3`], [`temporal_conv`], [`geglu`], [`permute`]) takes tensors on any device and
//! picks the kernel; the layers with weights packed at load ([`F32Matrix`], [`Bf16DotMatrix`],
//! [`F32Conv`], [`Bf16DotConv`], [`Bf16DotTemporalConv`], [`Bf16Matrix`], [`Bf16Conv`], [`amx_attention`], [`bf16_pair_attention`], [`Q8Matrix`], [`Q8Conv`]) are built by the
//! engine's backend, which decides once which of them a model uses.
//!
//! | folder | what | runs where |
//! |---|---|---|
//! | `common/` | vectorised-loop dispatch, math, buffers, the padded conv grid | everywhere |
//! | `portable/` | plain-Rust CPU kernels (f32), compiled for AVX-512 / AVX2 / baseline | every CPU |
//! | `avx512/` | f32 and bf16-pair matrices and 3×3 convs, bf16-pair attention, register helpers | AVX-512 F/BW/VL (bf16 pairs: AVX512-BF16) |
//! | `amx/` | bf16 tile products: matrix, convs, attention | AMX |
//! | `vnni/` | int8 (`q8_0`) products: matrix, convs | AVX-512 VNNI |
//! | `cuda/` | fused attention, group norm, shifted-GEMM convs (`*.cu` beside them) | NVIDIA GPUs |
//!
//! Dependencies point one way: `common` ← `portable`, `cuda` ← `avx512` ← `amx`, `vnni` ←
//! the op API. [`cpu::features`] is the one place that says which instruction sets run
//! (`DYNAMICRAFTER_CPU_ISA` caps it). Every kernel has a test against its reference computed
//! in f64.

#[macro_use]
mod common;
pub mod cpu;
mod ops;
mod reference;

mod amx;
mod avx512;
mod cuda;
mod portable;
mod vnni;

pub use amx::attention as amx_attention;
pub use avx512::attention as bf16_pair_attention;
pub use amx::{Bf16Conv, Bf16Matrix};
pub use avx512::{Bf16DotConv, Bf16DotMatrix, Bf16DotTemporalConv, F32Conv, F32Matrix};
pub use cuda::flash_attention::{flash_attention, flash_attention_with, reads_heads_in_place, supported as flash_attention_supported, Kernel as FlashAttentionKernel};
pub use cuda::conv_igemm::Tile as ConvTile;
pub use cuda::{conv3x3_cudnn, conv3x3_on, conv3x3_shifted, cudnn_enabled, kernels_enabled as cuda_kernels_enabled, temporal_conv_cudnn, temporal_conv_on, temporal_conv_shifted};
pub use ops::{
    attention, attention_heads, attention_heads_add, attention_heads_add_fused, conv1x1, conv1x1_supported, conv3x3, conv3x3_taps_upsampled, conv3x3_taps, conv3x3_taps_normed, conv3x3_taps_strided, conv3x3_taps_with, geglu, group_norm, group_norm_frame_tokens, group_norm_tokens, heads_in_place, linear, linear_add_layer_norm, linear_geglu, linear_permute_add, permute, softmax_last_dim, taps_first, taps_last,
    temporal_conv, temporal_conv_frames_supported, temporal_conv_taps_frames_normed, temporal_conv_taps_normed, temporal_conv_taps_with, temporal_conv_with, ConvExtras,
    ConvNorm,
};
pub use reference::{
    attention_chunked, attention_reference, conv3x3_reference, conv3x3_strided_reference, geglu_reference, group_norm_reference, permute_reference, softmax_reference,
    temporal_conv_reference, MAX_SCORES,
};
pub use vnni::{Q8Conv, Q8Matrix};
