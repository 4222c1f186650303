//! The network and pipeline cases: one forward of each network, a whole run.

use crate::{time, Target, Timing};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use dynamicrafter_engine::compute::{Part, UnetGraph};
use dynamicrafter_engine::models::clip_text::ClipTextEncoder;
use dynamicrafter_engine::models::clip_vision::ClipVisionEncoder;
use dynamicrafter_engine::models::unet::{Unet, UnetInput, IMAGE_TOKENS_PER_FRAME, TEXT_CONTEXT_LEN};
use dynamicrafter_engine::models::vae::AutoencoderKL;
use dynamicrafter_engine::config::presets::Preset;
use dynamicrafter_engine::samplers::SamplerKind;
use dynamicrafter_engine::{FrameSink, ModelConfig, Pipeline, Request, RgbImage, SeededNoise, SinkResult};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The UNet input of `unet-256`: 16 frames of 32×32 latents, context 77 + 16·16 tokens.
pub(crate) fn unet_256_input(cfg: &ModelConfig) -> Result<(Tensor, Tensor)> {
    unet_input(cfg, 32, 32, &Device::Cpu)
}

/// A UNet input of `h×w` latents for every frame, context 77 + 16·frames tokens, in f32.
pub(crate) fn unet_input(cfg: &ModelConfig, h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = cfg.unet.temporal_length;
    let x = Tensor::randn(0f32, 1.0, &[1, cfg.unet.in_channels, t, h, w], device)?;
    let context = Tensor::randn(0f32, 1.0, &[1, TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME, cfg.unet.context_dim], device)?;
    Ok((x, context))
}

/// The UNet input of a preset at its own latent size (`h×w`), on the target device in the
/// UNet's compute dtype: `(x, context, h, w)`.
fn preset_input(cfg: &ModelConfig, target: &Target) -> Result<(Tensor, Tensor, usize, usize)> {
    let f = cfg.vae.downsample_factor();
    let (h, w) = (cfg.defaults.height / f, cfg.defaults.width / f);
    let dt = target.precision.part(Part::Unet).compute;
    let (x, context) = unet_input(cfg, h, w, &target.device)?;
    Ok((x.to_dtype(dt)?, context.to_dtype(dt)?, h, w))
}

pub(crate) fn unet_forward(unet: &Unet, x: &Tensor, context: &Tensor) -> Result<Tensor> {
    Ok(unet.forward(&UnetInput { x, timesteps: &[637.0], context, fs: Some(&[3.0]) })?)
}

/// One forward of a preset's UNet at its own latent size (16 frames, context 333 tokens).
pub(crate) fn unet_case(preset: &str, runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::preset(preset)?;
    dynamicrafter_engine::device::reset_peak_memory(&target.device);
    let unet = Unet::new(&cfg.unet, target.weights(Part::Unet), &target.backend)?;
    if target.device.is_cpu() {
        let gb = |b: Option<u64>| b.unwrap_or(0) as f64 / 1e9;
        let (now, peak) = (dynamicrafter_engine::report::rss_bytes(), dynamicrafter_engine::report::peak_rss_bytes());
        println!("unet-{preset} built: RSS {:.2} GB (peak while building {:.2} GB)", gb(now), gb(peak));
    } else {
        // Which kernels the forward runs (the switches' effect, the convolution tile).
        println!("unet-{preset} kernels: {}", target.backend.describe());
    }
    let (x, context, h, w) = preset_input(&cfg, target)?;
    let name = format!("unet-{} forward{} ({}×{h}×{w}, ctx 333)", cfg.defaults.width.max(cfg.defaults.height), target.suffix(), cfg.unet.temporal_length);
    let mut t = target.time(&name, runs, || {
        unet_forward(&unet, &x, &context)?;
        Ok(())
    })?;
    t.peak_gpu_bytes = print_gpu_peak(&name, &target.device);
    Ok(t)
}

