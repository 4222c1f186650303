//! The precision cases: the 256 UNet in q8_0 and in the CPU's bf16 mode against fp32 from the
//! same seeded weights, and checkpoint load times and sizes.

use crate::networks::{unet_256_input, unet_forward};
use crate::{cpu, time, Timing};
use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::models::unet::Unet;
use dynamicrafter_engine::models::vae::AutoencoderKL;
use dynamicrafter_engine::report::rss_bytes;
use dynamicrafter_engine::weights::convert::convert;
use dynamicrafter_engine::weights::{q8, RandomWeights};
use dynamicrafter_engine::config::presets::Preset;
use dynamicrafter_engine::{Backend, ModelConfig, Pipeline, PrecisionPolicy, Quantization};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Seeded random weights with every weight the int8 formats would store rounded through
/// `GgmlDType` and back to f32 (rows whose length the format's blocks do not divide stay exact).
struct RoundedWeights(GgmlDType);

impl candle_nn::var_builder::SimpleBackend for RoundedWeights {
    fn get(&self, s: candle_core::Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let w = RandomWeights.get(s.clone(), name, h, DType::F32, dev)?;
        let dims = s.dims();
        let cols: usize = dims.iter().skip(1).product();
        if !q8::stores_quantized(name, dims) || !cols.is_multiple_of(self.0.block_size()) {
            return w.to_dtype(dtype);
        }
        let q = candle_core::quantized::QTensor::quantize(&w.reshape((dims[0], cols))?, self.0)?;
        q.dequantize(dev)?.reshape(dims)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("rounded weights need a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with(q8::SUFFIX)
    }
}

/// The CPU fp32 UNet of `cfg` from seeded random weights, its linear layers and 3×3
/// convolutions in q8_0 if asked.
fn unet(cfg: &ModelConfig, quantized: bool) -> Result<Unet> {
    let policy = PrecisionPolicy::f32().with_quantization(quantized.then_some(Quantization::Q8_0));
    Ok(Unet::new(&cfg.unet, RandomWeights::var_builder(DType::F32, &Device::Cpu), &Backend::new(&Device::Cpu, &policy, false))?)
}

/// ‖out − reference‖ / ‖reference‖ (L2 over all elements).
fn relative_error(out: &Tensor, reference: &Tensor) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64) };
    Ok(norm(&(out - reference)?)? / norm(reference)?)
}

