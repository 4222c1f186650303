//! The reference compositions of every op, in candle's own ops: what the tests hold our kernels
//! to (computed in f64 there), and what devices and dtypes without a kernel of ours run.

use candle_core::{DType, Result, Tensor};

/// candle's group norm, then SiLU.
pub fn group_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&gn, x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// `softmax(q·kᵀ·scale)·v` over `(batch, len, dim)` tensors, the whole score matrix at once.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    // The precision policy keeps softmax in f32 whatever the compute dtype.
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    probs.matmul(&v.contiguous()?)
}

/// Scores a device-generic attention may hold at once (elements): 2²⁸, 512 MiB in bf16. A
/// 576×1024 spatial attention (80 × 9216 × 9216 scores) would otherwise need 13.6 GB.
pub const MAX_SCORES: usize = 1 << 28;

/// [`attention_reference`] over blocks of queries, so at most `max_scores` scores exist at once.
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_scores: usize) -> Result<Tensor> {
    let (b, m, _) = q.dims3()?;
    let n = k.dim(1)?;
    let rows = (max_scores / (b * n).max(1)).clamp(1, m.max(1));
    if rows >= m {
        return attention_reference(q, k, v, scale);
    }
    let blocks = (0..m)
        .step_by(rows)
        .map(|start| attention_reference(&q.narrow(1, start, rows.min(m - start))?, k, v, scale))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

/// The (3,1,1) Conv3d as a 2-D conv over `(t, h·w)` with explicit time padding.
pub fn temporal_conv_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (co, c) = (w.dim(0)?, w.dim(1)?);
    let w = w.reshape((co, c, 3, 1))?;
    x.pad_with_zeros(2, 1, 1)?.conv2d(&w, 0, 1, 1, 1)?.broadcast_add(&bias.reshape((1, co, 1, 1))?)
}

/// candle's 3×3 convolution (stride 1, padding 1) plus the bias.
pub fn conv3x3_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

/// candle's 3×3 convolution with stride 2 and padding 1, with bias, computed in f32 (candle has
/// no bf16/f16 CPU convolution) and rounded back to `x`'s dtype.
pub fn conv3x3_strided_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
    let y = f32(x)?.conv2d(&f32(w)?, 1, 2, 1, 1)?.broadcast_add(&f32(bias)?.reshape((1, bias.dim(0)?, 1, 1))?)?;
    y.to_dtype(x.dtype())
}

/// `a · GELU_erf(g)` for `[a, g]` = the two halves of the last dimension.
pub fn geglu_reference(p: &Tensor) -> Result<Tensor> {
    let half = p.dim(candle_core::D::Minus1)? / 2;
    let a = p.narrow(candle_core::D::Minus1, 0, half)?;
    let g = p.narrow(candle_core::D::Minus1, half, half)?;
    a * g.gelu_erf()?
}

/// candle's permute and copy.
pub fn permute_reference(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    x.permute(dims)?.contiguous()
}

/// candle's softmax over the last dimension.
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(x)
}
