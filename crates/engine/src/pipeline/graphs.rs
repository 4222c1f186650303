//! The UNet's forward replayed as a CUDA graph (`DYNAMICRAFTER_CUDA_GRAPH=1`, off by default:
//! an experiment until a device measures it, `dynamicrafter-bench graph-*` first). Every
//! denoising step runs the same forward on inputs of the same shapes, and at 256×256 most of its
//! thousands of kernels are short, so the host's launches may be what the card waits on.
//!
//! Per input shape: the first call runs eagerly ([`UnetGraph::warm_up`]: kernels loaded,
//! cuBLAS's workspaces made, candle's uploads cached); the second captures the forward
//! ([`Unet::forward_conditioned`]: device work only) and replays it; every later call replays
//! with its inputs copied in. A capture that fails (an op the stream refuses while capturing)
//! leaves that shape eager, with a warning. The graph's memory is its own pool, kept while the
//! pipeline lives: the device's peak-memory figure does not count it.

use crate::compute::UnetGraph;
use crate::models::unet::{Unet, UnetConditioning};
use crate::Result;
use candle_core::{DType, Tensor};
use std::sync::Mutex;

/// The captured forwards, one per input shape.
#[derive(Default)]
pub(crate) struct UnetGraphs {
    slots: Mutex<Vec<Slot>>,
}

/// The shapes and dtypes a forward was captured for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    x: (Vec<usize>, DType),
    emb: (Vec<usize>, DType),
    context: (Vec<usize>, DType),
}

struct Slot {
    key: Key,
    state: State,
}

enum State {
    /// Run once, eagerly, its uploads cached.
    Seen,
    Captured(UnetGraph),
    /// The capture failed: eager from now on.
    Failed,
}

impl UnetGraphs {
    /// `unet.forward_conditioned(x, conditioning)`, replayed from a graph where one is captured.
    pub(crate) fn forward(&self, unet: &Unet, x: &Tensor, conditioning: &UnetConditioning) -> Result<Tensor> {
        let dims = |t: &Tensor| (t.dims().to_vec(), t.dtype());
        let key = Key { x: dims(x), emb: dims(&conditioning.emb), context: dims(&conditioning.context) };
        // Held for the whole call: a graph's launches and copies must not interleave.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.iter_mut().find(|s| s.key == key) else {
            slots.push(Slot { key, state: State::Seen });
            return UnetGraph::warm_up(unet, x, conditioning);
        };
        if matches!(slot.state, State::Seen) {
            slot.state = match UnetGraph::capture(unet, x, conditioning) {
                Ok(graph) => {
                    tracing::info!("CUDA graph captured for the UNet forward on {:?}", slot.key.x.0);
                    State::Captured(graph)
                }
                Err(why) => {
                    tracing::warn!("the UNet forward on {:?} runs without a CUDA graph: {why}", slot.key.x.0);
                    State::Failed
                }
            };
        }
        match &mut slot.state {
            State::Captured(graph) => graph.replay(x, conditioning),
            _ => Ok(unet.forward_conditioned(x, conditioning)?),
        }
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
