//! The UNet's forward as a CUDA graph: captured once on copies of its inputs, then replayed with
//! new inputs copied in. What `pipeline/graphs.rs` keeps per input shape
//! (`DYNAMICRAFTER_CUDA_GRAPH=1`) and `dynamicrafter-bench graph-*` times.
//!
//! candle uploads small host arrays (the dims and strides of its strided ops) on the way; a
//! capture may not read host memory, so the eager warm-up runs with candle's upload cache on
//! (each array uploaded once, by content) and the capture reuses those device copies.

use crate::models::unet::{Unet, UnetConditioning};
use crate::Result;
use candle_core::Tensor;

/// One captured forward: the inputs it reads, the output it writes (graph memory, valid after
/// a launch until the next), and the graph.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct UnetGraph {
    x: Tensor,
    emb: Tensor,
    context: Tensor,
    output: Tensor,
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    /// Recorded after the last copy of the output, on the stream of the thread that replayed:
    /// the next launch (maybe from another thread's stream) waits for it.
    #[cfg(feature = "cuda")]
    copied: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

// SAFETY: a CUDA graph and event may be used from any thread as long as calls on them are
// serialized: `replay` takes `&mut self`.
unsafe impl Send for UnetGraph {}

impl UnetGraph {
    /// The eager forward, with candle's uploads cached for a capture of the same shapes: run
    /// it (it also loads the kernels and makes cuBLAS's workspaces) before [`capture`](Self::capture).
    pub fn warm_up(unet: &Unet, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        let _cache = match x.device() {
            candle_core::Device::Cuda(dev) => Some(dev.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        Ok(unet.forward_conditioned(x, conditioning)?)
    }

    /// Captures the forward on copies of `x` and `conditioning` (nothing runs until a replay),
    /// or says why it cannot: not a CUDA device, or an op the stream refuses while capturing.
    #[cfg(feature = "cuda")]
    pub fn capture(unet: &Unet, x: &Tensor, conditioning: &UnetConditioning) -> std::result::Result<Self, String> {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let candle_core::Device::Cuda(dev) = x.device() else { return Err("not a CUDA device".into()) };
        let copy = |t: &Tensor| t.force_contiguous().map_err(|e| e.to_string());
        let (x, emb, context) = (copy(x)?, copy(&conditioning.emb)?, copy(&conditioning.context)?);
        let inputs = UnetConditioning { emb: emb.clone(), context: context.clone() };
        x.device().synchronize().map_err(|e| e.to_string())?;
        let _cache = dev.enable_cuda_graph_htod_cache();
        let stream = dev.cuda_stream();
        // Relaxed: candle allocates (cuMemAllocAsync, which the graph records) and makes events.
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(|e| e.to_string())?;
        let output = unet.forward_conditioned(&x, &inputs);
        // A failed op's temporaries were freed into the dead capture; cudarc keeps that error and
        // would return it from end_capture before ending the capture: clear it first.
        let _ = stream.context().check_err();
        // Auto-free: the output's graph allocation is released when the graph is launched again.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        if stream.capture_status().is_ok_and(|s| s != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) {
            // Still capturing (end_capture stopped early): end it here and drop what it made.
            // SAFETY: the stream is this device's, in capture mode; the graph, if any, is ours.
            if let Ok(g) = unsafe { result::stream::end_capture(stream.cu_stream()) } {
                if !g.is_null() {
                    let _ = unsafe { result::graph::destroy(g) };
                }
            }
        }
        let failure = match (output, graph) {
            (Ok(output), Ok(Some(graph))) => return Ok(Self { x, emb, context, output, graph, copied: None }),
            (Err(e), _) => format!("capturing: {e}"),
            (Ok(output), Err(e)) => {
                drop(output); // an address of a discarded graph: its free fails, and is cleared below
                format!("instantiating: {e}")
            }
            (Ok(output), Ok(None)) => {
                drop(output);
                "the capture came back empty".into()
            }
        };
        let _ = stream.context().check_err();
        Err(failure)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn capture(_: &Unet, _: &Tensor, _: &UnetConditioning) -> std::result::Result<Self, String> {
        Err("CUDA graphs need a CUDA build".into())
    }

    /// The forward on new inputs of the captured shapes: copied in, a launch, the output copied
    /// out (the next launch overwrites the graph's own).
    #[cfg(feature = "cuda")]
    pub fn replay(&mut self, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = self.x.device() else { return unreachable_device() };
        let stream = dev.cuda_stream();
        let driver = |e: candle_core::cuda_backend::cudarc::driver::DriverError| candle_core::Error::Msg(format!("CUDA graph: {e}"));
        if let Some(copied) = &self.copied {
            stream.wait(copied).map_err(driver)?;
        }
        self.x.slice_set(x, 0, 0)?;
        self.emb.slice_set(&conditioning.emb, 0, 0)?;
        self.context.slice_set(&conditioning.context, 0, 0)?;
        self.graph.launch().map_err(driver)?;
        let out = self.output.force_contiguous()?;
        self.copied = Some(stream.record_event(None).map_err(driver)?);
        Ok(out)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn replay(&mut self, _: &Tensor, _: &UnetConditioning) -> Result<Tensor> {
        unreachable_device()
    }
}

/// The error of a graph on a device that has none (no graph is ever captured there).
fn unreachable_device<T>() -> Result<T> {
    Err(candle_core::Error::Msg("a CUDA graph on a device without CUDA".into()).into())
}
