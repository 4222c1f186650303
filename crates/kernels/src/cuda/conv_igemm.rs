//! Convolutions as implicit GEMMs on tensor cores (`conv_igemm.cu`): the input copied once to
//! channels-last with its zero padding, then every tap and input channel of an output tile
//! (128 channels × 128 or 256 positions, or 64 × 256, across samples) accumulated in registers, bias and
//! extras added on the way out. For f16/bf16 with input channels a multiple of 32 (every UNet
//! convolution but the first); the shifted cuBLAS GEMMs of `mod.rs` take the rest (f32, the
//! 8-channel input convolution).

use candle_core::{DType, Result, Tensor};

/// Input channels per stage of the kernel: `ci` must be a multiple.
const CHANNEL_STEP: usize = 32;

/// Whether the implicit-GEMM kernel takes `x (…, ci, …)` with `w_taps (taps, co, ci)`: a CUDA
/// build, a GPU, f16/bf16 throughout, `ci` a multiple of 32. `DYNAMICRAFTER_CONV_IGEMM=0` keeps
/// the shifted GEMMs (A/B benchmarks).
pub fn supported(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> bool {
    supported_upsampled(x, w_taps, bias, 1)
}

/// [`supported`] for [`conv3x3_upsampled`] by `up` (the padded copy's rows grow with it).
pub fn supported_upsampled(x: &Tensor, w_taps: &Tensor, bias: &Tensor, up: usize) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| super::family_enabled("DYNAMICRAFTER_CONV_IGEMM"));
    let dtype = x.dtype();
    enabled
        && super::on_gpu(x)
        && matches!(dtype, DType::BF16 | DType::F16)
        && w_taps.dtype() == dtype
        && bias.dtype() == dtype
        && x.rank() == 4
        && w_taps.rank() == 3
        && x.dim(1).is_ok_and(|ci| ci > 0 && ci.is_multiple_of(CHANNEL_STEP) && w_taps.dim(2).ok() == Some(ci))
        // Something to compute (an empty grid is a launch error), and the channels-last copy's
        // grid has a block row per (sample, padded row): at most 65535.
        && x.elem_count() > 0
        && w_taps.elem_count() > 0
        && x.dim(0).and_then(|n| Ok(n * (x.dim(2)? * up + 2))).is_ok_and(|rows| rows <= 65535)
        && (up == 1 || x.rank() == 4 && w_taps.dim(0).ok() == Some(9))
}

/// What the kernel adds besides the bias, on the way out: a bias per sample and output channel
/// `(n, co)`, and a residual of the output's shape.
#[derive(Clone, Copy, Default)]
pub struct Extras<'a> {
    pub per_sample: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
}

impl Extras<'_> {
    /// `y (n, co, …)` with the extras added, by candle's ops: where no kernel fuses them.
    pub fn add_to(&self, y: Tensor) -> Result<Tensor> {
        let y = match self.per_sample {
            Some(e) => {
                let mut shape = e.dims().to_vec();
                shape.resize(y.rank(), 1);
                y.broadcast_add(&e.reshape(shape)?)?
            }
            None => y,
        };
        match self.residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// 3×3 convolution, stride 1, padding 1, of `x (n, ci, h, w)` with `w_taps (9, co, ci)`, bias
/// `(co)` and `extras`.
pub fn conv3x3(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras) -> Result<Tensor> {
    conv3x3_general(x, w_taps, bias, extras, Scale::Same, None, None)
}

/// [`conv3x3`] of `x` upsampled 2× (nearest), `(n, co, 2h, 2w)`: the upsample happens in the
/// channels-last copy, so the 4× larger upsampled image is never written on its own (candle's
/// upsample computes every element's source with 64-bit divisions).
pub fn conv3x3_upsampled(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv3x3_general(x, w_taps, bias, Extras::default(), Scale::Up2, None, None)
}

/// 3×3 convolution, stride 2, padding 1 (the UNet's downsampling): `(n, co, ⌈h/2⌉, ⌈w/2⌉)`,
/// read straight from the channels-last copy (candle's strided convolution writes a 9× im2col
/// matrix first).
pub fn conv3x3_strided(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv3x3_general(x, w_taps, bias, Extras::default(), Scale::Stride2, None, None)
}

/// A GroupNorm (+ SiLU) ahead of a convolution, applied in the implicit GEMM's channels-last
/// copy: the normalised activation is never written on its own (a residual block's two 3×3
/// convolutions and its temporal block's four, each after its norm).
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl Norm<'_> {
    /// The group norm on its own (where the convolution cannot take it).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm(x, self.weight, self.bias, self.groups, self.eps, self.silu)
    }
}

/// Whether [`conv3x3_normed`] / [`temporal_conv_normed`] take `x` with `norm`: as [`supported`],
/// the norm's weight and bias of `x`'s dtype, our group norm kernels in use (its statistics pass
/// runs first) and a grid they can cover; `DYNAMICRAFTER_CONV_NORM=0` keeps the norm a pass of
/// its own (A/B benchmarks).
pub fn supported_normed(x: &Tensor, w_taps: &Tensor, bias: &Tensor, norm: &Norm) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::family_enabled("DYNAMICRAFTER_CONV_NORM")) && supported(x, w_taps, bias) && norm_fits(x, norm)
}

