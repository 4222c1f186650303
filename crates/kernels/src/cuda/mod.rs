//! Our CUDA kernels (`*.cu` beside this file, compiled to PTX by `build.rs`) and the convolutions
//! (implicit GEMMs on tensor cores in f16/bf16, else cuBLAS GEMMs over shifted views), where
//! candle's generic CUDA ops are slow: candle's group norm makes ~10 passes in f32, its
//! convolutions write a 9× im2col matrix and transpose the result back. Each entry point says
//! which inputs it takes; callers fall back to candle's composition otherwise (the CPU, other
//! dtypes).

/// `impl CustomOpN for $op` of an op that runs on CUDA only: its `name`, a `cpu_fwd` that refuses
/// (the op API never sends CPU tensors to these ops), and a `cuda_fwd` evaluating `$run` with
/// `self` as `$s` and each input's storage and layout under the names given.
macro_rules! cuda_op {
    (@refuse $($arg:ident),*) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, _: &candle_core::Layout),*
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = $arg;)*
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (CustomOp1 for $op:ty, $name:expr, |$s:ident, $a:ident, $al:ident| $run:expr) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            cuda_op!(@refuse a);

            #[cfg(feature = "cuda")]
            fn cuda_fwd(&self, $a: &candle_core::CudaStorage, $al: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                let $s = self;
                $run
            }
        }
    };
    (CustomOp2 for $op:ty, $name:expr, |$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident| $run:expr) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            cuda_op!(@refuse a, b);

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $a: &candle_core::CudaStorage,
                $al: &candle_core::Layout,
                $b: &candle_core::CudaStorage,
                $bl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                let $s = self;
                $run
            }
        }
    };
    (CustomOp3 for $op:ty, $name:expr, |$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident, $c:ident, $cl:ident| $run:expr) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            cuda_op!(@refuse a, b, c);

            #[cfg(feature = "cuda")]
            #[allow(clippy::too_many_arguments)]
            fn cuda_fwd(
                &self,
                $a: &candle_core::CudaStorage,
                $al: &candle_core::Layout,
                $b: &candle_core::CudaStorage,
                $bl: &candle_core::Layout,
                $c: &candle_core::CudaStorage,
                $cl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                let $s = self;
                $run
            }
        }
    };
}

pub mod conv_igemm;
pub mod epilogue;
pub mod flash_attention;
pub mod permute;

/// What the launchers share: tensors an op carries beside its inputs, and optional pointers.
#[cfg(feature = "cuda")]
mod launch {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{Layout, Result, Storage};

    /// The contiguous elements of a tensor an op carries (read-locked by the caller for the
    /// launch), as a device view.
    pub fn carried<'a, T: CudaDType>(storage: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        let Storage::Cuda(storage) = storage else { candle_core::bail!("{what} is not on the GPU") };
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// Pushes `view`, or a null pointer where there is none (the kernels test for null).
    pub fn arg_or_null<'a, 'c: 'a, T>(builder: &mut LaunchArgs<'a>, view: Option<&'a CudaView<'c, T>>) {
        static NULL: u64 = 0;
        match view {
            Some(v) => builder.arg(v),
            None => builder.arg(&NULL),
        };
    }
}

use candle_core::{DType, Result, Tensor};

/// Whether a switch's value turns it off: `0`, and only that (unset or anything else keeps the
/// default, on).
fn turns_off(value: Option<&str>) -> bool {
    value == Some("0")
}

/// Whether the environment turns `var` off ([`turns_off`]): read once by each switch's caller.
fn switched_off(var: &str) -> bool {
    turns_off(std::env::var(var).ok().as_deref())
}

/// Whether the family of our kernels that `var` switches runs: our kernels at all
/// ([`kernels_enabled`]) and `var` not turned off. Read once by each family's caller.
pub(crate) fn family_enabled(var: &str) -> bool {
    kernels_enabled() && !switched_off(var)
}

