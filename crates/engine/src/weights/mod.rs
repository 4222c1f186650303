//! Weights: checkpoint loading (memory-mapped safetensors or a PyTorch Lightning `model.ckpt`,
//! zip + pickle parsed as data: no pickle code is ever executed) exposed to the networks as a
//! candle `VarBuilder` and checked strictly against the keys the networks read; synthetic
//! weights ([`synthetic`]); the `q8_0` format ([`q8`]); and `convert` ([`convert`]).

pub mod convert;
mod parked;
mod pickle;
pub mod q8;
mod synthetic;
mod torch;

pub use parked::ParkedWeights;
pub use synthetic::{KeyRecorder, RandomWeights};

use crate::compute::Quantization;
use crate::{Error, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

enum Source {
    Safetensors(MmapedSafetensors),
    Torch(torch::TorchFile),
}

/// An opened checkpoint. Tensors are read lazily, one at a time, when a network asks for them.
pub struct Checkpoint {
    path: PathBuf,
    source: Source,
    /// Model key → (key in the file, shape in the file).
    keys: HashMap<String, (String, Vec<usize>)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} tensors)", self.path.display(), self.keys.len())
    }
}

/// The 256 checkpoint stores the fs MLP as `framestride_embed`; upstream renames it on load.
fn model_key(file_key: &str) -> String {
    file_key.replace("framestride_embed", "fps_embedding")
}