/// The norm's side of the checks: our group norm kernels in use, its weight and bias of `x`'s
/// dtype and channels, groups that divide the channels, a statistics grid of at most 65535 rows.
fn norm_fits(x: &Tensor, norm: &Norm) -> bool {
    super::group_norm_enabled()
        && norm.weight.dtype() == x.dtype()
        && norm.bias.dtype() == x.dtype()
        && x.dim(1).is_ok_and(|c| norm.groups > 0 && c.is_multiple_of(norm.groups) && norm.weight.elem_count() == c && norm.bias.elem_count() == c)
        && x.dim(0).is_ok_and(|n| n * norm.groups <= 65535)
}

/// `norm(x)` of `x (n, c, h, w)` as tokens `(n, h·w, c)`: the channels-last copy without padding,
/// normalising on the way (a spatial transformer's entry: its group norm and the permute to
/// tokens in one pass). Where [`supported_tokens`] says so.
pub fn normalized_tokens(x: &Tensor, norm: &Norm) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    channels_last(x, 1, 0, 0, 1, Some(norm))?.reshape((n, h * w, c))
}

/// `norm(x)` of frames `x (b·t, c, h, w)` (`frames` = t), normalised as the video they are, as
/// tokens across frames `(b·h·w, t, c)`: a temporal transformer's entry (the permute to the video,
/// its group norm and the permute to tokens) in one pass. Where [`supported_frame_tokens`] says so.
pub fn normalized_frame_tokens(x: &Tensor, frames: usize, norm: &Norm) -> Result<Tensor> {
    let (bt, c, h, w) = x.dims4()?;
    if frames == 0 || bt % frames != 0 {
        candle_core::bail!("tokens across frames: {bt} frames are not videos of {frames}");
    }
    let x = x.contiguous()?;
    let copy = ChannelsLast { frames, pad_r: 0, pad_c: 0, up: 1, norm: Some(CopyNorm::of(&x, frames, norm)?), frame_tokens: true };
    x.apply_op1_no_bwd(&copy)?.reshape((bt / frames * h * w, frames, c))
}

/// Whether [`normalized_frame_tokens`] takes frames `x (b·t, c, h, w)` (`frames` = t) with
/// `norm`: as [`supported_tokens`], t dividing the leading dimension; unless
/// `DYNAMICRAFTER_CUDA_FRAMES=0`.
pub fn supported_frame_tokens(x: &Tensor, frames: usize, norm: &Norm) -> bool {
    frames_fit(x, frames) && supported_tokens(x, norm)
}

/// Whether the kernels read `x (b·t, …)` as videos of `frames` = t frames where it lies (the
/// temporal blocks' convolutions, the temporal transformers' entries): t dividing the leading
/// dimension, unless `DYNAMICRAFTER_CUDA_FRAMES=0` permutes it to the video layout first, as
/// before (A/B benchmarks).
fn frames_fit(x: &Tensor, frames: usize) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::family_enabled("DYNAMICRAFTER_CUDA_FRAMES")) && frames > 0 && x.dim(0).is_ok_and(|n| n.is_multiple_of(frames))
}

/// Whether [`normalized_tokens`] takes `x` with `norm`: a CUDA f16/bf16 tensor `(n, c, h, w)`, the
/// norm's tensors of its dtype, grids the copy and the statistics pass can cover.
pub fn supported_tokens(x: &Tensor, norm: &Norm) -> bool {
    super::on_gpu(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.rank() == 4
        && x.elem_count() > 0
        // The copy's grid has a block row per (sample, row).
        && x.dim(0).is_ok_and(|n| x.dim(2).is_ok_and(|h| n * h <= 65535))
        && norm_fits(x, norm)
}

/// [`conv3x3`] of `norm(x)`.
pub fn conv3x3_normed(x: &Tensor, norm: &Norm, w_taps: &Tensor, bias: &Tensor, extras: Extras) -> Result<Tensor> {
    conv3x3_general(x, w_taps, bias, extras, Scale::Same, None, Some(norm))
}

/// [`temporal_conv`] of `norm(x)` (the norm over `x (b, c, t, s)` as it lies: groups of channels
/// across every frame).
pub fn temporal_conv_normed(x: &Tensor, norm: &Norm, w_taps: &Tensor, bias: &Tensor, extras: Extras) -> Result<Tensor> {
    temporal_conv_general(x, w_taps, bias, extras, None, Some(norm))
}

/// [`temporal_conv`] of `norm(x)` for a video held as frames: `x (b·t, ci, h, w)` with `frames`
/// = t, normalised as the video `(b, ci, t, h·w)` it is; the output `(b·t, co, h, w)` and the
/// extras' residual likewise. A temporal block's convolutions without the permutes to the video
/// layout and back: the copy reads frames, the kernel writes them. Where [`supported_frames`]
/// says so.
pub fn temporal_conv_frames(x: &Tensor, frames: usize, norm: &Norm, w_taps: &Tensor, bias: &Tensor, extras: Extras) -> Result<Tensor> {
    let (bt, _, h, w) = x.dims4()?;
    let (s, co) = (h * w, w_taps.dim(1)?);
    let xp = channels_last(x, frames, 1, 0, 1, Some(norm))?;
    let residual = extras.residual.map(|r| r.reshape((bt, co, s))).transpose()?;
    let extras = Extras { per_sample: extras.per_sample, residual: residual.as_ref() };
    let geometry = Geometry { rows: frames, cols: s, cols_padded: s, kw: 1, row_step: s, stride: 1 };
    convolve(&xp, w_taps, bias, extras, geometry, None, true)?.reshape((bt, co, h, w))
}

/// Whether [`temporal_conv_frames`] takes `x (b·t, ci, h, w)` as `frames` = t frames per video
/// with `norm`: as [`supported_normed`], t dividing the leading dimension; unless
/// `DYNAMICRAFTER_CUDA_FRAMES=0`.
pub fn supported_frames(x: &Tensor, frames: usize, w_taps: &Tensor, bias: &Tensor, norm: &Norm) -> bool {
    frames_fit(x, frames) && supported_normed(x, w_taps, bias, norm)
}

/// [`conv3x3`] on a given tile shape and pipeline depth (A/B benchmarks).
pub fn conv3x3_on(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras, tile: Tile) -> Result<Tensor> {
    conv3x3_general(x, w_taps, bias, extras, Scale::Same, Some(tile), None)
}

/// How the output's grid relates to the input's.
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Same,
    /// The input upsampled 2× (nearest) first.
    Up2,
    /// Every second position (stride 2).
    Stride2,
}