/// The two UNet passes of a CFG step (cond, uncond) at a preset's latent size: one after the
/// other, and as one batch of 2 (what `Backend::batched_guidance` chooses between).
pub(crate) fn guided_case(preset: &str, runs: usize, target: &Target) -> Result<Vec<Timing>> {
    let cfg = ModelConfig::preset(preset)?;
    let unet = Unet::new(&cfg.unet, target.weights(Part::Unet), &target.backend)?;
    let (x, cond, h, w) = preset_input(&cfg, target)?;
    let uncond = cond.zeros_like()?;
    let (x2, c2) = (Tensor::cat(&[&x, &x], 0)?, Tensor::cat(&[&cond, &uncond], 0)?);
    let size = cfg.defaults.width.max(cfg.defaults.height);
    let mut out = Vec::new();
    for batched in [false, true] {
        let name = format!("guided-{size} {} ({}×{h}×{w}, ctx 333){}", if batched { "one batch of 2" } else { "two passes" }, cfg.unet.temporal_length, target.suffix());
        dynamicrafter_engine::device::reset_peak_memory(&target.device);
        let peak_rss = dynamicrafter_engine::report::peak_rss_bytes();
        let mut t = target.time(&name, runs, || {
            if batched {
                unet.forward(&UnetInput { x: &x2, timesteps: &[637.0, 637.0], context: &c2, fs: Some(&[3.0, 3.0]) })?;
            } else {
                unet_forward(&unet, &x, &cond)?;
                unet_forward(&unet, &x, &uncond)?;
            }
            Ok(())
        })?;
        t.peak_gpu_bytes = print_gpu_peak(&name, &target.device);
        out.push(t);
        if target.device.is_cpu() {
            let gb = |b: Option<u64>| b.unwrap_or(0) as f64 / 1e9;
            println!("{name}: peak RSS {:.2} GB (before {:.2} GB)", gb(dynamicrafter_engine::report::peak_rss_bytes()), gb(peak_rss));
        }
    }
    Ok(out)
}

/// One UNet forward at a preset's latent size run eagerly and replayed as a CUDA graph captured
/// from the same call (`UnetGraph`: the conditioning, which reads the timesteps from host
/// memory, outside it; inputs copied in and the output copied out on each replay, as the
/// pipeline does): whether candle's and our ops capture at all, what launching them costs, and
/// whether the replay gives the eager output. A capture that fails prints why and leaves the
/// eager timing.
pub(crate) fn graph_case(preset: &str, runs: usize, target: &Target) -> Result<Vec<Timing>> {
    let cfg = ModelConfig::preset(preset)?;
    let unet = Unet::new(&cfg.unet, target.weights(Part::Unet), &target.backend)?;
    let (x, context, h, w) = preset_input(&cfg, target)?;
    let conditioning = unet.condition(&UnetInput { x: &x, timesteps: &[637.0], context: &context, fs: Some(&[3.0]) }, None)?;
    let size = cfg.defaults.width.max(cfg.defaults.height);
    let name = |how: &str| format!("graph-{size} {how} ({}×{h}×{w}, ctx 333){}", cfg.unet.temporal_length, target.suffix());
    let eager = target.time(&name("eager forward"), runs, || {
        unet.forward_conditioned(&x, &conditioning)?;
        Ok(())
    })?;
    let mut out = vec![eager];
    let want = UnetGraph::warm_up(&unet, &x, &conditioning)?.to_dtype(candle_core::DType::F32)?;
    let replay = name("graph replay");
    let mut graph = match UnetGraph::capture(&unet, &x, &conditioning) {
        Ok(graph) => graph,
        Err(why) => {
            println!("{replay}: no graph: {why}");
            return Ok(out);
        }
    };
    out.push(target.time(&replay, runs, || {
        graph.replay(&x, &conditioning)?;
        Ok(())
    })?);
    let got = graph.replay(&x, &conditioning)?.to_dtype(candle_core::DType::F32)?;
    let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("{replay}: replay against eager: max |difference| {diff:.3e} (max |output| {scale:.3e})");
    Ok(out)
}

/// Prints the device's peak memory since the last reset and returns it (GPU only).
pub(crate) fn print_gpu_peak(name: &str, device: &Device) -> Option<u64> {
    let peak = dynamicrafter_engine::device::peak_memory_bytes(device);
    if let Some(b) = peak {
        println!("{name}: peak GPU memory {:.2} GB", b as f64 / 1e9);
    }
    peak
}

