//! The op cases: the primitives of `scripts/torch_ops.py` at the same shapes and names (ours next
//! to candle's where we replace it), and the UNet's ops at the 576×1024 model's shapes.

use crate::{cpu, randn, time, Target, Timing};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::compute::Part;
use dynamicrafter_kernels as kernels;

/// The UNet's operations at the first level of the 576×1024 model (16 frames of 72×128 latents,
/// 320 channels, 5 heads of 64), on the target device and dtype: what dominates a forward there.
pub(crate) fn ops_1024(runs: usize, target: &Target) -> Result<Vec<Timing>> {
    let (t, c, h, w) = (16, 320, 72, 128);
    let hw = h * w;
    let dt = target.precision.part(Part::Unet).compute;
    let r = |shape: &[usize], std: f64| -> Result<Tensor> { Ok((target.randn(shape, Part::Unet)? * std)?) };
    let suffix = target.suffix();
    let mut out = Vec::new();
    let mut op = |name: &str, f: &mut dyn FnMut() -> Result<Tensor>| -> Result<()> {
        out.push(target.time(&format!("{name}{suffix}"), runs, || f().map(|_| ()))?);
        Ok(())
    };
    let x = r(&[t, c, h, w], 1.0)?;
    let (ones, zeros) = (Tensor::ones(c, dt, &target.device)?, Tensor::zeros(c, dt, &target.device)?);
    let w3 = r(&[c, c, 3, 3], 0.02)?;
    op("conv3x3 16x320x72x128", &mut || Ok(kernels::conv3x3(&x, &w3, &zeros)?))?;
    // The output blocks' upsampling convolution into the first level: 2× nearest, then 3×3.
    let (x_half, w_up) = (r(&[t, 2 * c, h / 2, w / 2], 1.0)?, kernels::taps_first(&r(&[2 * c, 2 * c, 3, 3], 0.02)?)?);
    let zeros_up = Tensor::zeros(2 * c, dt, &target.device)?;
    op("upsample 2x + conv3x3 16x640x36x64 (upsampled first)", &mut || Ok(kernels::conv3x3_taps(&x_half.upsample_nearest2d(h, w)?, &w_up, &zeros_up)?))?;
    op("upsample 2x + conv3x3 16x640x36x64", &mut || Ok(kernels::conv3x3_taps_upsampled(&x_half, &w_up, &zeros_up)?))?;
    let xt = r(&[1, c, t, hw], 1.0)?;
    let wt = r(&[c, c, 3, 1, 1], 0.02)?;
    op("temporal conv 1x320x16x9216 k3", &mut || Ok(kernels::temporal_conv(&xt, &wt, &zeros)?))?;
    // A residual block's second convolution: the timestep embedding per frame and the skip
    // connection added in the kernel (on CUDA's implicit GEMM), or after it.
    let (w3_taps, per_frame) = (kernels::taps_first(&w3)?, r(&[t, c], 1.0)?);
    let extras = kernels::ConvExtras { per_sample: Some(&per_frame), residual: Some(&x) };
    op("conv3x3 16x320x72x128 + embedding + residual", &mut || Ok(kernels::conv3x3_taps_with(&x, &w3_taps, &zeros, extras)?))?;
    op("conv3x3 16x320x72x128 + embedding + residual (added after)", &mut || Ok(extras.add_to(kernels::conv3x3_taps(&x, &w3_taps, &zeros)?)?))?;
    if !target.device.is_cpu() && dt != DType::F32 {
        // What the implicit GEMM (the rows above, f16/bf16) replaced: one cuBLAS GEMM per tap.
        let wt_taps = kernels::taps_first(&wt)?;
        op("conv3x3 16x320x72x128 (shifted GEMMs)", &mut || Ok(kernels::conv3x3_shifted(&x, &w3_taps, &zeros)?))?;
        op("temporal conv 1x320x16x9216 k3 (shifted GEMMs)", &mut || Ok(kernels::temporal_conv_shifted(&xt, &wt_taps, &zeros)?))?;
        // Each tile shape and pipeline depth of the implicit GEMM (DYNAMICRAFTER_CONV_IGEMM_TILE
        // picks one; the rows above ran the default), at the first level and at the deepest one
        // (9×16 positions per frame, 1280 channels: tiles span frames).
        let (x_deep, w_deep) = (r(&[t, 4 * c, h / 8, w / 8], 1.0)?, kernels::taps_first(&r(&[4 * c, 4 * c, 3, 3], 0.02)?)?);
        let zeros_deep = Tensor::zeros(4 * c, dt, &target.device)?;
        let none = kernels::ConvExtras::default();
        for tile in kernels::ConvTile::ALL {
            let name = tile.name();
            op(&format!("conv3x3 16x320x72x128 (tile {name})"), &mut || Ok(kernels::conv3x3_on(&x, &w3_taps, &zeros, none, tile)?))?;
            op(&format!("temporal conv 1x320x16x9216 k3 (tile {name})"), &mut || Ok(kernels::temporal_conv_on(&xt, &wt_taps, &zeros, none, tile)?))?;
            op(&format!("conv3x3 16x1280x9x16 (tile {name})"), &mut || Ok(kernels::conv3x3_on(&x_deep, &w_deep, &zeros_deep, none, tile)?))?;
        }
        // A residual block's group norm + SiLU and convolution: the norm applied in the
        // convolution's input copy, or written first (what the layers ran before).
        let norm = kernels::ConvNorm { weight: &ones, bias: &zeros, groups: 32, eps: 1e-5, silu: true };
        op("group_norm+silu + conv3x3 16x320x72x128 (norm in the copy)", &mut || Ok(kernels::conv3x3_taps_normed(&x, &norm, &w3_taps, &zeros, none)?))?;
        op("group_norm+silu + conv3x3 16x320x72x128 (norm first)", &mut || Ok(kernels::conv3x3_taps_with(&norm.apply(&x)?, &w3_taps, &zeros, none)?))?;
        op("group_norm+silu + temporal conv 1x320x16x9216 (norm in the copy)", &mut || Ok(kernels::temporal_conv_taps_normed(&xt, &norm, &wt_taps, &zeros, none)?))?;
        op("group_norm+silu + temporal conv 1x320x16x9216 (norm first)", &mut || Ok(kernels::temporal_conv_taps_with(&norm.apply(&xt)?, &wt_taps, &zeros, none)?))?;
        // A temporal block's convolution from frames (16, 320, 72, 128) to frames: in that
        // layout (the copy reads frames, the kernel writes them), or between the permutes to the
        // video layout and back (what the block ran before).
        op("group_norm+silu + temporal conv 16x320x72x128 frames (frames in and out)", &mut || Ok(kernels::temporal_conv_taps_frames_normed(&x, t, &norm, &wt_taps, &zeros, none)?))?;
        op("group_norm+silu + temporal conv 16x320x72x128 frames (permuted to the video and back)", &mut || {
            let video = kernels::permute(&x.reshape((1, t, c, hw))?, &[0, 2, 1, 3])?;
            Ok(kernels::permute(&kernels::temporal_conv_taps_normed(&video, &norm, &wt_taps, &zeros, none)?, &[0, 2, 1, 3])?)
        })?;
        // A spatial transformer's entry: its group norm and the permute to tokens.
        let plain = kernels::ConvNorm { silu: false, ..norm };
        op("group_norm + permute to tokens 16x320x72x128 (one pass)", &mut || Ok(kernels::group_norm_tokens(&x, &plain)?))?;
        op("group_norm + permute to tokens 16x320x72x128 (norm, then permute)", &mut || Ok(kernels::permute(&plain.apply(&x)?.flatten_from(2)?, &[0, 2, 1])?))?;
        // A temporal transformer's entry: frames to the video, its group norm, the permute to
        // tokens across frames (9216, 16, 320).
        op("group_norm + permute to tokens across frames 16x320x72x128 (one pass)", &mut || Ok(kernels::group_norm_frame_tokens(&x, t, &plain)?))?;
        op("group_norm + permute to tokens across frames 16x320x72x128 (three passes)", &mut || {
            let video = kernels::permute(&x.reshape((1, t, c, h, w))?, &[0, 2, 1, 3, 4])?;
            Ok(kernels::permute(&plain.apply(&video)?, &[0, 3, 4, 2, 1])?)
        })?;
        // The downsampling convolution out of the first level: candle's (im2col) and ours.
        op("conv3x3 stride 2 16x320x72x128 (candle)", &mut || Ok(x.conv2d(&w3, 1, 2, 1, 1)?.broadcast_add(&zeros.reshape((1, c, 1, 1))?)?))?;
        op("conv3x3 stride 2 16x320x72x128", &mut || Ok(kernels::conv3x3_taps_strided(&x, &w3_taps, &zeros)?))?;
    }
    if kernels::cudnn_enabled() && !target.device.is_cpu() {
        op("conv3x3 16x320x72x128 (cuDNN)", &mut || Ok(kernels::conv3x3_cudnn(&x, &w3, &zeros)?))?;
        let wt2 = wt.squeeze(4)?;
        op("temporal conv 1x320x16x9216 k3 (cuDNN)", &mut || Ok(kernels::temporal_conv_cudnn(&xt, &wt2, &zeros)?))?;
    }
    // A residual block's skip connection at the first level of the output blocks (960 → 320).
    let (x960, w1) = (r(&[t, 3 * c, h, w], 1.0)?, r(&[c, 3 * c, 1, 1], 0.02)?);
    op("conv1x1 16x960->320x72x128 (candle)", &mut || Ok(x960.conv2d(&w1, 0, 1, 1, 1)?.broadcast_add(&zeros.reshape((1, c, 1, 1))?)?))?;
    op("conv1x1 16x960->320x72x128", &mut || Ok(kernels::conv1x1(&x960, &w1, Some(&zeros))?))?;
    op("group_norm+silu 16x320x72x128 g32", &mut || Ok(kernels::group_norm(&x, &ones, &zeros, 32, 1e-5, true)?))?;
    op("group_norm+silu 16x320x72x128 g32 (candle)", &mut || Ok(kernels::group_norm_reference(&x, &ones, &zeros, 32, 1e-5, true)?))?;
    let xv = r(&[1, c, t, h, w], 1.0)?;
    op("group_norm 1x320x16x72x128 g32 (video)", &mut || Ok(kernels::group_norm(&xv, &ones, &zeros, 32, 1e-6, false)?))?;
    let tokens = r(&[t, hw, c], 1.0)?;
    for (n, k) in [(c, c), (8 * c, c), (c, 4 * c)] {
        let input = if k == c { tokens.clone() } else { r(&[t, hw, k], 1.0)? };
        let (weight, bias) = (r(&[n, k], 0.02)?, Tensor::zeros(n, dt, &target.device)?);
        let lin = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        op(&format!("linear {}x{k}->{n} (candle)", t * hw), &mut || Ok(candle_core::Module::forward(&lin, &input)?))?;
        // What the layers run: the bias in our epilogue on CUDA (candle's Linear elsewhere).
        op(&format!("linear {}x{k}->{n}", t * hw), &mut || Ok(kernels::linear(&input, &weight, Some(&bias), None)?))?;
        if n == k {
            op(&format!("linear {}x{k}->{n} + residual", t * hw), &mut || Ok(kernels::linear(&input, &weight, Some(&bias), Some(&input))?))?;
        }
    }
    let (w_ff, b_ff) = (r(&[8 * c, c], 0.02)?, Tensor::zeros(8 * c, dt, &target.device)?);
    op("linear+geglu 147456x320->2560->1280", &mut || Ok(kernels::linear_geglu(&tokens, &w_ff, Some(&b_ff))?))?;
    let ln = candle_nn::LayerNorm::new(ones.clone(), zeros.clone(), 1e-5);
    op("layer_norm 147456x320", &mut || Ok(candle_core::Module::forward(&ln, &tokens)?))?;
    // An attention's output projection joining the residual stream, then the block's next norm.
    let w_out = r(&[c, c], 0.02)?;
    op("linear 147456x320 + residual, layer_norm", &mut || {
        let sum = kernels::linear(&tokens, &w_out, Some(&zeros), Some(&tokens))?;
        Ok(candle_core::Module::forward(&ln, &sum)?)
    })?;
    op("linear 147456x320 + residual + layer_norm", &mut || Ok(kernels::linear_add_layer_norm(&tokens, &w_out, Some(&zeros), &tokens, &ln)?.1))?;
    let ff = r(&[t, hw, 8 * c], 1.0)?;
    op("geglu 147456x2560", &mut || Ok(kernels::geglu(&ff)?))?;
    let heads = c / 64;
    let qkv = |b: usize, l: usize| r(&[b, l, 64], 1.0);
    let (q, k, v) = (qkv(t * heads, hw)?, qkv(t * heads, hw)?, qkv(t * heads, hw)?);
    op("attention self 80x9216x64", &mut || Ok(kernels::attention(&q, &k, &v, 0.125)?))?;
    let (kc, vc) = (qkv(t * heads, 77)?, qkv(t * heads, 77)?);
    op("attention cross 80x9216 vs 77", &mut || Ok(kernels::attention(&q, &kc, &vc, 0.125)?))?;
    let (qt, kt, vt) = (qkv(hw * heads, t)?, qkv(hw * heads, t)?, qkv(hw * heads, t)?);
    op("attention temporal 46080x16x64", &mut || Ok(kernels::attention(&qt, &kt, &vt, 0.125)?))?;
    if kernels::flash_attention_supported(&q, &k, &v) {
        // Each fused kernel on each shape (the rows above run the one `attention` picks).
        for kernel in kernels::FlashAttentionKernel::ALL {
            let mut fused = |name: &str, q: &Tensor, k: &Tensor, v: &Tensor| -> Result<()> {
                op(&format!("{name} ({kernel:?})"), &mut || Ok(kernels::flash_attention_with(kernel, q, k, v, 0.125)?))
            };
            fused("attention self 80x9216x64", &q, &k, &v)?;
            fused("attention cross 80x9216 vs 77", &q, &kc, &vc)?;
            fused("attention temporal 46080x16x64", &qt, &kt, &vt)?;
        }
    }
    // Multi-head self-attention around the kernel: heads split into (b·heads, n, 64) copies and
    // merged back, or read and written in place (CUDA; CPU f32); q, k, v from three products or
    // from views of one with the weights stacked.
    let (tq, tk, tv) = (tokens.clone(), r(&[t, hw, c], 1.0)?, r(&[t, hw, c], 1.0)?);
    {
        use dynamicrafter_engine::models::layers::{merge_heads, split_heads};
        let split_attention = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let s = |x: &Tensor| split_heads(x, heads);
            Ok(merge_heads(&kernels::attention(&s(q)?, &s(k)?, &s(v)?, 0.125)?, heads)?)
        };
        op("attention self 16x9216x320 5 heads (split, merge)", &mut || split_attention(&tq, &tk, &tv))?;
        let w_qkv = r(&[3 * c, c], 0.02)?;
        let w_each: Vec<Tensor> = (0..3).map(|i| w_qkv.narrow(0, i * c, c).and_then(|w| w.contiguous())).collect::<candle_core::Result<_>>()?;
        op("q/k/v products + attention 16x9216x320 (three, split)", &mut || {
            let p = |w: &Tensor| kernels::linear(&tokens, w, None, None);
            split_attention(&p(&w_each[0])?, &p(&w_each[1])?, &p(&w_each[2])?)
        })?;
        if kernels::heads_in_place(&tq, &tk, &tv, heads) {
            op("attention self 16x9216x320 5 heads (in place)", &mut || Ok(kernels::attention_heads(&tq, &tk, &tv, heads, 0.125)?))?;
            op("q/k/v products + attention 16x9216x320 (one, in place)", &mut || {
                let p = kernels::linear(&tokens, &w_qkv, None, None)?;
                Ok(kernels::attention_heads(&p.narrow(2, 0, c)?, &p.narrow(2, c, c)?, &p.narrow(2, 2 * c, c)?, heads, 0.125)?)
            })?;
        }
        // A spatial transformer's exit: the output projection back to (frames, c, h·w), plus the
        // block's input.
        let (w_out, b_out, x_flat) = (r(&[c, c], 0.02)?, r(&[c], 1.0)?, x.flatten_from(2)?);
        op("transformer exit 16x9216x320 (linear, permute, add)", &mut || {
            Ok((kernels::permute(&kernels::linear(&tokens, &w_out, Some(&b_out), None)?, &[0, 2, 1])? + &x_flat)?)
        })?;
        op("transformer exit 16x9216x320", &mut || Ok(kernels::linear_permute_add(&tokens, &w_out, Some(&b_out), &[t, hw, c], &[0, 2, 1], &x_flat)?))?;
    }
    op("permute video->tokens 1x320x16x72x128 (candle)", &mut || Ok(xv.permute((0, 3, 4, 2, 1))?.contiguous()?))?;
    op("permute video->tokens 1x320x16x72x128", &mut || Ok(kernels::permute(&xv, &[0, 3, 4, 2, 1])?))?;
    let frames = x.reshape((1, t, c, h, w))?;
    op("permute frames->video 16x320x72x128 (candle)", &mut || Ok(frames.permute((0, 2, 1, 3, 4))?.contiguous()?))?;
    op("permute frames->video 16x320x72x128", &mut || Ok(kernels::permute(&frames, &[0, 2, 1, 3, 4])?))?;
    op("permute channels->tokens 16x320x9216", &mut || Ok(kernels::permute(&x.flatten_from(2)?, &[0, 2, 1])?))?;
    op("split heads 16x9216x320", &mut || Ok(dynamicrafter_engine::models::layers::split_heads(&tokens, heads)?.contiguous()?))?;
    op("cat skip 2x16x320x72x128", &mut || Ok(Tensor::cat(&[&x, &x], 1)?))?;
    op("silu 16x320x72x128", &mut || Ok(x.silu()?))?;
    let bias = r(&[1, c, 1, 1], 1.0)?;
    op("broadcast add 16x320x72x128 + 320", &mut || Ok(x.broadcast_add(&bias)?))?;
    op("add 16x320x72x128", &mut || Ok((&x + &x)?))?;
    Ok(out)
}

