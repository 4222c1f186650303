//! GEMM epilogues on CUDA (`epilogue.cu`), each one pass over the product: a linear layer's bias
//! (and the residual after it), the feed-forward's bias and GELU gate, a convolution's bias with
//! its output layout. Where candle adds a bias it runs a broadcast op with per-element strided
//! indexing; a convolution took three passes with an f32 round trip.

use candle_core::{DType, Result, Tensor};

/// Whether the epilogue kernels run: unless `DYNAMICRAFTER_CUDA_EPILOGUES=0`, which leaves every
/// bias, residual, GEGLU gate, exit and LayerNorm to candle's ops (A/B timings; a way around a
/// kernel that misbehaves on some card without a rebuild).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| super::family_enabled("DYNAMICRAFTER_CUDA_EPILOGUES"))
}

/// Whether the epilogues take a product `y` and `bias` (and `residual`): a CUDA float tensor and
/// the rest of its dtype and device, the kernels [`enabled`].
pub fn supported(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> bool {
    enabled() && super::usable(y) && bias.dtype() == y.dtype() && bias.device().same_device(y.device()) && residual.is_none_or(|r| r.dtype() == y.dtype() && r.dims() == y.dims())
}

/// `y + bias (+ residual)` with `bias` over the last axis of `y (…, c)`.
pub fn bias_rows(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let c = y.dim(candle_core::D::Minus1)?;
    if bias.elem_count() != c || !supported(y, bias, residual) {
        candle_core::bail!("bias epilogue: y {:?} {:?}, bias {:?}, residual {:?}", y.shape(), y.dtype(), bias.shape(), residual.map(Tensor::shape));
    }
    let (y, bias) = (y.contiguous()?, bias.contiguous()?);
    match residual {
        Some(r) => y.apply_op3_no_bwd(&bias, &r.contiguous()?, &BiasRows),
        None => y.apply_op2_no_bwd(&bias, &BiasRows),
    }
}

/// `y + bias[c] (+ residual)` for `y (n, c, …)`: a bias per channel, as after a convolution.
pub fn bias_channels(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    if y.rank() < 2 || bias.elem_count() != y.dim(1)? {
        candle_core::bail!("channel bias epilogue: y {:?} {:?}, bias {:?}, residual {:?}", y.shape(), y.dtype(), bias.shape(), residual.map(Tensor::shape));
    }
    if !enabled() {
        let mut shape = vec![1; y.rank()];
        shape[1] = bias.elem_count();
        let y = y.broadcast_add(&bias.reshape(shape)?)?;
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    if !supported(y, bias, residual) {
        candle_core::bail!("channel bias epilogue: y {:?} {:?}, bias {:?}, residual {:?}", y.shape(), y.dtype(), bias.shape(), residual.map(Tensor::shape));
    }
    let (y, bias) = (y.contiguous()?, bias.contiguous()?);
    match residual {
        Some(r) => y.apply_op3_no_bwd(&bias, &r.contiguous()?, &BiasChannels),
        None => y.apply_op2_no_bwd(&bias, &BiasChannels),
    }
}

/// GEGLU of a feed-forward product before its bias: `p (…, 2d)`, `bias (2d)` →
/// `(p[…, :d] + bias[:d]) · GELU(p[…, d:] + bias[d:])`, `(…, d)`.
pub fn geglu_bias(p: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let two_d = p.dim(candle_core::D::Minus1)?;
    if two_d % 2 != 0 || bias.elem_count() != two_d || !supported(p, bias, None) {
        candle_core::bail!("GEGLU epilogue: p {:?} {:?}, bias {:?}", p.shape(), p.dtype(), bias.shape());
    }
    p.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &GegluBias)
}

/// A shifted-GEMM convolution's output: `y (n, c, rows, pitch)` in f32 → `(n, c, rows, width)`
/// in `bias`'s dtype, `+ bias[c]`.
pub fn conv_bias(y: &Tensor, bias: &Tensor, width: usize) -> Result<Tensor> {
    let (_, c, _, pitch) = y.dims4()?;
    if y.dtype() != DType::F32 || !super::usable(bias) || bias.elem_count() != c || width > pitch || !bias.device().same_device(y.device()) {
        candle_core::bail!("convolution epilogue: y {:?} {:?}, bias {:?} {:?}, width {width}", y.shape(), y.dtype(), bias.shape(), bias.dtype());
    }
    if !enabled() {
        let y = y.narrow(3, 0, width)?.broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?)?;
        return y.to_dtype(bias.dtype());
    }
    y.contiguous()?.apply_op2_no_bwd(&bias.contiguous()?, &ConvBias { width })
}

