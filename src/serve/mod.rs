//! `dynamicrafter serve`: the web page and the HTTP API, and `dynamicrafter worker`. The model
//! is loaded once; worker threads take jobs from a bounded queue (in this process, or shared in
//! Redis) and run them through the same
//! [`generate_videos`](crate::generation::generate_videos) call as the command line.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | flags, startup, routes, shutdown |
//! | `state.rs` | what the handlers share |
//! | `handlers.rs` | the HTTP handlers |
//! | `form.rs` | a submitted job: parsing and checks |
//! | `error.rs` | the error response |
//! | `openapi.rs` | `GET /openapi.json` |
//! | `backend.rs` | the seams: `Backend` (handlers' side) and `WorkSource` (workers' side) |
//! | `local.rs` | the in-process backend: `jobs.rs` (job store) and `queue.rs` (bounded queue) |
//! | `redis_queue.rs` | the Redis backend (stream, consumer group, Lua scripts) |
//! | `worker.rs` | the worker loop, and the `worker` command |
//! | `metrics.rs` | Prometheus metrics |

pub mod backend;
pub mod error;
pub mod form;
mod handlers;
mod http;
pub(crate) mod jobs;
mod local;
mod metrics;
mod openapi;
mod queue;
pub(crate) mod redis_queue;
pub mod state;
mod worker;

pub use worker::{run as run_worker, WorkerArgs};

use crate::model_source;
use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use backend::{Backend, WorkSource};
use dynamicrafter_engine::Pipeline;
use state::{AppState, Limits};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
    /// Answer only requests whose Host is this name (repeatable; e.g. the name users reach the
    /// server by): others get 421, so a page that rebinds its own DNS name to this server
    /// cannot read it [default: any host].
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Connections open at once; more get 503 and are closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_connections: u64,
    /// Seconds a client may take to send a request's headers before it is disconnected.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// Seconds a job submission (upload and checks) may take before it is refused with 408.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,
    /// Require this key on every /api/ request (`Authorization: Bearer KEY`; the page asks for
    /// it once). Letters, digits and `-._~+/=`, at most 256.
    #[arg(long, env = "DYNAMICRAFTER_API_KEY", hide_env_values = true, value_parser = api_key)]
    pub api_key: Option<String>,
    /// Port; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Jobs that may wait; more are refused with 429 (upstream's Gradio queue holds 12).
    #[arg(long, default_value_t = 12)]
    pub max_queue: usize,
    /// Jobs generated at the same time, all sharing the one loaded model; 0 (with --queue)
    /// makes a node that only serves the API.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Keep jobs in Redis (redis://HOST:PORT[/DB]) so several API nodes and `dynamicrafter
    /// worker` processes share them [default: in this process].
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
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
    /// Folder of the in-process queue's finished jobs: each job's record and video, kept across
    /// restarts (one server per folder) [default: dynamicrafter/jobs in the user's cache folder,
    /// e.g. ~/.cache]. With --queue, jobs live in Redis instead.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// With --queue: a folder for the videos that every node sees at the same path (a shared
    /// mount): workers write there, API nodes serve from there [default: videos kept in Redis].
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Frames per second of the written videos (upstream writes 8).
    #[arg(long, default_value_t = 8.0)]
    pub fps: f64,
    #[command(flatten)]
    pub compute: crate::cli::ComputeArgs,
}

/// How workers on a shared queue hold their jobs.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Seconds a running job may go without its worker's heartbeat before another worker
    /// takes it over (with --queue).
    #[arg(long, default_value_t = ClusterArgs::default().visibility_timeout, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub visibility_timeout: u64,
    /// Starts of one job before it is failed as poison (its workers keep dying; with --queue).
    #[arg(long, default_value_t = ClusterArgs::default().max_attempts, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
}

impl Default for ClusterArgs {
    /// The flags' defaults.
    fn default() -> Self {
        Self { visibility_timeout: 30, max_attempts: 3 }
    }
}

