//! Fused attention on CUDA: `softmax(q·kᵀ·scale)·v` for f16/bf16 inputs of head dimension 16, 32,
//! 64 or 128 without the score matrix in device memory. A 576×1024 spatial attention has
//! 80 × 9216² scores; the chunked composition writes and re-reads them several times over.
//!
//! The kernels: `flash_attention2.cu` (128 queries a block share each key/value tile, loaded
//! asynchronously into two buffers, fragments by ldmatrix; 4 warps of 32 rows for head
//! dimensions up to 64, 8 warps of 16 above) for runs of at least 128 queries, the spatial
//! attentions; `flash_attention.cu`'s staged kernel (4 warps, 64 queries a block) for shorter
//! ones, where a 128-query block would idle, and its short one (a warp per batch and head) for at
//! most 16: the temporal attention's frames.

use candle_core::{DType, Result, Tensor};

/// The head dimensions the kernels are built for (the real UNet uses 64, the tiny fixtures 16).
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// The fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `flash_attention.cu`: at most 16 queries, a warp per (batch, head), 16-key tiles.
    Short,
    /// `flash_attention.cu`: 64 queries a block, tiles staged through registers.
    Staged,
    /// `flash_attention2.cu`: 128 queries a block, tiles double-buffered by cp.async, 8 warps of
    /// 16 query rows.
    Pipelined,
    /// `flash_attention2.cu` with 4 warps of 32 query rows: each fragment read from shared
    /// memory feeds twice the products (head dimensions up to 64).
    PipelinedWide,
}

impl Kernel {
    pub const ALL: [Kernel; 4] = [Kernel::Short, Kernel::Staged, Kernel::Pipelined, Kernel::PipelinedWide];

    /// The kernel for `n` queries of head dimension `d`: the short one up to 16 queries, a
    /// pipelined one from a block's worth on (the wide one where it takes `d`), the staged one
    /// between, unless `DYNAMICRAFTER_FLASH_ATTENTION` says `1` (the staged one only) or `2` (the
    /// shapes before the short and wide kernels: staged below 128 queries, 16 rows per warp
    /// above): A/B benchmarks.
    pub fn for_shape(n: usize, d: usize) -> Kernel {
        let setting = setting();
        let newest = !matches!(setting, Setting::StagedOnly | Setting::Narrow);
        if newest && Kernel::Short.takes(n, d) {
            Kernel::Short
        } else if setting == Setting::StagedOnly || n < Kernel::Pipelined.block_queries() {
            Kernel::Staged
        } else if newest && Kernel::PipelinedWide.takes(n, d) {
            Kernel::PipelinedWide
        } else {
            Kernel::Pipelined
        }
    }

    /// Queries per block (the short kernel: per warp, a block holding 4).
    pub fn block_queries(self) -> usize {
        match self {
            Kernel::Short => SHORT_QUERIES,
            Kernel::Staged => 64,
            Kernel::Pipelined | Kernel::PipelinedWide => 128,
        }
    }

    /// Whether the kernel is built for `n` queries of head dimension `d`.
    pub fn takes(self, n: usize, d: usize) -> bool {
        HEAD_DIMS.contains(&d)
            && match self {
                Kernel::Short => n <= SHORT_QUERIES,
                Kernel::PipelinedWide => d <= 64,
                Kernel::Staged | Kernel::Pipelined => true,
            }
    }
}

/// The most queries the short kernel takes: one row tile of the products.
const SHORT_QUERIES: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setting {
    Off,
    StagedOnly,
    /// The staged kernel and the pipelined one with 16 rows per warp (no short or wide one).
    Narrow,
    /// Every kernel, heads split into `(batch·heads, len, d)` copies and merged back around them.
    Split,
    All,
}

/// `DYNAMICRAFTER_FLASH_ATTENTION`: `0` off (candle's chunked composition), `1` the staged kernel
/// only, `2` no short or wide kernel, `split` every kernel with the heads split and merged by
/// copies (the layout before [`flash_attention_heads`]), unset or anything else every kernel,
/// heads in place; off too under `DYNAMICRAFTER_CUDA_KERNELS=0` ([`super::kernels_enabled`]).
fn setting() -> Setting {
    static SETTING: std::sync::OnceLock<Setting> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("DYNAMICRAFTER_FLASH_ATTENTION").as_deref() {
        _ if !super::kernels_enabled() => Setting::Off,
        Ok("0") => Setting::Off,
        Ok("1") => Setting::StagedOnly,
        Ok("2") => Setting::Narrow,
        Ok("split") => Setting::Split,
        _ => Setting::All,
    })
}

