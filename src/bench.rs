//! `dynamicrafter bench`: times the real networks with random weights (no checkpoint needed) and
//! the primitive ops of `shared/bench/torch_ops.py` at the same shapes.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::kernels;
use dynamicrafter_engine::models::clip_text::ClipTextEncoder;
use dynamicrafter_engine::models::clip_vision::ClipVisionEncoder;
use dynamicrafter_engine::models::unet::{Unet, UnetInput, IMAGE_TOKENS_PER_FRAME, TEXT_CONTEXT_LEN};
use dynamicrafter_engine::models::vae::AutoencoderKL;
use dynamicrafter_engine::report::{peak_rss_bytes, rss_bytes};
use dynamicrafter_engine::weights::RandomWeights;
use dynamicrafter_engine::precision::Part;
use dynamicrafter_engine::{ModelConfig, Pipeline, PrecisionPolicy, Request, RgbImage, SeededNoise};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// What `bench` runs when no case is named: everything that fits a small CPU machine.
const DEFAULT_CASES: [&str; 10] = ["unet-256", "vae-decode-256", "clip-image", "clip-text", "tiny-pipeline", "ops", "serve-vs-cli", "quant-256", "bf16-256", "load"];
/// Named only: GPU-sized work (hours on a CPU).
const GPU_CASES: [&str; 6] = ["unet-512", "unet-1024", "pipeline-256", "pipeline-512", "pipeline-1024", "ops-1024"];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Cases: unet-256 (one forward of the real 256 UNet: 16 frames, 32×32 latent, context
    /// 333×1024), vae-decode-256 (16 frames at 256×256), clip-image, clip-text, tiny-pipeline
    /// (a full run of fixtures/tiny-v), ops (the primitives of torch_ops.py), serve-vs-cli (the
    /// same tiny-v request through `generate` and through `serve`), quant-256 (the 256 UNet in
    /// fp32 and q8_0 from the same seeded weights: output error, times, file sizes), bf16-256
    /// (the same with the CPU's bf16 products on AMX, where the CPU has them), load (file
    /// size, load time and resident memory of fp32 and q8_0 checkpoints: the tiny fixtures and a
    /// real-256 one of random weights written to the temp folder, 14 GB of disk). Default: all
    /// of these. Named only (GPU-sized): unet-512, unet-1024 (one forward at 40×64 / 72×128
    /// latents) and pipeline-256, pipeline-512, pipeline-1024 (a whole run of the preset with
    /// random weights: 16 frames, 50 steps, CFG 7.5, with per-stage times and peak GPU memory),
    /// ops-1024 (the UNet's ops at the 576×1024 model's first-level shapes, on the device and in
    /// the precision of the run: where a GPU forward spends its time).
    cases: Vec<String>,
    /// Timed runs per case, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Precision, quantization and device of the network and pipeline cases (ops, quant-256,
    /// load and serve-vs-cli measure the CPU).
    #[command(flatten)]
    compute: crate::run::ComputeArgs,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Timing {
    name: String,
    ms: Vec<f64>,
}

impl Timing {
    fn median(&self) -> f64 {
        self.ms[self.ms.len() / 2]
    }
}

fn time(name: &str, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    f()?; // warm-up
    let mut ms = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<_>>>()?;
    ms.sort_by(f64::total_cmp);
    let t = Timing { name: name.to_string(), ms };
    println!(
        "{:<44} median {:>10.2} ms  (min {:.2}, max {:.2}, n={})",
        t.name,
        t.median(),
        t.ms[0],
        t.ms[t.ms.len() - 1],
        t.ms.len()
    );
    Ok(t)
}

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

/// Seeded random weights with every weight the int8 formats would store rounded through
/// `GgmlDType` and back to f32 (rows whose length the format's blocks do not divide stay exact).
struct RoundedWeights(GgmlDType);

impl candle_nn::var_builder::SimpleBackend for RoundedWeights {
    fn get(&self, s: candle_core::Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let w = RandomWeights.get(s.clone(), name, h, DType::F32, dev)?;
        let dims = s.dims();
        let cols: usize = dims.iter().skip(1).product();
        if !dynamicrafter_engine::quant::stores_quantized(name, dims) || !cols.is_multiple_of(self.0.block_size()) {
            return w.to_dtype(dtype);
        }
        let q = candle_core::quantized::QTensor::quantize(&w.reshape((dims[0], cols))?, self.0)?;
        q.dequantize(dev)?.reshape(dims)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("rounded weights need a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with(dynamicrafter_engine::quant::SUFFIX)
    }
}

/// Seeded random weights of the presets' networks, float or with linear layers in q8_0.
fn weights(quantized: bool) -> candle_nn::VarBuilder<'static> {
    let quantization = quantized.then_some(dynamicrafter_engine::quant::Quantization::Q8_0);
    RandomWeights::var_builder_for(&PrecisionPolicy::f32().with_quantization(quantization), DType::F32, &Device::Cpu)
}

/// Where the network and pipeline cases run, and in which dtypes.
struct Target {
    device: Device,
    precision: PrecisionPolicy,
}

impl Target {
    /// Random weights for `part`, in its weight dtype (linear layers in q8_0 if asked).
    fn weights(&self, part: Part) -> candle_nn::VarBuilder<'static> {
        RandomWeights::var_builder_for(&self.precision, DType::F32, &self.device).set_dtype(self.precision.part(part).weights)
    }

    /// Standard-normal input for `part`, in its compute dtype.
    fn randn(&self, shape: &[usize], part: Part) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &self.device)?.to_dtype(self.precision.part(part).compute)?)
    }

    /// Times `f` with the device's queued work finished at the end of every run.
    fn time(&self, name: &str, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
        time(name, runs, || {
            f()?;
            Ok(self.device.synchronize()?)
        })
    }

    /// ` q8_0` / ` bf16` after a case's name when it does not run in fp32 on the CPU.
    fn suffix(&self) -> String {
        let mut s = String::new();
        if !self.device.is_cpu() {
            s += &format!(" {} {}", dynamicrafter_engine::device::name(&self.device), self.precision.name());
        } else if self.precision.quantization.is_some() {
            s += " q8_0";
        } else if self.precision.bf16_matmuls {
            s += " bf16 (AMX)";
        }
        s
    }
}