/// The shared queue for `model`, checked to answer, and a scratch folder for this process's
/// workers (removed by the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect_queue(
    url: &str,
    model: &model_source::ModelSpec,
    cluster: &ClusterArgs,
    capacity: usize,
    keep: Duration,
    fps: f64,
    results: Option<&Path>,
) -> Result<(Arc<redis_queue::RedisQueue>, PathBuf)> {
    if let Some(dir) = results {
        std::fs::create_dir_all(dir).with_context(|| format!("results folder {}", dir.display()))?;
    }
    sweep_dead_scratch(&std::env::temp_dir());
    let scratch = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("scratch folder {}", scratch.display()))?;
    let queue = redis_queue::RedisQueue::connect(redis_queue::Options {
        url: url.to_string(),
        model: model.queue_name(),
        capacity,
        visibility: Duration::from_secs(cluster.visibility_timeout),
        max_attempts: cluster.max_attempts,
        keep,
        fps,
        scratch: scratch.clone(),
        // Absolute: the path is stored for other processes to open.
        results: results.map(std::path::absolute).transpose()?,
    });
    match queue {
        Ok(q) => Ok((Arc::new(q), scratch)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Err(e)
        }
    }
}

/// A worker's scratch folder in the temp dir is this and its process id.
const SCRATCH_PREFIX: &str = "dynamicrafter-worker-";

/// Removes the scratch folders (and old servers' temporary results folders) of processes that
/// are gone: killed before they could remove their own. Only where `/proc` tells which are.
fn sweep_dead_scratch(temp: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(temp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let pid = [SCRATCH_PREFIX, "dynamicrafter-serve-"].iter().find_map(|p| name.strip_prefix(p)).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&pid| pid != std::process::id() && !proc.join(pid.to_string()).exists()) {
            tracing::info!("removing {} (left by process {pid}, which is gone)", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The in-process queue's data folder: `--data-dir`, or one in the user's cache folder.
fn data_dir(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir.to_path_buf()),
        None => dirs::cache_dir()
            .map(|c| c.join("dynamicrafter").join("jobs"))
            .context("no cache folder for this user (HOME unset?): pass --data-dir"),
    }
}

fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes();
    let api = Router::new()
        .route("/jobs", axum::routing::post(handlers::submit).layer(DefaultBodyLimit::max(body_limit)))
        .route("/jobs/{id}", get(handlers::status).delete(handlers::delete))
        .route("/jobs/{id}/cancel", axum::routing::post(handlers::cancel))
        .route("/jobs/{id}/events", get(handlers::events))
        .route("/jobs/{id}/video", get(handlers::video))
        .route("/model", get(handlers::model_info))
        .route("/examples", get(handlers::examples))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_key));
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), allowed_host))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// An API key as `--api-key` takes it: a bearer token (RFC 6750's characters), which is also a
/// valid cookie value, so the page can hand it to the requests it cannot add headers to (event
/// streams, the video).
fn api_key(key: &str) -> Result<String, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if key.is_empty() || key.len() > 256 || !key.bytes().all(token) {
        return Err("an API key is 1 to 256 letters, digits or -._~+/= characters".into());
    }
    Ok(key.to_string())
}

/// The cookie the page keeps the API key in.
pub const KEY_COOKIE: &str = "dynamicrafter_key";