/// Whether multi-head attention reads and writes heads in place ([`flash_attention_heads`])
/// rather than splitting them into copies: unless `DYNAMICRAFTER_FLASH_ATTENTION` says otherwise.
pub fn heads_in_place_enabled() -> bool {
    matches!(setting(), Setting::All | Setting::StagedOnly | Setting::Narrow)
}

/// Whether the kernels read heads of `head_dim` in place (strided views included) in this build:
/// what stacking a self-attention's q/k/v products relies on.
pub fn reads_heads_in_place(head_dim: usize) -> bool {
    cfg!(feature = "cuda") && heads_in_place_enabled() && HEAD_DIMS.contains(&head_dim)
}

/// Whether [`flash_attention`] takes these `(batch, len, d)` inputs: a CUDA build, a GPU, f16 or
/// bf16 throughout, d in [`HEAD_DIMS`], fused attention not turned off.
pub fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    supported_heads(q, k, v, 1)
}

/// Whether [`flash_attention_heads`] takes these `(batch, len, heads·d)` inputs: as
/// [`supported`], for each head's d.
pub fn supported_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let dtype = q.dtype();
    setting() != Setting::Off
        && super::on_gpu(q)
        && matches!(dtype, DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && heads > 0
        && [q, k, v].iter().all(|t| t.rank() == 3 && t.dims().iter().all(|&n| n > 0))
        && q.dim(2).is_ok_and(|c| c % heads == 0 && HEAD_DIMS.contains(&(c / heads)))
        && k.dims() == v.dims()
        && k.dim(2).ok() == q.dim(2).ok()
        && k.dim(0).ok() == q.dim(0).ok()
}

/// `softmax(q·kᵀ·scale)·v` for `(batch, n, d)` queries and `(batch, m, d)` keys and values.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    flash_attention_with(Kernel::for_shape(q.dim(1)?, q.dim(2)?), q, k, v, scale)
}

/// [`flash_attention`] on the kernel named.
pub fn flash_attention_with(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    flash_attention_heads_with(kernel, q, k, v, 1, scale)
}

/// Multi-head attention on `(batch, n, heads·d)` queries and `(batch, m, heads·d)` keys and
/// values, heads side by side in the last dimension, into a `(batch, n, heads·d)` output: the
/// kernels read and write each head in place, so neither the split into `(batch·heads, len, d)`
/// nor the merge back is copied. The rows may be strided (q, k and v as views of one fused
/// projection, `(batch, n, 3·heads·d)`).
pub fn flash_attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    flash_attention_heads_with(Kernel::for_shape(q.dim(1)?, head_dim(q, heads)?), q, k, v, heads, scale)
}

/// [`flash_attention_heads`] on the kernel named.
pub fn flash_attention_heads_with(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    attention_op(kernel, q, k, v, heads, scale, None)
}

/// `addend + weight · flash_attention_heads(q, k, v)`, the sum made as the kernel stores its
/// output (one rounding): the dual cross-attention's image branch joining the text branch's
/// output. `addend`: the output's shape, `(batch, n, heads·d)`.
pub fn flash_attention_heads_add(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, weight: f64, addend: &Tensor) -> Result<Tensor> {
    attention_op(Kernel::for_shape(q.dim(1)?, head_dim(q, heads)?), q, k, v, heads, scale, Some((addend, weight)))
}

/// The head dimension of `(batch, n, heads·d)` queries.
fn head_dim(q: &Tensor, heads: usize) -> Result<usize> {
    Ok(q.dim(2)? / heads.max(1))
}

