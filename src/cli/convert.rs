//! `dynamicrafter convert`: a `model.ckpt` (or safetensors) to safetensors, optionally in a
//! smaller dtype or with int8 (`q8_0`) weights, so later loads are memory-mapped.

use anyhow::{bail, Result};
use candle_core::DType;
use dynamicrafter_engine::weights::convert::{convert, Converted};
use dynamicrafter_engine::Quantization;
use std::path::PathBuf;

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
    let Converted { tensors, quantized } = convert(&args.input, &args.output, dtype, quantization)?;
    let how = match quantization {
        Some(q) => format!("{dtype_name}, {quantized} weights {}", q.name()),
        None => dtype_name,
    };
    println!("wrote {tensors} tensors to {} ({how})", args.output.display());
    Ok(())
}
