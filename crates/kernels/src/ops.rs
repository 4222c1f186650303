//! The op API: each function takes tensors on any device, picks our kernel for their device,
//! dtype and (on the CPU) instruction set, and falls back to the reference composition
//! ([`crate::reference`]) where we have none.

use crate::reference::{attention_chunked, conv3x3_reference, conv3x3_strided_reference, group_norm_reference, temporal_conv_reference, MAX_SCORES};
use crate::{cuda, portable};
use candle_core::{DType, Result, Tensor};

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The softmax row kernel of this CPU.
fn softmax_rows() -> portable::SoftmaxRows {
    #[cfg(target_arch = "x86_64")]
    if crate::avx512::available() {
        // SAFETY: AVX-512 was detected.
        return |rows, width, scale, sums| unsafe { crate::avx512::softmax_rows(rows, width, scale, sums) };
    }
    portable::softmax_rows
}

/// GroupNorm over `(n, c, …)` with affine weight/bias, optionally followed by SiLU, fused.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("group norm: {c} channels are not divisible into {groups} groups")
    }
    if cpu_f32(&[x, w, b]) {
        portable::group_norm(x, w, b, groups, eps, silu)
    } else if cuda::group_norm_enabled() && cuda::usable(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() && x.elem_count() > 0 && x.dim(0)? * groups <= 65535 {
        cuda::group_norm(x, w, b, groups, eps, silu)
    } else {
        group_norm_reference(x, w, b, groups, eps, silu)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x]) {
        portable::softmax_last_dim(x, softmax_rows())
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// `softmax(q·kᵀ·scale)·v` for `(batch, len, dim)` tensors, never materialising more than a
/// block of scores per thread on CPU (f32), no scores at all on CUDA in f16/bf16 (the fused
/// kernel), nor more than [`MAX_SCORES`] elsewhere.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(&[q, k, v]) {
        portable::attention(q, k, v, 1, scale, softmax_rows())
    } else if cuda::flash_attention::supported(q, k, v) {
        cuda::flash_attention::flash_attention(q, k, v, scale)
    } else {
        attention_chunked(q, k, v, scale, MAX_SCORES)
    }
}

/// Whether [`attention_heads`] takes these `(batch, len, heads·dim)` inputs in place: CPU f32,
/// or the fused CUDA kernels' f16/bf16 (which also read strided views, e.g. of one fused q/k/v
/// projection) unless `DYNAMICRAFTER_FLASH_ATTENTION` asks for split heads.
pub fn heads_in_place(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    (cpu_f32(&[q, k, v]) && [q, k, v].iter().all(|t| t.rank() == 3 && t.dims()[2].is_multiple_of(heads)))
        || fused_heads_in_place(q, k, v, heads)
}

/// The CUDA half of [`heads_in_place`].
fn fused_heads_in_place(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    cuda::flash_attention::heads_in_place_enabled() && cuda::flash_attention::supported_heads(q, k, v, heads)
}

/// [`attention`] per head for `(batch, len, heads·dim)` tensors, heads side by side in the last
/// dimension, read and written in place (no split or merge copies). Check [`heads_in_place`].
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if fused_heads_in_place(q, k, v, heads) {
        cuda::flash_attention::flash_attention_heads(q, k, v, heads, scale)
    } else if heads_in_place(q, k, v, heads) {
        portable::attention(q, k, v, heads, scale, softmax_rows())
    } else {
        candle_core::bail!("attention_heads: CPU f32 or CUDA f16/bf16 (batch, len, heads·dim) inputs only")
    }
}

/// Whether the fused CUDA kernel takes these for [`attention_heads_add`] (the sum made in its
/// store).
pub fn attention_heads_add_fused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    fused_heads_in_place(q, k, v, heads)
}

/// `addend + weight · attention_heads(q, k, v)` (`weight` None: unscaled), the dual
/// cross-attention's image branch joining the text branch, in the fused CUDA kernel's store
/// (one rounding). Check [`attention_heads_add_fused`]; elsewhere the caller composes it.
pub fn attention_heads_add(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, weight: Option<f64>, addend: &Tensor) -> Result<Tensor> {
    if !attention_heads_add_fused(q, k, v, heads) {
        candle_core::bail!("attention_heads_add: CUDA f16/bf16 (batch, len, heads·dim) inputs the fused kernel takes only");
    }
    cuda::flash_attention::flash_attention_heads_add(q, k, v, heads, scale, weight.unwrap_or(1.0), addend)
}