/// The UNet input of `unet-256`: 16 frames of 32×32 latents, context 77 + 16·16 tokens.
fn unet_256_input(cfg: &ModelConfig) -> Result<(Tensor, Tensor)> {
    unet_input(cfg, 32, 32, &Device::Cpu)
}

/// A UNet input of `h×w` latents for every frame, context 77 + 16·frames tokens, in f32.
fn unet_input(cfg: &ModelConfig, h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = cfg.unet.temporal_length;
    let x = Tensor::randn(0f32, 1.0, &[1, cfg.unet.in_channels, t, h, w], device)?;
    let context = Tensor::randn(0f32, 1.0, &[1, TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME, cfg.unet.context_dim], device)?;
    Ok((x, context))
}

fn unet_forward(unet: &Unet, x: &Tensor, context: &Tensor) -> Result<Tensor> {
    Ok(unet.forward(&UnetInput { x, timesteps: &[637.0], context, fs: Some(&[3.0]) })?)
}

/// One forward of a preset's UNet at its own latent size (16 frames, context 333 tokens).
fn unet_case(preset: &str, runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::preset(preset)?;
    dynamicrafter_engine::device::reset_peak_memory(&target.device);
    let unet = Unet::new(&cfg.unet, target.weights(Part::Unet))?;
    let f = cfg.vae.downsample_factor();
    let (h, w) = (cfg.defaults.height / f, cfg.defaults.width / f);
    let dt = target.precision.part(Part::Unet).compute;
    let (x, context) = unet_input(&cfg, h, w, &target.device)?;
    let (x, context) = (x.to_dtype(dt)?, context.to_dtype(dt)?);
    let name = format!("unet-{} forward{} ({}×{h}×{w}, ctx 333)", cfg.defaults.width.max(cfg.defaults.height), target.suffix(), cfg.unet.temporal_length);
    let t = target.time(&name, runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?;
    print_gpu_peak(&name, &target.device);
    Ok(t)
}

fn print_gpu_peak(name: &str, device: &Device) {
    if let Some(b) = dynamicrafter_engine::device::peak_memory_bytes(device) {
        println!("{name}: peak GPU memory {:.2} GB", b as f64 / 1e9);
    }
}

/// The UNet's operations at the first level of the 576×1024 model (16 frames of 72×128 latents,
/// 320 channels, 5 heads of 64), on the target device and dtype: what dominates a forward there.
fn ops_1024(runs: usize, target: &Target) -> Result<Vec<Timing>> {
    let (t, c, h, w) = (16, 320, 72, 128);
    let hw = h * w;
    let dt = target.precision.part(Part::Unet).compute;
    let r = |shape: &[usize], std: f64| -> Result<Tensor> { Ok((target.randn(shape, Part::Unet)? * std)?) };
    let suffix = target.suffix();
    let mut out = Vec::new();
    let mut op = |name: &str, f: &mut dyn FnMut() -> Result<Tensor>| -> Result<()> {
        out.push(target.time(&format!("{name}{suffix}"), runs, || f().map(|_| ()))?);
        Ok(())
    };
    let x = r(&[t, c, h, w], 1.0)?;
    let (ones, zeros) = (Tensor::ones(c, dt, &target.device)?, Tensor::zeros(c, dt, &target.device)?);
    let w3 = r(&[c, c, 3, 3], 0.02)?;
    op("conv3x3 16x320x72x128", &mut || Ok(kernels::conv3x3(&x, &w3, &zeros)?))?;
    let xt = r(&[1, c, t, hw], 1.0)?;
    let wt = r(&[c, c, 3, 1, 1], 0.02)?;
    op("temporal conv 1x320x16x9216 k3", &mut || Ok(kernels::temporal_conv(&xt, &wt, &zeros)?))?;
    op("group_norm+silu 16x320x72x128 g32", &mut || Ok(kernels::group_norm(&x, &ones, &zeros, 32, 1e-5, true)?))?;
    let xv = r(&[1, c, t, h, w], 1.0)?;
    op("group_norm 1x320x16x72x128 g32 (video)", &mut || Ok(kernels::group_norm(&xv, &ones, &zeros, 32, 1e-6, false)?))?;
    let tokens = r(&[t, hw, c], 1.0)?;
    for (n, k) in [(c, c), (8 * c, c), (c, 4 * c)] {
        let input = if k == c { tokens.clone() } else { r(&[t, hw, k], 1.0)? };
        let lin = candle_nn::Linear::new(r(&[n, k], 0.02)?, Some(Tensor::zeros(n, dt, &target.device)?));
        op(&format!("linear {}x{k}->{n}", t * hw), &mut || Ok(candle_core::Module::forward(&lin, &input)?))?;
    }
    let ln = candle_nn::LayerNorm::new(ones.clone(), zeros.clone(), 1e-5);
    op("layer_norm 147456x320", &mut || Ok(candle_core::Module::forward(&ln, &tokens)?))?;
    let ff = r(&[t, hw, 8 * c], 1.0)?;
    op("geglu 147456x2560", &mut || Ok(kernels::geglu(&ff)?))?;
    let heads = c / 64;
    let qkv = |b: usize, l: usize| r(&[b, l, 64], 1.0);
    let (q, k, v) = (qkv(t * heads, hw)?, qkv(t * heads, hw)?, qkv(t * heads, hw)?);
    op("attention self 80x9216x64", &mut || Ok(kernels::attention(&q, &k, &v, 0.125)?))?;
    let (kc, vc) = (qkv(t * heads, 77)?, qkv(t * heads, 77)?);
    op("attention cross 80x9216 vs 77", &mut || Ok(kernels::attention(&q, &kc, &vc, 0.125)?))?;
    let (qt, kt, vt) = (qkv(hw * heads, t)?, qkv(hw * heads, t)?, qkv(hw * heads, t)?);
    op("attention temporal 46080x16x64", &mut || Ok(kernels::attention(&qt, &kt, &vt, 0.125)?))?;
    op("permute video->tokens 1x320x16x72x128", &mut || Ok(xv.permute((0, 3, 4, 2, 1))?.contiguous()?))?;
    op("split heads 16x9216x320", &mut || Ok(dynamicrafter_engine::models::layers::split_heads(&tokens, heads)?.contiguous()?))?;
    op("cat skip 2x16x320x72x128", &mut || Ok(Tensor::cat(&[&x, &x], 1)?))?;
    op("silu 16x320x72x128", &mut || Ok(x.silu()?))?;
    let bias = r(&[1, c, 1, 1], 1.0)?;
    op("broadcast add 16x320x72x128 + 320", &mut || Ok(x.broadcast_add(&bias)?))?;
    op("add 16x320x72x128", &mut || Ok((&x + &x)?))?;
    Ok(out)
}

/// A whole run of a preset with random weights: its default request (16 frames, 50 steps, CFG
/// 7.5), a warm-up of one step first. Prints the stages of the median run and peak GPU memory.
fn pipeline_case(preset: &str, runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::preset(preset)?;
    dynamicrafter_engine::device::reset_peak_memory(&target.device);
    let start = Instant::now();
    let p = Pipeline::random_with(cfg.clone(), &target.device, target.precision.clone())?;
    target.device.synchronize()?;
    let build = start.elapsed();
    let (h, w) = (cfg.defaults.height, cfg.defaults.width);
    let image = RgbImage::new(w, h, (0..w * h * 3).map(|i| ((i * 7) % 251) as u8).collect())?;
    let req = Request::new(&cfg, image, "a red fox running through fresh snow");
    let cancel = AtomicBool::new(false);
    let name = format!("pipeline-{} ({} frames {h}×{w}, {} steps, CFG {}){}", w.max(h), req.frames, req.steps, req.cfg_scale, target.suffix());
    let warm = Request { steps: 1, ..req.clone() };
    p.generate(&warm, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
    let mut runs_done = Vec::new();
    let t = time(&name, runs, || {
        let v = p.generate(&req, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
        runs_done.push(v.timings);
        Ok(())
    })?;
    let mut report = dynamicrafter_engine::Report::new(preset, dynamicrafter_engine::device::name(&target.device), target.precision.name());
    if let Some(timings) = runs_done.get(runs_done.len() / 2) {
        report.add_timings(timings);
    }
    let stages: Vec<String> = report.stages.iter().map(|s| format!("{} {:.2} s", s.stage, s.seconds)).collect();
    println!("{name}: networks built in {:.1} s; stages: {}; mean step {:.3} s", build.as_secs_f64(), stages.join(", "), report.denoise_steps.mean_seconds);
    print_gpu_peak(&name, &target.device);
    Ok(t)
}

/// ‖out − reference‖ / ‖reference‖ (L2 over all elements).
fn relative_error(out: &Tensor, reference: &Tensor) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64) };
    Ok(norm(&(out - reference)?)? / norm(reference)?)
}

