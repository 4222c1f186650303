//! `dynamicrafter serve`: the web page and the HTTP API. The model is loaded once; worker
//! threads take jobs from a bounded queue and run them through the same
//! [`generate_videos`](crate::generation::generate_videos) call as the command line.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | flags, startup, routes, shutdown |
//! | `state.rs` | what handlers and workers share |
//! | `handlers.rs` | the HTTP handlers |
//! | `form.rs` | a submitted job: parsing and checks |
//! | `error.rs` | the error response |
//! | `openapi.rs` | `GET /openapi.json` |
//! | `worker.rs` | the worker threads |
//! | `jobs.rs`, `queue.rs` | the job store and the queue (the seams for a shared backend) |
//! | `metrics.rs` | Prometheus metrics |

mod error;
mod form;
mod handlers;
mod jobs;
mod metrics;
mod openapi;
mod queue;
mod state;
mod worker;

use crate::model_source;
use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use dynamicrafter_engine::Pipeline;
use jobs::JobStore;
use queue::MemoryQueue;
use state::{AppState, Limits};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
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
    /// Finished jobs kept at most (with their videos); beyond it the oldest go first.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_finished_jobs: u64,
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
    pub compute: crate::cli::ComputeArgs,
}

fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes();
    let api = Router::new()
        .route("/jobs", axum::routing::post(handlers::submit).layer(DefaultBodyLimit::max(body_limit)))
        .route("/jobs/{id}", get(handlers::status).delete(handlers::cancel))
        .route("/jobs/{id}/events", get(handlers::events))
        .route("/jobs/{id}/video", get(handlers::video))
        .route("/model", get(handlers::model_info))
        .route("/examples", get(handlers::examples))
        .method_not_allowed_fallback(handlers::method_not_allowed);
    Router::new()
        .route("/", get(handlers::page))
        .route("/examples/{name}", get(handlers::example_image))
        .route("/healthz", get(handlers::health))
        .route("/metrics", get(handlers::metrics_text))
        .route("/openapi.json", get(openapi::document))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .nest("/api/v1", api)
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn(same_origin))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Refuses a state-changing request (anything but GET, HEAD, OPTIONS) whose `Origin` is not
/// this server's own `Host`: a web page on another site cannot queue or cancel jobs through a
/// visitor's browser. Requests without `Origin` (scripts, curl) pass.
async fn same_origin(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::{header, Method};
    use axum::response::IntoResponse;
    let refused = {
        let headers = req.headers();
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        match text(header::ORIGIN) {
            Some(origin) if changes_state && Some(origin.split_once("://").map_or(origin, |(_, rest)| rest)) != text(header::HOST) => {
                Some(format!("cross-origin request from '{origin}' refused: submit from this server's page or without an Origin header"))
            }
            _ => None,
        }
    };
    match refused {
        Some(message) => error::ApiError::new(axum::http::StatusCode::FORBIDDEN, None, message).into_response(),
        None => next.run(req).await,
    }
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
    let source = model_source::resolve(&args.model, args.config.as_deref())?;
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
        jobs: JobStore::new(args.max_finished_jobs as usize),
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
            std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || worker::run(s))
        })
        .collect::<std::io::Result<_>>()
        .context("starting worker threads")?;

    let keep = Duration::from_secs(args.keep_seconds);
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{addr}");
    if !addr.ip().is_loopback() {
        tracing::warn!("listening on {addr}, not a loopback address, without authentication: anyone who can reach this port can queue jobs and read their videos");
    }
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
