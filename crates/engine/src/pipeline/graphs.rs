//! The UNet's forward replayed as a CUDA graph (`DYNAMICRAFTER_CUDA_GRAPH=1`, off by default:
//! an experiment until a device measures it, `dynamicrafter-bench graph-*` first). Every
//! denoising step runs the same forward on inputs of the same shapes, and at 256×256 most of its
//! thousands of kernels are short, so the host's launches may be what the card waits on.
//!
//! Per input shape: the first call runs eagerly (it loads the kernels and makes cuBLAS's
//! workspaces, which a capture must not do); the second captures the forward on copies of its
//! inputs ([`Unet::forward_conditioned`]: device work only) and replays it; every later call
//! copies its inputs into those copies, replays, and copies the output out. A capture that fails
//! (an op the stream refuses while capturing) leaves that shape eager, with a warning.

use crate::models::unet::{Unet, UnetConditioning};
use crate::Result;
use candle_core::{DType, Tensor};
use std::sync::Mutex;

/// The captured forwards, one per input shape.
#[derive(Default)]
pub(crate) struct UnetGraphs {
    slots: Mutex<Vec<Slot>>,
}

/// The shapes and dtype a forward was captured for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    x: Vec<usize>,
    emb: Vec<usize>,
    context: Vec<usize>,
    dtype: DType,
}

struct Slot {
    key: Key,
    state: State,
}

enum State {
    /// Run once, eagerly.
    Seen,
    Captured(Captured),
    /// The capture failed: eager from now on.
    Failed,
}

impl UnetGraphs {
    /// `unet.forward_conditioned(x, conditioning)`, replayed from a graph where one is captured.
    pub(crate) fn forward(&self, unet: &Unet, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        let key = Key { x: x.dims().to_vec(), emb: conditioning.emb.dims().to_vec(), context: conditioning.context.dims().to_vec(), dtype: x.dtype() };
        // Held for the whole call: a graph's launches must not interleave.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.iter_mut().find(|s| s.key == key) else {
            slots.push(Slot { key, state: State::Seen });
            return Ok(unet.forward_conditioned(x, conditioning)?);
        };
        if matches!(slot.state, State::Seen) {
            slot.state = match Captured::new(unet, x, conditioning) {
                Ok(captured) => {
                    tracing::info!("CUDA graph captured for the UNet forward on {:?}", slot.key.x);
                    State::Captured(captured)
                }
                Err(why) => {
                    tracing::warn!("the UNet forward on {:?} runs without a CUDA graph: {why}", slot.key.x);
                    State::Failed
                }
            };
        }
        match &slot.state {
            State::Captured(captured) => captured.replay(x, conditioning),
            _ => Ok(unet.forward_conditioned(x, conditioning)?),
        }
    }
}

/// A captured forward: the inputs it reads, the output it writes (graph memory, valid after a
/// launch until the next), the graph.
struct Captured {
    x: Tensor,
    emb: Tensor,
    context: Tensor,
    output: Tensor,
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

// SAFETY: a CUDA graph may be launched from any thread as long as calls on it are serialized;
// `UnetGraphs` only touches it under its mutex.
unsafe impl Send for Captured {}

impl Captured {
    #[cfg(feature = "cuda")]
    fn new(unet: &Unet, x: &Tensor, conditioning: &UnetConditioning) -> std::result::Result<Self, String> {
        use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let candle_core::Device::Cuda(dev) = x.device() else { return Err("not a CUDA device".into()) };
        let copy = |t: &Tensor| t.force_contiguous().map_err(|e| e.to_string());
        let (x, emb, context) = (copy(x)?, copy(&conditioning.emb)?, copy(&conditioning.context)?);
        let inputs = UnetConditioning { emb: emb.clone(), context: context.clone() };
        let stream = dev.cuda_stream();
        x.device().synchronize().map_err(|e| e.to_string())?;
        // Relaxed: candle allocates (cuMemAllocAsync, which a graph records) and creates events.
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(|e| e.to_string())?;
        let output = unet.forward_conditioned(&x, &inputs);
        // Auto-free: the output's graph allocation is released when the graph is launched again.
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        match (output, graph) {
            (Ok(output), Ok(Some(graph))) => Ok(Self { x, emb, context, output, graph }),
            (Err(e), _) => Err(format!("capturing: {e}")),
            (_, Err(e)) => Err(format!("instantiating: {e}")),
            (_, Ok(None)) => Err("the capture came back empty".into()),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn new(_: &Unet, _: &Tensor, _: &UnetConditioning) -> std::result::Result<Self, String> {
        Err("CUDA graphs need a CUDA build".into())
    }

    /// The inputs copied in, a launch, the output copied out (the next launch overwrites it).
    fn replay(&self, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        self.x.slice_set(x, 0, 0)?;
        self.emb.slice_set(&conditioning.emb, 0, 0)?;
        self.context.slice_set(&conditioning.context, 0, 0)?;
        self.launch()?;
        Ok(self.output.force_contiguous()?)
    }

    #[cfg(feature = "cuda")]
    fn launch(&self) -> Result<()> {
        Ok(self.graph.launch().map_err(|e| candle_core::Error::Msg(format!("CUDA graph launch: {e}")))?)
    }

    #[cfg(not(feature = "cuda"))]
    fn launch(&self) -> Result<()> {
        Ok(Err(candle_core::Error::Msg("CUDA graphs need a CUDA build".into()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::{Backend, PrecisionPolicy};
    use crate::models::unet::{UnetInput, IMAGE_TOKENS_PER_FRAME, TEXT_CONTEXT_LEN};
    use crate::weights::RandomWeights;
    use crate::ModelConfig;
    use candle_core::Device;

    /// Where no graph can be captured (here: the CPU), every call is the eager forward, the
    /// shape is marked failed after its second call, and a new shape gets a slot of its own.
    #[test]
    fn forwards_stay_eager_where_no_graph_captures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-v/config.json");
        let cfg = ModelConfig::from_json_file(&dir).unwrap();
        let dev = Device::Cpu;
        let f32 = PrecisionPolicy::f32();
        let unet = Unet::new(&cfg.unet, RandomWeights::var_builder(DType::F32, &dev), &Backend::new(&dev, &f32, false)).unwrap();
        let graphs = UnetGraphs::default();
        // A latent the UNet's levels halve down to 2×2.
        let side = 2 << (cfg.unet.channel_mult.len() - 1);
        let (t, h, w) = (cfg.unet.temporal_length, side, side);
        for frames_wide in [1, 1, 1, 2] {
            let x = Tensor::randn(0f32, 1.0, (frames_wide, cfg.unet.in_channels, t, h, w), &dev).unwrap();
            let context = Tensor::randn(0f32, 1.0, (frames_wide, TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME, cfg.unet.context_dim), &dev).unwrap();
            let steps = vec![500.0; frames_wide];
            let conditioning = unet.condition(&UnetInput { x: &x, timesteps: &steps, context: &context, fs: None }, None).unwrap();
            let want = unet.forward_conditioned(&x, &conditioning).unwrap();
            let got = graphs.forward(&unet, &x, &conditioning).unwrap();
            assert_eq!((got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
        let slots = graphs.slots.lock().unwrap();
        assert_eq!(slots.len(), 2, "one slot per input shape");
        assert!(matches!(slots[0].state, State::Failed), "the second call tried to capture and fell back");
        assert!(matches!(slots[1].state, State::Seen));
    }
}