/// Whether [`add_layer_norm`] takes these: a CUDA float `y (…, c)` with a bias, the norm's
/// weight and bias (all `c`) and the residual of its dtype and device.
pub fn add_layer_norm_supported(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor) -> bool {
    let c = y.dims().last().copied().unwrap_or(0);
    supported(y, bias, residual)
        && c > 0
        && y.elem_count() > 0
        && [bias, gamma, beta].iter().all(|t| t.elem_count() == c && t.dtype() == y.dtype() && t.device().same_device(y.device()))
}

/// `(sum, LayerNorm(sum))` with `sum = y + bias (+ residual)` over the last axis of `y (…, c)`
/// (rounded as [`bias_rows`] rounds it) and the norm's `gamma`, `beta`, `eps`: a transformer
/// block's attention output joining the residual stream, and the norm the next layer reads, in
/// one kernel that reads the stream once. Both halves live in one allocation.
pub fn add_layer_norm(y: &Tensor, bias: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if !add_layer_norm_supported(y, bias, residual, gamma, beta) {
        candle_core::bail!("layer-norm epilogue: y {:?} {:?}, bias {:?}, gamma {:?}, beta {:?}", y.shape(), y.dtype(), bias.shape(), gamma.shape(), beta.shape());
    }
    let op = AddLayerNorm { bias: bias.contiguous()?, gamma: gamma.contiguous()?, beta: beta.contiguous()?, eps: eps as f32 };
    let y = y.contiguous()?;
    let both = match residual {
        Some(r) => y.apply_op2_no_bwd(&r.contiguous()?, &op)?,
        None => y.apply_op1_no_bwd(&op)?,
    };
    Ok((both.get(0)?, both.get(1)?))
}

/// The plan of `permute(y, dims) + bias + addend` on the fused kernel, if it takes it: a CUDA
/// build and tensor, the epilogues' dtypes, `dims` moving y's innermost axis (a tiled plan), the
/// bias along y's last axis, the addend of the permuted shape.
fn permute_bias_add_plan(y: &Tensor, dims: &[usize], bias: Option<&Tensor>, addend: &Tensor) -> Option<super::permute::Plan> {
    use super::permute::{is_permutation, plan, Plan};
    let last = y.dims().last().copied()?;
    let permuted: Vec<usize> = dims.iter().filter_map(|&d| y.dims().get(d).copied()).collect();
    if !enabled()
        || !super::usable(y)
        || !is_permutation(dims, y.rank())
        || y.elem_count() == 0
        || addend.dtype() != y.dtype()
        || !addend.device().same_device(y.device())
        || addend.dims() != permuted.as_slice()
        || bias.is_some_and(|b| b.dtype() != y.dtype() || !b.device().same_device(y.device()) || b.elem_count() != last)
    {
        return None;
    }
    // The bias indexes I (the input's innermost axes merged) modulo its length.
    plan(y.dims(), dims).filter(|p| matches!(p, Plan::Tiles { ni, .. } if ni % last == 0) && p.fits())
}

/// Whether [`permute_bias_add`] takes these.
pub fn permute_bias_add_supported(y: &Tensor, dims: &[usize], bias: Option<&Tensor>, addend: &Tensor) -> bool {
    permute_bias_add_plan(y, dims, bias, addend).is_some()
}

/// `y.permute(dims) + bias + addend` in one pass, `bias` along y's last axis (before the
/// permute), for a `dims` that moves that axis: a transformer's exit, its output projection's
/// product back to the block's layout and the block's input added. One rounding, as
/// [`bias_rows`] with a residual.
pub fn permute_bias_add(y: &Tensor, dims: &[usize], bias: Option<&Tensor>, addend: &Tensor) -> Result<Tensor> {
    let Some(plan) = permute_bias_add_plan(y, dims, bias, addend) else {
        candle_core::bail!("permute epilogue: y {:?} {:?}, dims {dims:?}, bias {:?}, addend {:?}", y.shape(), y.dtype(), bias.map(Tensor::shape), addend.shape());
    };
    let op = PermuteBiasAdd { plan };
    let (y, addend) = (y.contiguous()?, addend.contiguous()?);
    match bias {
        Some(b) => y.apply_op3_no_bwd(&b.contiguous()?, &addend, &op),
        None => y.apply_op2_no_bwd(&addend, &op),
    }?
    .reshape(addend.shape())
}

