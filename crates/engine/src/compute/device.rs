//! Device selection by name and the GPU memory readings of the run report.

use crate::{Error, Result};
use candle_core::Device;

/// The device named `auto` (CUDA when this build has it and a GPU is present, else the CPU),
/// `cpu`, `cuda` or `cuda:N`.
pub fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "auto" => return Ok(Device::cuda_if_available(0)?),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::InvalidInput(format!("device '{name}' (expected auto, cpu, cuda or cuda:N)")))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidInput(format!("device {name}: this build has no CUDA support (build with `--features cuda`)")));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::InvalidInput(format!("device {name}: {e}")))
}

/// `cpu` or `cuda:N`, for reports.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => format!("cuda:{}", d.cuda_stream().context().ordinal()),
        _ => "gpu".into(),
    }
}

/// Peak GPU memory allocated by this process since it started or since the last
/// [`reset_peak_memory`] (the high-water mark of the device's memory pool, which candle's
/// stream-ordered allocations come from); `None` on the CPU.
pub fn peak_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda::pool_attribute(d, cuda::USED_HIGH).ok().map(|high| {
            let current = cuda::pool_attribute(d, cuda::USED_CURRENT).unwrap_or(0);
            high.max(current)
        });
    }
    let _ = device;
    None
}

/// Starts a new peak for [`peak_memory_bytes`] (benchmarks measure each case on its own).
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let _ = cuda::reset_pool_attribute(d, cuda::USED_HIGH);
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    pub const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pub const USED_CURRENT: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;

    fn pool(d: &CudaDevice) -> Result<sys::CUmemoryPool, sys::CUresult> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(|e| e.0)?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
        let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(pool)
        } else {
            Err(r)
        }
    }

    pub fn pool_attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64, sys::CUresult> {
        let pool = pool(d)?;
        let mut value: u64 = 0;
        // SAFETY: both attributes read are `cuuint64_t`, written into `value`.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(value)
        } else {
            Err(r)
        }
    }

    pub fn reset_pool_attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<(), sys::CUresult> {
        let pool = pool(d)?;
        let mut zero: u64 = 0;
        // SAFETY: the high-water marks are `cuuint64_t` and may only be set to zero.
        let r = unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut std::ffi::c_void) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(r)
        }
    }
}