/// GEGLU activation of the UNet feed-forwards, fused (one pass, vectorised erf) on CPU f32.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[p]) && p.dim(candle_core::D::Minus1)? % 2 == 0 {
        portable::geglu(p)
    } else {
        crate::reference::geglu_reference(p)
    }
}

/// `y + b (+ residual)` after a product made without its bias: on CUDA in one pass
/// ([`cuda::epilogue::bias_rows`], one rounding), else broadcast ops.
fn add_bias(y: Tensor, b: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) if cuda::epilogue::supported(&y, b, residual) && b.elem_count() == y.dim(candle_core::D::Minus1)? => {
            cuda::epilogue::bias_rows(&y, b, residual)
        }
        _ => {
            let y = match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            match residual {
                Some(r) => y + r,
                None => Ok(y),
            }
        }
    }
}

/// `x·Wᵀ + b (+ residual)` with `w (out, in)`: candle's product, then on CUDA the bias and the
/// residual in one pass over it ([`cuda::epilogue::bias_rows`]); elsewhere candle's `Linear`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::Module;
    match b {
        Some(b) if cuda::epilogue::supported(x, b, None) && residual.is_none_or(|r| r.dtype() == x.dtype()) => {
            add_bias(candle_nn::Linear::new(w.clone(), None).forward(x)?, Some(b), residual)
        }
        _ => {
            let y = candle_nn::Linear::new(w.clone(), b.cloned()).forward(x)?;
            match residual {
                Some(r) => y + r,
                None => Ok(y),
            }
        }
    }
}

/// `a · GELU(g)` where `[a, g] = x·Wᵀ + b`: on CUDA the bias and the gate in one pass over the
/// product ([`cuda::epilogue::geglu_bias`]), elsewhere [`linear`] then [`geglu`].
pub fn linear_geglu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::Module;
    match b {
        Some(b) if cuda::epilogue::supported(x, b, None) => {
            cuda::epilogue::geglu_bias(&candle_nn::Linear::new(w.clone(), None).forward(x)?, b)
        }
        _ => geglu(&linear(x, w, b, None)?),
    }
}

/// `(sum, norm(sum))` with `sum = x·Wᵀ + b + residual`: a transformer block's attention output
/// joining the residual stream and the next LayerNorm of it. On CUDA both in one kernel after the
/// product ([`cuda::epilogue::add_layer_norm`]); elsewhere [`linear`], then the norm.
pub fn linear_add_layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, residual: &Tensor, norm: &candle_nn::LayerNorm) -> Result<(Tensor, Tensor)> {
    use candle_core::Module;
    if let (Some(b), Some(beta), true, true) = (b, norm.bias(), norm.remove_mean(), cuda::usable(x) && w.dtype() == x.dtype()) {
        let y = candle_nn::Linear::new(w.clone(), None).forward(x)?;
        if cuda::epilogue::add_layer_norm_supported(&y, b, Some(residual), norm.weight(), beta) {
            return cuda::epilogue::add_layer_norm(&y, b, Some(residual), norm.weight(), beta, norm.eps());
        }
        let sum = add_bias(y, Some(b), Some(residual))?;
        let normed = norm.forward(&sum)?;
        return Ok((sum, normed));
    }
    let sum = linear(x, w, b, Some(residual))?;
    let normed = norm.forward(&sum)?;
    Ok((sum, normed))
}

/// `(x·Wᵀ + b).reshape(view).permute(dims) + addend`, a transformer's exit (its output
/// projection back to the block's layout, the block's input added): on CUDA the bias, the
/// permute and the addition in one pass over the product
/// ([`cuda::epilogue::permute_bias_add`]); elsewhere [`linear`], [`permute`], an add.
pub fn linear_permute_add(x: &Tensor, w: &Tensor, b: Option<&Tensor>, view: &[usize], dims: &[usize], addend: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    if cuda::usable(x) && w.dtype() == x.dtype() {
        let y = candle_nn::Linear::new(w.clone(), None).forward(x)?.reshape(view)?;
        if cuda::epilogue::permute_bias_add_supported(&y, dims, b, addend) {
            return cuda::epilogue::permute_bias_add(&y, dims, b, addend);
        }
        return permute(&add_bias(y, b, None)?, dims)? + addend;
    }
    permute(&linear(x, w, b, None)?.reshape(view)?, dims)? + addend
}

