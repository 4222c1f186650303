//! Convolutions: the UNet's and VAE's 3×3 (plain and downsampling), 1×1 and temporal
//! convolutions on whichever kernel the backend picks; candle's `Conv2d` for the rest.

use crate::compute::{Backend, Kernel};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use dynamicrafter_kernels::{Bf16Conv, Bf16DotConv, Bf16DotTemporalConv, ConvExtras, ConvNorm, F32Conv, Q8Conv};
use std::sync::Arc;

/// candle's `Conv2d`, which on the CPU also takes bf16/f16 inputs (candle has no such CPU
/// convolution): they are computed in f32, as GPUs accumulate, and rounded back. Pointwise (1×1)
/// ones on CUDA are one product and our bias epilogue ([`dynamicrafter_kernels::conv1x1`]).
#[derive(Debug, Clone)]
pub struct Conv2d(candle_nn::Conv2d);

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (w, cfg) = (self.0.weight(), self.0.config());
        // A pointwise convolution as one product where the op API has the kernels for it (CUDA).
        let pointwise = w.dims()[2..] == [1, 1] && cfg.stride == 1 && cfg.padding == 0 && cfg.dilation == 1 && cfg.groups == 1;
        if pointwise && dynamicrafter_kernels::conv1x1_supported(xs, w, self.0.bias()) {
            return dynamicrafter_kernels::conv1x1(xs, w, self.0.bias());
        }
        if xs.device().is_cpu() && (xs.dtype() != DType::F32 || self.0.weight().dtype() != DType::F32) {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let conv = candle_nn::Conv2d::new(f32(self.0.weight())?, self.0.bias().map(f32).transpose()?, *self.0.config());
            return conv.forward(&f32(xs)?)?.to_dtype(xs.dtype());
        }
        self.0.forward(xs)
    }
}

pub fn conv2d(in_c: usize, out_c: usize, kernel: usize, padding: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb).map(Conv2d)
}

/// A convolution candle computes (the UNet's strided downsampling off CUDA; its 1×1 skips off
/// the bf16 pair kernel), its weight
/// kept in the dtype the backend stores such weights in (bf16 in the CPU's bf16 mode: half the
/// memory, converted to f32 for each product).
pub fn stored_conv2d(in_c: usize, out_c: usize, kernel: usize, padding: usize, stride: usize, vb: VarBuilder, backend: &Backend) -> Result<Conv2d> {
    let conv = conv2d(in_c, out_c, kernel, padding, stride, vb.clone())?.0;
    let weight = conv.weight().to_dtype(backend.stored_dtype(&vb, "weight"))?;
    Ok(Conv2d(candle_nn::Conv2d::new(weight, conv.bias().cloned(), *conv.config())))
}

pub fn conv2d_no_bias(in_c: usize, out_c: usize, kernel: usize, padding: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d_no_bias(in_c, out_c, kernel, cfg, vb).map(Conv2d)
}

/// A 1×1 convolution with bias (the UNet's skip connections).
#[derive(Debug, Clone)]
pub enum Conv1x1 {
    Candle(Conv2d),
    /// bf16 pair products on AVX512-BF16 (the temporal conv's kernel with one tap).
    Bf16Pairs(Arc<Bf16DotTemporalConv>),
}

impl Module for Conv1x1 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(conv) => conv.forward(xs),
            Self::Bf16Pairs(conv) => conv.forward_2d(xs),
        }
    }
}

pub fn conv1x1(in_c: usize, out_c: usize, vb: VarBuilder, backend: &Backend) -> Result<Conv1x1> {
    Ok(match backend.conv1x1(&vb) {
        Kernel::Avx512Bf16 => {
            let (weight, bias) = (vb.get((out_c, in_c, 1, 1), "weight")?, vb.get(out_c, "bias")?);
            Conv1x1::Bf16Pairs(Arc::new(Bf16DotTemporalConv::pointwise(&weight, &bias)?))
        }
        _ => Conv1x1::Candle(stored_conv2d(in_c, out_c, 1, 0, 1, vb, backend)?),
    })
}

/// The UNet's downsampling: 3×3, stride 2, padding 1, with bias.
#[derive(Debug, Clone)]
pub enum Downsample {
    /// candle's strided convolution (im2col), its weight as the backend stores such weights.
    Candle(Conv2d),
    /// The op API (CUDA's implicit GEMM), the weight taps first `(9, co, ci)`, rearranged once at load.
    Taps { taps: Tensor, bias: Tensor },
}

impl Module for Downsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(conv) => conv.forward(xs),
            Self::Taps { taps, bias } => dynamicrafter_kernels::conv3x3_taps_strided(xs, taps, bias),
        }
    }
}