fn attention_op(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, addend: Option<(&Tensor, f64)>) -> Result<Tensor> {
    if !supported_heads(q, k, v, heads) {
        candle_core::bail!("flash attention needs f16/bf16 CUDA tensors (batch, len, heads·d) with d in {HEAD_DIMS:?}");
    }
    if !kernel.takes(q.dim(1)?, head_dim(q, heads)?) {
        candle_core::bail!("flash attention: the {kernel:?} kernel does not take {} queries of head dimension {}", q.dim(1)?, head_dim(q, heads)?);
    }
    let addend = match addend {
        Some((a, weight)) => {
            if a.dims() != q.dims() || a.dtype() != q.dtype() || !a.device().same_device(q.device()) {
                candle_core::bail!("flash attention: an addend {:?} {:?} for an output {:?} {:?}", a.shape(), a.dtype(), q.shape(), q.dtype());
            }
            // Read in the output's layout: contiguous from an aligned start.
            let a = if a.is_contiguous() && a.layout().start_offset().is_multiple_of(8) { a.clone() } else { a.force_contiguous()? };
            Some((a, weight as f32))
        }
        None => None,
    };
    let (q, k, v) = (readable(q)?, readable(k)?, readable(v)?);
    q.apply_op3_no_bwd(&k, &v, &FlashAttention { scale: scale as f32, kernel, heads, addend })
}

/// `t` as the kernels can read it: rows of contiguous elements, and every row and batch starting
/// on a 16-byte boundary (they load 16-byte chunks). Views that are (a narrowed projection) stay
/// views; anything else becomes a fresh copy, which starts at 0 (`copy` would keep the offset).
fn readable(t: &Tensor) -> Result<Tensor> {
    if row_strides(t.layout()).is_some() {
        Ok(t.clone())
    } else if t.is_contiguous() && !t.layout().start_offset().is_multiple_of(8) {
        t.force_contiguous()
    } else {
        t.contiguous()
    }
}

/// The batch and row strides (elements) of a `(batch, len, c)` layout the kernels read in place:
/// the last dimension contiguous, the offset and both strides multiples of 8 elements. The stride
/// of a dimension of size 1 is never used and counts as 0.
fn row_strides(l: &candle_core::Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    if dims.len() != 3 || (strides[2] != 1 && dims[2] > 1) {
        return None;
    }
    let used = |i: usize| if dims[i] > 1 { strides[i] } else { 0 };
    let (batch, row) = (used(0), used(1));
    [l.start_offset(), batch, row].iter().all(|x| x.is_multiple_of(8)).then_some((batch, row))
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    scale: f32,
    kernel: Kernel,
    heads: usize,
    /// Added to the output with the output weighted (contiguous, aligned: `attention_op`).
    addend: Option<(Tensor, f32)>,
}

