//! `convert`: a checkpoint (`model.ckpt` or safetensors) rewritten as safetensors, float tensors
//! in one dtype, weights optionally quantized to `q8_0`, so later loads are memory-mapped.

use super::{q8, Checkpoint};
use crate::compute::Quantization;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// What [`convert`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    pub tensors: usize,
    /// Of those, stored as `q8_0`.
    pub quantized: usize,
}

/// Writes `input` as safetensors to `output` with float tensors in `dtype` (integer buffers
/// kept), weights quantized where asked (see [`q8::stores_quantized`]). The file appears only
/// once complete (written under a temporary name, then renamed).
pub fn convert(input: &Path, output: &Path, dtype: DType, quantization: Option<Quantization>) -> Result<Converted> {
    let ck = Checkpoint::open(input)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut quantized = 0;
    for (file_key, model_key) in ck.file_keys() {
        let t = ck.load(model_key, &Device::Cpu)?;
        // Keep the file's own key names (the loader renames the 256 model's on every load).
        if quantization.is_some() && t.dtype().is_float() && q8::stores_quantized(model_key, t.dims()) {
            tensors.insert(format!("{file_key}{}", q8::SUFFIX), q8::quantize(&t)?);
            quantized += 1;
            continue;
        }
        let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
        tensors.insert(file_key.to_string(), t);
    }
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
    safetensors::serialize_to_file(tensors.iter(), metadata, tmp.path())
        .map_err(|e| io(tmp.path(), std::io::Error::other(e.to_string())))?;
    tmp.persist(output).map_err(|e| io(output, e.error))?;
    Ok(Converted { tensors: tensors.len(), quantized })
}
