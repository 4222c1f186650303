//! `dynamicrafter-bench`: times the real networks with random weights (no checkpoint needed), the
//! whole pipeline, and the primitive ops of `scripts/torch_ops.py` at the same shapes, so each
//! figure can be set beside PyTorch's on the same machine (docs/PERFORMANCE.md).
//!
//! `cargo build --release --workspace && ./target/release/dynamicrafter-bench [CASES]`

mod networks;
mod ops;
mod quant;
mod serve;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use dynamicrafter_engine::compute::Part;
use dynamicrafter_engine::report::peak_rss_bytes;
use dynamicrafter_engine::weights::RandomWeights;
use dynamicrafter_engine::{Backend, PrecisionPolicy};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// What `bench` runs when no case is named: everything that fits a small CPU machine.
const DEFAULT_CASES: [&str; 12] = ["unet-256", "vae-decode-256", "clip-image", "clip-text", "tiny-pipeline", "samplers", "ops", "serve-vs-cli", "quant-256", "bf16-256", "vae-bf16-256", "load"];
/// Named only: GPU-sized work (hours on a CPU; long-video-256 some ten minutes), and queue
/// (it needs redis-server).
const GPU_CASES: [&str; 14] = [
    "unet-512",
    "unet-1024",
    "guided-256",
    "guided-512",
    "guided-1024",
    "graph-256",
    "graph-512",
    "graph-1024",
    "pipeline-256",
    "pipeline-512",
    "pipeline-1024",
    "ops-1024",
    "long-video-256",
    "queue",
];

#[derive(Parser)]
#[command(name = "dynamicrafter-bench", about = "Time dynamicrafter's networks, pipeline and ops with random weights")]
struct BenchArgs {
    /// Cases: unet-256 (one forward of the real 256 UNet: 16 frames, 32×32 latent, context
    /// 333×1024), vae-decode-256 (16 frames at 256×256), clip-image, clip-text, tiny-pipeline
    /// (a full run of fixtures/tiny-v), ops (the primitives of scripts/torch_ops.py), serve-vs-cli (the
    /// same tiny-v request through `generate` and through `serve`), quant-256 (the 256 UNet in
    /// fp32 and q8_0 from the same seeded weights: output error, times, file sizes), bf16-256
    /// (the same with the CPU's bf16 products on AMX or AVX512-BF16, where the CPU has them),
    /// vae-bf16-256 (the 256 VAE decoder likewise: decoded pixels' PSNR and time), load (file
    /// size, load time and resident memory of fp32 and q8_0 checkpoints: the tiny fixtures and a
    /// real-256 one of random weights written to the temp folder, 14 GB of disk). Default: all
    /// of these. Named only (GPU-sized): unet-512, unet-1024 (one forward at 40×64 / 72×128
    /// latents), guided-256, guided-512, guided-1024 (the two UNet passes of a CFG step, one
    /// after the other and as one batch of 2, with peak memory), graph-256, graph-512,
    /// graph-1024 (one UNet forward eagerly and replayed as a CUDA graph: does it capture, what
    /// do launches cost; a CUDA build) and pipeline-256, pipeline-512, pipeline-1024 (a whole run of the preset with
    /// random weights: 16 frames, 50 steps, CFG 7.5, with per-stage times and peak GPU memory),
    /// ops-1024 (the UNet's ops at the 576×1024 model's first-level shapes, on the device and in
    /// the precision of the run: where a GPU forward spends its time), queue (tiny-v jobs through
    /// a shared Redis queue, started here: latency against the in-process queue, jobs/min with
    /// 1 and 2 workers; needs redis-server).
    cases: Vec<String>,
    /// Timed runs per case, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Precision of the network and pipeline cases: auto, fp32, bf16 or f16 (ops, quant-256,
    /// load and serve-vs-cli measure the CPU).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Quantize the network cases' weights to int8: q8_0.
    #[arg(long)]
    quantize: Option<String>,
    /// Park the networks not in use in host memory (the pipeline cases), as `generate
    /// --offload` does.
    #[arg(long)]
    offload: bool,
    /// Device of the network and pipeline cases: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) struct Timing {
    pub(crate) name: String,
    pub(crate) ms: Vec<f64>,
    /// The device memory pool's high-water mark over the case, on a GPU.
    pub(crate) peak_gpu_bytes: Option<u64>,
}

impl Timing {
    pub(crate) fn median(&self) -> f64 {
        self.ms[self.ms.len() / 2]
    }
}

pub(crate) fn time(name: &str, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    f()?; // warm-up
    let mut ms = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<_>>>()?;
    ms.sort_by(f64::total_cmp);
    let t = Timing { name: name.to_string(), ms, peak_gpu_bytes: None };
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

pub(crate) fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
}

/// The instruction sets the kernels may use in this process.
pub(crate) fn cpu() -> dynamicrafter_kernels::cpu::CpuFeatures {
    dynamicrafter_kernels::cpu::features()
}

