//! Weights parked in host memory (`--offload`): a network not in use keeps its weights here, as
//! its layers read them (already in their dtype, dequantized where a float layer read an int8
//! weight), and is rebuilt on the compute device from them when its stage runs.
//!
//! [`ParkedWeights::capturing`] wraps the source a network is first built from and keeps a host
//! copy of every tensor read under the parked prefixes; [`ParkedWeights::var_builder`] then
//! hands exactly those reads back, moved to the device, so a rebuild sees what the first build
//! saw.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Default)]
struct Store {
    /// Full key → host copy of what the layer read.
    tensors: HashMap<String, Tensor>,
    /// Keys the layers asked about (`contains_tensor`) and found.
    present: HashSet<String>,
}

/// Host copies of the weights of the networks kept off the device.
#[derive(Clone, Default)]
pub struct ParkedWeights {
    store: Arc<Mutex<Store>>,
    prefixes: Arc<Vec<String>>,
}

impl ParkedWeights {
    /// An empty store for the networks under `prefixes` (checkpoint prefixes, without the dot).
    pub fn new(prefixes: &[&str]) -> Self {
        Self { store: Arc::default(), prefixes: Arc::new(prefixes.iter().map(|p| format!("{p}.")).collect()) }
    }

    /// `source` with every read under the parked prefixes copied into this store.
    pub fn capturing<'a>(&self, source: Box<dyn SimpleBackend + 'a>, dtype: DType, dev: &Device) -> VarBuilder<'a> {
        VarBuilder::from_backend(Box::new(Capture { source, parked: self.clone() }), dtype, dev.clone())
    }

    /// Reads the parked weights onto `dev`.
    pub fn var_builder(&self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Parked(self.clone())), dtype, dev.clone())
    }

    /// Bytes held in host memory.
    pub fn bytes(&self) -> usize {
        self.lock().tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    fn parks(&self, name: &str) -> bool {
        self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keep(&self, name: &str, t: &Tensor) -> candle_core::Result<()> {
        if self.parks(name) {
            let host = t.to_device(&Device::Cpu)?;
            self.lock().tensors.insert(name.to_string(), host);
        }
        Ok(())
    }
}

struct Capture<'a> {
    source: Box<dyn SimpleBackend + 'a>,
    parked: ParkedWeights,
}

impl SimpleBackend for Capture<'_> {
    fn get(&self, s: Shape, name: &str, init: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.source.get(s, name, init, dtype, dev)?;
        self.parked.keep(name, &t)?;
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.source.get_unchecked(name, dtype, dev)?;
        self.parked.keep(name, &t)?;
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let found = self.source.contains_tensor(name);
        if found && self.parked.parks(name) {
            self.parked.lock().present.insert(name.to_string());
        }
        found
    }
}

struct Parked(ParkedWeights);

impl Parked {
    fn host(&self, name: &str) -> candle_core::Result<Tensor> {
        match self.0.lock().tensors.get(name) {
            Some(t) => Ok(t.clone()),
            None => candle_core::bail!("{name}: not among the parked weights"),
        }
    }
}

impl SimpleBackend for Parked {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.host(name)?;
        if t.dims() != s.dims() {
            candle_core::bail!("{name}: parked shape {:?}, model {:?}", t.dims(), s.dims())
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.host(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let store = self.0.lock();
        store.present.contains(name) || store.tensors.contains_key(name)
    }
}