/// With `--api-key`, every request under /api/ needs the key, as `Authorization: Bearer KEY` or
/// the page's cookie; else 401 JSON.
async fn require_key(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    let Some(key) = state.api_key.as_deref() else { return next.run(req).await };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(KEY_COOKIE).and_then(|c| c.strip_prefix('=')));
    // Compared in time independent of where the first difference is.
    let same = |given: &str| given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if bearer.is_some_and(same) || cookie.is_some_and(same) {
        return next.run(req).await;
    }
    let message = match (bearer, cookie) {
        (None, None) => "this server needs an API key: send it as 'Authorization: Bearer KEY'",
        _ => "wrong API key",
    };
    let mut response = error::ApiError::new(axum::http::StatusCode::UNAUTHORIZED, None, message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// With `--allowed-host`, answers only requests whose `Host` (without its port) is one of them:
/// 421 JSON otherwise.
async fn allowed_host(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Health probes come from load balancers by address: always answered.
    if state.allowed_hosts.is_empty() || req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let host = req.headers().get(axum::http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    // "name:port", "[v6]:port", or a bare name.
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let bare = |h: &str| h.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    if state.allowed_hosts.iter().any(|h| bare(h) == bare(name)) {
        return next.run(req).await;
    }
    let message = format!("host '{host}' is not one this server answers to (--allowed-host)");
    error::ApiError::new(axum::http::StatusCode::MISDIRECTED_REQUEST, None, message).into_response()
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

/// Logs on stderr: `RUST_LOG=tower_http=debug` shows every request.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

pub fn run(args: ServeArgs) -> Result<()> {
    init_logging();
    if args.workers == 0 && args.queue.is_none() {
        anyhow::bail!("--workers must be at least 1 (0 serves only the API, for a shared --queue)");
    }
    match (&args.queue, &args.data_dir, &args.results_dir) {
        (Some(_), Some(_), _) => anyhow::bail!("--data-dir is for the in-process queue: with --queue, jobs live in Redis (videos: --results-dir)"),
        (None, _, Some(_)) => anyhow::bail!("--results-dir is for a shared --queue: the in-process queue keeps its videos in --data-dir"),
        _ => {}
    }
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if !(args.fps.is_finite() && args.fps > 0.0) {
        anyhow::bail!("--fps must be a positive number, got {}", args.fps);
    }
    let (device, precision) = args.compute.resolve()?;
    let spec = model_source::describe(&args.model, args.config.as_deref())?;
    let keep = Duration::from_secs(args.keep_seconds);
    // Videos go to a folder of this process (in-process queue) or into Redis (shared queue,
    // written through a scratch folder by this node's workers).
    let (backend, source_of_work, scratch): (Arc<dyn Backend>, Arc<dyn WorkSource>, PathBuf) = match &args.queue {
        Some(url) => {
            let (queue, scratch) = connect_queue(url, &spec, &args.cluster, args.max_queue, keep, args.fps, args.results_dir.as_deref())?;
            (queue.clone(), queue, scratch)
        }
        None => {
            let dir = data_dir(args.data_dir.as_deref())?;
            let local = Arc::new(local::Local::open(args.max_queue, args.max_finished_jobs as usize, &dir, args.fps, args.workers)?);
            (local.clone(), local, dir)
        }
    };
    let temporary = args.queue.is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind before the (slow) model load so a taken port fails fast.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    // A node without workers checks requests against the config alone: no weights in memory.
    let start = Instant::now();
    let (name, config) = (spec.name.clone(), spec.config.clone());
    let pipeline = match args.workers {
        0 => None,
        _ => {
            let source = spec.fetch()?;
            tracing::info!("loading {}", source.weights.display());
            Some(Arc::new(Pipeline::load_with(source.config, &source.weights, &device, precision)?))
        }
    };
    let load_time = start.elapsed();
    metrics::handle();
    metrics::describe(load_time);
    let state = Arc::new(AppState {
        model: state::ServedModel::new(config.clone(), pipeline.clone())?,
        model_name: name.clone(),
        backend,
        max_queue: args.max_queue,
        limits: Limits {
            max_image_bytes: args.max_image_bytes,
            max_image_pixels: args.max_image_pixels,
            max_prompt_tokens: config.text.context_length - 2,
            upload_timeout: Duration::from_secs(args.body_timeout),
        },
        closing: AtomicBool::new(false),
        api_key: args.api_key.clone(),
        allowed_hosts: args.allowed_hosts.clone(),
    });
    let workers: Vec<_> = pipeline
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, args.workers))
        .enumerate()
        .map(|(i, pipeline)| {
            let (pipeline, work, name) = (pipeline.clone(), source_of_work.clone(), name.clone());
            std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || worker::run_jobs(&pipeline, &name, work.as_ref()))
        })
        .collect::<std::io::Result<_>>()
        .context("starting worker threads")?;

    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{addr}");
    if !addr.ip().is_loopback() && args.api_key.is_none() {
        tracing::warn!("listening on {addr}, not a loopback address, without --api-key: anyone who can reach this port can queue jobs and read their videos");
    }
    match &pipeline {
        Some(_) => tracing::info!("model {} loaded in {:.1} s; {} worker(s), queue of {}", name, load_time.as_secs_f64(), args.workers, args.max_queue),
        None => tracing::info!("API node for model {} (its weights stay with the workers); queue of {}", name, args.max_queue),
    }
    runtime.block_on(async {
        let janitor = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(keep.min(Duration::from_secs(60)).max(Duration::from_secs(1)));
                loop {
                    tick.tick().await;
                    state.backend.expire(keep);
                }
            })
        };
        let app = router(state.clone());
        let shutdown = {
            let state = state.clone();
            async move {
                shutdown_signal().await;
                tracing::info!("shutting down: cancelling waiting and running jobs (a shared queue keeps them for other workers)");
                state.shut_down();
            }
        };
        let limits = http::ConnectionLimits { max_connections: args.max_connections as usize, header_timeout: Duration::from_secs(args.header_timeout) };
        let served = http::serve(listener, app, limits, shutdown).await;
        janitor.abort();
        served
    })?;
    for w in workers {
        let _ = w.join();
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    tracing::info!("stopped");
    Ok(())
}
