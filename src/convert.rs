//! `dynamicrafter convert`: a `model.ckpt` (or safetensors) to safetensors, optionally in a
//! smaller dtype or with int8 (`q8_0`) weights, so later loads are memory-mapped.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::quant::{self, Quantization};
use dynamicrafter_engine::weights::Checkpoint;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Input checkpoint (model.ckpt or .safetensors).
    pub input: PathBuf,
    /// Output .safetensors file.
    pub output: PathBuf,
    /// Floating-point dtype of the output: f32, bf16 or f16 (integer buffers are kept)
    /// [default: f32; f16 for what stays float with --quantize, which keeps the file ≤ 0.3× f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Store weights as int8: q8_0 (blocks of 32 with an f16 scale; see README for what stays float).
    #[arg(long)]
    pub quantize: Option<String>,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let dtype_name = args.dtype.clone().unwrap_or_else(|| if args.quantize.is_some() { "f16" } else { "f32" }.into());
    let dtype = match dtype_name.as_str() {
        "f32" | "fp32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" | "fp16" => DType::F16,
        other => bail!("--dtype '{other}' (expected f32, bf16 or f16)"),
    };
    if args.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("output {} must end in .safetensors", args.output.display());
    }
    let quantization = args.quantize.as_deref().map(str::parse::<Quantization>).transpose()?;
    let (tensors, quantized) = convert(&args.input, &args.output, dtype, quantization)?;
    let how = match quantization {
        Some(q) => format!("{dtype_name}, {quantized} weights {}", q.name()),
        None => dtype_name,
    };
    println!("wrote {tensors} tensors to {} ({how})", args.output.display());
    Ok(())
}

/// Writes `input` as safetensors to `output` with float tensors in `dtype`, weights quantized
/// where asked (see `quant::stores_quantized`); returns the tensor count and how many are int8.
pub fn convert(input: &Path, output: &Path, dtype: DType, quantization: Option<Quantization>) -> Result<(usize, usize)> {
    let ck = Checkpoint::open(input)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut quantized = 0;
    for (file_key, model_key) in ck.file_keys() {
        let t = ck.load(model_key, &Device::Cpu)?;
        // Keep the file's own key names (the loader renames the 256 model's on every load).
        if quantization.is_some() && t.dtype().is_float() && quant::stores_quantized(model_key, t.dims()) {
            tensors.insert(format!("{file_key}{}", quant::SUFFIX), quant::quantize(&t)?);
            quantized += 1;
            continue;
        }
        let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
        tensors.insert(file_key.to_string(), t);
    }
    let metadata = quantization.map(|q| HashMap::from([(quant::METADATA_KEY.to_string(), q.name().to_string())]));
    let tmp = output.with_extension("safetensors.partial");
    safetensors::serialize_to_file(tensors.iter(), metadata, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    Ok((tensors.len(), quantized))
}