/// The ops of `scripts/torch_ops.py`, same shapes and names: ours next to candle's own where we replace it.
pub(crate) fn ops(runs: usize) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    let w = randn(&[320, 320, 3, 3], 0.05)?;
    let bias = Tensor::zeros(320, DType::F32, &Device::Cpu)?;
    for hw in [32, 64] {
        let x = randn(&[16, 320, hw, hw], 1.0)?;
        if kernels::F32Conv::supports(320) {
            // The weight packed once, as a layer does at load.
            let conv = kernels::F32Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (ours, AVX-512)"), runs, || { conv.forward(&x)?; Ok(()) })?);
        }
        out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (ours, gemm crate)"), runs, || { kernels::conv3x3(&x, &w, &bias)?; Ok(()) })?);
        out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (candle)"), runs, || { x.conv2d(&w, 1, 1, 1, 1)?; Ok(()) })?);
        if cpu().avx512_vnni {
            let q = kernels::Q8Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d q8_0 16x320x{hw}x{hw} k3 (ours)"), runs, || { q.forward(&x)?; Ok(()) })?);
        }
        if cpu().amx {
            let a = kernels::Bf16Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d bf16 16x320x{hw}x{hw} k3 (ours, AMX)"), runs, || { a.forward(&x)?; Ok(()) })?);
        }
        if cpu().avx512_bf16 {
            let a = kernels::Bf16DotConv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d bf16 16x320x{hw}x{hw} k3 (ours, AVX512-BF16)"), runs, || { a.forward(&x)?; Ok(()) })?);
        }
    }
    let w1 = randn(&[320, 320, 3], 0.05)?;
    let x1 = randn(&[1024, 320, 16], 1.0)?;
    out.push(time("conv1d f32 1024x320x16 k3 (candle)", runs, || { x1.conv1d(&w1, 1, 1, 1, 1)?; Ok(()) })?);
    // The same temporal conv as the UNet runs it: (b, c, t, h·w) with taps over t.
    let xt = randn(&[1, 320, 16, 1024], 1.0)?;
    let wt = randn(&[320, 320, 3, 1, 1], 0.05)?;
    out.push(time("conv1d f32 1024x320x16 k3 (ours, temporal)", runs, || { kernels::temporal_conv(&xt, &wt, &bias)?; Ok(()) })?);
    if cpu().avx512_vnni {
        let q = kernels::Q8Conv::temporal(&wt, &bias)?;
        out.push(time("conv1d q8_0 1024x320x16 k3 (ours, temporal)", runs, || { q.forward(&xt)?; Ok(()) })?);
    }
    if cpu().amx {
        let a = kernels::Bf16Conv::temporal(&wt, &bias)?;
        out.push(time("conv1d bf16 1024x320x16 k3 (ours, AMX, temporal)", runs, || { a.forward(&xt)?; Ok(()) })?);
    }
    if cpu().avx512_bf16 {
        let a = kernels::Bf16DotTemporalConv::new(&wt, &bias)?;
        out.push(time("conv1d bf16 1024x320x16 k3 (ours, AVX512-BF16, temporal)", runs, || { a.forward(&xt)?; Ok(()) })?);
    }
    let a = randn(&[4096, 1280], 1.0)?;
    let b = randn(&[1280, 1280], 1.0)?;
    out.push(time("matmul f32 4096x1280@1280x1280", runs, || { a.matmul(&b)?; Ok(()) })?);
    let packed_f32 = |w: &Tensor| kernels::F32Matrix::new(&w.t()?.contiguous()?, None);
    if cpu().avx512 {
        let w = packed_f32(&b)?;
        out.push(time("matmul f32 4096x1280@1280x1280 (ours, AVX-512)", runs, || { w.forward(&a)?; Ok(()) })?);
    }
    // int8 weights (q8_0) at the UNet's projection shapes: ours (VNNI) and candle's QMatMul.
    for (m, k, n) in [(4096, 1280, 1280), (16384, 320, 320), (16384, 320, 2560)] {
        let x = randn(&[m, k], 1.0)?;
        let w = randn(&[n, k], 0.05)?;
        let q = candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)?;
        if cpu().avx512_vnni {
            let ours = kernels::Q8Matrix::new(&q)?;
            out.push(time(&format!("matmul q8_0 {m}x{k}@{k}x{n} (ours)"), runs, || { ours.forward(&x)?; Ok(()) })?);
        }
        let qm = candle_core::quantized::QMatMul::from_qtensor(q)?;
        out.push(time(&format!("matmul q8_0 {m}x{k}@{k}x{n} (candle)"), runs, || { candle_core::Module::forward(&qm, &x)?; Ok(()) })?);
        let wt = w.t()?.contiguous()?;
        out.push(time(&format!("matmul f32 {m}x{k}@{k}x{n}"), runs, || { x.matmul(&wt)?; Ok(()) })?);
        if cpu().avx512 {
            let ours = packed_f32(&wt)?;
            out.push(time(&format!("matmul f32 {m}x{k}@{k}x{n} (ours, AVX-512)"), runs, || { ours.forward(&x)?; Ok(()) })?);
        }
    }
    let (ab, bb) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
    out.push(time("matmul bf16 4096x1280@1280x1280", runs, || { ab.matmul(&bb)?; Ok(()) })?);
    if cpu().amx {
        // f32 in and out, bf16 products on AMX (the weight packed once, as a layer would).
        let w = kernels::Bf16Matrix::new(&b.t()?.contiguous()?, None)?;
        out.push(time("matmul bf16 4096x1280@1280x1280 (ours, AMX)", runs, || { w.forward(&a)?; Ok(()) })?);
        for (m, k, n) in [(16384, 320, 320), (16384, 320, 2560)] {
            let (x, w) = (randn(&[m, k], 1.0)?, kernels::Bf16Matrix::new(&randn(&[n, k], 0.05)?, None)?);
            out.push(time(&format!("matmul bf16 {m}x{k}@{k}x{n} (ours, AMX)"), runs, || { w.forward(&x)?; Ok(()) })?);
        }
    }
    if cpu().avx512_bf16 {
        // f32 in and out, bf16 pair products (`vdpbf16ps`): the bf16 mode without AMX.
        let w = kernels::Bf16DotMatrix::new(&b.t()?.contiguous()?, None)?;
        out.push(time("matmul bf16 4096x1280@1280x1280 (ours, AVX512-BF16)", runs, || { w.forward(&a)?; Ok(()) })?);
        for (m, k, n) in [(16384, 320, 320), (16384, 320, 2560)] {
            let (x, w) = (randn(&[m, k], 1.0)?, kernels::Bf16DotMatrix::new(&randn(&[n, k], 0.05)?, None)?);
            out.push(time(&format!("matmul bf16 {m}x{k}@{k}x{n} (ours, AVX512-BF16)"), runs, || { w.forward(&x)?; Ok(()) })?);
        }
    }
    let (wb, xb) = (w.to_dtype(DType::BF16)?, randn(&[16, 320, 32, 32], 1.0)?.to_dtype(DType::BF16)?);
    match xb.conv2d(&wb, 1, 1, 1, 1) {
        Ok(_) => out.push(time("conv2d bf16 16x320x32x32 k3", runs, || { xb.conv2d(&wb, 1, 1, 1, 1)?; Ok(()) })?),
        Err(e) => println!("{:<44} unsupported ({})", "conv2d bf16 16x320x32x32 k3", e.to_string().lines().next().unwrap_or("")),
    }
    let qkv = |b, l| -> Result<[Tensor; 3]> { Ok([randn(&[b, l, 64], 1.0)?, randn(&[b, l, 64], 1.0)?, randn(&[b, l, 64], 1.0)?]) };
    let [q, k, v] = qkv(16 * 5, 1024)?;
    out.push(time("sdpa f32 spatial 16x5x1024x64 (ours)", runs, || { kernels::attention(&q, &k, &v, 0.125)?; Ok(()) })?);
    out.push(time("attn naive f32 spatial (candle)", runs, || { kernels::attention_reference(&q, &k, &v, 0.125)?; Ok(()) })?);
    if kernels::amx_attention::supports(&q, &k, &v, 1) {
        // The same attention in the UNet's bf16 mode: heads merged in the last dimension.
        let merged = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((16, 5, 1024, 64))?.transpose(1, 2)?.reshape((16, 1024, 320))?) };
        let (qm, km, vm) = (merged(&q)?, merged(&k)?, merged(&v)?);
        out.push(time("sdpa bf16 spatial 16x5x1024x64 (ours, AMX)", runs, || { kernels::amx_attention::attention(&qm, &km, &vm, 5, 0.125)?; Ok(()) })?);
    }
    let [q, k, v] = qkv(1024 * 5, 16)?;
    out.push(time("sdpa f32 temporal 1024x5x16x64 (ours)", runs, || { kernels::attention(&q, &k, &v, 0.125)?; Ok(()) })?);
    out.push(time("attn naive f32 temporal (candle)", runs, || { kernels::attention_reference(&q, &k, &v, 0.125)?; Ok(()) })?);
    let x = randn(&[16, 320, 32, 32], 1.0)?;
    let (g, bb) = (Tensor::ones(320, DType::F32, &Device::Cpu)?, Tensor::zeros(320, DType::F32, &Device::Cpu)?);
    out.push(time("group_norm f32 16x320x32x32 g32 (ours)", runs, || { kernels::group_norm(&x, &g, &bb, 32, 1e-5, false)?; Ok(()) })?);
    out.push(time("group_norm f32 16x320x32x32 g32 (candle)", runs, || { kernels::group_norm_reference(&x, &g, &bb, 32, 1e-5, false)?; Ok(()) })?);
    // The temporal transformer's layout change at the first level (b, c, t, h, w) → (b, h, w, t, c).
    let video = randn(&[1, 320, 16, 32, 32], 1.0)?;
    out.push(time("permute f32 1x320x16x32x32 to tokens (ours)", runs, || { kernels::permute(&video, &[0, 3, 4, 2, 1])?; Ok(()) })?);
    out.push(time("permute f32 1x320x16x32x32 to tokens (candle)", runs, || { kernels::permute_reference(&video, &[0, 3, 4, 2, 1])?; Ok(()) })?);
    let s = randn(&[80, 1024, 1024], 1.0)?;
    out.push(time("softmax f32 80x1024x1024 (ours)", runs, || { kernels::softmax_last_dim(&s)?; Ok(()) })?);
    out.push(time("softmax f32 80x1024x1024 (candle)", runs, || { candle_nn_softmax(&s)?; Ok(()) })?);
    Ok(out)
}

fn candle_nn_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

