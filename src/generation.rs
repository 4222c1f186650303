//! The one generation call of every front end (`generate`, `batch`, the server's workers): run
//! the pipeline for a request, write its videos, return the report.

use anyhow::Result;
use dynamicrafter_engine::report::peak_rss_bytes;
use dynamicrafter_engine::{FrameSink, Pipeline, Progress, Report, Request, SeededNoise, SinkResult};
use dynamicrafter_video::{Format, VideoWriter};
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
    let mut writers = Writers { output, outputs, current: None, times: Vec::new() };
    let videos = pipeline.generate_samples(req, outputs.len(), &mut noise, progress, cancel, &mut writers)?;
    for (video, write_time) in videos.iter().zip(&writers.times) {
        report.add_timings(&video.timings);
        report.add("video write", *write_time);
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

/// Encodes each sample's frames into its output as the pipeline decodes them.
struct Writers<'a> {
    output: VideoOutput,
    outputs: &'a [PathBuf],
    current: Option<VideoWriter>,
    /// Time spent encoding and writing, per finished sample.
    times: Vec<Duration>,
}

impl Writers<'_> {
    fn spent(&mut self, since: Instant) {
        if let Some(t) = self.times.last_mut() {
            *t += since.elapsed();
        }
    }
}

impl FrameSink for Writers<'_> {
    fn begin(&mut self, sample: usize, _count: usize, width: usize, height: usize) -> SinkResult {
        let start = Instant::now();
        let path = self.outputs.get(sample).ok_or("more samples than outputs")?;
        self.times.push(Duration::ZERO);
        self.current = Some(VideoWriter::create(self.output.format, self.output.fps, path, width, height)?);
        self.spent(start);
        Ok(())
    }

    fn frame(&mut self, rgb: &[u8]) -> SinkResult {
        let start = Instant::now();
        self.current.as_mut().ok_or("frame before begin")?.push(rgb)?;
        self.spent(start);
        Ok(())
    }

    fn end(&mut self) -> SinkResult {
        let start = Instant::now();
        self.current.take().ok_or("end before begin")?.finish()?;
        self.spent(start);
        Ok(())
    }
}