/// Whether our CUDA kernels run at all: unless `DYNAMICRAFTER_CUDA_KERNELS=0`, which leaves every
/// op to candle's composition (cuBLAS products and candle's generic kernels): the way around
/// kernels of ours that misbehave on a card, without a rebuild, and the baseline a failing CUDA
/// test is compared with. Each family's own switch (`DYNAMICRAFTER_CUDA_GROUP_NORM`, …) turns
/// off just that family.
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !switched_off("DYNAMICRAFTER_CUDA_KERNELS"))
}

/// Whether `x` lies on a GPU our kernels run on: a CUDA build, a CUDA device, [`kernels_enabled`].
pub(crate) fn on_gpu(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && kernels_enabled()
}

/// Whether `x` is a float tensor on a GPU this build can run our kernels on ([`on_gpu`]).
pub fn usable(x: &Tensor) -> bool {
    on_gpu(x) && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Whether [`group_norm`] runs our kernels: unless `DYNAMICRAFTER_CUDA_GROUP_NORM=0` leaves it
/// to candle's composition (A/B timings; a way around the kernel without a rebuild).
pub fn group_norm_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| family_enabled("DYNAMICRAFTER_CUDA_GROUP_NORM"))
}

/// GroupNorm (+ SiLU) of `x (n, c, …)` with weight and bias `(c)` of `x`'s dtype.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &GroupNorm { groups, eps: eps as f32, silu })
}

/// The group norm's statistics of `x (n, c, …)` in `groups`: `(n·groups, 2)` f64, per group
/// [Σ(x − x₀), Σ(x − x₀)²] with x₀ the group's first element (`group_norm.cuh`'s
/// `group_moments` turns them into the mean and 1/σ): what a convolution that normalises its
/// input in its channels-last copy reads. With `frames` > 1, `x (b·t, c, …)` (t = `frames`) is
/// normalised as the video `(b, c, t, …)` it is: `(b·groups, 2)`, a group's elements read in t runs.
pub fn group_sums(x: &Tensor, frames: usize, groups: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GroupSums { groups, frames })
}

/// Σ over taps of `w[tap] · x[:, :, offset[tap] .. offset[tap] + len]` for `x (n, ci, l)` and
/// `w (taps, co, ci)`: `(n, co, out_len)` in f32 (positions past `len` left unwritten). A
/// convolution whose every tap reads a shifted window of the padded input.
pub fn shifted_gemm(x: &Tensor, w: &Tensor, offsets: &[usize], len: usize, out_len: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &ShiftedGemm { offsets: offsets.to_vec(), len, out_len })
}

/// 3×3 convolution, stride 1, padding 1, of `x (n, ci, h, w)` with `w_taps (9, co, ci)` (the
/// weight with taps first), bias `(co)` and `extras`: the implicit GEMM where it applies
/// (f16/bf16, channels a multiple of 32; the extras in its epilogue), else shifted GEMMs (the
/// extras added after).
pub fn conv3x3(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: conv_igemm::Extras) -> Result<Tensor> {
    let bias = bias.to_dtype(x.dtype())?;
    if conv_igemm::supported(x, w_taps, &bias) {
        conv_igemm::conv3x3(x, w_taps, &bias, extras)
    } else {
        extras.add_to(conv3x3_shifted(x, w_taps, &bias)?)
    }
}

/// [`conv3x3`] of `x (n, ci, h, w)` upsampled 2× (nearest): the upsample fused into the
/// implicit GEMM's channels-last copy where that kernel takes the convolution, else candle's
/// upsample first.
pub fn conv3x3_upsampled(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let bias = bias.to_dtype(x.dtype())?;
    if conv_igemm::supported_upsampled(x, w_taps, &bias, 2) {
        conv_igemm::conv3x3_upsampled(x, w_taps, &bias)
    } else {
        let (_, _, h, w) = x.dims4()?;
        conv3x3(&x.upsample_nearest2d(2 * h, 2 * w)?, w_taps, &bias, conv_igemm::Extras::default())
    }
}

/// 3×3 convolution, stride 2, padding 1, of `x (n, ci, h, w)` with `w_taps (9, co, ci)` and
/// bias `(co)` → `(n, co, ⌈h/2⌉, ⌈w/2⌉)`: the implicit GEMM where it applies, else candle's
/// strided convolution (im2col).
pub fn conv3x3_strided(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let bias = bias.to_dtype(x.dtype())?;
    if conv_igemm::supported(x, w_taps, &bias) {
        conv_igemm::conv3x3_strided(x, w_taps, &bias)
    } else {
        crate::conv3x3_strided_reference(x, &crate::taps_last(w_taps, 3)?, &bias)
    }
}