/// `tile`: none for [`Tile::for_channels`].
fn conv3x3_general(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras, scale: Scale, tile: Option<Tile>, norm: Option<&Norm>) -> Result<Tensor> {
    let (n, _, h, w) = x.dims4()?;
    let up = if scale == Scale::Up2 { 2 } else { 1 };
    let stride = if scale == Scale::Stride2 { 2 } else { 1 };
    let xp = channels_last(x, 1, 1, 1, up, norm)?;
    let (h_p, w_p) = (h * up + 2, w * up + 2);
    // Output side of a 3-tap window at `stride` over the padded side.
    let (rows, cols) = ((h_p - 3) / stride + 1, (w_p - 3) / stride + 1);
    let co = w_taps.dim(1)?;
    let geometry = Geometry { rows, cols, cols_padded: w_p, kw: 3, row_step: w_p, stride };
    convolve(&xp, w_taps, bias, extras, geometry, tile, false)?.reshape((n, co, rows, cols))
}

/// Conv3d with kernel (3,1,1), padding (1,0,0) of `x (b, ci, t, s)` with `w_taps (3, co, ci)`.
pub fn temporal_conv(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras) -> Result<Tensor> {
    temporal_conv_general(x, w_taps, bias, extras, None, None)
}

/// [`temporal_conv`] on a given tile shape and pipeline depth (A/B benchmarks).
pub fn temporal_conv_on(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras, tile: Tile) -> Result<Tensor> {
    temporal_conv_general(x, w_taps, bias, extras, Some(tile), None)
}

fn temporal_conv_general(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras, tile: Option<Tile>, norm: Option<&Norm>) -> Result<Tensor> {
    let (b, _, t, s) = x.dims4()?;
    let xp = channels_last(x, 1, 1, 0, 1, norm)?;
    let co = w_taps.dim(1)?;
    let geometry = Geometry { rows: t, cols: s, cols_padded: s, kw: 1, row_step: s, stride: 1 };
    convolve(&xp, w_taps, bias, extras, geometry, tile, false)?.reshape((b, co, t, s))
}

/// The kernel's tile shapes and pipeline depths (`conv_igemm.cu` has one kernel for each): 128
/// output channels × 128 or 256 positions per block, or 64 × 256, with 2–4 shared-memory buffers
/// of 32 input channels in flight. `DYNAMICRAFTER_CONV_IGEMM_TILE=128x128s2|128x128s3|128x128s4|
/// 128x256s3|64x256s3` picks one for every convolution without a rebuild; by default
/// [`for_channels`](Self::for_channels) picks by the output channels, until a device session
/// measures the tiles side by side (ops-1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    C128P128S2,
    C128P128S3,
    C128P128S4,
    C128P256S3,
    C64P256S3,
}

impl Tile {
    pub const ALL: [Tile; 5] = [Tile::C128P128S2, Tile::C128P128S3, Tile::C128P128S4, Tile::C128P256S3, Tile::C64P256S3];

