//! `convert`: a checkpoint (`model.ckpt` or safetensors) rewritten as safetensors, float tensors
//! in one dtype, weights optionally quantized to `q8_0`, so later loads are memory-mapped.

use super::{q8, Checkpoint};
use crate::compute::Quantization;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

/// What [`convert`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    pub tensors: usize,
    /// Of those, stored as `q8_0`.
    pub quantized: usize,
}

/// How one tensor is written.
#[derive(Clone, Copy)]
enum Store {
    /// Floats, in this dtype.
    Float(DType),
    /// Integer buffers, as they are.
    Keep,
    /// `q8_0` blocks.
    Quantized,
}

/// One tensor of the output, read, converted and quantized only when the writer reaches it, so
/// converting holds one tensor at a time in memory, however large the checkpoint and however
/// many of its tensors share one storage (each would otherwise be a copy).
struct Pending<'a> {
    ck: &'a Checkpoint,
    model_key: &'a str,
    store: Store,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// The first failure while writing (the writer's interface has no error to return).
    failed: &'a RefCell<Option<Error>>,
}

impl Pending<'_> {
    fn produce(&self) -> Result<Tensor> {
        let t = self.ck.load(self.model_key, &Device::Cpu)?;
        Ok(match self.store {
            Store::Float(dtype) => t.to_dtype(dtype)?,
            Store::Keep => t,
            Store::Quantized => q8::quantize(&t)?,
        })
    }
}

impl safetensors::View for Pending<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let produced = self.produce().and_then(|t| {
            if t.dims() != self.shape {
                return Err(Error::InvalidInput(format!("{}: read as {:?}, listed as {:?}", self.model_key, t.dims(), self.shape)));
            }
            Ok(safetensors::View::data(&t).into_owned())
        });
        match produced {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `input` as safetensors to `output` with float tensors in `dtype` (integer buffers
/// kept), weights quantized where asked (see [`q8::stores_quantized`]). The file appears only
/// once complete (written under a temporary name, then renamed).
pub fn convert(input: &Path, output: &Path, dtype: DType, quantization: Option<Quantization>) -> Result<Converted> {
    let ck = Checkpoint::open(input)?;
    let shapes = ck.shapes();
    let failed = RefCell::new(None);
    let mut quantized = 0;
    let mut pending = Vec::new();
    for (file_key, model_key) in ck.file_keys() {
        let stored = ck.dtype(model_key)?;
        let shape = shapes[model_key].to_vec();
        // Keep the file's own key names (the loader renames the 256 model's on every load).
        let (name, store, out_dtype, out_shape) = if quantization.is_some() && stored.is_float() && q8::stores_quantized(model_key, &shape) {
            let q = q8::stored_shape(&shape).ok_or_else(|| Error::InvalidInput(format!("{model_key}: shape {shape:?} does not split into q8_0 blocks")))?;
            quantized += 1;
            (format!("{file_key}{}", q8::SUFFIX), Store::Quantized, DType::U8, q.to_vec())
        } else if stored.is_float() {
            (file_key.to_string(), Store::Float(dtype), dtype, shape)
        } else {
            (file_key.to_string(), Store::Keep, stored, shape)
        };
        let view = Pending { ck: &ck, model_key, store, dtype: out_dtype.into(), shape: out_shape, failed: &failed };
        pending.push((name, view));
    }
    let count = pending.len();
    let metadata = quantization.map(|q| HashMap::from([(q8::METADATA_KEY.to_string(), q.name().to_string())]));
    let io = |path: &Path, e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
    // Written under a name created exclusively beside the output (unpredictable: no planted
    // link is followed; removed if anything fails), then renamed into place.
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new();
    temp.prefix(".convert.").suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = temp.tempfile_in(dir).map_err(|e| io(dir, e))?;
    // The writer replaces the file with one of its own (mode 0600): the output keeps the mode a
    // new file gets here.
    let mode = tmp.as_file().metadata().map(|m| m.permissions()).map_err(|e| io(tmp.path(), e))?;
    safetensors::serialize_to_file(pending, metadata, tmp.path()).map_err(|e| io(tmp.path(), std::io::Error::other(e.to_string())))?;
    std::fs::set_permissions(tmp.path(), mode).map_err(|e| io(tmp.path(), e))?;
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    tmp.persist(output).map_err(|e| io(output, e.error))?;
    Ok(Converted { tensors: count, quantized })
}
