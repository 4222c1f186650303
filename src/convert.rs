//! `dynamicrafter convert`: a `model.ckpt` (or safetensors) to safetensors, optionally in a
//! smaller dtype, so later loads are memory-mapped.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::weights::Checkpoint;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Input checkpoint (model.ckpt or .safetensors).
    pub input: PathBuf,
    /// Output .safetensors file.
    pub output: PathBuf,
    /// Floating-point dtype of the output: f32, bf16 or f16 (integer buffers are kept).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "f32" | "fp32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" | "fp16" => DType::F16,
        other => bail!("--dtype '{other}' (expected f32, bf16 or f16)"),
    };
    if args.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("output {} must end in .safetensors", args.output.display());
    }
    let ck = Checkpoint::open(&args.input)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (file_key, model_key) in ck.file_keys() {
        let t = ck.load(model_key, &Device::Cpu)?;
        let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
        // Keep the file's own key names (the loader renames the 256 model's on every load).
        tensors.insert(file_key.to_string(), t);
    }
    let tmp = args.output.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output).with_context(|| format!("writing {}", args.output.display()))?;
    println!("wrote {} tensors to {} ({})", tensors.len(), args.output.display(), args.dtype);
    Ok(())
}