/// The 256 UNet in fp32 and in the CPU's bf16 mode (products on AMX), from the same seeded
/// weights and input: the output's error against fp32 (the quality bar is 35 dB), and
/// the bf16 forward's time.
fn bf16_256(runs: usize) -> Result<Vec<Timing>> {
    if !kernels::amx::available() {
        println!("bf16-256: this CPU has no AMX: nothing to measure");
        return Ok(Vec::new());
    }
    let cfg = ModelConfig::dc_256();
    let (x, context) = unet_256_input(&cfg)?;
    let reference = unet_forward(&Unet::new(&cfg.unet, weights(false))?, &x, &context)?;
    let policy = PrecisionPolicy::new(dynamicrafter_engine::Precision::Bf16, &Device::Cpu)?;
    let unet = Unet::new(&cfg.unet, RandomWeights::var_builder_for(&policy, DType::F32, &Device::Cpu))?;
    let rel = relative_error(&unet_forward(&unet, &x, &context)?, &reference)?;
    println!("bf16-256: UNet output relative error bf16 (AMX) vs fp32: {rel:.4} ({:.1} dB SNR)", -20.0 * rel.log10());
    Ok(vec![time("unet-256 forward bf16 (AMX), same weights", runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?])
}

/// The 256 UNet in fp32 and with q8_0 linear layers, from the same seeded weights and input:
/// relative error of the output, and each forward's time. Also the file size `convert
/// --quantize q8_0` writes for each preset, from its key list.
fn quant_256(runs: usize) -> Result<Vec<Timing>> {
    use dynamicrafter_engine::quant;
    for preset in ModelConfig::PRESETS {
        let keys = Pipeline::checkpoint_keys(&ModelConfig::preset(preset)?)?;
        // Bytes of the float checkpoint, and of `convert --quantize q8_0` with the float
        // remainder in f32 (default) or f16 (`--dtype f16`).
        let (mut f32_bytes, mut q8_bytes, mut rest) = (0usize, 0usize, 0usize);
        for (name, shape) in &keys {
            let n: usize = shape.iter().product();
            f32_bytes += 4 * n;
            match quant::stored_shape(shape).filter(|_| quant::stores_quantized(name, shape)) {
                Some([rows, bytes]) => q8_bytes += rows * bytes,
                None => rest += n,
            }
        }
        let gb = |b: usize| b as f64 / 1e9;
        println!(
            "quant-256: {preset:<10} checkpoint f32 {:.2} GB; q8_0 {:.2} GB ({:.3}×); q8_0 + f16 rest {:.2} GB ({:.3}×)",
            gb(f32_bytes),
            gb(q8_bytes + 4 * rest),
            (q8_bytes + 4 * rest) as f64 / f32_bytes as f64,
            gb(q8_bytes + 2 * rest),
            (q8_bytes + 2 * rest) as f64 / f32_bytes as f64
        );
    }
    let cfg = ModelConfig::dc_256();
    let (x, context) = unet_256_input(&cfg)?;
    let reference = {
        let unet = Unet::new(&cfg.unet, weights(false))?;
        unet_forward(&unet, &x, &context)?
    };
    // Weight rounding alone, q8_0 against q4k (what `--quantize q4k` would store): the same
    // f32 UNet with its quantizable weights rounded through each format and back.
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let vb = candle_nn::VarBuilder::from_backend(Box::new(RoundedWeights(dtype)), DType::F32, Device::Cpu);
        let out = unet_forward(&Unet::new(&cfg.unet, vb)?, &x, &context)?;
        let rel = relative_error(&out, &reference)?;
        println!("quant-256: UNet output relative error, weights rounded to {dtype:?} only: {rel:.4} ({:.1} dB)", -20.0 * rel.log10());
    }
    let unet = Unet::new(&cfg.unet, weights(true))?;
    let rel = relative_error(&unet_forward(&unet, &x, &context)?, &reference)?;
    println!("quant-256: UNet output relative error q8_0 vs fp32: {rel:.4} ({:.1} dB SNR)", -20.0 * rel.log10());
    Ok(vec![time("unet-256 forward q8_0 (16×32×32, ctx 333)", runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?])
}

fn vae_decode_256(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::dc_256();
    let vae = AutoencoderKL::new(&cfg.vae, target.weights(Part::Vae).pp("first_stage_model"))?;
    let z = target.randn(&[1, 4, 32, 32], Part::Vae)?;
    // 16 frames one at a time, as the decode runs.
    target.time(&format!("vae-decode-256 (16 frames 256×256){}", target.suffix()), runs, || {
        for _ in 0..16 {
            vae.decode(&z)?;
        }
        Ok(())
    })
}

fn clip_image(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::dc_256();
    let enc = ClipVisionEncoder::new(&cfg.vision, target.weights(Part::ImageEncoder))?;
    let x = target.randn(&[1, 3, 224, 224], Part::ImageEncoder)?;
    target.time(&format!("clip-image (ViT-H/14, one image){}", target.suffix()), runs, || {
        enc.forward(&x)?;
        Ok(())
    })
}

fn clip_text(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::dc_256();
    let enc = ClipTextEncoder::new(&cfg.text, target.weights(Part::TextEncoder))?;
    let ids = Tensor::from_vec((0..77u32).map(|i| (i * 97) % 49408).collect::<Vec<_>>(), (1, 77), &target.device)?;
    target.time(&format!("clip-text (77 tokens){}", target.suffix()), runs, || {
        enc.forward(&ids)?;
        Ok(())
    })
}

fn tiny_pipeline(runs: usize, target: &Target) -> Result<Timing> {
    let dir = std::path::Path::new("fixtures/tiny-v");
    if !dir.is_dir() {
        bail!("tiny-pipeline needs fixtures/tiny-v: run from the repository root");
    }
    let cfg = ModelConfig::from_json_file(&dir.join("config.json"))?;
    let p = Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &target.device, target.precision.clone())?;
    let image = RgbImage::new(220, 96, (0..220 * 96 * 3).map(|i| (i % 251) as u8).collect())?;
    let req = Request::new(&cfg, image, "a red fox running through fresh snow");
    let cancel = AtomicBool::new(false);
    target.time(&format!("tiny-pipeline (tiny-v, 5 steps, CFG){}", target.suffix()), runs, || {
        p.generate(&req, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
        Ok(())
    })
}

/// The ops of `torch_ops.py`, same shapes and names: ours next to candle's own where we replace it.
fn ops(runs: usize) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    let w = randn(&[320, 320, 3, 3], 0.05)?;
    let bias = Tensor::zeros(320, DType::F32, &Device::Cpu)?;
    for hw in [32, 64] {
        let x = randn(&[16, 320, hw, hw], 1.0)?;
        if kernels::F32Conv::supports(320) {
            // The weight packed once, as a layer does at load.
            let conv = kernels::F32Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (ours, AVX-512)"), runs, || { conv.forward(&x)?; Ok(()) })?);
        }
        out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (ours, gemm crate)"), runs, || { kernels::conv3x3(&x, &w, &bias)?; Ok(()) })?);
        out.push(time(&format!("conv2d f32 16x320x{hw}x{hw} k3 (candle)"), runs, || { x.conv2d(&w, 1, 1, 1, 1)?; Ok(()) })?);
        if kernels::q8_available() {
            let q = kernels::Q8Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d q8_0 16x320x{hw}x{hw} k3 (ours)"), runs, || { q.forward(&x)?; Ok(()) })?);
        }
        if kernels::amx::available() {
            let a = kernels::amx::Bf16Conv::spatial_3x3(&w, &bias)?;
            out.push(time(&format!("conv2d bf16 16x320x{hw}x{hw} k3 (ours, AMX)"), runs, || { a.forward(&x)?; Ok(()) })?);
        }
    }
    let w1 = randn(&[320, 320, 3], 0.05)?;
    let x1 = randn(&[1024, 320, 16], 1.0)?;
    out.push(time("conv1d f32 1024x320x16 k3 (candle)", runs, || { x1.conv1d(&w1, 1, 1, 1, 1)?; Ok(()) })?);
    // The same temporal conv as the UNet runs it: (b, c, t, h·w) with taps over t.
    let xt = randn(&[1, 320, 16, 1024], 1.0)?;
    let wt = randn(&[320, 320, 3, 1, 1], 0.05)?;
    out.push(time("conv1d f32 1024x320x16 k3 (ours, temporal)", runs, || { kernels::temporal_conv(&xt, &wt, &bias)?; Ok(()) })?);
    if kernels::q8_available() {
        let q = kernels::Q8Conv::temporal(&wt, &bias)?;
        out.push(time("conv1d q8_0 1024x320x16 k3 (ours, temporal)", runs, || { q.forward(&xt)?; Ok(()) })?);
    }
    if kernels::amx::available() {
        let a = kernels::amx::Bf16Conv::temporal(&wt, &bias)?;
        out.push(time("conv1d bf16 1024x320x16 k3 (ours, AMX, temporal)", runs, || { a.forward(&xt)?; Ok(()) })?);
    }
    let a = randn(&[4096, 1280], 1.0)?;
    let b = randn(&[1280, 1280], 1.0)?;
    out.push(time("matmul f32 4096x1280@1280x1280", runs, || { a.matmul(&b)?; Ok(()) })?);
    let packed_f32 = |w: &Tensor| kernels::f32_matrix::F32Matrix::new(&w.t()?.contiguous()?, None);
    if kernels::f32_matrix::available() {
        let w = packed_f32(&b)?;
        out.push(time("matmul f32 4096x1280@1280x1280 (ours, AVX-512)", runs, || { w.forward(&a)?; Ok(()) })?);
    }
    // int8 weights (q8_0) at the UNet's projection shapes: ours (VNNI) and candle's QMatMul.
    for (m, k, n) in [(4096, 1280, 1280), (16384, 320, 320), (16384, 320, 2560)] {
        let x = randn(&[m, k], 1.0)?;
        let w = randn(&[n, k], 0.05)?;
        let q = candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)?;
        if kernels::q8_available() {
            let ours = kernels::Q8Matrix::new(&q)?;
            out.push(time(&format!("matmul q8_0 {m}x{k}@{k}x{n} (ours)"), runs, || { ours.forward(&x)?; Ok(()) })?);
        }
        let qm = candle_core::quantized::QMatMul::from_qtensor(q)?;
        out.push(time(&format!("matmul q8_0 {m}x{k}@{k}x{n} (candle)"), runs, || { candle_core::Module::forward(&qm, &x)?; Ok(()) })?);
        let wt = w.t()?.contiguous()?;
        out.push(time(&format!("matmul f32 {m}x{k}@{k}x{n}"), runs, || { x.matmul(&wt)?; Ok(()) })?);
        if kernels::f32_matrix::available() {
            let ours = packed_f32(&wt)?;
            out.push(time(&format!("matmul f32 {m}x{k}@{k}x{n} (ours, AVX-512)"), runs, || { ours.forward(&x)?; Ok(()) })?);
        }
    }
    let (ab, bb) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
    out.push(time("matmul bf16 4096x1280@1280x1280", runs, || { ab.matmul(&bb)?; Ok(()) })?);
    if kernels::amx::available() {
        // f32 in and out, bf16 products on AMX (the weight packed once, as a layer would).
        let w = kernels::amx::Bf16Matrix::new(&b.t()?.contiguous()?, None)?;
        out.push(time("matmul bf16 4096x1280@1280x1280 (ours, AMX)", runs, || { w.forward(&a)?; Ok(()) })?);
        for (m, k, n) in [(16384, 320, 320), (16384, 320, 2560)] {
            let (x, w) = (randn(&[m, k], 1.0)?, kernels::amx::Bf16Matrix::new(&randn(&[n, k], 0.05)?, None)?);
            out.push(time(&format!("matmul bf16 {m}x{k}@{k}x{n} (ours, AMX)"), runs, || { w.forward(&x)?; Ok(()) })?);
        }
    }
    let (wb, xb) = (w.to_dtype(DType::BF16)?, randn(&[16, 320, 32, 32], 1.0)?.to_dtype(DType::BF16)?);
    match xb.conv2d(&wb, 1, 1, 1, 1) {
        Ok(_) => out.push(time("conv2d bf16 16x320x32x32 k3", runs, || { xb.conv2d(&wb, 1, 1, 1, 1)?; Ok(()) })?),
        Err(e) => println!("{:<44} unsupported ({})", "conv2d bf16 16x320x32x32 k3", e.to_string().lines().next().unwrap_or("")),
    }
    let qkv = |b, l| -> Result<[Tensor; 3]> { Ok([randn(&[b, l, 64], 1.0)?, randn(&[b, l, 64], 1.0)?, randn(&[b, l, 64], 1.0)?]) };
    let [q, k, v] = qkv(16 * 5, 1024)?;
    out.push(time("sdpa f32 spatial 16x5x1024x64 (ours)", runs, || { kernels::attention(&q, &k, &v, 0.125)?; Ok(()) })?);
    out.push(time("attn naive f32 spatial (candle)", runs, || { kernels::attention_reference(&q, &k, &v, 0.125)?; Ok(()) })?);
    if kernels::amx_attention::supports(&q, &k, &v, 1) {
        // The same attention in the UNet's bf16 mode: heads merged in the last dimension.
        let merged = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((16, 5, 1024, 64))?.transpose(1, 2)?.reshape((16, 1024, 320))?) };
        let (qm, km, vm) = (merged(&q)?, merged(&k)?, merged(&v)?);
        out.push(time("sdpa bf16 spatial 16x5x1024x64 (ours, AMX)", runs, || { kernels::amx_attention::attention(&qm, &km, &vm, 5, 0.125)?; Ok(()) })?);
    }
    let [q, k, v] = qkv(1024 * 5, 16)?;
    out.push(time("sdpa f32 temporal 1024x5x16x64 (ours)", runs, || { kernels::attention(&q, &k, &v, 0.125)?; Ok(()) })?);
    out.push(time("attn naive f32 temporal (candle)", runs, || { kernels::attention_reference(&q, &k, &v, 0.125)?; Ok(()) })?);
    let x = randn(&[16, 320, 32, 32], 1.0)?;
    let (g, bb) = (Tensor::ones(320, DType::F32, &Device::Cpu)?, Tensor::zeros(320, DType::F32, &Device::Cpu)?);
    out.push(time("group_norm f32 16x320x32x32 g32 (ours)", runs, || { kernels::group_norm(&x, &g, &bb, 32, 1e-5, false)?; Ok(()) })?);
    out.push(time("group_norm f32 16x320x32x32 g32 (candle)", runs, || { kernels::group_norm_reference(&x, &g, &bb, 32, 1e-5, false)?; Ok(()) })?);
    // The temporal transformer's layout change at the first level (b, c, t, h, w) → (b, h, w, t, c).
    let video = randn(&[1, 320, 16, 32, 32], 1.0)?;
    out.push(time("permute f32 1x320x16x32x32 to tokens (ours)", runs, || { kernels::permute(&video, &[0, 3, 4, 2, 1])?; Ok(()) })?);
    out.push(time("permute f32 1x320x16x32x32 to tokens (candle)", runs, || { kernels::permute_reference(&video, &[0, 3, 4, 2, 1])?; Ok(()) })?);
    let s = randn(&[80, 1024, 1024], 1.0)?;
    out.push(time("softmax f32 80x1024x1024 (ours)", runs, || { kernels::softmax_last_dim(&s)?; Ok(()) })?);
    out.push(time("softmax f32 80x1024x1024 (candle)", runs, || { candle_nn_softmax(&s)?; Ok(()) })?);
    Ok(out)
}