/// `x.permute(dims).contiguous()`: a tiled transpose on CPU f32 where the innermost axis moves,
/// our row or tile copies on CUDA, candle's strided copy elsewhere.
pub fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if cpu_f32(&[x]) && portable::moves_innermost(x.rank(), dims) {
        portable::permute(x, dims)
    } else if cuda::permute::supported(x, dims) {
        cuda::permute::permute(x, dims)
    } else {
        x.permute(dims)?.contiguous()
    }
}

/// Conv3d with kernel (3,1,1), padding (1,0,0) on `x (b, c, t, s)` (s = h·w): three GEMMs over
/// shifted views of the input, no im2col copy.
pub fn temporal_conv(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w, bias]) {
        portable::temporal_conv(x, w, bias)
    } else if x.device().is_cpu() {
        // candle has no bf16/f16 CPU convolution: compute in f32 (as GPUs accumulate), round back.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        temporal_conv(&f32(x)?, &f32(w)?, &f32(bias)?)?.to_dtype(x.dtype())
    } else if cuda::usable(x) && w.dtype() == x.dtype() {
        cuda::temporal_conv(x, &taps_first(w)?, bias, ConvExtras::default())
    } else {
        temporal_conv_reference(x, w, bias)
    }
}

/// What a convolution adds to its output besides its bias: a bias per sample and output channel
/// `(n, co)` (the UNet's timestep embedding per frame) and a residual of the output's shape (a
/// skip connection). Added in the kernel's epilogue where it has one (CUDA's implicit GEMM),
/// after the convolution elsewhere.
pub use cuda::conv_igemm::Extras as ConvExtras;

/// [`conv3x3_taps`] plus `extras`.
pub fn conv3x3_taps_with(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    if cuda::usable(x) && w_taps.dtype() == x.dtype() {
        cuda::conv3x3(x, w_taps, bias, extras)
    } else {
        extras.add_to(conv3x3_taps(x, w_taps, bias)?)
    }
}

/// A group norm (+ SiLU) ahead of a convolution ([`conv3x3_taps_normed`],
/// [`temporal_conv_taps_normed`]): applied in CUDA's implicit-GEMM input copy, on its own elsewhere.
pub use cuda::conv_igemm::Norm as ConvNorm;

/// [`conv3x3_taps_with`] of `norm(x)`: on CUDA's implicit GEMM the norm happens in the
/// convolution's channels-last copy (its statistics pass first), so the normalised activation is
/// never written and read back; elsewhere the group norm, then the convolution.
pub fn conv3x3_taps_normed(x: &Tensor, norm: &ConvNorm, w_taps: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    normed_conv(x, norm, w_taps, bias, |b| cuda::conv_igemm::conv3x3_normed(x, norm, w_taps, b, extras), |y| conv3x3_taps_with(y, w_taps, bias, extras))
}

/// `fused` (given the bias in `x`'s dtype) where the implicit GEMM takes `x` with `norm`, else
/// `plain` of `norm(x)`.
fn normed_conv(
    x: &Tensor,
    norm: &ConvNorm,
    w_taps: &Tensor,
    bias: &Tensor,
    fused: impl FnOnce(&Tensor) -> Result<Tensor>,
    plain: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match igemm_bias(x, w_taps, bias, |b| cuda::conv_igemm::supported_normed(x, w_taps, b, norm))? {
        Some(b) => fused(&b),
        None => plain(&norm.apply(x)?),
    }
}

/// `bias` in `x`'s dtype where `x` is on CUDA with `w_taps` of its dtype and the implicit GEMM
/// `takes` the convolution given that bias; none where another path runs it.
fn igemm_bias(x: &Tensor, w_taps: &Tensor, bias: &Tensor, takes: impl FnOnce(&Tensor) -> bool) -> Result<Option<Tensor>> {
    if !(cuda::usable(x) && w_taps.dtype() == x.dtype()) {
        return Ok(None);
    }
    let b = bias.to_dtype(x.dtype())?;
    Ok(takes(&b).then_some(b))
}

/// Frames `x (b·t, c, h, w)` (`frames` = t) as the video `(b, c, t, h·w)` they are.
fn frames_as_video(x: &Tensor, frames: usize) -> Result<Tensor> {
    let (bt, c, h, w) = x.dims4()?;
    if frames == 0 || bt % frames != 0 {
        candle_core::bail!("{bt} frames are not videos of {frames}");
    }
    permute(&x.reshape((bt / frames, frames, c, h * w))?, &[0, 2, 1, 3])
}