cuda_op!(CustomOp3 for FlashAttention, "flash-attention", |op, q, ql, k, kl, v, vl| {
    use candle_core::backend::BackendStorage;
    let args = cuda::Args { kernel: op.kernel, scale: op.scale, heads: op.heads, addend: op.addend.as_ref() };
    match q.dtype() {
        DType::BF16 => cuda::launch::<half::bf16>(&args, "bf16", q, ql, k, kl, v, vl),
        DType::F16 => cuda::launch::<half::f16>(&args, "f16", q, ql, k, kl, v, vl),
        dt => candle_core::bail!("flash attention: unsupported dtype {dt:?}"),
    }
});

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Shape};

    use super::{row_strides, Kernel};

    const STAGED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
    const PIPELINED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention2.ptx"));

    pub struct Args<'a> {
        pub kernel: Kernel,
        pub scale: f32,
        pub heads: usize,
        pub addend: Option<&'a (candle_core::Tensor, f32)>,
    }

    /// attention.cuh's `AttentionLayout`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct AttentionLayout {
        q_batch: i64,
        k_batch: i64,
        v_batch: i64,
        out_batch: i64,
        q_row: i64,
        k_row: i64,
        v_row: i64,
        out_row: i64,
        heads: i32,
        weight: f32,
        batches: i32,
    }

    // SAFETY: plain numbers, laid out as the kernels' struct (#[repr(C)]).
    unsafe impl DeviceRepr for AttentionLayout {}

    /// The elements of `storage` that layout `l` reaches, and its batch and row strides.
    fn view<'a, T: CudaDType>(storage: &'a CudaStorage, l: &Layout) -> Result<(CudaView<'a, T>, usize, usize)> {
        let Some((batch, row)) = row_strides(l) else {
            candle_core::bail!("flash attention: a layout the kernels cannot read in place ({:?}, strides {:?})", l.dims(), l.stride())
        };
        let (b, n, c) = l.shape().dims3()?;
        let start = l.start_offset();
        let end = start + (b - 1) * batch + (n - 1) * row + c;
        Ok((storage.as_cuda_slice::<T>()?.slice(start..end), batch, row))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn launch<T: CudaDType + DeviceRepr>(
        args: &Args<'_>,
        dtype: &str,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n, c) = ql.shape().dims3()?;
        let (kb, m, kc) = kl.shape().dims3()?;
        if kb != b || kc != c || vl.shape() != kl.shape() || c % args.heads != 0 {
            candle_core::bail!("flash attention: q {:?}, k {:?}, v {:?}, {} heads", ql.shape(), kl.shape(), vl.shape(), args.heads);
        }
        let d = c / args.heads;
        let dev = q.device.clone();
        let (q, q_batch, q_row) = view::<T>(q, ql)?;
        let (k, k_batch, k_row) = view::<T>(k, kl)?;
        let (v, v_batch, v_row) = view::<T>(v, vl)?;
        let kernel = args.kernel;
        // Query blocks per (batch, head); the short kernel: 4 (batch, head)s per block, a warp each.
        let blocks = if kernel == Kernel::Short { (b * args.heads).div_ceil(4) } else { b * args.heads * n.div_ceil(kernel.block_queries()) };
        // Threads, dynamic shared memory (flash_attention2.cu: two buffers of k and v tiles,
        // 64 keys, 32 for d = 128, rows padded by 8 elements), the module.
        let (threads, shared_bytes, name, module, ptx) = match kernel {
            Kernel::Staged => (128, 0, "flash_attention", "dynamicrafter_flash_attention", STAGED_PTX),
            Kernel::Short => (128, 0, "flash_attention_short", "dynamicrafter_flash_attention", STAGED_PTX),
            Kernel::Pipelined | Kernel::PipelinedWide => {
                let keys = if d <= 64 { 64 } else { 32 };
                let (threads, name) = if kernel == Kernel::PipelinedWide { (128, "flash_attention2w") } else { (256, "flash_attention2") };
                (threads, 4 * keys * (d + 8) * std::mem::size_of::<T>(), name, "dynamicrafter_flash_attention2", PIPELINED_PTX)
            }
        };
        let func = dev.get_or_load_custom_func(&format!("{name}_{dtype}_d{d}"), module, ptx)?;
        // SAFETY: every element is written by the kernel (each query row of each head of each batch).
        let out = unsafe { dev.alloc::<T>(b * n * c)? };
        let as_i64 = |x: usize| x as i64;
        let layout = AttentionLayout {
            q_batch: as_i64(q_batch),
            k_batch: as_i64(k_batch),
            v_batch: as_i64(v_batch),
            out_batch: as_i64(n * c),
            q_row: as_i64(q_row),
            k_row: as_i64(k_row),
            v_row: as_i64(v_row),
            out_row: as_i64(c),
            heads: args.heads as i32,
            weight: args.addend.map_or(1.0, |a| a.1),
            batches: b as i32,
        };
        // The addend's storage, held for the launch (attention_op made it contiguous and aligned).
        let addend_storage = args.addend.map(|(a, _)| a.storage_and_layout());
        let addend = addend_storage.as_ref().map(|(storage, layout)| crate::cuda::launch::carried::<T>(storage, layout, "the attention's addend")).transpose()?;
        if let Some(a) = &addend {
            if a.len() != b * n * c {
                candle_core::bail!("flash attention: an addend of {} elements for {} outputs", a.len(), b * n * c);
            }
        }
        let (n_i, m_i) = (n as i32, m as i32);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared_bytes as u32 };
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        crate::cuda::launch::arg_or_null(&mut builder, addend.as_ref());
        builder.arg(&n_i);
        builder.arg(&m_i);
        builder.arg(&args.scale);
        builder.arg(&layout);
        // SAFETY: argument types and order match the kernel's signature; the views cover every
        // element the strides reach.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, n, c))))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::attention_reference;
    use candle_core::Device;

    /// On a GPU: every fused kernel against the f32 composition on the same (rounded) inputs, for
    /// lengths that are and are not multiples of the tiles, cross- and self-attention.
    #[test]
    fn fused_attention_matches_the_f32_reference() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let cases = [(1, 1, 1, 64), (3, 17, 77, 64), (2, 64, 16, 64), (5, 100, 33, 64), (80, 1024, 1024, 64), (7, 16, 16, 64), (2, 4096, 300, 64), (1, 9216, 9216, 64), (4, 70, 130, 16), (3, 65, 64, 32), (2, 200, 90, 128), (9, 12, 40, 32), (3, 16, 16, 128)];
        for (kernel, (b, n, m, d)) in Kernel::ALL.into_iter().flat_map(|k| cases.map(|c| (k, c))).filter(|(k, c)| k.takes(c.1, c.3)) {
            for (dtype, tol) in [(DType::BF16, 5e-3), (DType::F16, 1e-3)] {
                let r = |len| Tensor::randn(0f32, 1.0, (b, len, d), &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
                let (q, k, v) = (r(n), r(m), r(m));
                let got = flash_attention_with(kernel, &q, &k, &v, 0.125).unwrap().to_dtype(DType::F32).unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = attention_reference(&f(&q), &f(&k), &f(&v), 0.125).unwrap();
                let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let rel = diff / norm;
                eprintln!("flash attention {kernel:?} {dtype:?} b={b} n={n} m={m} d={d}: relative error {rel:.2e}");
                assert!(rel.is_finite() && rel < tol, "{kernel:?} {dtype:?} b={b} n={n} m={m} d={d}: relative error {rel:.2e} ≥ {tol:.0e}");
            }
        }
    }

    /// On a GPU: heads read and written in place, from separate projections and from views of
    /// one fused q/k/v projection, against split heads through the f32 composition.
    #[test]
    fn heads_in_place_match_split_heads() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let split = |t: &Tensor, heads: usize| {
            let (b, l, c) = t.dims3().unwrap();
            t.reshape((b, l, heads, c / heads)).unwrap().transpose(1, 2).unwrap().reshape((b * heads, l, c / heads)).unwrap()
        };
        // (b, heads, n, m, d, fused): spatial and temporal self-attention, cross-attention.
        let cases = [(2, 5, 300, 300, 64, true), (40, 5, 16, 16, 64, true), (2, 5, 300, 77, 64, false), (3, 2, 130, 33, 128, false), (1, 3, 20, 20, 16, true)];
        for (kernel, (b, heads, n, m, d, fused)) in Kernel::ALL.into_iter().flat_map(|k| cases.map(|c| (k, c))).filter(|(k, c)| k.takes(c.2, c.4)) {
            for (dtype, tol) in [(DType::BF16, 5e-3), (DType::F16, 1e-3)] {
                let c = heads * d;
                let r = |len, width| Tensor::randn(0f32, 1.0, (b, len, width), &dev).and_then(|t| t.to_dtype(dtype)).unwrap();
                let (q, k, v) = if fused {
                    let qkv = r(n, 3 * c);
                    (qkv.narrow(2, 0, c).unwrap(), qkv.narrow(2, c, c).unwrap(), qkv.narrow(2, 2 * c, c).unwrap())
                } else {
                    (r(n, c), r(m, c), r(m, c))
                };
                let got = flash_attention_heads_with(kernel, &q, &k, &v, heads, 0.125).unwrap().to_dtype(DType::F32).unwrap();
                let f = |t: &Tensor| split(&t.to_dtype(DType::F32).unwrap(), heads);
                let want = attention_reference(&f(&q), &f(&k), &f(&v), 0.125).unwrap();
                let want = want.reshape((b, heads, n, d)).unwrap().transpose(1, 2).unwrap().reshape((b, n, c)).unwrap();
                let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let rel = diff / norm;
                let what = format!("{kernel:?} {dtype:?} b={b} heads={heads} n={n} m={m} d={d} fused={fused}");
                eprintln!("flash attention heads in place {what}: relative error {rel:.2e}");
                assert!(rel.is_finite() && rel < tol, "{what}: relative error {rel:.2e} ≥ {tol:.0e}");
                if kernel == Kernel::for_shape(n, d) {
                    // With an addend, as the dual cross-attention's image branch.
                    let addend = r(n, c);
                    let got = flash_attention_heads_add(&q, &k, &v, heads, 0.125, 0.75, &addend).unwrap().to_dtype(DType::F32).unwrap();
                    let want = ((&want * 0.75).unwrap() + addend.to_dtype(DType::F32).unwrap()).unwrap();
                    let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                    let rel = diff / want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                    eprintln!("flash attention with an addend {what}: relative error {rel:.2e}");
                    assert!(rel.is_finite() && rel < tol, "{what} with an addend: relative error {rel:.2e} ≥ {tol:.0e}");
                }
            }
        }
    }
}