/// The same request (tiny-v, its 5 steps with CFG, seed 1) through the command line and through
/// the server. CLI: the whole process, and its report's time without the model load (the server
/// keeps the model resident). Server: multipart upload → `done` event → video downloaded.
fn serve_vs_cli(runs: usize) -> Result<Vec<Timing>> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let (image, prompt) = ("examples/images/sunset.png", "waves rolling onto the shore at sunset");
    if !std::path::Path::new("fixtures/tiny-v").is_dir() || !std::path::Path::new(image).is_file() {
        bail!("serve-vs-cli needs fixtures/tiny-v and {image}: run from the repository root");
    }
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("dynamicrafter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (out, report) = (dir.join("cli.mp4"), dir.join("report.json"));
    let mut generation_ms = Vec::new();
    let cli = time("serve-vs-cli: CLI process (tiny-v, 5 steps)", runs, || {
        let status = Command::new(&exe)
            .args(["generate", "--model", "fixtures/tiny-v", "--image", image, "--prompt", prompt, "--seed", "1", "--quiet"])
            .arg("--out")
            .arg(&out)
            .arg("--report-json")
            .arg(&report)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("generate failed: {status}");
        }
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let load = r["stages"].as_array().into_iter().flatten().find(|s| s["stage"] == "model load").and_then(|s| s["seconds"].as_f64());
        generation_ms.push((r["total_seconds"].as_f64().unwrap_or(0.0) - load.unwrap_or(0.0)) * 1e3);
        Ok(())
    })?;
    generation_ms.remove(0); // the warm-up run
    generation_ms.sort_by(f64::total_cmp);
    let cli_generation = Timing { name: "serve-vs-cli: CLI without model load".into(), ms: generation_ms };
    println!("{:<44} median {:>10.2} ms", cli_generation.name, cli_generation.median());

    let mut server = Command::new(&exe)
        .args(["serve", "--model", "fixtures/tiny-v", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    let url = line.trim().strip_prefix("listening on ").map(str::to_string);
    let image_bytes = std::fs::read(image)?;
    let boundary = "dynamicrafter-bench";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n1\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n\r\n").as_bytes());
    body.extend_from_slice(&image_bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let served = (|| -> Result<Timing> {
        let url = url.ok_or_else(|| anyhow::anyhow!("the server did not print its address"))?;
        // Ready once it answers.
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while ureq::get(&format!("{url}/healthz")).call().is_err() {
            if Instant::now() > deadline {
                bail!("the server did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        time("serve-vs-cli: server submit→video (tiny-v)", runs, || {
            let job: serde_json::Value = ureq::post(&format!("{url}/api/v1/jobs"))
                .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
                .send_bytes(&body)?
                .into_json()?;
            let id = job["id"].as_str().unwrap_or_default();
            let events = ureq::get(&format!("{url}/api/v1/jobs/{id}/events")).call()?;
            let done = BufReader::new(events.into_reader()).lines().map_while(|l| l.ok()).any(|l| l == "event: done");
            if !done {
                bail!("job {id} did not finish");
            }
            let mut video = Vec::new();
            ureq::get(&format!("{url}/api/v1/jobs/{id}/video")).call()?.into_reader().read_to_end(&mut video)?;
            Ok(())
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let served = served?;
    println!(
        "serve-vs-cli ratio: server/CLI-without-load {:.3}, server/CLI-process {:.3}",
        served.median() / cli_generation.median(),
        served.median() / cli.median()
    );
    Ok(vec![cli, cli_generation, served])
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
fn load_times(runs: usize) -> Result<Vec<Timing>> {
    use dynamicrafter_engine::quant::Quantization;
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
        write_random_checkpoint(&ModelConfig::dc_256(), &real)?;
        println!("load: wrote a random real-256 checkpoint in {:.1} s", t.elapsed().as_secs_f64());
        models.push(("real-256".into(), ModelConfig::dc_256(), real));
        let mut out = Vec::new();
        for (name, cfg, f32_file) in models {
            let q8_file = dir.join(format!("{name}-q8_0.safetensors"));
            crate::convert::convert(&f32_file, &q8_file, DType::F32, Some(Quantization::Q8_0))?;
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

fn candle_nn_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (device, precision) = args.compute.resolve()?;
    let cases: Vec<String> = if args.cases.is_empty() { DEFAULT_CASES.iter().map(|s| s.to_string()).collect() } else { args.cases.clone() };
    let known = || DEFAULT_CASES.iter().chain(&GPU_CASES).copied().collect::<Vec<_>>().join(", ");
    if let Some(bad) = cases.iter().find(|c| !DEFAULT_CASES.contains(&c.as_str()) && !GPU_CASES.contains(&c.as_str())) {
        bail!("unknown bench case '{bad}' (known: {})", known());
    }
    println!(
        "device {} | precision {} | CPU threads {} | {} runs after a warm-up",
        dynamicrafter_engine::device::name(&device),
        precision.name(),
        rayon_threads(),
        args.runs
    );
    if !device.is_cpu() {
        device.set_seed(1)?;
    }
    let target = Target { device, precision: precision.clone() };
    let mut results = Vec::new();
    for case in &cases {
        match case.as_str() {
            "unet-256" => results.push(unet_case("256", args.runs, &target)?),
            "unet-512" => results.push(unet_case("512", args.runs, &target)?),
            "unet-1024" => results.push(unet_case("1024", args.runs, &target)?),
            "pipeline-256" => results.push(pipeline_case("256", args.runs, &target)?),
            "pipeline-512" => results.push(pipeline_case("512", args.runs, &target)?),
            "pipeline-1024" => results.push(pipeline_case("1024", args.runs, &target)?),
            "ops-1024" => results.extend(ops_1024(args.runs, &target)?),
            "quant-256" => results.extend(quant_256(args.runs)?),
            "bf16-256" => results.extend(bf16_256(args.runs)?),
            "load" => results.extend(load_times(args.runs)?),
            "vae-decode-256" => results.push(vae_decode_256(args.runs, &target)?),
            "clip-image" => results.push(clip_image(args.runs, &target)?),
            "clip-text" => results.push(clip_text(args.runs, &target)?),
            "tiny-pipeline" => results.push(tiny_pipeline(args.runs, &target)?),
            "serve-vs-cli" => results.extend(serve_vs_cli(args.runs)?),
            _ => results.extend(ops(args.runs)?),
        }
    }
    let rss = peak_rss_bytes();
    if let Some(path) = &args.json {
        let j = json!({
            "precision": precision.name(),
            "device": dynamicrafter_engine::device::name(&target.device),
            "peak_rss_bytes": rss,
            "results": results.iter().map(|t| json!({"name": t.name, "median_ms": t.median(), "min_ms": t.ms[0], "max_ms": t.ms[t.ms.len()-1], "runs": t.ms.len()})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&j)?)?;
    }
    let summary: Vec<String> = results.iter().map(|t| format!("{} {:.1} ms", t.name, t.median())).collect();
    println!(
        "summary: {} | peak RSS {}",
        summary.join("; "),
        rss.map(|b| format!("{:.2} GB", b as f64 / 1e9)).unwrap_or_else(|| "n/a".into())
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
