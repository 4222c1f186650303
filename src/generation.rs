//! The one generation call of every front end (`generate`, `batch`, the server's workers): run
//! the pipeline for a request, write its videos, return the report.

use anyhow::Result;
use dynamicrafter_engine::report::peak_rss_bytes;
use dynamicrafter_engine::{Pipeline, Progress, Report, Request, SeededNoise};
use dynamicrafter_video::{Format, Frames};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Where a run's videos go and how they are encoded.
#[derive(Debug, Clone, Copy)]
pub struct VideoOutput {
    pub format: Format,
    pub fps: f64,
}

/// The one generation path of every front end (CLI, batch, server): run the pipeline for `req`
/// (its seed included), write one video per path in `outputs` (one sample each), and return
/// the report. Device, precision and kernels come from the loaded pipeline, never from the
/// caller.
#[allow(clippy::too_many_arguments)]
pub fn generate_videos(
    pipeline: &Pipeline,
    model_name: &str,
    req: &Request,
    output: VideoOutput,
    outputs: &[PathBuf],
    load_time: Option<Duration>,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Report> {
    let start = Instant::now();
    let device = dynamicrafter_engine::device::name(pipeline.device());
    let mut report = Report::new(model_name, device, pipeline.precision().name());
    report.kernels = pipeline.backend().summary();
    if let Some(d) = load_time {
        report.add("model load", d);
    }
    let seed = req.sampling.seed;
    let mut noise = SeededNoise::new(seed, pipeline.device());
    let videos = pipeline.generate_samples(req, outputs.len(), &mut noise, progress, cancel)?;
    for (video, path) in videos.iter().zip(outputs) {
        report.add_timings(&video.timings);
        let t = Instant::now();
        let frames = Frames::new(&video.frames_u8, video.frames, video.width, video.height)?;
        dynamicrafter_video::write(frames, output.format, output.fps, path)?;
        report.add("video write", t.elapsed());
    }
    report.seed = Some(seed);
    report.frames = videos[0].frames;
    report.width = req.sampling.width;
    report.height = req.sampling.height;
    report.sampler = Some(req.sampling.sampler_summary());
    report.windows = Some(videos[0].plan.describe());
    report.total_seconds = start.elapsed().as_secs_f64() + load_time.map_or(0.0, |d| d.as_secs_f64());
    report.peak_rss_bytes = peak_rss_bytes();
    report.peak_gpu_bytes = dynamicrafter_engine::device::peak_memory_bytes(pipeline.device());
    Ok(report)
}