struct BiasRows;
struct BiasChannels;
struct GegluBias;
struct ConvBias {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    width: usize,
}
/// Inputs `y` (and the residual); the small per-channel tensors travel with the op.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AddLayerNorm {
    bias: Tensor,
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}
struct PermuteBiasAdd {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    plan: super::permute::Plan,
}

cuda_op!(CustomOp2 for BiasRows, "dc-bias-rows", |_op, y, yl, b, bl| imp::bias_rows(y, yl, b, bl, None));
cuda_op!(CustomOp3 for BiasRows, "dc-bias-rows-residual", |_op, y, yl, b, bl, r, rl| imp::bias_rows(y, yl, b, bl, Some((r, rl))));
cuda_op!(CustomOp2 for BiasChannels, "dc-bias-channels", |_op, y, yl, b, bl| imp::bias_channels(y, yl, b, bl, None));
cuda_op!(CustomOp3 for BiasChannels, "dc-bias-channels-residual", |_op, y, yl, b, bl, r, rl| imp::bias_channels(y, yl, b, bl, Some((r, rl))));
cuda_op!(CustomOp2 for GegluBias, "dc-geglu-bias", |_op, p, pl, b, bl| imp::geglu_bias(p, pl, b, bl));
cuda_op!(CustomOp2 for ConvBias, "dc-conv-bias", |op, y, yl, b, bl| imp::conv_bias(op.width, y, yl, b, bl));
cuda_op!(CustomOp1 for AddLayerNorm, "dc-bias-layer-norm", |op, y, yl| imp::add_layer_norm(op, y, yl, None));
cuda_op!(CustomOp2 for AddLayerNorm, "dc-add-layer-norm", |op, y, yl, r, rl| imp::add_layer_norm(op, y, yl, Some((r, rl))));
// Without a bias: (y, addend); with one: (y, bias, addend).
cuda_op!(CustomOp2 for PermuteBiasAdd, "dc-permute-add", |op, y, yl, a, al| imp::permute_bias_add(&op.plan, y, yl, None, a, al));
cuda_op!(CustomOp3 for PermuteBiasAdd, "dc-permute-bias-add", |op, y, yl, b, bl, a, al| imp::permute_bias_add(&op.plan, y, yl, Some((b, bl)), a, al));

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    use crate::cuda::launch::{arg_or_null, carried};
    use crate::cuda::permute::imp::tile_launch;
    use crate::cuda::permute::Plan;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx"));
    const MODULE: &str = "dynamicrafter_epilogue";
    const THREADS: u32 = 256;

    /// Enough blocks to fill the card for a grid-stride loop over `work` items.
    fn launch_config(work: usize) -> LaunchConfig {
        let blocks = work.div_ceil(THREADS as usize).clamp(1, 132 * 32) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<(CudaView<'a, T>, usize)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
        Ok((s.as_cuda_slice::<T>()?.slice(start..end), start))
    }

    /// The kernel's name for `dtype`.
    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            dt => candle_core::bail!("epilogue: unsupported dtype {dt:?}"),
        })
    }

    /// Whether 16-byte accesses line up: `len` a multiple of a pack and every start offset too.
    fn packs<T>(len: usize, starts: &[usize]) -> i32 {
        let per_pack = 16 / std::mem::size_of::<T>();
        (len.is_multiple_of(per_pack) && starts.iter().all(|s| s.is_multiple_of(per_pack))) as i32
    }

    /// The kernel `name` of `epilogue.cu` for `dtype`, loaded once per device.
    macro_rules! kernel {
        ($dev:expr, $name:literal, $dtype:expr) => {
            $dev.get_or_load_custom_func(&format!(concat!($name, "_{}"), suffix($dtype)?), MODULE, PTX)?
        };
    }

    macro_rules! by_dtype {
        ($dtype:expr, $f:ident, $($args:expr),*) => {
            match $dtype {
                DType::F32 => $f::<f32>($($args),*),
                DType::F16 => $f::<half::f16>($($args),*),
                DType::BF16 => $f::<half::bf16>($($args),*),
                dt => candle_core::bail!("epilogue: unsupported dtype {dt:?}"),
            }
        };
    }

    pub fn bias_rows(y: &CudaStorage, yl: &Layout, b: &CudaStorage, bl: &Layout, r: Option<(&CudaStorage, &Layout)>) -> Result<(CudaStorage, Shape)> {
        by_dtype!(y.dtype(), bias_t, Broadcast::Rows, y, yl, b, bl, r)
    }

    pub fn bias_channels(y: &CudaStorage, yl: &Layout, b: &CudaStorage, bl: &Layout, r: Option<(&CudaStorage, &Layout)>) -> Result<(CudaStorage, Shape)> {
        by_dtype!(y.dtype(), bias_t, Broadcast::Channels, y, yl, b, bl, r)
    }

    /// Which axis the bias runs along.
    enum Broadcast {
        /// The last: `bias_rows_*`.
        Rows,
        /// Axis 1: `bias_channels_*`.
        Channels,
    }

    fn bias_t<T: CudaDType + DeviceRepr>(
        along: Broadcast,
        y: &CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let total = yl.shape().elem_count();
        let channels = bl.shape().elem_count();
        // Rows: the bias repeats every `channels` elements; channels: it steps every `plane`.
        let plane = total / (yl.dims()[0] * channels).max(1);
        let dev = y.device.clone();
        let (ys, y0) = view::<T>(y, yl, "y")?;
        let (bs, b0) = view::<T>(b, bl, "bias")?;
        let residual = r.map(|(r, rl)| view::<T>(r, rl, "residual")).transpose()?;
        let r0 = residual.as_ref().map_or(0, |r| r.1);
        let (f, run) = match along {
            Broadcast::Rows => (kernel!(dev, "bias_rows", y.dtype()), packs::<T>(channels, &[y0, b0, r0])),
            Broadcast::Channels => (kernel!(dev, "bias_channels", y.dtype()), packs::<T>(plane, &[y0, r0])),
        };
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(total)? };
        let (total_u, channels_i, plane_u) = (total as u64, channels as i32, plane as u64);
        let mut builder = f.builder();
        builder.arg(&ys);
        builder.arg(&bs);
        arg_or_null(&mut builder, residual.as_ref().map(|(r, _)| r));
        builder.arg(&out);
        builder.arg(&total_u);
        builder.arg(&channels_i);
        if matches!(along, Broadcast::Channels) {
            builder.arg(&plane_u);
        }
        builder.arg(&run);
        let per_pack = if run == 1 { 16 / std::mem::size_of::<T>() } else { 1 };
        // SAFETY: arguments match `bias_rows_*` / `bias_channels_*`; sizes come from the checked layouts.
        unsafe { builder.launch(launch_config(total / per_pack)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), yl.shape().clone()))
    }

    pub fn geglu_bias(p: &CudaStorage, pl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        by_dtype!(p.dtype(), geglu_bias_t, p, pl, b, bl)
    }

    fn geglu_bias_t<T: CudaDType + DeviceRepr>(p: &CudaStorage, pl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let mut dims = pl.dims().to_vec();
        let d = dims.last().copied().unwrap_or(0) / 2;
        let rows = pl.shape().elem_count() / (2 * d).max(1);
        let dev = p.device.clone();
        let (ps, p0) = view::<T>(p, pl, "product")?;
        let (bs, b0) = view::<T>(b, bl, "bias")?;
        let packed = packs::<T>(d, &[p0, b0]);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(rows * d)? };
        let f = kernel!(dev, "geglu_bias", p.dtype());
        let (rows_u, d_i) = (rows as u64, d as i32);
        let mut builder = f.builder();
        builder.arg(&ps);
        builder.arg(&bs);
        builder.arg(&out);
        builder.arg(&rows_u);
        builder.arg(&d_i);
        builder.arg(&packed);
        let per_pack = if packed == 1 { 16 / std::mem::size_of::<T>() } else { 1 };
        // SAFETY: arguments match `geglu_bias_*`; sizes come from the checked layouts.
        unsafe { builder.launch(launch_config(rows * d / per_pack)) }.w()?;
        if let Some(last) = dims.last_mut() {
            *last = d;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }

    pub fn add_layer_norm(op: &super::AddLayerNorm, y: &CudaStorage, yl: &Layout, r: Option<(&CudaStorage, &Layout)>) -> Result<(CudaStorage, Shape)> {
        by_dtype!(y.dtype(), add_layer_norm_t, op, y, yl, r)
    }

    fn add_layer_norm_t<T: CudaDType + DeviceRepr>(
        op: &super::AddLayerNorm,
        y: &CudaStorage,
        yl: &Layout,
        r: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let total = yl.shape().elem_count();
        let cols = yl.dims().last().copied().unwrap_or(1).max(1);
        let rows = total / cols;
        let dev = y.device.clone();
        let (ys, y0) = view::<T>(y, yl, "y")?;
        let residual = r.map(|(r, rl)| view::<T>(r, rl, "residual")).transpose()?;
        let r0 = residual.as_ref().map_or(0, |r| r.1);
        let (bias, gamma, beta) = (op.bias.storage_and_layout(), op.gamma.storage_and_layout(), op.beta.storage_and_layout());
        let bs = carried::<T>(&bias.0, bias.1, "bias")?;
        let gs = carried::<T>(&gamma.0, gamma.1, "norm weight")?;
        let betas = carried::<T>(&beta.0, beta.1, "norm bias")?;
        let starts = [y0, r0, bias.1.start_offset(), gamma.1.start_offset(), beta.1.start_offset()];
        let packed = packs::<T>(cols, &starts);
        // Sum then norm, one allocation: (2, …).
        // SAFETY: the kernel writes every element of both halves.
        let mut out = unsafe { dev.alloc::<T>(2 * total)? };
        {
            let (mut sum, mut normed) = out.split_at_mut(total);
            let f = kernel!(dev, "add_layer_norm", y.dtype());
            let (rows_u, cols_i) = (rows as u64, cols as i32);
            let mut builder = f.builder();
            builder.arg(&ys);
            builder.arg(&bs);
            arg_or_null(&mut builder, residual.as_ref().map(|(r, _)| r));
            builder.arg(&gs);
            builder.arg(&betas);
            builder.arg(&mut sum);
            builder.arg(&mut normed);
            builder.arg(&rows_u);
            builder.arg(&cols_i);
            builder.arg(&op.eps);
            builder.arg(&packed);
            // Eight rows (warps) per block of 256 threads.
            let blocks = rows.div_ceil(8).clamp(1, 132 * 32) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match `add_layer_norm_*`; sizes come from the checked layouts.
            unsafe { builder.launch(cfg) }.w()?;
        }
        let mut dims = vec![2];
        dims.extend_from_slice(yl.dims());
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }

    pub fn permute_bias_add(
        plan: &Plan,
        y: &CudaStorage,
        yl: &Layout,
        b: Option<(&CudaStorage, &Layout)>,
        a: &CudaStorage,
        al: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(y.dtype(), permute_bias_add_t, plan, y, yl, b, a, al)
    }

    fn permute_bias_add_t<T: CudaDType + DeviceRepr>(
        plan: &Plan,
        y: &CudaStorage,
        yl: &Layout,
        b: Option<(&CudaStorage, &Layout)>,
        a: &CudaStorage,
        al: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let total = yl.shape().elem_count();
        let dev = y.device.clone();
        let (ys, _) = view::<T>(y, yl, "y")?;
        let (adds, _) = view::<T>(a, al, "addend")?;
        let bias = b.map(|(b, bl)| view::<T>(b, bl, "bias")).transpose()?;
        let bias_len = bias.as_ref().map_or(1, |(b, _)| b.len()) as i64;
        let (tiles, batches, cfg) = tile_launch(plan)?;
        // SAFETY: the kernel writes every element (each tile of each batch).
        let out = unsafe { dev.alloc::<T>(total)? };
        let f = kernel!(dev, "permute_bias_add", y.dtype());
        let mut builder = f.builder();
        builder.arg(&ys);
        arg_or_null(&mut builder, bias.as_ref().map(|(b, _)| b));
        builder.arg(&bias_len);
        builder.arg(&adds);
        builder.arg(&out);
        builder.arg(&tiles);
        builder.arg(&batches);
        // SAFETY: arguments match `permute_bias_add_*`; the plan was made for y's shape and the
        // addend has the permuted one (checked before the op).
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), yl.shape().clone()))
    }

    pub fn conv_bias(width: usize, y: &CudaStorage, yl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        by_dtype!(b.dtype(), conv_bias_t, width, y, yl, b, bl)
    }

    fn conv_bias_t<T: CudaDType + DeviceRepr>(width: usize, y: &CudaStorage, yl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, c, rows, pitch) = yl.shape().dims4()?;
        let total = n * c * rows * width;
        let dev = y.device.clone();
        let (ys, _) = view::<f32>(y, yl, "product")?;
        let (bs, _) = view::<T>(b, bl, "bias")?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(total)? };
        let f = kernel!(dev, "conv_bias", b.dtype());
        let (total_u, c_i, rows_i, pitch_i, width_i) = (total as u64, c as i32, rows as i32, pitch as i32, width as i32);
        let mut builder = f.builder();
        builder.arg(&ys);
        builder.arg(&bs);
        builder.arg(&out);
        builder.arg(&total_u);
        builder.arg(&c_i);
        builder.arg(&rows_i);
        builder.arg(&pitch_i);
        builder.arg(&width_i);
        // SAFETY: arguments match `conv_bias_*`; sizes come from the checked layout.
        unsafe { builder.launch(launch_config(total)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, c, rows, width))))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::common::testing::rel_l2 as rel;

    /// On a GPU: every epilogue against candle's composition in f32, on packed and unpacked
    /// shapes (last axes that are and are not multiples of a 16-byte pack, views at odd offsets).
    #[test]
    fn epilogues_match_candle_on_gpu() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for shape in [vec![3usize, 5, 64], vec![7, 33], vec![2, 4608, 320], vec![1, 1, 8]] {
                let c = *shape.last().unwrap();
                let (y, b, res) = (r(&shape), r(&[c]), r(&shape));
                let want = f(&y).broadcast_add(&f(&b)).unwrap();
                let e = rel(&bias_rows(&y, &b, None).unwrap(), &want);
                assert!(e < tol, "bias {dtype:?} {shape:?}: {e:.2e}");
                let e = rel(&bias_rows(&y, &b, Some(&res)).unwrap(), &(want + f(&res)).unwrap());
                assert!(e < tol, "bias + residual {dtype:?} {shape:?}: {e:.2e}");
                // A view one row in (contiguous, at an offset of c elements: unpacked unless c is
                // a whole number of packs).
                let tall = r(&[shape[0] + 1, c]);
                let view = tall.narrow(0, 1, shape[0]).unwrap();
                let e = rel(&bias_rows(&view, &b, None).unwrap(), &f(&view).broadcast_add(&f(&b)).unwrap());
                assert!(e < tol, "bias on a view {dtype:?} {shape:?}: {e:.2e}");
                eprintln!("bias epilogues {dtype:?} {shape:?}: ok");
            }
            for shape in [vec![2usize, 3, 5, 7], vec![1, 320, 72, 128], vec![3, 8, 16]] {
                let c = shape[1];
                let (y, b, res) = (r(&shape), r(&[c]), r(&shape));
                let mut bshape = vec![1usize; shape.len()];
                bshape[1] = c;
                let want = f(&y).broadcast_add(&f(&b).reshape(bshape).unwrap()).unwrap();
                let e = rel(&bias_channels(&y, &b, None).unwrap(), &want);
                assert!(e < tol, "channel bias {dtype:?} {shape:?}: {e:.2e}");
                let e = rel(&bias_channels(&y, &b, Some(&res)).unwrap(), &(want + f(&res)).unwrap());
                assert!(e < tol, "channel bias + residual {dtype:?} {shape:?}: {e:.2e}");
                eprintln!("channel bias epilogues {dtype:?} {shape:?}: ok");
            }
            for (rows, d) in [(5usize, 8usize), (3, 13), (4608, 1280), (1, 2560)] {
                let (p, b) = (r(&[2, rows, 2 * d]), r(&[2 * d]));
                let want = crate::reference::geglu_reference(&f(&p).broadcast_add(&f(&b)).unwrap()).unwrap();
                let e = rel(&geglu_bias(&p, &b).unwrap(), &want);
                eprintln!("GEGLU epilogue {dtype:?} {rows}x{d}: {e:.2e}");
                assert!(e < tol, "GEGLU {dtype:?} {rows}x{d}: {e:.2e}");
            }
            for (n, c, rows, pitch, width) in [(2usize, 3usize, 5usize, 9usize, 7usize), (1, 320, 72, 130, 128), (3, 8, 4, 4, 4)] {
                let y = Tensor::randn(0f32, 1.0, (n, c, rows, pitch), &dev).unwrap();
                let b = r(&[c]);
                let want = y.narrow(3, 0, width).unwrap().broadcast_add(&f(&b).reshape((1, c, 1, 1)).unwrap()).unwrap();
                let got = conv_bias(&y, &b, width).unwrap();
                assert_eq!(got.dtype(), dtype);
                let e = rel(&got, &want);
                eprintln!("conv epilogue {dtype:?} {n}x{c}x{rows}x{pitch}→{width}: {e:.2e}");
                assert!(e < tol, "conv epilogue {dtype:?}: {e:.2e}");
            }
        }
    }

    /// On a GPU: the transformers' exits (permute, bias, addend in one pass) against the f32
    /// composition on the same rounded inputs; one rounding of the output.
    #[test]
    fn permute_bias_add_matches_the_composition() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        // (y's shape, dims): spatial (n, h·w, c) → (n, c, h·w); temporal (b, h, w, t, c) →
        // (b, t, c, h, w), t and c merged by the plan; an odd one.
        let cases: [(&[usize], &[usize]); 4] = [(&[16, 1152, 320], &[0, 2, 1]), (&[2, 9, 16, 16, 320], &[0, 3, 4, 1, 2]), (&[3, 70, 40], &[0, 2, 1]), (&[2, 5, 3, 7], &[0, 3, 1, 2])];
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 5e-3), (DType::F16, 1e-3)] {
            let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for (shape, dims) in cases {
                let permuted: Vec<usize> = dims.iter().map(|&d| shape[d]).collect();
                let (y, b, add) = (r(shape), r(&[*shape.last().unwrap()]), r(&permuted));
                assert!(permute_bias_add_supported(&y, dims, Some(&b), &add), "{shape:?} {dims:?}");
                for bias in [Some(&b), None] {
                    let biased = match bias {
                        Some(b) => f(&y).broadcast_add(&f(b)).unwrap(),
                        None => f(&y),
                    };
                    let want = (biased.permute(dims).unwrap().contiguous().unwrap() + f(&add)).unwrap();
                    let got = permute_bias_add(&y, dims, bias, &add).unwrap();
                    assert_eq!((got.dims(), got.dtype()), (permuted.as_slice(), dtype));
                    let e = rel(&got, &want);
                    eprintln!("permute epilogue {dtype:?} {shape:?} {dims:?} bias {}: {e:.2e}", bias.is_some());
                    assert!(e < tol, "permute epilogue {dtype:?} {shape:?} {dims:?} bias {}: {e:.2e}", bias.is_some());
                }
            }
            // What it does not take: the innermost axis staying put, a bias along another axis.
            let y = r(&[2, 3, 8]);
            assert!(!permute_bias_add_supported(&y, &[1, 0, 2], None, &r(&[3, 2, 8])));
            assert!(!permute_bias_add_supported(&y, &[0, 2, 1], Some(&r(&[3])), &r(&[2, 8, 3])));
        }
    }

    /// On a GPU: the residual stream's sum and its LayerNorm against the f32 composition (the norm
    /// of the sum as stored), packed and unpacked rows, with and without a residual.
    #[test]
    fn add_layer_norm_matches_the_composition() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-3), (DType::F16, 1e-3)] {
            let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            for shape in [vec![16usize, 1152, 320], vec![3, 37, 1280], vec![2, 5, 323]] {
                let c = shape[2];
                let (y, b, res, gamma, beta) = (r(&shape), r(&[c]), r(&shape), r(&[c]), r(&[c]));
                for residual in [Some(&res), None] {
                    let (sum, normed) = add_layer_norm(&y, &b, residual, &gamma, &beta, 1e-5).unwrap();
                    assert_eq!((sum.dims(), normed.dims(), normed.dtype()), (shape.as_slice(), shape.as_slice(), dtype));
                    let mut want = f(&y).broadcast_add(&f(&b)).unwrap();
                    if let Some(res) = residual {
                        want = (want + f(res)).unwrap();
                    }
                    let e = rel(&sum, &want);
                    assert!(e < tol, "sum {dtype:?} {shape:?}: {e:.2e}");
                    let want = candle_nn::ops::layer_norm(&f(&sum), &f(&gamma), &f(&beta), 1e-5).unwrap();
                    let e = rel(&normed, &want);
                    eprintln!("layer-norm epilogue {dtype:?} {shape:?} residual {}: {e:.2e}", residual.is_some());
                    assert!(e < tol, "layer norm {dtype:?} {shape:?} residual {}: {e:.2e}", residual.is_some());
                }
            }
        }
    }
}