pub fn downsample(c: usize, vb: VarBuilder, backend: &Backend) -> Result<Downsample> {
    Ok(match backend.downsample(&vb) {
        Kernel::Cuda => {
            let weight = vb.get((c, c, 3, 3), "weight")?;
            Downsample::Taps { taps: dynamicrafter_kernels::taps_first(&backend.float_weight(&vb, "weight", weight)?)?, bias: vb.get(c, "bias")? }
        }
        _ => Downsample::Candle(stored_conv2d(c, c, 3, 1, 2, vb, backend)?),
    })
}

/// 3×3 convolution, stride 1, padding 1, with bias (every such conv of the UNet and VAE).
#[derive(Debug, Clone)]
pub enum Conv3x3 {
    /// The op API's shifted GEMMs (the CPU's portable kernel, CUDA, candle elsewhere), the
    /// weight taps first, `(9, co, ci)` (rearranged once, at load).
    Shifted { taps: Tensor, bias: Tensor },
    Int8(Arc<Q8Conv>),
    Bf16(Arc<Bf16Conv>),
    /// bf16 pair products on AVX512-BF16 (Winograd form).
    Bf16Pairs(Arc<Bf16DotConv>),
    F32(Arc<F32Conv>),
    /// cuDNN, the weight as stored `(co, ci, 3, 3)`.
    Cudnn { weight: Tensor, bias: Tensor },
}

impl Module for Conv3x3 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Shifted { taps, bias } => dynamicrafter_kernels::conv3x3_taps(xs, taps, bias),
            Self::Int8(conv) => conv.forward(&xs.to_dtype(DType::F32)?)?.to_dtype(xs.dtype()),
            Self::Bf16(conv) => conv.forward(xs),
            Self::Bf16Pairs(conv) => conv.forward(xs),
            Self::F32(conv) => conv.forward(xs),
            Self::Cudnn { weight, bias } => dynamicrafter_kernels::conv3x3_cudnn(xs, weight, bias),
        }
    }
}

impl Conv3x3 {
    /// The convolution of `xs (n, c, h, w)` upsampled 2× (nearest): on CUDA the upsample is part
    /// of the convolution's input copy.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Shifted { taps, bias } => dynamicrafter_kernels::conv3x3_taps_upsampled(xs, taps, bias),
            _ => {
                let (_, _, h, w) = xs.dims4()?;
                self.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }

    /// The convolution plus `extras` (a bias per sample, a residual): in the kernel where it
    /// takes them (CUDA's implicit GEMM), added after it otherwise.
    pub fn forward_with(&self, xs: &Tensor, extras: ConvExtras) -> Result<Tensor> {
        match self {
            Self::Shifted { taps, bias } => dynamicrafter_kernels::conv3x3_taps_with(xs, taps, bias, extras),
            _ => extras.add_to(self.forward(xs)?),
        }
    }

    /// [`forward_with`](Self::forward_with) of `norm(xs)`: on CUDA's implicit GEMM the norm is
    /// applied in the convolution's input copy.
    pub fn forward_normed(&self, xs: &Tensor, norm: &ConvNorm, extras: ConvExtras) -> Result<Tensor> {
        match self {
            Self::Shifted { taps, bias } => dynamicrafter_kernels::conv3x3_taps_normed(xs, norm, taps, bias, extras),
            _ => self.forward_with(&norm.apply(xs)?, extras),
        }
    }
}

pub fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder, backend: &Backend) -> Result<Conv3x3> {
    let weight = vb.get((out_c, in_c, 3, 3), "weight")?;
    let bias = vb.get(out_c, "bias")?;
    Ok(match backend.conv3x3(&vb, in_c, out_c) {
        // Quantized in (tap, channel) blocks, the order the int8 kernel reads.
        Kernel::VnniQ8 => Conv3x3::Int8(Arc::new(Q8Conv::spatial_3x3(&weight, &bias)?)),
        Kernel::AmxBf16 => Conv3x3::Bf16(Arc::new(Bf16Conv::spatial_3x3(&weight, &bias)?)),
        Kernel::Avx512Bf16 => Conv3x3::Bf16Pairs(Arc::new(Bf16DotConv::spatial_3x3(&weight, &bias)?)),
        Kernel::Avx512F32 => Conv3x3::F32(Arc::new(F32Conv::spatial_3x3(&backend.float_weight(&vb, "weight", weight)?, &bias)?)),
        Kernel::Cudnn => Conv3x3::Cudnn { weight: backend.float_weight(&vb, "weight", weight)?, bias },
        _ => Conv3x3::Shifted { taps: dynamicrafter_kernels::taps_first(&backend.float_weight(&vb, "weight", weight)?)?, bias },
    })
}