/// `norm(x)` of `x (n, c, h, w)` as tokens `(n, h·w, c)` (a spatial transformer's entry): on
/// CUDA one pass that normalises and transposes; elsewhere the group norm, then the permute.
pub fn group_norm_tokens(x: &Tensor, norm: &ConvNorm) -> Result<Tensor> {
    if cuda::conv_igemm::supported_tokens(x, norm) {
        cuda::conv_igemm::normalized_tokens(x, norm)
    } else {
        permute(&norm.apply(x)?.flatten_from(2)?, &[0, 2, 1])
    }
}

/// `norm(x)` of frames `x (b·t, c, h, w)` (`frames` = t), normalised as the video `(b, c, t, h, w)`
/// they are, as tokens across frames `(b·h·w, t, c)` (a temporal transformer's entry): on CUDA one
/// pass; elsewhere the permute to the video, the group norm, the permute to tokens.
pub fn group_norm_frame_tokens(x: &Tensor, frames: usize, norm: &ConvNorm) -> Result<Tensor> {
    if cuda::conv_igemm::supported_frame_tokens(x, frames, norm) {
        return cuda::conv_igemm::normalized_frame_tokens(x, frames, norm);
    }
    // The video (b, c, t, h·w) normalised, then (b, h·w, t, c).
    let video = frames_as_video(x, frames)?;
    let (b, c, t, s) = video.dims4()?;
    permute(&norm.apply(&video)?, &[0, 3, 2, 1])?.reshape((b * s, t, c))
}

/// [`temporal_conv_taps_with`] of `norm(x)`, `x (b, c, t, s)` normalised as it lies: as
/// [`conv3x3_taps_normed`].
pub fn temporal_conv_taps_normed(x: &Tensor, norm: &ConvNorm, w_taps: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    normed_conv(x, norm, w_taps, bias, |b| cuda::conv_igemm::temporal_conv_normed(x, norm, w_taps, b, extras), |y| temporal_conv_taps_with(y, w_taps, bias, extras))
}

/// [`temporal_conv_taps_normed`] of a video held as frames, `x (b·t, c, h, w)` with `frames` = t
/// (normalised as the video it is), output `(b·t, co, h, w)` and the extras' residual likewise:
/// on CUDA's implicit GEMM without leaving the frames layout; elsewhere between permutes to the
/// video layout `(b, c, t, h·w)` and back. A block of such convolutions asks
/// [`temporal_conv_frames_supported`] once and permutes once where it says no.
pub fn temporal_conv_taps_frames_normed(x: &Tensor, frames: usize, norm: &ConvNorm, w_taps: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    if let Some(b) = igemm_bias(x, w_taps, bias, |b| cuda::conv_igemm::supported_frames(x, frames, w_taps, b, norm))? {
        return cuda::conv_igemm::temporal_conv_frames(x, frames, norm, w_taps, &b, extras);
    }
    let (bt, _, h, w) = x.dims4()?;
    let residual = extras.residual.map(|r| frames_as_video(r, frames)).transpose()?;
    let y = temporal_conv_taps_normed(&frames_as_video(x, frames)?, norm, w_taps, bias, ConvExtras { per_sample: extras.per_sample, residual: residual.as_ref() })?;
    permute(&y, &[0, 2, 1, 3])?.reshape((bt, w_taps.dim(1)?, h, w))
}

/// Whether [`temporal_conv_taps_frames_normed`] stays in the frames layout (CUDA's implicit GEMM
/// takes `x` with `norm`).
pub fn temporal_conv_frames_supported(x: &Tensor, frames: usize, norm: &ConvNorm, w_taps: &Tensor, bias: &Tensor) -> bool {
    igemm_bias(x, w_taps, bias, |b| cuda::conv_igemm::supported_frames(x, frames, w_taps, b, norm)).is_ok_and(|b| b.is_some())
}

/// [`temporal_conv`] plus `extras`.
pub fn temporal_conv_with(x: &Tensor, w: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    if cuda::usable(x) && w.dtype() == x.dtype() {
        cuda::temporal_conv(x, &taps_first(w)?, bias, extras)
    } else {
        extras.add_to(temporal_conv(x, w, bias)?)
    }
}

/// [`temporal_conv_with`] from the weight taps first, `(3, co, ci)` (see [`taps_first`]): what a
/// layer on CUDA prepares once.
pub fn temporal_conv_taps_with(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: ConvExtras) -> Result<Tensor> {
    if cuda::usable(x) && w_taps.dtype() == x.dtype() {
        return cuda::temporal_conv(x, w_taps, bias, extras);
    }
    let (co, ci) = (w_taps.dim(1)?, w_taps.dim(2)?);
    let w = w_taps.permute((1, 2, 0))?.reshape((co, ci, 3, 1, 1))?;
    extras.add_to(temporal_conv(x, &w, bias)?)
}