/// Where the network and pipeline cases run, and in which dtypes.
pub(crate) struct Target {
    pub(crate) device: Device,
    pub(crate) precision: PrecisionPolicy,
    /// The kernels of the network cases' layers.
    pub(crate) backend: Backend,
}

impl Target {
    /// Random weights for `part`, in its weight dtype (the backend quantizes them if asked).
    pub(crate) fn weights(&self, part: Part) -> candle_nn::VarBuilder<'static> {
        RandomWeights::var_builder(self.precision.part(part).weights, &self.device)
    }

    /// Standard-normal input for `part`, in its compute dtype.
    pub(crate) fn randn(&self, shape: &[usize], part: Part) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &self.device)?.to_dtype(self.precision.part(part).compute)?)
    }

    /// Times `f` with the device's queued work finished at the end of every run.
    pub(crate) fn time(&self, name: &str, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
        time(name, runs, || {
            f()?;
            Ok(self.device.synchronize()?)
        })
    }

    /// ` q8_0` / ` bf16` after a case's name when it does not run in fp32 on the CPU.
    pub(crate) fn suffix(&self) -> String {
        let mut s = String::new();
        if !self.device.is_cpu() {
            s += &format!(" {} {}", dynamicrafter_engine::device::name(&self.device), self.precision.name());
        } else if self.precision.quantization.is_some() {
            s += " q8_0";
        } else if self.precision.bf16_matmuls {
            s += if cpu().amx { " bf16 (AMX)" } else { " bf16 (AVX512-BF16)" };
        }
        s
    }
}

fn run(args: BenchArgs) -> Result<()> {
    let device = dynamicrafter_engine::device::parse(&args.device)?;
    let precision = PrecisionPolicy::from_flags(&args.precision, args.quantize.as_deref(), &device)?.with_offload(args.offload);
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
    let backend = Backend::new(&device, &precision, false);
    let target = Target { device, precision: precision.clone(), backend };
    let mut results = Vec::new();
    for case in &cases {
        match case.as_str() {
            "unet-256" => results.push(networks::unet_case("256", args.runs, &target)?),
            "unet-512" => results.push(networks::unet_case("512", args.runs, &target)?),
            "unet-1024" => results.push(networks::unet_case("1024", args.runs, &target)?),
            "guided-256" => results.extend(networks::guided_case("256", args.runs, &target)?),
            "guided-512" => results.extend(networks::guided_case("512", args.runs, &target)?),
            "guided-1024" => results.extend(networks::guided_case("1024", args.runs, &target)?),
            "graph-256" => results.extend(networks::graph_case("256", args.runs, &target)?),
            "graph-512" => results.extend(networks::graph_case("512", args.runs, &target)?),
            "graph-1024" => results.extend(networks::graph_case("1024", args.runs, &target)?),
            "pipeline-256" => results.push(networks::pipeline_case("256", args.runs, &target)?),
            "pipeline-512" => results.push(networks::pipeline_case("512", args.runs, &target)?),
            "pipeline-1024" => results.push(networks::pipeline_case("1024", args.runs, &target)?),
            "ops-1024" => results.extend(ops::ops_1024(args.runs, &target)?),
            "quant-256" => results.extend(quant::quant_256(args.runs)?),
            "bf16-256" => results.extend(quant::bf16_256(args.runs)?),
            "vae-bf16-256" => results.extend(quant::vae_bf16_256(args.runs)?),
            "load" => results.extend(quant::load_times(args.runs)?),
            "vae-decode-256" => results.push(networks::vae_decode_256(args.runs, &target)?),
            "clip-image" => results.push(networks::clip_image(args.runs, &target)?),
            "clip-text" => results.push(networks::clip_text(args.runs, &target)?),
            "tiny-pipeline" => results.push(networks::tiny_pipeline(args.runs, &target)?),
            "samplers" => results.extend(networks::samplers(args.runs, &target)?),
            "long-video-256" => results.extend(networks::long_video_256(&target)?),
            "serve-vs-cli" => results.extend(serve::serve_vs_cli(args.runs)?),
            "queue" => results.extend(serve::queue(args.runs)?),
            _ => results.extend(ops::ops(args.runs)?),
        }
    }
    let rss = peak_rss_bytes();
    if let Some(path) = &args.json {
        let j = json!({
            "precision": precision.name(),
            "device": dynamicrafter_engine::device::name(&target.device),
            "peak_rss_bytes": rss,
            "results": results.iter().map(|t| json!({"name": t.name, "median_ms": t.median(), "min_ms": t.ms[0], "max_ms": t.ms[t.ms.len()-1], "runs": t.ms.len(), "peak_gpu_bytes": t.peak_gpu_bytes})).collect::<Vec<_>>(),
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

fn main() -> ExitCode {
    // As the shipped binary does: what it measures is what users run.
    dynamicrafter_engine::compute::keep_freed_memory();
    match run(BenchArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamicrafter-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
