//! `dynamicrafter bench`: times the real networks with random weights (no checkpoint needed).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::models::unet::{Unet, UnetInput, IMAGE_TOKENS_PER_FRAME, TEXT_CONTEXT_LEN};
use dynamicrafter_engine::weights::RandomWeights;
use dynamicrafter_engine::ModelConfig;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Cases to run: unet-256 (one UNet forward of the real 256 network, 16 frames, 32×32 latent).
    #[arg(default_value = "unet-256")]
    cases: Vec<String>,
    /// Timed runs per case (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    f()?; // warm-up
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f()?;
            Ok(start.elapsed())
        })
        .collect()
}

fn unet_256(runs: usize) -> Result<Vec<Duration>> {
    let dev = Device::Cpu;
    let cfg = ModelConfig::dc_256();
    let unet = Unet::new(&cfg.unet, RandomWeights::var_builder(DType::F32, &dev))?;
    let t = cfg.unet.temporal_length;
    let x = Tensor::randn(0f32, 1.0, (1, cfg.unet.in_channels, t, 32, 32), &dev)?;
    let ctx_len = TEXT_CONTEXT_LEN + t * IMAGE_TOKENS_PER_FRAME;
    let context = Tensor::randn(0f32, 1.0, (1, ctx_len, cfg.unet.context_dim), &dev)?;
    time_runs(runs, || {
        let out = unet.forward(&UnetInput { x: &x, timesteps: &[637.0], context: &context, fs: Some(&[3.0]) })?;
        out.dims5()?;
        Ok(())
    })
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mut summary = Vec::new();
    for case in &args.cases {
        let mut times = match case.as_str() {
            "unet-256" => unet_256(args.runs)?,
            other => bail!("unknown bench case '{other}' (known: unet-256)"),
        };
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "{case}: median {:.2?} min {:.2?} max {:.2?} over {} runs",
            median,
            times[0],
            times[times.len() - 1],
            times.len()
        );
        summary.push(format!("{case} {:.2}s", median.as_secs_f64()));
    }
    let rss = dynamicrafter_engine::report::peak_rss_bytes().map(|b| format!("{:.2} GB", b as f64 / 1e9)).unwrap_or_else(|| "n/a".into());
    println!("summary: {} | peak RSS {rss}", summary.join(", "));
    Ok(())
}