/// 3×3 convolution, stride 1, padding 1, with bias, its weight `(9, co, c)` taps first (see
/// [`taps_first`]): nine GEMMs over shifted views of the padded input on CPU f32 (no im2col
/// matrix), candle's conv elsewhere.
pub fn conv3x3_taps(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w_taps, bias]) {
        portable::conv3x3_taps(x, w_taps, bias)
    } else if x.device().is_cpu() {
        // candle has no bf16/f16 CPU convolution: compute in f32 (as GPUs accumulate), round back.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        conv3x3_taps(&f32(x)?, &f32(w_taps)?, &f32(bias)?)?.to_dtype(x.dtype())
    } else if cuda::usable(x) && w_taps.dtype() == x.dtype() {
        cuda::conv3x3(x, w_taps, bias, ConvExtras::default())
    } else {
        conv3x3_reference(x, &taps_last(w_taps, 3)?, bias)
    }
}

/// Whether [`conv1x1`] runs as one product and our channel-bias epilogue (a CUDA float tensor,
/// the weight and bias of its dtype); elsewhere candle's convolution serves.
pub fn conv1x1_supported(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    cuda::usable(x) && w.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype()) && x.rank() >= 3 && w.elem_count() > 0
}

/// A 1×1 convolution of `x (n, ci, …)` with `w (co, ci[, 1, 1])` and a bias `(co)`: one batched
/// product `w · x[n]` straight into `(n, co, …)`, then the bias on the way out
/// ([`cuda::epilogue::bias_channels`] on CUDA). candle's convolution copies the input into an
/// im2col matrix, transposes the product back and adds the bias with a broadcast op (the UNet's
/// skip connections, the VAE's shortcuts and attention projections).
pub fn conv1x1(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 3 {
        candle_core::bail!("1x1 convolution: input {:?} is not (n, c, …)", x.shape());
    }
    let (n, ci) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let co = w.dim(0)?;
    if w.elem_count() != co * ci {
        candle_core::bail!("1x1 convolution: weight {:?} for {ci} input channels", w.shape());
    }
    let w = w.reshape((co, ci))?.broadcast_left(n)?;
    let y = w.matmul(&x.reshape((n, ci, s))?.contiguous()?)?;
    let y = match bias {
        Some(b) if cuda::epilogue::supported(&y, b, None) => cuda::epilogue::bias_channels(&y, b, None)?,
        Some(b) => y.broadcast_add(&b.reshape((1, co, 1))?)?,
        None => y,
    };
    let mut out = dims.to_vec();
    out[1] = co;
    y.reshape(out)
}

/// [`conv3x3_taps`] of `x (n, c, h, w)` upsampled 2× (nearest), as before the UNet's and the
/// VAE's upsampling convolutions: on CUDA the upsample happens in the implicit GEMM's input copy.
pub fn conv3x3_taps_upsampled(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cuda::usable(x) && w_taps.dtype() == x.dtype() {
        cuda::conv3x3_upsampled(x, w_taps, bias)
    } else {
        let (_, _, h, w) = x.dims4()?;
        conv3x3_taps(&x.upsample_nearest2d(2 * h, 2 * w)?, w_taps, bias)
    }
}

/// [`conv3x3_taps`] with stride 2 (the UNet's downsampling): `(n, co, ⌈h/2⌉, ⌈w/2⌉)`. On CUDA
/// the implicit GEMM reads every second position of its channels-last copy; elsewhere candle's
/// strided convolution serves (in f32 on the CPU).
pub fn conv3x3_taps_strided(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if cuda::usable(x) && w_taps.dtype() == x.dtype() {
        cuda::conv3x3_strided(x, w_taps, bias)
    } else {
        conv3x3_strided_reference(x, &taps_last(w_taps, 3)?, bias)
    }
}

/// [`conv3x3_taps`] from a weight in its stored layout `(co, c, 3, 3)`.
pub fn conv3x3(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv3x3_taps(x, &taps_first(w)?, bias)
}

/// A weight taps first `(k·k, co, ci)` back in its stored layout `(co, ci, k, k)`: the inverse of
/// [`taps_first`] for a square kernel of side `k`.
pub fn taps_last(w_taps: &Tensor, k: usize) -> Result<Tensor> {
    let (co, ci) = (w_taps.dim(1)?, w_taps.dim(2)?);
    w_taps.permute((1, 2, 0))?.reshape((co, ci, k, k))
}