/// [`conv3x3`] on the implicit GEMM with a given tile shape and pipeline depth (A/B
/// benchmarks): an error where that kernel does not take the convolution.
pub fn conv3x3_on(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: conv_igemm::Extras, tile: conv_igemm::Tile) -> Result<Tensor> {
    conv_igemm::conv3x3_on(x, w_taps, &igemm_bias(x, w_taps, bias)?, extras, tile)
}

/// [`temporal_conv`] on a given tile, as [`conv3x3_on`].
pub fn temporal_conv_on(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: conv_igemm::Extras, tile: conv_igemm::Tile) -> Result<Tensor> {
    conv_igemm::temporal_conv_on(x, w_taps, &igemm_bias(x, w_taps, bias)?, extras, tile)
}

/// `bias` in `x`'s dtype where the implicit GEMM takes the convolution, an error otherwise.
fn igemm_bias(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let bias = bias.to_dtype(x.dtype())?;
    if !conv_igemm::supported(x, w_taps, &bias) {
        candle_core::bail!("the implicit-GEMM convolution does not take {:?} {:?} with weight {:?}", x.shape(), x.dtype(), w_taps.shape());
    }
    Ok(bias)
}

/// [`conv3x3`] as 9 cuBLAS GEMMs over shifted windows of the padded input, f32 accumulation.
pub fn conv3x3_shifted(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (n, _, h, w) = x.dims4()?;
    let co = w_taps.dim(1)?;
    let pitch = w + 2;
    let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.flatten_from(2)?;
    // Output rows keep the padded pitch (two unused columns each) so every tap is one window.
    let offsets: Vec<usize> = (0..9).map(|t| (t / 3) * pitch + t % 3).collect();
    let y = shifted_gemm(&padded, w_taps, &offsets, h * pitch - 2, h * pitch)?;
    epilogue::conv_bias(&y.reshape((n, co, h, pitch))?, &bias.to_dtype(x.dtype())?, w)
}

/// Conv3d with kernel (3,1,1), padding (1,0,0) of `x (b, ci, t, s)` with `w_taps (3, co, ci)`
/// and `extras`: chosen as for [`conv3x3`].
pub fn temporal_conv(x: &Tensor, w_taps: &Tensor, bias: &Tensor, extras: conv_igemm::Extras) -> Result<Tensor> {
    let bias = bias.to_dtype(x.dtype())?;
    if conv_igemm::supported(x, w_taps, &bias) {
        conv_igemm::temporal_conv(x, w_taps, &bias, extras)
    } else {
        extras.add_to(temporal_conv_shifted(x, w_taps, &bias)?)
    }
}

/// [`temporal_conv`] as 3 cuBLAS GEMMs over shifted windows of the input padded in time.
pub fn temporal_conv_shifted(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, _, t, s) = x.dims4()?;
    let co = w_taps.dim(1)?;
    let padded = x.pad_with_zeros(2, 1, 1)?.flatten_from(2)?;
    let y = shifted_gemm(&padded, w_taps, &[0, s, 2 * s], t * s, t * s)?;
    epilogue::conv_bias(&y.reshape((b, co, t, s))?, &bias.to_dtype(x.dtype())?, s)
}

/// Whether the cuDNN convolutions are there: a `cudnn` build, and `DYNAMICRAFTER_CUDNN` not `0`
/// (A/B against our own: implicit or shifted GEMMs).
pub fn cudnn_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cudnn") && *ENABLED.get_or_init(|| !switched_off("DYNAMICRAFTER_CUDNN"))
}

/// 3×3 convolution, stride 1, padding 1, on cuDNN (candle's conv2d in a `cudnn` build) with
/// `w (co, ci, 3, 3)`; the bias in one pass after it.
pub fn conv3x3_cudnn(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    epilogue::bias_channels(&x.conv2d(w, 1, 1, 1, 1)?, bias, None)
}