    /// As `DYNAMICRAFTER_CONV_IGEMM_TILE` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Tile::C128P128S2 => "128x128s2",
            Tile::C128P128S3 => "128x128s3",
            Tile::C128P128S4 => "128x128s4",
            Tile::C128P256S3 => "128x256s3",
            Tile::C64P256S3 => "64x256s3",
        }
    }

    /// Output channels per block.
    pub fn channels(self) -> usize {
        if self == Tile::C64P256S3 { 64 } else { 128 }
    }

    /// Output positions per block.
    pub fn positions(self) -> usize {
        match self {
            Tile::C128P256S3 | Tile::C64P256S3 => 256,
            _ => 128,
        }
    }

    pub fn stages(self) -> usize {
        match self {
            Tile::C128P128S2 => 2,
            Tile::C128P128S3 | Tile::C128P256S3 | Tile::C64P256S3 => 3,
            Tile::C128P128S4 => 4,
        }
    }

    /// Dynamic shared memory of a block, bytes: each stage holds the tile's weight rows and its
    /// input rows, 32 + 8 elements each (the 8 keep ldmatrix's rows on distinct banks).
    pub fn shared_bytes(self, element_bytes: usize) -> usize {
        self.stages() * (self.channels() + self.positions()) * (CHANNEL_STEP + 8) * element_bytes
    }

    /// The tile for a convolution to `co` channels: the one `DYNAMICRAFTER_CONV_IGEMM_TILE`
    /// names, else 64 × 256 where `co` is an odd multiple of 64 (the first level's 320 channels
    /// fill 2.5 tiles of 128, 5 of 64), else the deepest 128 × 128 pipeline.
    pub fn for_channels(co: usize) -> Tile {
        match Tile::setting() {
            (Some(tile), _) => tile,
            _ if !co.is_multiple_of(128) && co.is_multiple_of(64) => Tile::C64P256S3,
            _ => Tile::C128P128S4,
        }
    }

    /// The tile `DYNAMICRAFTER_CONV_IGEMM_TILE` names (none: the choice by channels), and the
    /// variable's value where it names no tile (the choice by channels serves then; the run
    /// report says so).
    pub fn setting() -> (Option<Tile>, Option<&'static str>) {
        static SETTING: std::sync::OnceLock<(Option<Tile>, Option<String>)> = std::sync::OnceLock::new();
        let (tile, unknown) = SETTING.get_or_init(|| match std::env::var("DYNAMICRAFTER_CONV_IGEMM_TILE") {
            Ok(name) => match Tile::ALL.into_iter().find(|t| t.name() == name) {
                Some(tile) => (Some(tile), None),
                None => (None, Some(name)),
            },
            Err(_) => (None, None),
        });
        (*tile, unknown.as_deref())
    }
}

/// `x (n, c, rows, cols)` upsampled by `up` (nearest), group-normalised by `norm` where given
/// (statistics of `x` first) → `(n, rows·up + 2·pad_r, cols·up + 2·pad_c, c)`, zeros in the border.
/// With `frames` > 1, `x (n·frames, c, h, w)` is read as the video `(n, c, frames, h·w)`.
fn channels_last(x: &Tensor, frames: usize, pad_r: usize, pad_c: usize, up: usize, norm: Option<&Norm>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let norm = norm.map(|n| CopyNorm::of(&x, frames, n)).transpose()?;
    x.apply_op1_no_bwd(&ChannelsLast { frames, pad_r, pad_c, up, norm, frame_tokens: false })
}

/// `xp` channels-last and padded (`n, rows_p, cols_padded, ci`) → `(n, co, rows·cols)`, or with
/// `frames_out` `(n·rows, co, cols)` (rows are frames).
fn convolve(xp: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: Extras, geometry: Geometry, tile: Option<Tile>, frames_out: bool) -> Result<Tensor> {
    // cp.async reads 16-byte chunks: the weight must start on an 8-element boundary (a forced
    // copy starts at 0; `copy` would keep the offset).
    let w = w_taps.contiguous()?;
    let w = if w.layout().start_offset() % 8 == 0 { w } else { w.force_contiguous()? };
    let (n, co) = (xp.dim(0)?, w.dim(1)?);
    let tile = tile.unwrap_or_else(|| Tile::for_channels(co));
    // The extras ride in the op (a CustomOp takes three inputs): contiguous, of the output's
    // dtype, shaped (n, co) and like the output.
    let held = |t: Option<&Tensor>, dims: &[usize], what: &str| -> Result<Option<Tensor>> {
        t.map(|t| {
            if t.dims() != dims || t.dtype() != xp.dtype() || !t.device().same_device(xp.device()) {
                candle_core::bail!("implicit-GEMM convolution: {what} {:?} {:?}, expected {dims:?} {:?}", t.shape(), t.dtype(), xp.dtype());
            }
            t.contiguous()
        })
        .transpose()
    };
    let output = if frames_out { vec![n * geometry.rows, co, geometry.cols] } else { vec![n, co, geometry.rows, geometry.cols] };
    let op = ConvIgemm { geometry, tile, frames_out, per_sample: held(extras.per_sample, &[n, co], "bias per sample")?, residual: held(extras.residual, &output, "residual")? };
    xp.apply_op3_no_bwd(&w, &bias.contiguous()?, &op)
}

/// Where a tap reads: output position (r, c) reads the padded input at
/// `(r·cols_padded + c)·stride + (tap / kw)·row_step + tap % kw`.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Geometry {
    rows: usize,
    cols: usize,
    cols_padded: usize,
    kw: usize,
    row_step: usize,
    stride: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct ChannelsLast {
    /// Frames per video where `x (n·frames, c, h, w)` is read as `(n, c, frames, h·w)`; 1: `x` as it is.
    frames: usize,
    pad_r: usize,
    pad_c: usize,
    up: usize,
    norm: Option<CopyNorm>,
    /// The output as tokens across frames `(n, cols, rows, c)` (rows are frames; no padding),
    /// not `(n, rows_p, cols_p, c)`.
    frame_tokens: bool,
}

/// A group norm the channels-last copy applies: the statistics pass's sums `(n·groups, 2)` f64
/// (of the video where the copy reads frames),
/// the affine weight and bias.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CopyNorm {
    sums: Tensor,
    weight: Tensor,
    bias: Tensor,
    channels_per_group: usize,
    eps: f32,
    silu: bool,
}

