//! A worker: takes jobs from a [`WorkSource`] and runs each through the one generation call.
//! The same loop serves the in-process queue and the shared Redis one; `dynamicrafter worker`
//! runs it on its own, against Redis.

use super::backend::{Backend, WorkSource};
use super::metrics;
use crate::generation::{generate_videos, VideoOutput};
use crate::model_source;
use anyhow::Result;
use dynamicrafter_engine::{Pipeline, Progress, Stage};
use dynamicrafter_video::Format;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The shared queue: redis://HOST:PORT[/DB] (the one the API nodes' `serve --queue` names).
    #[arg(long, value_name = "URL")]
    pub queue: String,
    /// Model, as for `serve`: this worker takes only the jobs submitted for it.
    #[arg(long, default_value = "1024")]
    pub model: String,
    /// Network config when the model does not say: a preset name or a config.json.
    #[arg(long)]
    pub config: Option<String>,
    /// Write the videos to this folder (every node must see it at the same path, a shared
    /// mount) instead of storing them in Redis.
    #[arg(long)]
    pub results_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub cluster: super::ClusterArgs,
    #[command(flatten)]
    pub compute: crate::cli::ComputeArgs,
}

/// `dynamicrafter worker`: connects (an unreachable Redis fails here), loads the model, and
/// runs jobs until SIGTERM or Ctrl-C, when the running job is handed back to the queue.
pub fn run(args: WorkerArgs) -> Result<()> {
    super::init_logging();
    let (device, precision) = args.compute.resolve()?;
    // Redis first: a wrong URL fails before a download or a model load.
    let spec = model_source::describe(&args.model, args.config.as_deref())?;
    let (queue, scratch) = super::connect_queue(&args.queue, &spec, &args.cluster, 1, Duration::from_secs(3600), 8.0, args.results_dir.as_deref())?;
    // Every line this worker logs names it (the name its jobs show as `worker`).
    let _span = tracing::info_span!("worker", id = %queue.worker_name()).entered();
    let source = spec.fetch()?;
    tracing::info!("loading {}", source.weights.display());
    let pipeline = Pipeline::load_with(source.config.clone(), &source.weights, &device, precision)?;
    {
        let queue = queue.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(super::shutdown_signal());
            tracing::info!("stopping: the running job goes back to the queue");
            queue.shut_down();
        })?;
    }
    tracing::info!("worker for model {} on {}", source.name, args.queue);
    run_jobs(&pipeline, &source.name, queue.as_ref());
    let _ = std::fs::remove_dir_all(&scratch);
    tracing::info!("stopped");
    Ok(())
}

/// Takes jobs until the source closes.
pub fn run_jobs(pipeline: &Pipeline, model_name: &str, source: &dyn WorkSource) {
    while let Some(job) = source.take() {
        let mut denoise_start = Instant::now();
        let mut last_step = Instant::now();
        let mut on_progress = |p: Progress| {
            if p.stage != Stage::Denoise {
                if p.step == 0 {
                    source.stage(&job, p.stage.name());
                }
                return;
            }
            if p.step == 0 {
                source.stage(&job, p.stage.name());
                denoise_start = Instant::now();
            } else {
                metrics::step(last_step.elapsed().as_secs_f64());
                let per_step = denoise_start.elapsed().as_secs_f64() / p.step as f64;
                source.step(&job, p.step, p.total, Some(per_step * (p.total - p.step) as f64));
            }
            last_step = Instant::now();
        };
        let output = VideoOutput { format: Format::Mp4, fps: job.fps };
        let path = job.video_path.clone();
        // A panic in one job must not take the worker with it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            generate_videos(pipeline, model_name, &job.request, output, std::slice::from_ref(&path), None, &mut on_progress, &job.cancel)
        }));
        let outcome = match result {
            Ok(Ok(report)) => {
                for s in &report.stages {
                    metrics::stage(&s.stage, s.seconds);
                }
                metrics::peak_memory(report.peak_rss_bytes, report.peak_gpu_bytes);
                Ok((report, path.clone()))
            }
            Ok(Err(_)) if job.cancel.load(Ordering::Relaxed) => Err(None),
            Ok(Err(e)) => Err(Some(format!("{e:#}"))),
            Err(_) => Err(Some("internal error while generating (see the server log)".to_string())),
        };
        if outcome.is_err() {
            // Nothing half-written is left behind; the writer renames only complete files.
            let _ = std::fs::remove_file(&path);
        }
        if let Err(Some(e)) = &outcome {
            tracing::warn!(job = %job.id, "generation failed: {e}");
        }
        source.finish(job, outcome);
    }
}
