//! `dynamicrafter serve`: the web page and the HTTP API. The model is loaded once; worker
//! threads take jobs from a bounded queue and run them through the same
//! [`generate_videos`](crate::run::generate_videos) call as the command line.

mod api;
mod jobs;
mod metrics;
mod openapi;
mod queue;

use crate::model;
use crate::run::{generate_videos, VideoOutput};
use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use dynamicrafter_engine::{Pipeline, Progress, Stage};
use dynamicrafter_video::Format;
use jobs::{CancelOutcome, JobSpec, JobStore, State as JobState};
use queue::{JobQueue, MemoryQueue, PushError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Model: a preset (256, 512, 1024, 512_interp), a checkpoint file or folder, or a repo id.
    #[arg(long, default_value = "1024")]
    pub model: String,
    /// Network config when the model does not say: a preset name or a config.json.
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Jobs that may wait; more are refused with 429 (upstream's Gradio queue holds 12).
    #[arg(long, default_value_t = 12)]
    pub max_queue: usize,
    /// Jobs generated at the same time, all sharing the one loaded model.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Seconds a finished job and its video are kept.
    #[arg(long, default_value_t = 3600)]
    pub keep_seconds: u64,
    /// Largest accepted image upload, in bytes.
    #[arg(long, default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// Largest accepted image, in pixels (width × height).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Folder for the videos [default: a new folder under the system temp dir, removed at exit].
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Frames per second of the written videos (upstream writes 8).
    #[arg(long, default_value_t = 8.0)]
    pub fps: f64,
    #[command(flatten)]
    pub compute: crate::run::ComputeArgs,
}

pub struct Limits {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_prompt_tokens: usize,
}

/// Everything the handlers and workers share.
pub struct AppState {
    pipeline: Pipeline,
    model_name: String,
    jobs: JobStore,
    queue: Box<dyn JobQueue>,
    max_queue: usize,
    limits: Limits,
    results_dir: PathBuf,
    fps: f64,
    closing: AtomicBool,
    /// Mean wall time of recent jobs (f64 bits), for `Retry-After`.
    mean_job_seconds: AtomicU64,
    workers: usize,
    positions_lock: std::sync::Mutex<()>,
}

impl AppState {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Creates a job and queues it; returns its position.
    fn enqueue(&self, id: &str, spec: JobSpec) -> Result<usize, PushError> {
        self.jobs.insert(id, spec);
        match self.queue.push(id) {
            Ok(position) => {
                self.positions_changed();
                Ok(position)
            }
            Err(e) => {
                self.jobs.discard(id);
                Err(e)
            }
        }
    }

    fn positions_changed(&self) {
        // Serialised so an older snapshot of the queue never overwrites a newer one.
        let _order = self.positions_lock.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = self.queue.waiting();
        metrics::queue_depth(waiting.len());
        self.jobs.set_positions(&waiting);
    }

    fn cancel(&self, id: &str) -> Option<CancelOutcome> {
        let was_waiting = self.queue.remove(id);
        let outcome = self.jobs.cancel(id, was_waiting)?;
        if outcome == CancelOutcome::Dequeued {
            metrics::job_finished(JobState::Cancelled.name());
            self.positions_changed();
        }
        Some(outcome)
    }

    fn retry_after_seconds(&self) -> u64 {
        let mean = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
        let waiting = self.queue.waiting().len() as f64;
        ((mean * waiting / self.workers as f64).ceil() as u64).max(1)
    }

    /// Stops taking jobs: the waiting ones are cancelled, running ones stop at their next step.
    fn shut_down(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for id in self.queue.close() {
            if self.jobs.finish(&id, Err(None)) {
                metrics::job_finished(JobState::Cancelled.name());
            }
        }
        metrics::queue_depth(0);
        self.jobs.cancel_running();
    }

    fn video_path(&self, id: &str) -> PathBuf {
        self.results_dir.join(format!("{id}.mp4"))
    }
}

/// One worker: takes jobs until the queue closes.
fn worker(state: Arc<AppState>) {
    while let Some(id) = state.queue.pop() {
        state.positions_changed();
        let Some((spec, cancel)) = state.jobs.start(&id) else { continue };
        metrics::running(state.jobs.count_running());
        let path = state.video_path(&id);
        let started = Instant::now();
        let mut denoise_start = Instant::now();
        let mut last_step = Instant::now();
        let mut on_progress = |p: Progress| {
            if p.stage != Stage::Denoise {
                if p.step == 0 {
                    state.jobs.stage(&id, p.stage.name());
                }
                return;
            }
            if p.step == 0 {
                state.jobs.stage(&id, p.stage.name());
                denoise_start = Instant::now();
            } else {
                metrics::step(last_step.elapsed().as_secs_f64());
                let per_step = denoise_start.elapsed().as_secs_f64() / p.step as f64;
                state.jobs.step(&id, p.step, p.total, Some(per_step * (p.total - p.step) as f64));
            }
            last_step = Instant::now();
        };
        let output = VideoOutput { format: Format::Mp4, fps: state.fps };
        // A panic in one job must not take the worker with it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            generate_videos(
                &state.pipeline,
                &state.model_name,
                &spec.request,
                spec.seed,
                output,
                std::slice::from_ref(&path),
                None,
                &mut on_progress,
                &cancel,
            )
        }));
        let outcome = match result {
            Ok(Ok(report)) => {
                for s in &report.stages {
                    metrics::stage(&s.stage, s.seconds);
                }
                metrics::peak_memory(report.peak_rss_bytes, report.peak_gpu_bytes);
                let secs = started.elapsed().as_secs_f64();
                let old = f64::from_bits(state.mean_job_seconds.load(Ordering::Relaxed));
                let mean = if old == 0.0 { secs } else { 0.8 * old + 0.2 * secs };
                state.mean_job_seconds.store(mean.to_bits(), Ordering::Relaxed);
                Ok((report, path.clone()))
            }
            Ok(Err(_)) if cancel.load(Ordering::Relaxed) => Err(None),
            Ok(Err(e)) => Err(Some(format!("{e:#}"))),
            Err(_) => Err(Some("internal error while generating (see the server log)".to_string())),
        };
        if outcome.is_err() {
            // Nothing half-written is left behind; the writer renames only complete files.
            let _ = std::fs::remove_file(&path);
        }
        let final_state = match &outcome {
            Ok(_) => JobState::Done,
            Err(Some(_)) => JobState::Failed,
            Err(None) => JobState::Cancelled,
        };
        if let Err(Some(e)) = &outcome {
            tracing::warn!(job = %id, "generation failed: {e}");
        }
        if state.jobs.finish(&id, outcome) {
            metrics::job_finished(final_state.name());
        }
        metrics::running(state.jobs.count_running());
    }
}

