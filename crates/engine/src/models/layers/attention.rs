//! Scaled dot-product attention over projected `q, k, v`: the op API's kernels, or the AMX or
//! bf16-pair one where the backend put the layer.

use crate::compute::Kernel;
use candle_core::{DType, Result, Tensor};
use dynamicrafter_kernels::{amx_attention, bf16_pair_attention, permute};

/// `(n, l, heads·d) → (n·heads, l, d)`, head-major channels as `einops 'b n (h d) -> (b h) n d'`.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, l, c) = xs.dims3()?;
    permute(&xs.reshape((n, l, heads, c / heads))?, &[0, 2, 1, 3])?.reshape((n * heads, l, c / heads))
}

/// Inverse of [`split_heads`].
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (nh, l, d) = xs.dims3()?;
    permute(&xs.reshape((nh / heads, heads, l, d))?, &[0, 2, 1, 3])?.reshape((nh / heads, l, heads * d))
}

/// `softmax(q·kᵀ·scale [+ mask])·v` over `(batch, len, dim)` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => dynamicrafter_kernels::attention(q, k, v, scale),
        Some(m) => {
            // Softmax in f32 whatever the compute dtype (the precision policy).
            let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = dynamicrafter_kernels::softmax_last_dim(&scores.broadcast_add(&m.to_dtype(DType::F32)?)?)?;
            probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)
        }
    }
}

/// Multi-head attention with already-projected `q, k, v` of shape `(n, l, heads·d)`.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    if mask.is_none() && dynamicrafter_kernels::heads_in_place(q, k, v, heads) {
        return dynamicrafter_kernels::attention_heads(q, k, v, heads, scale);
    }
    let out = attention(&split_heads(q, heads)?, &split_heads(k, heads)?, &split_heads(v, heads)?, scale, mask)?;
    merge_heads(&out, heads)
}

/// [`multi_head_attention`] without a mask on the backend's `kernel`: AMX or AVX512-BF16 pairs
/// where it put the layer and the shapes suit them (short sequences stay on the f32 kernel),
/// else the op API.
pub fn attend(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if kernel == Kernel::AmxBf16 && amx_attention::supports(q, k, v, heads) {
        return amx_attention::attention(q, k, v, heads, scale);
    }
    if kernel == Kernel::Avx512Bf16 && bf16_pair_attention::supports(q, k, v, heads) {
        return bf16_pair_attention::attention(q, k, v, heads, scale);
    }
    multi_head_attention(q, k, v, heads, scale, None)
}

/// `addend + weight · attend(kernel, q, k, v, …)` (`weight` None: unscaled): the dual
/// cross-attention's image branch joining the text branch's output. On CUDA the sum is made as
/// the fused kernel stores its output; elsewhere after [`attend`], as the reference does.
#[allow(clippy::too_many_arguments)]
pub fn attend_add(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, weight: Option<f64>, addend: &Tensor) -> Result<Tensor> {
    if kernel == Kernel::Cuda && dynamicrafter_kernels::attention_heads_add_fused(q, k, v, heads) {
        return dynamicrafter_kernels::attention_heads_add(q, k, v, heads, scale, weight, addend);
    }
    let out = attend(kernel, q, k, v, heads, scale)?;
    let out = match weight {
        Some(w) => out.affine(w, 0.0)?,
        None => out,
    };
    addend + out
}