/// A whole run of a preset with random weights: its default request (16 frames, 50 steps, CFG
/// 7.5), a warm-up of one step first. Prints the stages of the median run and peak GPU memory.
pub(crate) fn pipeline_case(preset: &str, runs: usize, target: &Target) -> Result<Timing> {
    let cfg = ModelConfig::preset(preset)?;
    dynamicrafter_engine::device::reset_peak_memory(&target.device);
    let start = Instant::now();
    let p = Pipeline::random_with(cfg.clone(), &target.device, target.precision.clone())?;
    target.device.synchronize()?;
    let build = start.elapsed();
    if let Some(bytes) = p.parked_bytes() {
        println!("offload: {:.2} GB parked in host memory", bytes as f64 / 1e9);
    }
    // The run's peak from here on; loading's own is printed apart.
    print_gpu_peak(&format!("pipeline-{preset} load"), &target.device);
    dynamicrafter_engine::device::reset_peak_memory(&target.device);
    let (h, w) = (cfg.defaults.height, cfg.defaults.width);
    let image = RgbImage::new(w, h, (0..w * h * 3).map(|i| ((i * 7) % 251) as u8).collect())?;
    let req = Request::new(&cfg, image, "a red fox running through fresh snow");
    let cancel = AtomicBool::new(false);
    let name = format!("pipeline-{} ({} frames {h}×{w}, {} steps, CFG {}){}", w.max(h), req.sampling.frames, req.sampling.steps, req.sampling.cfg_scale, target.suffix());
    let mut warm = req.clone();
    warm.sampling.steps = 1;
    p.generate(&warm, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
    let mut runs_done = Vec::new();
    let mut t = time(&name, runs, || {
        let v = p.generate(&req, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
        runs_done.push(v.sample.timings);
        Ok(())
    })?;
    let mut report = dynamicrafter_engine::Report::new(preset, dynamicrafter_engine::device::name(&target.device), target.precision.name());
    if let Some(timings) = runs_done.get(runs_done.len() / 2) {
        report.add_timings(timings);
    }
    let stages: Vec<String> = report.stages.iter().map(|s| format!("{} {:.2} s", s.stage, s.seconds)).collect();
    println!("{name}: networks built in {:.1} s; stages: {}; mean step {:.3} s", build.as_secs_f64(), stages.join(", "), report.denoise_steps.mean_seconds);
    t.peak_gpu_bytes = print_gpu_peak(&name, &target.device);
    Ok(t)
}

pub(crate) fn vae_decode_256(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = Preset::Dc256.config();
    let vae = AutoencoderKL::new(&cfg.vae, target.weights(Part::Vae).pp("first_stage_model"), &target.backend)?;
    let z = target.randn(&[1, 4, 32, 32], Part::Vae)?;
    // 16 frames one at a time, as the decode runs.
    target.time(&format!("vae-decode-256 (16 frames 256×256){}", target.suffix()), runs, || {
        for _ in 0..16 {
            vae.decode(&z)?;
        }
        Ok(())
    })
}

pub(crate) fn clip_image(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = Preset::Dc256.config();
    let enc = ClipVisionEncoder::new(&cfg.vision, target.weights(Part::ImageEncoder), &target.backend)?;
    let x = target.randn(&[1, 3, 224, 224], Part::ImageEncoder)?;
    target.time(&format!("clip-image (ViT-H/14, one image){}", target.suffix()), runs, || {
        enc.forward(&x)?;
        Ok(())
    })
}

pub(crate) fn clip_text(runs: usize, target: &Target) -> Result<Timing> {
    let cfg = Preset::Dc256.config();
    let enc = ClipTextEncoder::new(&cfg.text, target.weights(Part::TextEncoder), &target.backend)?;
    let ids = Tensor::from_vec((0..77u32).map(|i| (i * 97) % 49408).collect::<Vec<_>>(), (1, 77), &target.device)?;
    target.time(&format!("clip-text (77 tokens){}", target.suffix()), runs, || {
        enc.forward(&ids)?;
        Ok(())
    })
}

fn tiny_v(target: &Target) -> Result<(Pipeline, Request)> {
    let dir = std::path::Path::new("fixtures/tiny-v");
    if !dir.is_dir() {
        bail!("the tiny-model cases need fixtures/tiny-v: run from the repository root");
    }
    let cfg = ModelConfig::from_json_file(&dir.join("config.json"))?;
    let p = Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &target.device, target.precision.clone())?;
    let image = RgbImage::new(220, 96, (0..220 * 96 * 3).map(|i| (i % 251) as u8).collect())?;
    Ok((p, Request::new(&cfg, image, "a red fox running through fresh snow")))
}

pub(crate) fn tiny_pipeline(runs: usize, target: &Target) -> Result<Timing> {
    let (p, req) = tiny_v(target)?;
    let cancel = AtomicBool::new(false);
    target.time(&format!("tiny-pipeline (tiny-v, 5 steps, CFG){}", target.suffix()), runs, || {
        p.generate(&req, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
        Ok(())
    })
}

/// The whole tiny-model run per sampler at the same step count: the UNet calls are the same,
/// so this shows each sampler's own overhead.
pub(crate) fn samplers(runs: usize, target: &Target) -> Result<Vec<Timing>> {
    let (p, mut req) = tiny_v(target)?;
    req.sampling.steps = 10;
    let cancel = AtomicBool::new(false);
    SamplerKind::ALL
        .into_iter()
        .map(|kind| {
            req.sampling.sampler = kind;
            target.time(&format!("sampler {kind} (tiny-v, 10 steps, CFG){}", target.suffix()), runs, || {
                p.generate(&req, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
                Ok(())
            })
        })
        .collect()
}

/// Long videos on the real 256 geometry (random weights): 16, 48 and 96 frames, one step
/// without guidance (so the run is short on a CPU) at the default window stride (4), frames
/// streamed to a sink that only counts them, as a video writer takes them. The figures show
/// what the windows cost: time per window and peak memory, which should stay that of one
/// window. The peak is reset between runs (`/proc/self/clear_refs`).
pub(crate) fn long_video_256(target: &Target) -> Result<Vec<Timing>> {
    let cfg = ModelConfig::preset("256")?;
    let p = Pipeline::random_with(cfg.clone(), &target.device, target.precision.clone())?;
    let (h, w) = (cfg.defaults.height, cfg.defaults.width);
    let image = RgbImage::new(w, h, (0..w * h * 3).map(|i| ((i * 7) % 251) as u8).collect())?;
    let cancel = AtomicBool::new(false);
    let mut warm = Request::new(&cfg, image.clone(), "warm-up");
    (warm.sampling.steps, warm.sampling.cfg_scale) = (1, 1.0);
    p.generate(&warm, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel)?;
    let mut out = Vec::new();
    for frames in [16, 48, 96] {
        let mut req = Request::new(&cfg, image.clone(), "a red fox running through fresh snow");
        (req.sampling.frames, req.sampling.steps, req.sampling.cfg_scale) = (frames, 1, 1.0);
        let stride = req.sampling.window_stride;
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        // One run each, no warm-up: the networks are warm from the previous frame count.
        let start = Instant::now();
        let mut sink = CountFrames(0);
        let run = p.generate_samples(&req, 1, &mut SeededNoise::new(1, &target.device), &mut |_| {}, &cancel, &mut sink)?;
        target.device.synchronize()?;
        anyhow::ensure!(sink.0 == frames, "{} frames reached the sink, not {frames}", sink.0);
        let plan = run[0].plan.describe();
        let t = Timing { name: format!("long-video-256 ({frames} frames, 1 step, stride {stride}){}", target.suffix()), ms: vec![start.elapsed().as_secs_f64() * 1e3], peak_gpu_bytes: None };
        let rss = dynamicrafter_engine::report::peak_rss_bytes().unwrap_or(0);
        println!("long-video-256 {frames} frames: {plan}; peak RSS {:.2} GB", rss as f64 / 1e9);
        out.push(t);
    }
    Ok(out)
}

/// Counts the frames it is given and drops them.
struct CountFrames(usize);

impl FrameSink for CountFrames {
    fn begin(&mut self, _: usize, _: usize, _: usize, _: usize) -> SinkResult {
        Ok(())
    }
    fn frame(&mut self, _: &[u8]) -> SinkResult {
        self.0 += 1;
        Ok(())
    }
    fn end(&mut self) -> SinkResult {
        Ok(())
    }
}