fn router(state: Arc<AppState>) -> Router {
    // Two images, base64 in JSON (4/3), plus the other fields.
    let body_limit = state.limits.max_image_bytes * 8 / 3 + (1 << 20);
    let api = Router::new()
        .route("/jobs", axum::routing::post(api::submit).layer(DefaultBodyLimit::max(body_limit)))
        .route("/jobs/{id}", get(api::status).delete(api::cancel))
        .route("/jobs/{id}/events", get(api::events))
        .route("/jobs/{id}/video", get(api::video))
        .route("/model", get(api::model_info))
        .route("/examples", get(api::examples));
    Router::new()
        .route("/", get(api::page))
        .route("/examples/{name}", get(api::example_image))
        .route("/healthz", get(api::health))
        .route("/metrics", get(api::metrics_text))
        .route("/openapi.json", get(openapi::document))
        .nest("/api/v1", api)
        .fallback(api::not_found)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    // Request logs on stderr: `RUST_LOG=tower_http=debug` shows every request.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if !(args.fps.is_finite() && args.fps > 0.0) {
        anyhow::bail!("--fps must be a positive number, got {}", args.fps);
    }
    let (device, precision) = args.compute.resolve()?;
    let (results_dir, temporary) = match &args.results_dir {
        Some(dir) => (dir.clone(), false),
        None => (std::env::temp_dir().join(format!("dynamicrafter-serve-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&results_dir).with_context(|| format!("results folder {}", results_dir.display()))?;
    let source = model::resolve(&args.model, args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind before the (slow) model load so a taken port fails fast.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    tracing::info!("loading {}", source.weights.display());
    let start = Instant::now();
    let pipeline = Pipeline::load_with(source.config.clone(), &source.weights, &device, precision)?;
    let load_time = start.elapsed();
    metrics::handle();
    metrics::describe(load_time);
    let max_prompt_tokens = pipeline.config().text.context_length - 2;
    let state = Arc::new(AppState {
        pipeline,
        model_name: source.name.clone(),
        jobs: JobStore::default(),
        queue: Box::new(MemoryQueue::new(args.max_queue)),
        max_queue: args.max_queue,
        limits: Limits { max_image_bytes: args.max_image_bytes, max_image_pixels: args.max_image_pixels, max_prompt_tokens },
        results_dir: results_dir.clone(),
        fps: args.fps,
        closing: AtomicBool::new(false),
        mean_job_seconds: AtomicU64::new(0),
        workers: args.workers,
        positions_lock: std::sync::Mutex::default(),
    });
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            let s = state.clone();
            std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || worker(s))
        })
        .collect::<std::io::Result<_>>()
        .context("starting worker threads")?;

    let keep = Duration::from_secs(args.keep_seconds);
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{addr}");
    tracing::info!("model {} loaded in {:.1} s; {} worker(s), queue of {}", source.name, load_time.as_secs_f64(), args.workers, args.max_queue);
    runtime.block_on(async {
        let janitor = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(keep.min(Duration::from_secs(60)).max(Duration::from_secs(1)));
                loop {
                    tick.tick().await;
                    for path in state.jobs.expire(keep) {
                        let _ = std::fs::remove_file(path);
                    }
                }
            })
        };
        let app = router(state.clone());
        let shutdown = {
            let state = state.clone();
            async move {
                shutdown_signal().await;
                tracing::info!("shutting down: cancelling waiting and running jobs");
                state.shut_down();
            }
        };
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        janitor.abort();
        served
    })?;
    for w in workers {
        let _ = w.join();
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&results_dir);
    }
    tracing::info!("stopped");
    Ok(())
}