/// A conv weight `(co, ci, k…)` as `(taps, co, ci)`, taps in row-major kernel order: each tap's
/// matrix contiguous, as the shifted GEMMs read it.
pub fn taps_first(w: &Tensor) -> Result<Tensor> {
    let (co, ci) = (w.dim(0)?, w.dim(1)?);
    w.reshape((co, ci, ()))?.permute((2, 0, 1))?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::{assert_f32_level, f64, max_rel, merge_heads, split_heads, CONV3X3_SHAPES};
    use crate::reference::*;
    use candle_core::Device;

    #[test]
    fn group_norm_matches_reference_on_many_shapes() {
        let dev = Device::Cpu;
        for &(shape, groups) in &[(&[2usize, 32, 4, 4][..], 32), (&[1, 64, 3, 5, 7][..], 32), (&[3, 96, 1][..], 32), (&[2, 320, 16, 16][..], 32), (&[1, 8, 9][..], 4)] {
            let c = shape[1];
            let w = Tensor::randn(1f32, 0.2, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, c, &dev).unwrap();
            // A mean far from zero too: the variance must not cancel.
            for offset in [1.5, 100.0] {
                let x = (Tensor::randn(0f32, 3.0, shape, &dev).unwrap() + offset).unwrap();
                for silu in [false, true] {
                    let got = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                    let want = group_norm_reference(&f64(&x), &f64(&w), &f64(&b), groups, 1e-5, silu).unwrap();
                    let candle = group_norm_reference(&x, &w, &b, groups, 1e-5, silu).unwrap();
                    assert_f32_level(&got, &candle, &want, &format!("{shape:?} offset {offset} silu {silu}"));
                }
            }
        }
    }

    #[test]
    fn chunked_attention_equals_unchunked() {
        let dev = Device::Cpu;
        for &(b, m, n, d, max_scores) in &[(2, 37, 20, 8, 40), (1, 100, 64, 16, 64 * 7), (3, 9, 9, 4, 1), (1, 5, 5, 4, 1 << 20)] {
            let q = Tensor::randn(0f32, 2.0, (b, m, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (b, n, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let whole = attention_reference(&q, &k, &v, 0.3).unwrap();
            let chunked = attention_chunked(&q, &k, &v, 0.3, max_scores).unwrap();
            assert_eq!(chunked.dims(), whole.dims());
            let err = max_rel(&chunked, &whole);
            assert!(err < 1e-6, "{:?}: {err:e}", (b, m, n, d, max_scores));
        }
        // bf16 inputs: softmax runs in f32, the result comes back in bf16.
        let q = Tensor::randn(0f32, 1.0, (2, 33, 8), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let out = attention(&q, &q, &q, 0.35).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let f32_out = attention(&q.to_dtype(DType::F32).unwrap(), &q.to_dtype(DType::F32).unwrap(), &q.to_dtype(DType::F32).unwrap(), 0.35).unwrap();
        let err = max_rel(&out, &f32_out);
        assert!(err < 2e-2, "bf16 attention off by {err:e}");
    }

    #[test]
    fn attention_matches_reference_on_many_shapes() {
        let dev = Device::Cpu;
        for &(b, m, n, d, dv) in &[(1, 1, 1, 1, 1), (2, 5, 7, 3, 4), (3, 64, 64, 16, 16), (2, 130, 77, 64, 64), (10, 16, 16, 64, 64), (1, 257, 513, 8, 8)] {
            let q = Tensor::randn(0f32, 2.0, (b, m, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (b, n, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, dv), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            // Against the reference composition computed in f64: our error must stay at f32
            // rounding level (candle's own f32 composition is shown for scale).
            let got = attention(&q, &k, &v, scale).unwrap();
            let want = attention_reference(&f64(&q), &f64(&k), &f64(&v), scale).unwrap();
            let candle = attention_reference(&q, &k, &v, scale).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, m, n, d, dv)));
        }
    }

    /// Heads read and written in place equal splitting them out, attending and merging back.
    #[test]
    fn attention_heads_equals_split_attention_merge() {
        let dev = Device::Cpu;
        for &(b, m, n, heads, d) in &[(1, 5, 7, 1, 8), (2, 300, 77, 5, 16), (1, 33, 260, 3, 64)] {
            let q = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let got = attention_heads(&q, &k, &v, heads, scale).unwrap();
            let split = |t: &Tensor| split_heads(t, heads);
            let merge = |t: &Tensor| merge_heads(t, heads);
            let want = merge(&attention_reference(&split(&f64(&q)), &split(&f64(&k)), &split(&f64(&v)), scale).unwrap());
            let candle = merge(&attention_reference(&split(&q), &split(&k), &split(&v), scale).unwrap());
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, m, n, heads, d)));
        }
        let bf16 = Tensor::zeros((1, 4, 8), DType::BF16, &dev).unwrap();
        assert!(!heads_in_place(&bf16, &bf16, &bf16, 2));
    }

    /// The 1×1 convolution as one product (the CUDA path's composition, here on the CPU) equals
    /// candle's convolution.
    #[test]
    fn conv1x1_as_a_product_equals_candles_convolution() {
        let dev = Device::Cpu;
        for &(n, ci, co, h, w) in &[(2usize, 6usize, 5usize, 3usize, 7usize), (1, 16, 32, 9, 9)] {
            let x = Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (co, ci, 1, 1), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let got = conv1x1(&x, &wt, Some(&b)).unwrap();
            let want = x.conv2d(&wt, 0, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, co, 1, 1)).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{:?}: max difference {diff}", (n, ci, co, h, w));
            let video = conv1x1(&x.reshape((n, ci, 1, h, w)).unwrap(), &wt, None).unwrap();
            assert_eq!(video.dims(), &[n, co, 1, h, w]);
        }
        assert!(conv1x1(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap(), &Tensor::zeros((4, 3), DType::F32, &dev).unwrap(), None).is_err());
    }

    #[test]
    fn softmax_matches_reference() {
        let dev = Device::Cpu;
        // The last one's output is over 32 MB: its pages are populated ahead (`output_buffer`).
        for shape in [&[1usize, 1][..], &[3, 17][..], &[2, 5, 77][..], &[40, 1024][..], &[9, 1024, 1031][..]] {
            let x = (Tensor::randn(0f32, 4.0, shape, &dev).unwrap() + 2.0).unwrap();
            let got = softmax_last_dim(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&f64(&x)).unwrap();
            let candle = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{shape:?}"));
        }
    }

    #[test]
    fn geglu_matches_reference() {
        for shape in [&[1usize, 2][..], &[3, 5, 18][..], &[2, 100, 640][..]] {
            let p = Tensor::randn(0f32, 3.0, shape, &Device::Cpu).unwrap();
            let got = geglu(&p).unwrap();
            let want = geglu_reference(&f64(&p)).unwrap();
            let candle = geglu_reference(&p).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{shape:?}"));
        }
    }

    /// The convolutions with extras, where nothing fuses them (the CPU): the convolution, then
    /// the bias per sample and the residual, exactly; the taps-first temporal form likewise.
    #[test]
    fn conv_extras_add_after_the_convolution() {
        let dev = Device::Cpu;
        let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (n, ci, co, h, w) = (3, 8, 6, 5, 7);
        let (x, b, per_sample, residual) = (r(&[n, ci, h, w]), r(&[co]), r(&[n, co]), r(&[n, co, h, w]));
        let extras = ConvExtras { per_sample: Some(&per_sample), residual: Some(&residual) };
        let add = |y: Tensor| (y.broadcast_add(&per_sample.reshape((n, co, 1, 1)).unwrap()).unwrap() + &residual).unwrap();
        let w3 = r(&[co, ci, 3, 3]);
        let got = conv3x3_taps_with(&x, &taps_first(&w3).unwrap(), &b, extras).unwrap();
        let want = add(conv3x3(&x, &w3, &b).unwrap());
        assert_eq!((got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let wt = r(&[co, ci, 3, 1, 1]);
        let want = add(temporal_conv(&x, &wt, &b).unwrap());
        for got in [temporal_conv_with(&x, &wt, &b, extras).unwrap(), temporal_conv_taps_with(&x, &taps_first(&wt).unwrap(), &b, extras).unwrap()] {
            assert_eq!((got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn permute_matches_candle_on_many_shapes() {
        let dev = Device::Cpu;
        let cases: [(&[usize], &[usize]); 6] = [
            (&[1, 320, 16, 9, 7], &[0, 3, 4, 2, 1]),
            (&[2, 7, 5, 3, 40], &[0, 3, 4, 1, 2]),
            (&[3, 33, 65], &[0, 2, 1]),
            (&[70, 3], &[1, 0]),
            (&[2, 3, 4, 5], &[3, 2, 1, 0]),
            (&[4, 1, 37], &[2, 0, 1]),
        ];
        for (shape, dims) in cases {
            let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let got = permute(&x, dims).unwrap();
            let want = permute_reference(&x, dims).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, w) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert_eq!(g, w, "{shape:?} permuted by {dims:?}");
        }
    }

    #[test]
    fn temporal_conv_matches_reference() {
        let dev = Device::Cpu;
        for &(b, c, co, t, s) in &[(1, 3, 5, 1, 4), (2, 8, 8, 4, 6), (1, 64, 70, 16, 9), (1, 130, 130, 3, 1)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, s), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = temporal_conv(&x, &w, &bias).unwrap();
            let want = temporal_conv_reference(&f64(&x), &f64(&w), &f64(&bias)).unwrap();
            let candle = temporal_conv_reference(&x, &w, &bias).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, c, co, t, s)));
        }
    }

    /// The downsampling convolution from a weight taps first (the UNet's layer on CUDA keeps it
    /// so) against candle's strided convolution of the stored weight, odd and even sides, bf16.
    #[test]
    fn strided_conv_from_taps_equals_candles() {
        let dev = Device::Cpu;
        for (n, c, co, h, w) in [(2, 8, 6, 9, 7), (1, 4, 5, 8, 10)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let back = taps_last(&taps_first(&wt).unwrap(), 3).unwrap();
            assert_eq!((back - &wt).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let got = conv3x3_taps_strided(&bf16(&x), &taps_first(&bf16(&wt)).unwrap(), &bf16(&bias)).unwrap();
            assert_eq!((got.dtype(), got.dims()), (DType::BF16, &[n, co, h.div_ceil(2), w.div_ceil(2)][..]));
            let f = |t: &Tensor| bf16(t).to_dtype(DType::F32).unwrap();
            let want = f(&x).conv2d(&f(&wt), 1, 2, 1, 1).unwrap().broadcast_add(&f(&bias).reshape((1, co, 1, 1)).unwrap()).unwrap();
            let e = crate::common::testing::rel_l2(&got, &want);
            assert!(e < 5e-3, "{:?}: {e:.2e}", (n, c, co, h, w));
        }
    }

    /// A temporal convolution of a video held as frames (what the UNet's temporal blocks call)
    /// against the same convolution of the video, away from CUDA: the permutes around it.
    #[test]
    fn temporal_conv_on_frames_matches_the_video_layout() {
        let dev = Device::Cpu;
        let (b, t, c, co, h, w) = (2, 5, 64, 32, 3, 4);
        let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (video, residual) = (r(&[b, c, t, h * w]), r(&[b, co, t, h * w]));
        let (gamma, beta, bias) = (r(&[c]), r(&[c]), r(&[co]));
        let taps = taps_first(&Tensor::randn(0f32, 0.05, (co, c, 3, 1, 1), &dev).unwrap()).unwrap();
        let norm = ConvNorm { weight: &gamma, bias: &beta, groups: 32, eps: 1e-5, silu: true };
        let as_frames = |v: &Tensor, c: usize| v.permute((0, 2, 1, 3)).unwrap().contiguous().unwrap().reshape((b * t, c, h, w)).unwrap();
        assert!(!temporal_conv_frames_supported(&as_frames(&video, c), t, &norm, &taps, &bias));
        let want = temporal_conv_taps_normed(&video, &norm, &taps, &bias, ConvExtras { per_sample: None, residual: Some(&residual) }).unwrap();
        let got = temporal_conv_taps_frames_normed(&as_frames(&video, c), t, &norm, &taps, &bias, ConvExtras { per_sample: None, residual: Some(&as_frames(&residual, co)) }).unwrap();
        assert_eq!(got.dims(), &[b * t, co, h, w]);
        let diff = (got - as_frames(&want, co)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        // Frames that are not whole videos: an error, not a panic.
        assert!(temporal_conv_taps_frames_normed(&as_frames(&video, c), 3, &norm, &taps, &bias, ConvExtras::default()).is_err());
    }

    #[test]
    fn conv3x3_matches_reference() {
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in CONV3X3_SHAPES {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = conv3x3(&x, &wt, &bias).unwrap();
            let want = conv3x3_reference(&f64(&x), &f64(&wt), &f64(&bias)).unwrap();
            let candle = conv3x3_reference(&x, &wt, &bias).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (n, c, co, h, w)));
        }
    }
}