impl CopyNorm {
    /// `norm` of contiguous `x` (as `frames`-frame videos where `frames` > 1): its statistics
    /// pass runs here.
    fn of(x: &Tensor, frames: usize, norm: &Norm) -> Result<Self> {
        Ok(Self {
            sums: super::group_sums(x, frames, norm.groups)?,
            weight: norm.weight.contiguous()?,
            bias: norm.bias.contiguous()?,
            channels_per_group: x.dim(1)? / norm.groups,
            eps: norm.eps as f32,
            silu: norm.silu,
        })
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct ConvIgemm {
    geometry: Geometry,
    tile: Tile,
    /// The output (and residual) as frames `(n·rows, co, cols)`, not `(n, co, rows·cols)`.
    frames_out: bool,
    /// `(n, co)`, added with the bias.
    per_sample: Option<Tensor>,
    /// The output's shape, added last.
    residual: Option<Tensor>,
}

cuda_op!(CustomOp1 for ChannelsLast, "dc-channels-last", |op, x, xl| {
    use candle_core::backend::BackendStorage;
    match x.dtype() {
        DType::BF16 => imp::channels_last::<half::bf16>("bf16", op, x, xl),
        DType::F16 => imp::channels_last::<half::f16>("f16", op, x, xl),
        dt => candle_core::bail!("channels-last copy: unsupported dtype {dt:?}"),
    }
});

cuda_op!(CustomOp3 for ConvIgemm, "dc-conv-igemm", |op, xp, xl, w, wl, b, bl| {
    use candle_core::backend::BackendStorage;
    match xp.dtype() {
        DType::BF16 => imp::conv::<half::bf16>("bf16", op, xp, xl, w, wl, b, bl),
        DType::F16 => imp::conv::<half::f16>("f16", op, xp, xl, w, wl, b, bl),
        dt => candle_core::bail!("implicit-GEMM convolution: unsupported dtype {dt:?}"),
    }
});

#[cfg(feature = "cuda")]
mod imp {
    use super::{ChannelsLast, ConvIgemm, CHANNEL_STEP};
    use crate::cuda::launch::{arg_or_null, carried};
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_igemm.ptx"));
    const MODULE: &str = "dynamicrafter_conv_igemm";
    /// Threads per block (the tile's channels and positions: `Tile`).
    const THREADS: u32 = 256;
    /// Dynamic shared memory a kernel gets without opting in.
    const STATIC_SHARED_LIMIT: usize = 48 * 1024;

    fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))
    }

    fn int(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("implicit-GEMM convolution: {what} {v} exceeds i32")))
    }

    /// A stride in elements, as the kernels' 64-bit offsets take it.
    fn long(v: usize) -> Result<i64> {
        i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("implicit-GEMM convolution: stride {v} exceeds i64")))
    }

    /// conv_igemm.cuh's `CopyLayout`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CopyLayout {
        in_sample: i64,
        in_channel: i64,
        in_row: i64,
        out_sample: i64,
        out_row: i64,
        out_col: i64,
    }

    // SAFETY: plain numbers, laid out as the kernel's struct (#[repr(C)]).
    unsafe impl DeviceRepr for CopyLayout {}

    pub fn channels_last<T: CudaDType + DeviceRepr>(dtype: &str, op: &ChannelsLast, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (nt, c, h, w) = xl.shape().dims4()?;
        if op.frames == 0 || !nt.is_multiple_of(op.frames) {
            candle_core::bail!("channels-last copy: {nt} frames are not videos of {}", op.frames);
        }
        // (n, c, rows, cols), and where the copy reads element (sample, channel, row, col).
        let (n, c, rows, cols, input) = if op.frames == 1 {
            (nt, c, h, w, [c * h * w, h * w, w])
        } else {
            (nt / op.frames, c, op.frames, h * w, [op.frames * c * h * w, h * w, c * h * w])
        };
        if op.frame_tokens && (op.pad_r, op.pad_c, op.up) != (0, 0, 1) {
            candle_core::bail!("channels-last copy: tokens across frames are neither padded nor upsampled");
        }
        let (x0, x1) = contiguous(xl, "x")?;
        let (rows_p, cols_p) = (rows * op.up + 2 * op.pad_r, cols * op.up + 2 * op.pad_c);
        // Where it writes element (sample, row, col, channel): (n, rows_p, cols_p, c), or tokens
        // across frames (n, cols, rows, c).
        let output = if op.frame_tokens { [rows * cols * c, c, rows * c] } else { [rows_p * cols_p * c, cols_p * c, c] };
        let layout = CopyLayout {
            in_sample: long(input[0])?,
            in_channel: long(input[1])?,
            in_row: long(input[2])?,
            out_sample: long(output[0])?,
            out_row: long(output[1])?,
            out_col: long(output[2])?,
        };
        let dev = x.device.clone();
        let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
        // SAFETY: the grid covers every (sample, row, column, channel) of the output once.
        let out = unsafe { dev.alloc::<T>(n * rows_p * cols_p * c)? };
        let func = dev.get_or_load_custom_func(&format!("to_channels_last_{dtype}"), MODULE, PTX)?;
        let grid = (cols_p.div_ceil(32) as u32, c.div_ceil(32) as u32, (n * rows_p) as u32);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let (c_i, rows_i, cols_i) = (int(c, "channels")?, int(rows, "rows")?, int(cols, "columns")?);
        let (pad_r, pad_c, up) = (op.pad_r as i32, op.pad_c as i32, op.up as i32);
        // The norm's tensors, read-locked for the launch.
        let held = op.norm.as_ref().map(|m| (m.sums.storage_and_layout(), m.weight.storage_and_layout(), m.bias.storage_and_layout()));
        let norm = match (&op.norm, &held) {
            (Some(m), Some(((sums, sl), (w, wl), (b, bl)))) => {
                if m.channels_per_group == 0 || !c.is_multiple_of(m.channels_per_group) || sl.shape().elem_count() != 2 * n * (c / m.channels_per_group) || wl.shape().elem_count() != c || bl.shape().elem_count() != c {
                    candle_core::bail!("channels-last copy: a group norm of {c} channels in groups of {}, sums {:?}, weight {:?}, bias {:?}", m.channels_per_group, sl.shape(), wl.shape(), bl.shape());
                }
                Some((carried::<f64>(sums, sl, "the group sums")?, carried::<T>(w, wl, "the norm's weight")?, carried::<T>(b, bl, "the norm's bias")?))
            }
            _ => None,
        };
        let (cpg, eps, silu) = op.norm.as_ref().map_or((1, 0.0, 0), |m| (m.channels_per_group as i32, m.eps, m.silu as i32));
        let mut builder = func.builder();
        builder.arg(&xs);
        builder.arg(&out);
        builder.arg(&c_i);
        builder.arg(&rows_i);
        builder.arg(&cols_i);
        builder.arg(&pad_r);
        builder.arg(&pad_c);
        builder.arg(&up);
        builder.arg(&layout);
        arg_or_null(&mut builder, norm.as_ref().map(|n| &n.0));
        arg_or_null(&mut builder, norm.as_ref().map(|n| &n.1));
        arg_or_null(&mut builder, norm.as_ref().map(|n| &n.2));
        builder.arg(&cpg);
        builder.arg(&eps);
        builder.arg(&silu);
        // SAFETY: arguments match `to_channels_last_*`; sizes from the layout above.
        unsafe { builder.launch(cfg) }.w()?;
        let shape = if op.frame_tokens { Shape::from((n, cols, rows, c)) } else { Shape::from((n, rows_p, cols_p, c)) };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }

    /// conv_igemm.cu's `ConvGeometry`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct ConvGeometry {
        out_sample: i64,
        out_channel: i64,
        out_row: i64,
        ci: i32,
        co: i32,
        samples: i32,
        rows: i32,
        cols: i32,
        plane_p: i32,
        cols_p: i32,
        taps: i32,
        kw: i32,
        row_step: i32,
        stride: i32,
    }

    // SAFETY: plain numbers, laid out as the kernel's struct (#[repr(C)]).
    unsafe impl DeviceRepr for ConvGeometry {}

    #[allow(clippy::too_many_arguments)]
    pub fn conv<T: CudaDType + DeviceRepr>(
        dtype: &str,
        op: &ConvIgemm,
        xp: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (g, tile) = (op.geometry, op.tile);
        let (n, rows_p, cols_p, ci) = xl.shape().dims4()?;
        let (taps, co, wci) = wl.shape().dims3()?;
        let kh = taps.checked_div(g.kw).unwrap_or(0);
        // The last tap of the last output position must stay inside the sample's padded input.
        let reach = |kh: usize| ((g.rows - 1) * g.cols_padded + g.cols - 1) * g.stride + (kh - 1) * g.row_step + g.kw - 1;
        if wci != ci
            || !ci.is_multiple_of(CHANNEL_STEP)
            || kh == 0
            || kh * g.kw != taps
            || g.rows == 0
            || g.cols == 0
            || g.stride == 0
            || co == 0
            || n == 0
            || cols_p != g.cols_padded
            || reach(kh) >= rows_p * cols_p
            || bl.shape().elem_count() != co
        {
            candle_core::bail!("implicit-GEMM convolution: input {:?}, weight {:?}, bias {:?}, {g:?}", xl.shape(), wl.shape(), bl.shape());
        }
        let ((x0, x1), (w0, w1), (b0, b1)) = (contiguous(xl, "input")?, contiguous(wl, "weight")?, contiguous(bl, "bias")?);
        if x0 % 8 != 0 || w0 % 8 != 0 {
            candle_core::bail!("implicit-GEMM convolution: input and weight must start on a 16-byte boundary");
        }
        let positions = g.rows * g.cols;
        // The kernel counts positions across samples, and input positions across padded
        // planes, in i32.
        int(n * positions, "positions")?;
        int(n * rows_p * cols_p, "padded positions")?;
        let dev = xp.device.clone();
        let xs = xp.as_cuda_slice::<T>()?.slice(x0..x1);
        let ws = w.as_cuda_slice::<T>()?.slice(w0..w1);
        let bs = b.as_cuda_slice::<T>()?.slice(b0..b1);
        // The extras' storages, read-locked for the launch (their sizes checked by `convolve`).
        let held_per_sample = op.per_sample.as_ref().map(|t| t.storage_and_layout());
        let held_residual = op.residual.as_ref().map(|t| t.storage_and_layout());
        let per_sample = held_per_sample.as_ref().map(|(s, l)| carried::<T>(s, l, "a bias per sample")).transpose()?;
        let residual = held_residual.as_ref().map(|(s, l)| carried::<T>(s, l, "a residual")).transpose()?;
        // SAFETY: the grid covers every (sample, channel, position); each is written once.
        let out = unsafe { dev.alloc::<T>(n * co * positions)? };
        let name = format!("conv_igemm_{}x{}_s{}_{dtype}", tile.channels(), tile.positions(), tile.stages());
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let shared = tile.shared_bytes(std::mem::size_of::<T>());
        if shared > STATIC_SHARED_LIMIT {
            // Above 48 KiB a kernel must opt in (the card allows up to 227 KiB per block).
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).w()?;
        }
        // One dimension, the channel tiles fastest: blocks that read the same positions run together.
        let blocks = co.div_ceil(tile.channels()) * (n * positions).div_ceil(tile.positions());
        let cfg = LaunchConfig { grid_dim: (int(blocks, "blocks")? as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 };
        // Where output (sample, channel, row, col) lies: (n, co, rows·cols), or frames (n·rows, co, cols).
        let (out_sample, out_channel, out_row) = if op.frames_out { (g.rows * co * g.cols, g.cols, co * g.cols) } else { (co * positions, positions, g.cols) };
        let geometry = ConvGeometry {
            out_sample: long(out_sample)?,
            out_channel: long(out_channel)?,
            out_row: long(out_row)?,
            ci: int(ci, "input channels")?,
            co: int(co, "output channels")?,
            samples: int(n, "samples")?,
            rows: int(g.rows, "rows")?,
            cols: int(g.cols, "columns")?,
            plane_p: int(rows_p * cols_p, "padded plane")?,
            cols_p: int(cols_p, "padded width")?,
            taps: int(taps, "taps")?,
            kw: int(g.kw, "kernel width")?,
            row_step: int(g.row_step, "row step")?,
            stride: int(g.stride, "stride")?,
        };
        let mut builder = func.builder();
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&bs);
        arg_or_null(&mut builder, per_sample.as_ref());
        arg_or_null(&mut builder, residual.as_ref());
        builder.arg(&out);
        builder.arg(&geometry);
        // SAFETY: arguments match `conv_igemm_*`; every read stays inside the buffers checked above.
        unsafe { builder.launch(cfg) }.w()?;
        let shape = if op.frames_out { Shape::from((n * g.rows, co, g.cols)) } else { Shape::from((n, co, positions)) };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::common::testing::rel_l2 as rel;
    use crate::taps_first;
    use candle_core::Device;

    /// On a GPU: the convolutions (3×3 plain, upsampled, strided; temporal) against candle's f32
    /// composition on the same (rounded) inputs, with partial tiles in channels and positions,
    /// f16 and bf16, on every tile shape.
    #[test]
    fn implicit_gemm_convolutions_match_the_f32_reference_on_gpu() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        for (dtype, tol) in [(DType::BF16, 5e-3), (DType::F16, 1e-3)] {
            let r = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            // Odd sides, a tile across samples (the UNet's deepest level: 4×4 per frame).
            for (n, ci, co, h, w) in [(2, 64, 48, 5, 7), (1, 32, 160, 12, 20), (3, 320, 320, 9, 16), (1, 640, 320, 11, 13), (16, 128, 256, 4, 4)] {
                let (x, b) = (r(&[n, ci, h, w], 1.0), r(&[co], 1.0));
                let wt = r(&[co, ci, 3, 3], 0.05);
                assert!(supported(&x, &taps_first(&wt).unwrap(), &b));
                let got = conv3x3(&x, &taps_first(&wt).unwrap(), &b, Extras::default()).unwrap();
                let want = crate::conv3x3_reference(&f(&x), &f(&wt), &f(&b)).unwrap();
                let e = rel(&got, &want);
                eprintln!("implicit-GEMM conv3x3 {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // With a bias per sample and a residual added on the way out.
                let (per_sample, residual) = (r(&[n, co], 1.0), r(&[n, co, h, w], 1.0));
                let extras = Extras { per_sample: Some(&per_sample), residual: Some(&residual) };
                let got = conv3x3(&x, &taps_first(&wt).unwrap(), &b, extras).unwrap();
                let want_extras = (want.broadcast_add(&f(&per_sample).reshape((n, co, 1, 1)).unwrap()).unwrap() + f(&residual)).unwrap();
                let e = rel(&got, &want_extras);
                eprintln!("implicit-GEMM conv3x3 + extras {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 + extras {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                let w3 = r(&[co, ci, 3, 1, 1], 0.05);
                let got = temporal_conv(&x, &taps_first(&w3).unwrap(), &b, Extras::default()).unwrap();
                let want_temporal = crate::temporal_conv_reference(&f(&x), &f(&w3), &f(&b)).unwrap();
                let e = rel(&got, &want_temporal);
                eprintln!("implicit-GEMM temporal conv {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "temporal conv {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // Of the input upsampled 2× in the channels-last copy.
                assert!(supported_upsampled(&x, &taps_first(&wt).unwrap(), &b, 2));
                let got = conv3x3_upsampled(&x, &taps_first(&wt).unwrap(), &b).unwrap();
                let want = crate::conv3x3_reference(&f(&x).upsample_nearest2d(2 * h, 2 * w).unwrap(), &f(&wt), &f(&b)).unwrap();
                assert_eq!(got.dims(), want.dims());
                let e = rel(&got, &want);
                eprintln!("implicit-GEMM conv3x3 of the 2x upsampled {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 of the upsampled input {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // Stride 2 (the downsampling convolutions).
                let got = conv3x3_strided(&x, &taps_first(&wt).unwrap(), &b).unwrap();
                let want = f(&x).conv2d(&f(&wt), 1, 2, 1, 1).unwrap().broadcast_add(&f(&b).reshape((1, co, 1, 1)).unwrap()).unwrap();
                assert_eq!(got.dims(), want.dims());
                let e = rel(&got, &want);
                eprintln!("implicit-GEMM conv3x3 stride 2 {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 stride 2 {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // A group norm + SiLU applied in the channels-last copy, against the norm first.
                let (gamma, beta) = (r(&[ci], 0.2), r(&[ci], 0.2));
                let norm = Norm { weight: &gamma, bias: &beta, groups: 32, eps: 1e-5, silu: true };
                assert!(supported_normed(&x, &taps_first(&wt).unwrap(), &b, &norm));
                let normed = norm.apply(&x).unwrap();
                let got = conv3x3_normed(&x, &norm, &taps_first(&wt).unwrap(), &b, extras).unwrap();
                let want_normed = (crate::conv3x3_reference(&f(&normed), &f(&wt), &f(&b)).unwrap().broadcast_add(&f(&per_sample).reshape((n, co, 1, 1)).unwrap()).unwrap() + f(&residual)).unwrap();
                let e = rel(&got, &want_normed);
                eprintln!("implicit-GEMM conv3x3 of group norm + SiLU + extras {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 of group norm + SiLU {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // The same norm (no SiLU) into tokens (n, h·w, c), a spatial transformer's entry.
                let plain = Norm { silu: false, ..norm };
                assert!(supported_tokens(&x, &plain));
                let got = normalized_tokens(&x, &plain).unwrap();
                let want_tokens = f(&plain.apply(&x).unwrap()).flatten_from(2).unwrap().transpose(1, 2).unwrap();
                assert_eq!(got.dims(), want_tokens.dims());
                let e = rel(&got, &want_tokens.contiguous().unwrap());
                eprintln!("group norm into tokens {dtype:?} {n}x{ci}x{h}x{w}: {e:.2e}");
                assert!(e < tol, "group norm into tokens {dtype:?} {n}x{ci}x{h}x{w}: {e:.2e}");
                let got = temporal_conv_normed(&x, &norm, &taps_first(&w3).unwrap(), &b, Extras::default()).unwrap();
                let e = rel(&got, &crate::temporal_conv_reference(&f(&normed), &f(&w3), &f(&b)).unwrap());
                eprintln!("implicit-GEMM temporal conv of group norm + SiLU {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "temporal conv of group norm + SiLU {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // A temporal block's convolution on frames: x as n videos of h frames (w·1 each),
                // normalised as the video, output and residual as frames.
                let as_frames = |t: &Tensor, c: usize| t.permute((0, 2, 1, 3)).unwrap().contiguous().unwrap().reshape((n * h, c, w, 1)).unwrap();
                let (frames_x, frames_residual) = (as_frames(&x, ci), as_frames(&residual, co));
                let frames_extras = Extras { per_sample: Some(&per_sample), residual: Some(&frames_residual) };
                assert!(supported_frames(&frames_x, h, &taps_first(&w3).unwrap(), &b, &norm));
                let got = temporal_conv_frames(&frames_x, h, &norm, &taps_first(&w3).unwrap(), &b, frames_extras).unwrap();
                let want_video = (crate::temporal_conv_reference(&f(&normed), &f(&w3), &f(&b)).unwrap().broadcast_add(&f(&per_sample).reshape((n, co, 1, 1)).unwrap()).unwrap() + f(&residual)).unwrap();
                let want_frames = as_frames(&want_video, co);
                let e = rel(&got, &want_frames);
                eprintln!("implicit-GEMM temporal conv on frames of group norm + SiLU + extras {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "temporal conv on frames {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                // Those frames normalised as the video into tokens across frames (n·w, h, ci), a
                // temporal transformer's entry.
                assert!(supported_frame_tokens(&frames_x, h, &plain));
                let got = normalized_frame_tokens(&frames_x, h, &plain).unwrap();
                let want_tokens = f(&plain.apply(&x).unwrap()).permute((0, 3, 2, 1)).unwrap().contiguous().unwrap().reshape((n * w, h, ci)).unwrap();
                let e = rel(&got, &want_tokens);
                eprintln!("group norm of frames into tokens across frames {dtype:?} {n}x{ci}x{h}x{w}: {e:.2e}");
                assert!(e < tol, "group norm into tokens across frames {dtype:?} {n}x{ci}x{h}x{w}: {e:.2e}");
                // Every tile shape and pipeline depth, with the extras (the default tile ran above).
                for tile in Tile::ALL {
                    let got = conv3x3_on(&x, &taps_first(&wt).unwrap(), &b, extras, tile).unwrap();
                    let e = rel(&got, &want_extras);
                    eprintln!("implicit-GEMM conv3x3 + extras on {} {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}", tile.name());
                    assert!(e < tol, "conv3x3 + extras on {} {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}", tile.name());
                    let got = temporal_conv_on(&x, &taps_first(&w3).unwrap(), &b, Extras::default(), tile).unwrap();
                    let e = rel(&got, &want_temporal);
                    assert!(e < tol, "temporal conv on {} {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}", tile.name());
                }
            }
        }
    }
}
