//! Weights without a checkpoint: seeded random ones (benchmarks, shape checks of the real
//! networks) and a recorder of the keys and shapes the networks read.

use super::q8;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Records the name and shape of every tensor the networks ask for and hands back broadcast
/// zeros (no memory), so even the real networks can be "built" to list their checkpoint keys.
#[derive(Default)]
pub struct KeyRecorder {
    keys: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl KeyRecorder {
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'_> {
        VarBuilder::from_backend(self.reader(), dtype, Device::Cpu)
    }

    /// The `VarBuilder` backend of [`var_builder`](Self::var_builder).
    pub fn reader(&self) -> Box<dyn SimpleBackend + '_> {
        Box::new(Recording(self))
    }

    pub fn into_keys(self) -> BTreeMap<String, Vec<usize>> {
        self.keys.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

struct Recording<'a>(&'a KeyRecorder);

impl SimpleBackend for Recording<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("key recorder needs a shape for {name}")
    }

    /// Every float key; the checkpoint keys are those of a float model.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with(q8::SUFFIX)
    }
}

/// Random weights for benchmarks and shape checks of the real networks without a checkpoint:
/// matrices N(0, 1/fan_in), 1-D `weight`s (norms) one, everything else small noise. On the CPU
/// seeded by the tensor's name, so every build of a network gets the same weights; on a GPU
/// drawn by the device's own generator (billions of host draws would dominate a GPU benchmark).
pub struct RandomWeights;

impl RandomWeights {
    pub fn var_builder(dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone())
    }

    /// The `VarBuilder` backend of [`var_builder`](Self::var_builder).
    pub fn reader() -> Box<dyn SimpleBackend> {
        Box::new(RandomWeights)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // FNV-1a of the name.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
        let dims = s.dims();
        let normal = |std: f64| -> candle_core::Result<Tensor> {
            if !dev.is_cpu() {
                return Tensor::randn(0f32, std as f32, dims, dev);
            }
            let t = crate::noise::Normal::new(seed).tensor(dims, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            t.affine(std, 0.0)
        };
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            normal(1.0 / (fan_in as f64).sqrt())?
        } else if name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            normal(0.02)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    /// Float weights only (the backend quantizes them as they load where asked).
    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with(q8::SUFFIX)
    }
}
