//! Fused attention on CUDA: `softmax(q·kᵀ·scale)·v` for f16/bf16 inputs of head dimension 16, 32,
//! 64 or 128 without the score matrix in device memory. A 576×1024 spatial attention has
//! 80 × 9216² scores; the chunked composition writes and re-reads them several times over.
//!
//! Two kernels: `flash_attention2.cu` (8 warps share each key/value tile, loaded asynchronously
//! into two buffers, fragments by ldmatrix) for runs of at least 128 queries, the spatial
//! attentions; `flash_attention.cu` (4 warps, 64 queries a block) for shorter ones, where 8 warps
//! would idle: the temporal attention's 16 frames.

use candle_core::{DType, Result, Tensor};

/// The head dimensions the kernels are built for (the real UNet uses 64, the tiny fixtures 16).
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// The two fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `flash_attention.cu`: 64 queries a block, tiles staged through registers.
    Staged,
    /// `flash_attention2.cu`: 128 queries a block, tiles double-buffered by cp.async.
    Pipelined,
}

impl Kernel {
    /// The kernel for `n` queries: the pipelined one from a block's worth of queries on, unless
    /// `DYNAMICRAFTER_FLASH_ATTENTION=1` keeps the staged one (A/B benchmarks).
    pub fn for_queries(n: usize) -> Kernel {
        if setting() == Setting::StagedOnly || n < Kernel::Pipelined.block_queries() {
            Kernel::Staged
        } else {
            Kernel::Pipelined
        }
    }

    /// Queries per block.
    pub fn block_queries(self) -> usize {
        match self {
            Kernel::Staged => 64,
            Kernel::Pipelined => 128,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setting {
    Off,
    StagedOnly,
    Both,
}

/// `DYNAMICRAFTER_FLASH_ATTENTION`: `0` off (candle's chunked composition), `1` the staged kernel
/// only, unset or anything else both.
fn setting() -> Setting {
    static SETTING: std::sync::OnceLock<Setting> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("DYNAMICRAFTER_FLASH_ATTENTION").as_deref() {
        Ok("0") => Setting::Off,
        Ok("1") => Setting::StagedOnly,
        _ => Setting::Both,
    })
}

/// Whether [`flash_attention`] takes these `(batch, len, d)` inputs: a CUDA build, a GPU, f16 or
/// bf16 throughout, d in [`HEAD_DIMS`], fused attention not turned off.
pub fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let dtype = q.dtype();
    setting() != Setting::Off
        && cfg!(feature = "cuda")
        && q.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && q.rank() == 3
        && q.dim(2).is_ok_and(|d| HEAD_DIMS.contains(&d))
        && k.dims() == v.dims()
        && k.dim(2).ok() == q.dim(2).ok()
        && k.dim(1).is_ok_and(|m| m > 0)
        && q.dim(1).is_ok_and(|n| n > 0)
        && q.dim(0).is_ok_and(|b| b > 0)
}

/// `softmax(q·kᵀ·scale)·v` for `(batch, n, d)` queries and `(batch, m, d)` keys and values.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    flash_attention_with(Kernel::for_queries(q.dim(1)?), q, k, v, scale)
}

/// [`flash_attention`] on the kernel named.
pub fn flash_attention_with(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !supported(q, k, v) {
        candle_core::bail!("flash attention needs f16/bf16 CUDA tensors of head dimension {HEAD_DIMS:?}");
    }
    // The kernels read 16-byte chunks: each tensor must start on an 8-element boundary (a
    // forced copy starts at 0; `copy` would keep the offset).
    let aligned = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.force_contiguous()
        }
    };
    aligned(q)?.apply_op3_no_bwd(&aligned(k)?, &aligned(v)?, &FlashAttention { scale: scale as f32, kernel })
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    scale: f32,
    kernel: Kernel,
}

impl candle_core::CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("flash attention runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &candle_core::Layout,
        k: &candle_core::CudaStorage,
        kl: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        vl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        match q.dtype() {
            DType::BF16 => cuda::launch::<half::bf16>(self.kernel, "bf16", self.scale, q, ql, k, kl, v, vl),
            DType::F16 => cuda::launch::<half::f16>(self.kernel, "f16", self.scale, q, ql, k, kl, v, vl),
            dt => candle_core::bail!("flash attention: unsupported dtype {dt:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Shape};

    use super::Kernel;

    const STAGED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
    const PIPELINED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention2.ptx"));

    #[allow(clippy::too_many_arguments)]
    pub fn launch<T: CudaDType + DeviceRepr>(
        kernel: Kernel,
        dtype: &str,
        scale: f32,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, n, d) = ql.shape().dims3()?;
        let (kb, m, _) = kl.shape().dims3()?;
        if kb != b || vl.shape() != kl.shape() {
            candle_core::bail!("flash attention: q {:?}, k {:?}, v {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) =
            (ql.contiguous_offsets(), kl.contiguous_offsets(), vl.contiguous_offsets())
        else {
            candle_core::bail!("flash attention needs contiguous inputs");
        };
        let dev = q.device.clone();
        let q = q.as_cuda_slice::<T>()?.slice(q0..q1);
        let k = k.as_cuda_slice::<T>()?.slice(k0..k1);
        let v = v.as_cuda_slice::<T>()?.slice(v0..v1);
        let blocks = b * n.div_ceil(kernel.block_queries());
        // Threads, dynamic shared memory (flash_attention2.cu: two buffers of k and v tiles,
        // 64 keys, 32 for d = 128, rows padded by 8 elements), the module.
        let (threads, shared_bytes, name, module, ptx) = match kernel {
            Kernel::Staged => (128, 0, "flash_attention", "dynamicrafter_flash_attention", STAGED_PTX),
            Kernel::Pipelined => {
                let keys = if d <= 64 { 64 } else { 32 };
                (256, 4 * keys * (d + 8) * std::mem::size_of::<T>(), "flash_attention2", "dynamicrafter_flash_attention2", PIPELINED_PTX)
            }
        };
        let func = dev.get_or_load_custom_func(&format!("{name}_{dtype}_d{d}"), module, ptx)?;
        // SAFETY: every element is written by the kernel (each query row of each batch).
        let out = unsafe { dev.alloc::<T>(b * n * d)? };
        let (n_i, m_i) = (n as i32, m as i32);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared_bytes as u32 };
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&n_i);
        builder.arg(&m_i);
        builder.arg(&scale);
        // SAFETY: argument types and order match the kernel's signature; sizes checked above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, n, d))))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::attention_reference;
    use candle_core::Device;

    /// On a GPU: both fused kernels against the f32 composition on the same (rounded) inputs, for
    /// lengths that are and are not multiples of the tiles, cross- and self-attention.
    #[test]
    fn fused_attention_matches_the_f32_reference() {
        let dev = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let cases = [(1, 1, 1, 64), (3, 17, 77, 64), (2, 64, 16, 64), (5, 100, 33, 64), (80, 1024, 1024, 64), (7, 16, 16, 64), (2, 4096, 300, 64), (1, 9216, 9216, 64), (4, 70, 130, 16), (3, 65, 64, 32), (2, 200, 90, 128)];
        for (kernel, (b, n, m, d)) in [Kernel::Staged, Kernel::Pipelined].into_iter().flat_map(|k| cases.map(|c| (k, c))) {
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
}