/// The temporal Conv3d (3,1,1) of `x (b, ci, t, s)` on cuDNN: a 2-D convolution over (t, s) of the
/// input padded in t, with `w (co, ci, 3, 1)`.
pub fn temporal_conv_cudnn(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    epilogue::bias_channels(&x.pad_with_zeros(2, 1, 1)?.conv2d(w, 0, 1, 1, 1)?, bias, None)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GroupSums {
    groups: usize,
    /// Frames per video: the leading dimension is `videos · frames`.
    frames: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct ShiftedGemm {
    offsets: Vec<usize>,
    len: usize,
    out_len: usize,
}

cuda_op!(CustomOp3 for GroupNorm, "dc-group-norm-cuda", |op, x, xl, w, wl, b, bl| {
    use candle_core::backend::BackendStorage;
    match x.dtype() {
        DType::F32 => imp::group_norm::<f32>("f32", op, x, xl, w, wl, b, bl),
        DType::F16 => imp::group_norm::<half::f16>("f16", op, x, xl, w, wl, b, bl),
        DType::BF16 => imp::group_norm::<half::bf16>("bf16", op, x, xl, w, wl, b, bl),
        dt => candle_core::bail!("group norm: unsupported dtype {dt:?}"),
    }
});

cuda_op!(CustomOp1 for GroupSums, "dc-group-sums", |op, x, xl| {
    use candle_core::backend::BackendStorage;
    match x.dtype() {
        DType::F32 => imp::group_sums::<f32>("f32", op, x, xl),
        DType::F16 => imp::group_sums::<half::f16>("f16", op, x, xl),
        DType::BF16 => imp::group_sums::<half::bf16>("bf16", op, x, xl),
        dt => candle_core::bail!("group sums: unsupported dtype {dt:?}"),
    }
});

cuda_op!(CustomOp2 for ShiftedGemm, "dc-shifted-gemm", |op, x, xl, w, wl| imp::shifted_gemm(op, x, xl, w, wl));

#[cfg(feature = "cuda")]
mod imp {
    use super::{GroupNorm, GroupSums, ShiftedGemm};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
    /// Threads per block and elements per statistics block of `group_norm.cu`.
    const THREADS: u32 = 256;
    const CHUNK: usize = 256 * 16;

    fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn group_norm<T: CudaDType + DeviceRepr>(
        suffix: &str,
        op: &GroupNorm,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = xl.dims();
        let (n, c) = (dims[0], dims[1]);
        let s: usize = dims[2..].iter().product();
        if op.groups == 0 || c % op.groups != 0 || wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("group norm: {c} channels, {} groups, weight {:?}, bias {:?}", op.groups, wl.shape(), bl.shape());
        }
        let ((x0, x1), (w0, w1), (b0, b1)) = (contiguous(xl, "x")?, contiguous(wl, "weight")?, contiguous(bl, "bias")?);
        let dev = x.device.clone();
        let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let ws = w.as_cuda_slice::<T>()?.slice(w0..w1);
        let bs = b.as_cuda_slice::<T>()?.slice(b0..b1);
        let cpg = c / op.groups;
        let total = n * c * s;
        let (sums, cfg, packed) = stats::<T>(&dev, suffix, &xs, x0, n, GroupRuns::of(c, op.groups, s, 1)?, s)?;

        // SAFETY: `group_apply_*` writes every element (the same grid).
        let y = unsafe { dev.alloc::<T>(total)? };
        let apply = dev.get_or_load_custom_func(&format!("group_apply_{suffix}"), "dynamicrafter_group_norm", GROUP_NORM_PTX)?;
        let (c_i, s_u, cpg_i, silu) = (c as i32, s as u64, cpg as i32, op.silu as i32);
        let mut builder = apply.builder();
        builder.arg(&xs);
        builder.arg(&ws);
        builder.arg(&bs);
        builder.arg(&sums);
        builder.arg(&y);
        builder.arg(&c_i);
        builder.arg(&s_u);
        builder.arg(&cpg_i);
        builder.arg(&op.eps);
        builder.arg(&silu);
        builder.arg(&packed);
        // SAFETY: arguments match `group_apply_*`.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }

    /// group_norm.cuh's `GroupRuns`: where a group's elements lie.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct GroupRuns {
        run_len: i64,
        sample_stride: i64,
        group_stride: i64,
        run_stride: i64,
        runs: i32,
        groups: i32,
    }

    // SAFETY: plain numbers, laid out as the kernel's struct (#[repr(C)], same field order).
    unsafe impl DeviceRepr for GroupRuns {}

    impl GroupRuns {
        /// `groups` of `c` channels of planes of `s` over `frames` (n·frames, c, s) read as the
        /// video (n, c, frames, s): a run per frame (one for contiguous (n, c, s), frames = 1).
        fn of(c: usize, groups: usize, s: usize, frames: usize) -> Result<Self> {
            let i = |v: usize| i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("group norm: {v} elements exceed i64")));
            let run_len = c / groups * s;
            Ok(Self {
                run_len: i(run_len)?,
                sample_stride: i(frames * c * s)?,
                group_stride: i(run_len)?,
                run_stride: i(c * s)?,
                runs: i32::try_from(frames).map_err(|_| candle_core::Error::Msg(format!("group norm: {frames} frames")))?,
                groups: i32::try_from(groups).map_err(|_| candle_core::Error::Msg(format!("group norm: {groups} groups")))?,
            })
        }
    }

    /// group_stats's pass over `xs`, `n` samples of `runs` (a run per block row, CHUNK elements
    /// per block): the sums `(n·groups, 2)`, and the grid and packing the apply pass shares
    /// (one run per group: a block per CHUNK elements of a group, (chunks, n·groups)); 16-byte
    /// packs where a plane of `s` is whole packs and x starts on a pack.
    fn stats<T: CudaDType + DeviceRepr>(dev: &CudaDevice, suffix: &str, xs: &CudaView<'_, T>, x0: usize, n: usize, runs: GroupRuns, s: usize) -> Result<(CudaSlice<f64>, LaunchConfig, i32)> {
        let (groups, block_rows) = (runs.groups as usize, n * runs.groups as usize * runs.runs as usize);
        if block_rows > 65535 || runs.run_len == 0 {
            candle_core::bail!("group norm: {block_rows} runs of {} elements are outside the kernels' grid", runs.run_len);
        }
        let sums = dev.alloc_zeros::<f64>(2 * n * groups)?;
        let cfg = LaunchConfig { grid_dim: ((runs.run_len as usize).div_ceil(CHUNK) as u32, block_rows as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let per_pack = 16 / std::mem::size_of::<T>();
        let packed = (s.is_multiple_of(per_pack) && x0.is_multiple_of(per_pack)) as i32;
        let func = dev.get_or_load_custom_func(&format!("group_stats_{suffix}"), "dynamicrafter_group_norm", GROUP_NORM_PTX)?;
        let mut builder = func.builder();
        builder.arg(xs);
        builder.arg(&sums);
        builder.arg(&runs);
        builder.arg(&packed);
        // SAFETY: arguments match `group_stats_*`; the grid covers every element once.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((sums, cfg, packed))
    }

    /// The sums alone (`super::group_sums`).
    pub fn group_sums<T: CudaDType + DeviceRepr>(suffix: &str, op: &GroupSums, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = xl.dims();
        if dims.len() < 2 || op.groups == 0 || !dims[1].is_multiple_of(op.groups) || op.frames == 0 || !dims[0].is_multiple_of(op.frames) {
            candle_core::bail!("group sums: {:?} in {} groups, {} frames per video", xl.shape(), op.groups, op.frames);
        }
        let (n, c) = (dims[0] / op.frames, dims[1]);
        let s: usize = dims[2..].iter().product();
        let (x0, x1) = contiguous(xl, "x")?;
        let dev = x.device.clone();
        let xs = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let (sums, _, _) = stats::<T>(&dev, suffix, &xs, x0, n, GroupRuns::of(c, op.groups, s, op.frames)?, s)?;
        Ok((CudaStorage::wrap_cuda_slice(sums, dev), Shape::from((n * op.groups, 2))))
    }

    fn cuda_type(dt: DType) -> Result<cublas::cudaDataType> {
        Ok(match dt {
            DType::F32 => cublas::cudaDataType::CUDA_R_32F,
            DType::F16 => cublas::cudaDataType::CUDA_R_16F,
            DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
            dt => candle_core::bail!("shifted gemm: unsupported dtype {dt:?}"),
        })
    }

    pub fn shifted_gemm(op: &ShiftedGemm, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, ci, l) = xl.shape().dims3()?;
        let (taps, co, wci) = wl.shape().dims3()?;
        if wci != ci || taps != op.offsets.len() || x.dtype() != w.dtype() || op.len > op.out_len {
            candle_core::bail!("shifted gemm: x {:?}, w {:?}, {} offsets", xl.shape(), wl.shape(), op.offsets.len());
        }
        if op.offsets.iter().any(|&o| o + op.len > l) {
            candle_core::bail!("shifted gemm: a window passes the end of the {l} input positions");
        }
        let (x0, _) = contiguous(xl, "x")?;
        let (w0, _) = contiguous(wl, "weight")?;
        let dev = x.device.clone();
        let stream = dev.cuda_stream();
        let elem = x.dtype().size_in_bytes() as u64;
        let (x_ptr, _x_guard) = match &x.slice {
            candle_core::cuda_backend::CudaStorageSlice::F32(s) => s.device_ptr(&stream),
            candle_core::cuda_backend::CudaStorageSlice::F16(s) => s.device_ptr(&stream),
            candle_core::cuda_backend::CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
            _ => candle_core::bail!("shifted gemm: unsupported dtype {:?}", x.dtype()),
        };
        let (w_ptr, _w_guard) = match &w.slice {
            candle_core::cuda_backend::CudaStorageSlice::F32(s) => s.device_ptr(&stream),
            candle_core::cuda_backend::CudaStorageSlice::F16(s) => s.device_ptr(&stream),
            candle_core::cuda_backend::CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
            _ => candle_core::bail!("shifted gemm: unsupported dtype {:?}", w.dtype()),
        };
        // SAFETY: written by the first GEMM (beta 0) at every position below `len`; later ones
        // accumulate. Positions from `len` to `out_len` are documented as unwritten.
        let mut y = unsafe { dev.alloc::<f32>(n * co * op.out_len)? };
        {
            let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
            let blas = dev.cublas_handle();
            let handle = *blas.handle();
            let t = cuda_type(x.dtype())?;
            let (one, zero) = (1f32, 0f32);
            for (tap, &offset) in op.offsets.iter().enumerate() {
                let a = x_ptr + (x0 as u64 + offset as u64) * elem;
                let b = w_ptr + (w0 as u64 + (tap * co * ci) as u64) * elem;
                let beta: *const f32 = if tap == 0 { &zero } else { &one };
                // Column-major: C (len × co, ldc out_len) = A (len × ci, lda l) · B (ci × co, ldb ci),
                // i.e. row-major y[o][j] = Σ_i w[tap][o][i] · x[i][offset + j], per sample.
                // SAFETY: pointers and strides stay inside the buffers checked above.
                let status = unsafe {
                    cublas::cublasGemmStridedBatchedEx(
                        handle,
                        cublas::cublasOperation_t::CUBLAS_OP_N,
                        cublas::cublasOperation_t::CUBLAS_OP_N,
                        op.len as i32,
                        co as i32,
                        ci as i32,
                        &one as *const f32 as *const std::ffi::c_void,
                        a as *const std::ffi::c_void,
                        t,
                        l as i32,
                        (ci * l) as i64,
                        b as *const std::ffi::c_void,
                        t,
                        ci as i32,
                        0,
                        beta as *const std::ffi::c_void,
                        y_ptr as *mut std::ffi::c_void,
                        cublas::cudaDataType::CUDA_R_32F,
                        op.out_len as i32,
                        (co * op.out_len) as i64,
                        n as i32,
                        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    candle_core::bail!("shifted gemm: cuBLAS {status:?}");
                }
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((n, co, op.out_len))))
    }
}

#[cfg(test)]
mod switch_tests {
    /// A switch is off for `0` alone: a typo or an empty value must not turn a kernel off unseen.
    #[test]
    fn only_zero_turns_a_switch_off() {
        assert!(super::turns_off(Some("0")));
        for value in [None, Some(""), Some("1"), Some("00"), Some("off"), Some(" 0")] {
            assert!(!super::turns_off(value), "{value:?}");
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::taps_first;
    use candle_core::Device;

    use crate::common::testing::rel_l2 as rel;

    /// On a GPU: group norm and both convolutions against candle's composition, in f32 at f32
    /// rounding level and in bf16 within bf16 rounding, on shapes with odd sizes.
    #[test]
    fn kernels_match_candle_on_gpu() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let r = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            // Planes of whole 16-byte packs and not; the UNet's second level (16 frames).
            for (shape, groups) in [(vec![2usize, 64, 5, 7], 32), (vec![1, 96, 3, 9, 11], 32), (vec![3, 8, 1000], 4), (vec![16, 640, 36, 64], 32)] {
                let x = (r(&shape, 2.0) + 3.0).unwrap();
                let (w, b) = (r(&[shape[1]], 1.0), r(&[shape[1]], 1.0));
                for silu in [false, true] {
                    let got = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    let want = crate::group_norm_reference(&f(&x), &f(&w), &f(&b), groups, 1e-5, silu).unwrap();
                    let e = rel(&got, &want);
                    eprintln!("group norm {dtype:?} {shape:?} silu {silu}: {e:.2e}");
                    assert!(e < tol, "group norm {dtype:?} {shape:?}: {e:.2e}");
                }
            }
            for (n, ci, co, h, w) in [(2, 8, 16, 5, 7), (3, 64, 32, 16, 9), (1, 320, 320, 12, 20)] {
                let x = r(&[n, ci, h, w], 1.0);
                let (wt, b) = (r(&[co, ci, 3, 3], 0.1), r(&[co], 1.0));
                let got = conv3x3(&x, &taps_first(&wt).unwrap(), &b, conv_igemm::Extras::default()).unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = crate::conv3x3_reference(&f(&x), &f(&wt), &f(&b)).unwrap();
                let e = rel(&got, &want);
                eprintln!("conv3x3 {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "conv3x3 {dtype:?}: {e:.2e}");
                let xt = r(&[n, ci, h, w], 1.0);
                let wt = r(&[co, ci, 3, 1, 1], 0.1);
                let got = temporal_conv(&xt, &taps_first(&wt).unwrap(), &b, conv_igemm::Extras::default()).unwrap();
                let want = crate::temporal_conv_reference(&f(&xt), &f(&wt), &f(&b)).unwrap();
                let e = rel(&got, &want);
                eprintln!("temporal conv {dtype:?} {n}x{ci}x{h}x{w} -> {co}: {e:.2e}");
                assert!(e < tol, "temporal conv {dtype:?}: {e:.2e}");
            }
        }
    }

    /// On a GPU: 1×1 convolutions as one product with the bias epilogue against candle's
    /// convolution in f32 (the UNet's skips, a VAE shortcut's shape, planes of whole packs and
    /// not).
    #[test]
    fn conv1x1_matches_candle_on_gpu() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-3), (DType::F16, 1e-3)] {
            let r = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for (n, ci, co, h, w) in [(16usize, 960usize, 320usize, 36usize, 64usize), (1, 256, 128, 72, 128), (3, 24, 40, 5, 7)] {
                let (x, wt, b) = (r(&[n, ci, h, w], 1.0), r(&[co, ci, 1, 1], 0.05), r(&[co], 1.0));
                assert!(crate::conv1x1_supported(&x, &wt, Some(&b)));
                let got = crate::conv1x1(&x, &wt, Some(&b)).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[n, co, h, w][..], dtype));
                let want = f(&x).conv2d(&f(&wt), 0, 1, 1, 1).unwrap().broadcast_add(&f(&b).reshape((1, co, 1, 1)).unwrap()).unwrap();
                let e = rel(&got, &want);
                eprintln!("1x1 convolution {dtype:?} {n}x{ci}->{co}x{h}x{w}: {e:.2e}");
                assert!(e < tol, "1x1 convolution {dtype:?} {n}x{ci}->{co}x{h}x{w}: {e:.2e}");
            }
        }
    }
}