/// The 256 UNet in fp32 and in the CPU's bf16 mode (products on AMX or AVX512-BF16), from the
/// same seeded weights and input: the output's error against fp32 (the quality bar is 35 dB), and
/// the bf16 forward's time.
pub(crate) fn bf16_256(runs: usize) -> Result<Vec<Timing>> {
    if !cpu().amx && !cpu().avx512_bf16 {
        println!("bf16-256: this CPU has neither AMX nor AVX512-BF16: nothing to measure");
        return Ok(Vec::new());
    }
    let isa = if cpu().amx { "AMX" } else { "AVX512-BF16" };
    let cfg = Preset::Dc256.config();
    let (x, context) = unet_256_input(&cfg)?;
    let reference = unet_forward(&unet(&cfg, false)?, &x, &context)?;
    let policy = PrecisionPolicy::new(dynamicrafter_engine::Precision::Bf16, &Device::Cpu)?;
    let unet = Unet::new(&cfg.unet, RandomWeights::var_builder(DType::F32, &Device::Cpu), &Backend::new(&Device::Cpu, &policy, false))?;
    let rel = relative_error(&unet_forward(&unet, &x, &context)?, &reference)?;
    println!("bf16-256: UNet output relative error bf16 ({isa}) vs fp32: {rel:.4} ({:.1} dB SNR)", -20.0 * rel.log10());
    Ok(vec![time(&format!("unet-256 forward bf16 ({isa}), same weights"), runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?])
}

/// The 256 VAE decoder in fp32 and in the CPU's bf16 mode, from the same seeded weights and
/// latent: the decoded frame's error against fp32, as SNR and as PSNR of the 8-bit pixels the
/// video gets, and the time of 16 bf16 frames.
pub(crate) fn vae_bf16_256(runs: usize) -> Result<Vec<Timing>> {
    if !cpu().amx && !cpu().avx512_bf16 {
        println!("vae-bf16-256: this CPU has neither AMX nor AVX512-BF16: nothing to measure");
        return Ok(Vec::new());
    }
    let cfg = Preset::Dc256.config();
    let vae = |policy: &PrecisionPolicy| -> Result<AutoencoderKL> {
        let vb = RandomWeights::var_builder(DType::F32, &Device::Cpu).pp("first_stage_model");
        Ok(AutoencoderKL::new(&cfg.vae, vb, &Backend::new(&Device::Cpu, policy, false))?)
    };
    let bf16 = vae(&PrecisionPolicy::new(dynamicrafter_engine::Precision::Bf16, &Device::Cpu)?)?;
    let z = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu)?;
    let reference = vae(&PrecisionPolicy::f32())?.decode(&z)?;
    let out = bf16.decode(&z)?;
    let rel = relative_error(&out, &reference)?;
    // As the pipeline writes frames: clamp to [-1, 1], to 0..255.
    let pixels = |t: &Tensor| -> Result<Tensor> { Ok(((t.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?) };
    let mse = (pixels(&out)? - pixels(&reference)?)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    println!("vae-bf16-256: decoded frame relative error bf16 vs fp32: {rel:.4} ({:.1} dB SNR), pixels {:.1} dB PSNR", -20.0 * rel.log10(), 10.0 * (255.0f64 * 255.0 / mse).log10());
    Ok(vec![time("vae-decode-256 bf16 (16 frames 256×256), same weights", runs, || {
        for _ in 0..16 {
            bf16.decode(&z)?;
        }
        Ok(())
    })?])
}

/// The 256 UNet in fp32 and with q8_0 linear layers, from the same seeded weights and input:
/// relative error of the output, and each forward's time. Also the file size `convert
/// --quantize q8_0` writes for each preset, from its key list.
pub(crate) fn quant_256(runs: usize) -> Result<Vec<Timing>> {
    for preset in Preset::ALL {
        let keys = Pipeline::checkpoint_keys(&preset.config())?;
        // Bytes of the float checkpoint, and of `convert --quantize q8_0` with the float
        // remainder in f32 (default) or f16 (`--dtype f16`).
        let (mut f32_bytes, mut q8_bytes, mut rest) = (0usize, 0usize, 0usize);
        for (name, shape) in &keys {
            let n: usize = shape.iter().product();
            f32_bytes += 4 * n;
            match q8::stored_shape(shape).filter(|_| q8::stores_quantized(name, shape)) {
                Some([rows, bytes]) => q8_bytes += rows * bytes,
                None => rest += n,
            }
        }
        let gb = |b: usize| b as f64 / 1e9;
        println!(
            "quant-256: {:<10} checkpoint f32 {:.2} GB; q8_0 {:.2} GB ({:.3}×); q8_0 + f16 rest {:.2} GB ({:.3}×)",
            preset.name(),
            gb(f32_bytes),
            gb(q8_bytes + 4 * rest),
            (q8_bytes + 4 * rest) as f64 / f32_bytes as f64,
            gb(q8_bytes + 2 * rest),
            (q8_bytes + 2 * rest) as f64 / f32_bytes as f64
        );
    }
    let cfg = Preset::Dc256.config();
    let (x, context) = unet_256_input(&cfg)?;
    let reference = unet_forward(&unet(&cfg, false)?, &x, &context)?;
    // Weight rounding alone, q8_0 against q4k (what `--quantize q4k` would store): the same
    // f32 UNet with its quantizable weights rounded through each format and back.
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let vb = candle_nn::VarBuilder::from_backend(Box::new(RoundedWeights(dtype)), DType::F32, Device::Cpu);
        let out = unet_forward(&Unet::new(&cfg.unet, vb, &Backend::new(&Device::Cpu, &PrecisionPolicy::f32(), false))?, &x, &context)?;
        let rel = relative_error(&out, &reference)?;
        println!("quant-256: UNet output relative error, weights rounded to {dtype:?} only: {rel:.4} ({:.1} dB)", -20.0 * rel.log10());
    }
    let unet = unet(&cfg, true)?;
    let rel = relative_error(&unet_forward(&unet, &x, &context)?, &reference)?;
    println!("quant-256: UNet output relative error q8_0 vs fp32: {rel:.4} ({:.1} dB SNR)", -20.0 * rel.log10());
    Ok(vec![time("unet-256 forward q8_0 (16×32×32, ctx 333)", runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?])
}

/// Writes a checkpoint of every key of `cfg` with seeded random f32 values, one tensor at a time.
fn write_random_checkpoint(cfg: &ModelConfig, path: &std::path::Path) -> Result<()> {
    use candle_nn::var_builder::SimpleBackend;
    use std::io::Write;
    let keys = Pipeline::checkpoint_keys(cfg)?;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &keys {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes] }));
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&header)?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(text.len() as u64).to_le_bytes())?;
    file.write_all(&text)?;
    for (name, shape) in &keys {
        let t = RandomWeights.get(shape.as_slice().into(), name, candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu)?;
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            file.write_all(&v.to_le_bytes())?;
        }
    }
    file.flush()?;
    Ok(())
}

/// File size, load time and resident memory after loading, fp32 vs q8_0 (float remainder f32).
pub(crate) fn load_times(runs: usize) -> Result<Vec<Timing>> {
    let dir = std::env::temp_dir().join(format!("dynamicrafter-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<Vec<Timing>> {
        let mut models: Vec<(String, ModelConfig, PathBuf)> = Vec::new();
        for name in ["tiny-v", "tiny-eps"] {
            let fixture = std::path::Path::new("fixtures").join(name);
            if fixture.is_dir() {
                models.push((name.into(), ModelConfig::from_json_file(&fixture.join("config.json"))?, fixture.join("model.safetensors")));
            }
        }
        let real = dir.join("real-256.safetensors");
        let t = Instant::now();
        write_random_checkpoint(&Preset::Dc256.config(), &real)?;
        println!("load: wrote a random real-256 checkpoint in {:.1} s", t.elapsed().as_secs_f64());
        models.push(("real-256".into(), Preset::Dc256.config(), real));
        let mut out = Vec::new();
        for (name, cfg, f32_file) in models {
            let q8_file = dir.join(format!("{name}-q8_0.safetensors"));
            convert(&f32_file, &q8_file, DType::F32, Some(Quantization::Q8_0))?;
            let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e9).unwrap_or(0.0);
            for (label, file) in [("fp32", &f32_file), ("q8_0", &q8_file)] {
                let mut rss = None;
                let timing = time(&format!("load {name} {label}"), runs, || {
                    let p = Pipeline::load(cfg.clone(), file, &Device::Cpu)?;
                    rss = rss_bytes();
                    drop(p);
                    Ok(())
                })?;
                println!(
                    "load: {name} {label}: file {:.3} GB, resident after load {:.2} GB",
                    size(file),
                    rss.unwrap_or(0) as f64 / 1e9
                );
                out.push(timing);
            }
            if name == "real-256" {
                // The 10 GB file goes as soon as it is measured.
                let _ = std::fs::remove_file(&f32_file);
            }
        }
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