impl Checkpoint {
    /// Opens `model.safetensors` or `model.ckpt`, telling them apart by content, not by name.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |detail: String| Error::Checkpoint { path: path.to_path_buf(), detail };
        let mut magic = [0u8; 8];
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let n = file.read(&mut magic).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n < 8 {
            return Err(err("file too short to be a checkpoint".into()));
        }
        let (source, file_shapes): (Source, Vec<(String, Vec<usize>)>) = if &magic[..4] == b"PK\x03\x04" {
            // torch.save zip; Lightning nests the weights under "state_dict".
            let torch = torch::TorchFile::open(&file).map_err(|e| err(format!("not a readable PyTorch checkpoint: {e}")))?;
            let shapes = torch.shapes().map(|(k, s)| (k.to_string(), s.to_vec())).collect();
            (Source::Torch(torch), shapes)
        } else {
            let header_len = u64::from_le_bytes(magic);
            let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if header_len == 0 || header_len > file_len.saturating_sub(8) {
                return Err(err(
                    "neither a safetensors file nor a PyTorch zip checkpoint (bad header or truncated)"
                        .into(),
                ));
            }
            // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
            // truncating it while we run.
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| err(format!("invalid safetensors: {e}")))?;
            let shapes = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
            (Source::Safetensors(st), shapes)
        };
        let keys = file_shapes
            .into_iter()
            .map(|(k, shape)| (model_key(&k), (k, shape)))
            .collect();
        Ok(Self { path: path.to_path_buf(), source, keys })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the checkpoint holds `key`, in float or (then read dequantized) quantized.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key) || self.keys.contains_key(&format!("{key}{}", q8::SUFFIX))
    }

    /// The quantization of a `convert --quantize` file; `None` for float checkpoints.
    pub fn quantization(&self) -> Option<Quantization> {
        self.keys.keys().any(|k| k.ends_with(q8::SUFFIX)).then_some(Quantization::Q8_0)
    }

    /// Names and shapes of every tensor, under the model's key names.
    pub fn shapes(&self) -> BTreeMap<&str, &[usize]> {
        self.keys.iter().map(|(k, (_, s))| (k.as_str(), s.as_slice())).collect()
    }

    /// `(key in the file, model key)` of every tensor, sorted by file key.
    pub fn file_keys(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = self.keys.iter().map(|(m, (f, _))| (f.as_str(), m.as_str())).collect();
        v.sort();
        v
    }

    /// The stored dtype of one tensor, by model key, without reading it.
    pub fn dtype(&self, key: &str) -> Result<DType> {
        let missing = || Error::Checkpoint { path: self.path.clone(), detail: format!("missing key {key}") };
        let (file_key, _) = self.keys.get(key).ok_or_else(missing)?;
        match &self.source {
            Source::Safetensors(st) => Ok(DType::try_from(st.get(file_key)?.dtype())?),
            Source::Torch(t) => t.dtype(file_key).ok_or_else(missing),
        }
    }

    /// Reads one tensor by model key, in its stored dtype.
    pub fn load(&self, key: &str, dev: &Device) -> Result<Tensor> {
        let (file_key, _) = self.keys.get(key).ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            detail: format!("missing key {key}"),
        })?;
        let t = match &self.source {
            Source::Safetensors(st) => st.load(file_key, dev)?,
            Source::Torch(t) => t.load(file_key, dev)?,
        };
        Ok(t)
    }

    /// A `VarBuilder` reading this checkpoint, converting to `dtype` on `dev`.
    pub fn var_builder(&self, dtype: DType, dev: &Device) -> VarBuilder<'_> {
        VarBuilder::from_backend(self.reader(), dtype, dev.clone())
    }

    /// The `VarBuilder` backend of [`var_builder`](Self::var_builder).
    pub fn reader(&self) -> Box<dyn SimpleBackend + '_> {
        Box::new(Reader(self))
    }

    /// Strict check against the key set a model expects (see `Pipeline::checkpoint_keys`):
    /// lists every missing, unexpected and mis-shaped tensor at once.
    pub fn verify(&self, expected: &BTreeMap<String, Vec<usize>>) -> Result<()> {
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (k, shape) in expected {
            let stored = format!("{k}{}", q8::SUFFIX);
            match (self.keys.get(k), self.keys.get(&stored)) {
                (None, None) => missing.push(k.clone()),
                (Some((_, s)), _) if s != shape => mismatched.push(format!("{k}: checkpoint {s:?}, model {shape:?}")),
                (None, Some((_, s))) if q8::stored_shape(shape).is_none_or(|q| s[..] != q[..]) => {
                    mismatched.push(format!("{stored}: checkpoint {s:?}, model {shape:?} quantized"))
                }
                _ => {}
            }
        }
        let known = |k: &String| expected.contains_key(k.strip_suffix(q8::SUFFIX).unwrap_or(k));
        let mut unexpected: Vec<String> = self.keys.keys().filter(|k| !known(k)).cloned().collect();
        if missing.is_empty() && mismatched.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        unexpected.sort();
        let mut detail = String::from("does not match the model config:");
        for (what, items) in [("missing keys", &missing), ("shape mismatches", &mismatched), ("unexpected keys", &unexpected)] {
            if items.is_empty() {
                continue;
            }
            const SHOWN: usize = 12;
            let shown: Vec<&str> = items.iter().take(SHOWN).map(|s| s.as_str()).collect();
            detail.push_str(&format!(" {} {what}: {}", items.len(), shown.join(", ")));
            if items.len() > SHOWN {
                detail.push_str(&format!(", … ({} more)", items.len() - SHOWN));
            }
            detail.push(';');
        }
        Err(Error::Checkpoint { path: self.path.clone(), detail })
    }
}

struct Reader<'a>(&'a Checkpoint);

impl SimpleBackend for Reader<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let stored = format!("{name}{}", q8::SUFFIX);
        if !self.0.keys.contains_key(name) && self.0.keys.contains_key(&stored) {
            // A quantized weight read by a float layer (a convolution): dequantize it.
            let raw = self.get_unchecked(&stored, DType::U8, &Device::Cpu)?;
            let t = q8::dequantize(&raw, s.dims(), dev).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            return t.to_dtype(dtype);
        }
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.dims() != s.dims() {
            candle_core::bail!("{name}: checkpoint shape {:?}, model {:?}", t.dims(), s.dims())
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