/// The temporal Conv3d, kernel (3,1,1), padding (1,0,0), over `(b, c, t, h·w)`.
#[derive(Debug, Clone)]
pub enum TemporalConv {
    /// The op API's shifted GEMMs.
    Shifted { weight: Tensor, bias: Tensor },
    /// The op API on CUDA (implicit or shifted GEMMs), the weight taps first `(3, co, ci)`,
    /// rearranged once at load.
    Taps { taps: Tensor, bias: Tensor },
    Bf16(Arc<Bf16Conv>),
    /// bf16 pair products on AVX512-BF16.
    Bf16Pairs(Arc<Bf16DotTemporalConv>),
    /// cuDNN, as a 2-D convolution over (t, h·w): the weight `(co, ci, 3, 1)`.
    Cudnn { weight: Tensor, bias: Tensor },
}

impl Module for TemporalConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Shifted { weight, bias } => dynamicrafter_kernels::temporal_conv(xs, weight, bias),
            Self::Taps { taps, bias } => dynamicrafter_kernels::temporal_conv_taps_with(xs, taps, bias, ConvExtras::default()),
            Self::Bf16(conv) => conv.forward(xs),
            Self::Bf16Pairs(conv) => conv.forward(xs),
            Self::Cudnn { weight, bias } => dynamicrafter_kernels::temporal_conv_cudnn(xs, weight, bias),
        }
    }
}

impl TemporalConv {
    /// The convolution plus `extras`, as [`Conv3x3::forward_with`].
    pub fn forward_with(&self, xs: &Tensor, extras: ConvExtras) -> Result<Tensor> {
        match self {
            Self::Shifted { weight, bias } => dynamicrafter_kernels::temporal_conv_with(xs, weight, bias, extras),
            Self::Taps { taps, bias } => dynamicrafter_kernels::temporal_conv_taps_with(xs, taps, bias, extras),
            _ => extras.add_to(self.forward(xs)?),
        }
    }

    /// [`forward_with`](Self::forward_with) of `norm(xs)`, as [`Conv3x3::forward_normed`].
    pub fn forward_normed(&self, xs: &Tensor, norm: &ConvNorm, extras: ConvExtras) -> Result<Tensor> {
        match self {
            Self::Taps { taps, bias } => dynamicrafter_kernels::temporal_conv_taps_normed(xs, norm, taps, bias, extras),
            _ => self.forward_with(&norm.apply(xs)?, extras),
        }
    }

    /// Whether [`forward_frames_normed`](Self::forward_frames_normed) takes frames `xs (b·t, c,
    /// h, w)` (`frames` = t) with `norm` without permutes (CUDA's implicit GEMM).
    pub fn takes_frames(&self, xs: &Tensor, frames: usize, norm: &ConvNorm) -> bool {
        match self {
            Self::Taps { taps, bias } => dynamicrafter_kernels::temporal_conv_frames_supported(xs, frames, norm, taps, bias),
            _ => false,
        }
    }

    /// [`forward_normed`](Self::forward_normed) of a video held as frames `xs (b·t, c, h, w)`
    /// (`frames` = t), output and residual likewise. Only where
    /// [`takes_frames`](Self::takes_frames) says so: elsewhere it permutes both ways.
    pub fn forward_frames_normed(&self, xs: &Tensor, frames: usize, norm: &ConvNorm, extras: ConvExtras) -> Result<Tensor> {
        match self {
            Self::Taps { taps, bias } => dynamicrafter_kernels::temporal_conv_taps_frames_normed(xs, frames, norm, taps, bias, extras),
            _ => candle_core::bail!("temporal conv: frames in, frames out only on CUDA's implicit GEMM"),
        }
    }
}

/// A temporal conv from `c` to `c` channels, stored `[c, c, 3, 1, 1]`.
pub fn temporal_conv(c: usize, vb: VarBuilder, backend: &Backend) -> Result<TemporalConv> {
    let weight = vb.get((c, c, 3, 1, 1), "weight")?;
    let bias = vb.get(c, "bias")?;
    Ok(match backend.temporal_conv(&vb, c) {
        Kernel::AmxBf16 => TemporalConv::Bf16(Arc::new(Bf16Conv::temporal(&weight, &bias)?)),
        Kernel::Avx512Bf16 => TemporalConv::Bf16Pairs(Arc::new(Bf16DotTemporalConv::new(&weight, &bias)?)),
        Kernel::Cudnn => TemporalConv::Cudnn { weight: backend.float_weight(&vb, "weight", weight)?.squeeze(4)?, bias },
        Kernel::Cuda => TemporalConv::Taps { taps: dynamicrafter_kernels::taps_first(&backend.float_weight(&vb, "weight", weight)?)?, bias },
        _ => TemporalConv::Shifted { weight: backend.float_weight(&vb, "weight", weight)?, bias },
    })
}
