//! HTTP handlers: the JSON API under `/api/v1`, the page, health and metrics. Handlers only
//! parse, check and hand jobs to the queue; workers run the pipeline.

use super::error::ApiError;
use super::form::JobForm;
use super::jobs::{CancelOutcome, Event, State as JobState};
use super::backend::{Backend, EventBatch, SubmitError, Video, Wait};
use super::state::AppState;
use super::metrics;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use dynamicrafter_engine::config::{FsKind, Range, KNOBS};
use dynamicrafter_engine::ModelConfig;
use futures_util::Stream;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceExt;

/// The answer to a queued job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub id: String,
    /// Always `queued`.
    pub state: JobState,
    /// 1 is next.
    pub position: usize,
    pub status_url: String,
    pub events_url: String,
    pub video_url: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    summary = "Queue a generation job",
    request_body(content(
        (super::openapi::JobMultipart = "multipart/form-data"),
        (super::openapi::JobJson = "application/json"),
    )),
    responses(
        (status = 202, description = "Queued; Location names the job", body = Accepted),
        (status = 400, description = "Malformed request, unknown field or a mode/image2 mismatch", body = super::error::ErrorBody),
        (status = 413, description = "Image too large (bytes or pixels) or body over the limit", body = super::error::ErrorBody),
        (status = 415, description = "Not an image, or an unsupported body type", body = super::error::ErrorBody),
        (status = 422, description = "A knob is out of range or the prompt is too long", body = super::error::ErrorBody),
        (status = 429, description = "Queue full; see the Retry-After header", body = super::error::ErrorBody),
        (status = 503, description = "Shutting down", body = super::error::ErrorBody),
    )
)]
pub async fn submit(State(state): State<Arc<AppState>>, form: JobForm) -> Result<Response, ApiError> {
    if state.is_closing() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, "the server is shutting down"));
    }
    // Decoding and resizing images is CPU work: keep it off the async threads.
    let checker = state.clone();
    let job = tokio::task::spawn_blocking(move || form.check(&checker.model, &checker.limits))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, "checking the request failed"))??;
    let (id, position) = call(&state, move |b| b.submit(job)).await?.map_err(|e| match e {
        SubmitError::Full { capacity } => {
            metrics::rejected();
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                format!("the queue is full ({capacity} jobs waiting); try again later"),
            );
            err.retry_after = Some(state.backend.retry_after_seconds());
            err
        }
        SubmitError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, "the server is shutting down"),
        SubmitError::Unavailable(e) => e.into(),
    })?;
    let body = Accepted {
        state: JobState::Queued,
        position,
        status_url: format!("/api/v1/jobs/{id}"),
        events_url: format!("/api/v1/jobs/{id}/events"),
        video_url: format!("/api/v1/jobs/{id}/video"),
        id,
    };
    let location = body.status_url.clone();
    let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", summary = "Job state, queue position, progress, report or error", params(("id" = String, Path)),
    responses((status = 200, body = super::jobs::JobView), (status = 404, description = "Unknown job", body = super::error::ErrorBody)))]
pub async fn status(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = id.clone();
    let view = call(&state, move |b| b.view(&key)).await??.ok_or_else(|| ApiError::unknown_job(&id))?;
    Ok(Json(view).into_response())
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", summary = "Cancel: a queued job at once, a running one between denoising steps (the job stays, state cancelled)", params(("id" = String, Path)),
    responses((status = 200, description = "Cancelled"), (status = 202, description = "Cancelling"), (status = 404, description = "Unknown job", body = super::error::ErrorBody), (status = 409, description = "Already ended", body = super::error::ErrorBody)))]
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = id.clone();
    match call(&state, move |b| b.cancel(&key)).await??.ok_or_else(|| ApiError::unknown_job(&id))? {
        CancelOutcome::Dequeued => Ok(Json(json!({ "id": id, "state": "cancelled" })).into_response()),
        CancelOutcome::Stopping => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "state": "cancelling" }))).into_response())
        }
        CancelOutcome::AlreadyFinal(s) => Err(ApiError::field(
            StatusCode::CONFLICT,
            "id",
            format!("job '{id}' has already ended ({})", s.name()),
        )),
    }
}

#[utoipa::path(delete, path = "/api/v1/jobs/{id}", summary = "Delete: cancel the job if it has not ended, then forget it and its video (404 from then on)", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, description = "Unknown job", body = super::error::ErrorBody)))]
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = id.clone();
    if !call(&state, move |b| b.delete(&key)).await?? {
        return Err(ApiError::unknown_job(&id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs a backend call off the async threads: a shared backend waits on the network.
async fn call<T: Send + 'static>(state: &Arc<AppState>, f: impl FnOnce(&dyn Backend) -> T + Send + 'static) -> Result<T, ApiError> {
    let backend = state.backend.clone();
    tokio::task::spawn_blocking(move || f(backend.as_ref()))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, "the job store call failed"))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/video", summary = "The H.264 MP4 of a finished job (range requests answered)", params(("id" = String, Path)),
    responses((status = 200, description = "The video", content_type = "video/mp4"), (status = 404, description = "Unknown job", body = super::error::ErrorBody), (status = 409, description = "Not done", body = super::error::ErrorBody)))]
pub async fn video(State(state): State<Arc<AppState>>, Path(id): Path<String>, req: Request) -> Result<Response, ApiError> {
    let key = id.clone();
    let (job_state, video) = call(&state, move |b| b.video(&key)).await??.ok_or_else(|| ApiError::unknown_job(&id))?;
    let Some(video) = video.filter(|_| job_state == JobState::Done) else {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "id",
            format!("job '{id}' has no video ({})", job_state.name()),
        ));
    };
    match video {
        // ServeFile answers range requests, which browsers use to seek in a <video>.
        Video::File(path) => {
            let resp = tower_http::services::ServeFile::new_with_mime(path, &"video/mp4".parse().expect("valid mime"))
                .oneshot(req)
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, format!("reading the video: {e}")))?;
            Ok(resp.map(Body::new))
        }
        Video::Bytes(bytes) => Ok(byte_range(&bytes, req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()))),
    }
}

/// A video held in memory, whole (200) or the one range asked for (206; 416 past its end), as
/// `ServeFile` answers for a file: browsers seek in a `<video>` with range requests.
fn byte_range(bytes: &[u8], range: Option<&str>) -> Response {
    let len = bytes.len();
    let wanted = range.and_then(|r| r.strip_prefix("bytes=")).filter(|r| !r.contains(',')).and_then(|r| r.split_once('-'));
    let span = wanted.map(|(start, end)| match (start.trim().parse::<usize>().ok(), end.trim().parse::<usize>().ok()) {
        (Some(a), Some(b)) if a <= b && a < len => Some((a, b.min(len - 1))),
        (Some(a), None) if end.trim().is_empty() && a < len => Some((a, len - 1)),
        (None, Some(n)) if start.trim().is_empty() && n > 0 && len > 0 => Some((len - n.min(len), len - 1)),
        _ => None,
    });
    let mp4 = (header::CONTENT_TYPE, "video/mp4");
    let ranges = (header::ACCEPT_RANGES, "bytes");
    match span {
        None => ([mp4, ranges], bytes.to_vec()).into_response(),
        Some(Some((a, b))) => {
            let content_range = format!("bytes {a}-{b}/{len}");
            (StatusCode::PARTIAL_CONTENT, [mp4, ranges], [(header::CONTENT_RANGE, content_range)], bytes[a..=b].to_vec()).into_response()
        }
        Some(None) => (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))]).into_response(),
    }
}

fn sse_event(e: &Event) -> SseEvent {
    let data = match serde_json::to_value(e) {
        Ok(Value::Object(mut m)) => {
            m.remove("event");
            Value::Object(m)
        }
        _ => Value::Null,
    };
    SseEvent::default().event(e.name()).data(data.to_string())
}

/// Server-sent events of a job: everything so far, then each new event until it ends.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", summary = "Server-sent events: queued, position, stage, step, done, error, cancelled (replayed from the start)", params(("id" = String, Path)),
    responses((status = 200, description = "The job's events", content_type = "text/event-stream"), (status = 404, description = "Unknown job", body = super::error::ErrorBody)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let key = id.clone();
    let first = call(&state, move |b| b.events_since(&key, 0)).await??.ok_or_else(|| ApiError::unknown_job(&id))?;
    struct Cursor {
        state: Arc<AppState>,
        id: String,
        next: usize,
        pending: VecDeque<Event>,
        ended: bool,
        position: Option<usize>,
        batch: Option<EventBatch>,
    }
    let start = Cursor { state, id, next: 0, pending: VecDeque::new(), ended: false, position: None, batch: Some(first) };
    let stream = futures_util::stream::unfold(start, |mut c| async move {
        loop {
            if let Some(e) = c.pending.pop_front() {
                return Some((Ok(sse_event(&e)), c));
            }
            if c.ended {
                return None;
            }
            let batch = match c.batch.take() {
                Some(b) => b,
                None => {
                    let (state, id, from) = (c.state.clone(), c.id.clone(), c.next);
                    // `None`: the job expired while we were streaming (or the store is down).
                    call(&state, move |b| b.events_since(&id, from)).await.ok()?.ok()??
                }
            };
            c.ended = batch.ended;
            c.next += batch.events.len();
            for e in &batch.events {
                if let Event::Queued { position } | Event::Position { position } = e {
                    c.position = Some(*position);
                }
            }
            c.pending.extend(batch.events);
            // A backend that does not publish moves of the queue reports the position instead.
            if let (Some(now), Some(_)) = (batch.position, c.position) {
                if c.position != Some(now) {
                    c.pending.push_back(Event::Position { position: now });
                    c.position = Some(now);
                }
            }
            if c.pending.is_empty() && !c.ended {
                let Wait { changed, at_most } = batch.wait;
                let changed = async {
                    match changed {
                        Some(mut rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let timeout = async {
                    match at_most {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // The store dropped the job (it expired): the stream ends.
                    live = changed => if !live { return None },
                    () = timeout => {},
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A control of the page: the API's range of a knob and the model's default.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Control {
    /// A numeric knob's range.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
    /// A knob of named values: the names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<&'static str>>,
    /// The model's default (for the seed: image-to-video's; see `modes`): a number, or a
    /// name for a knob of named values.
    #[schema(value_type = Option<serde_json::Value>)]
    pub default: Option<serde_json::Value>,
    pub help: String,
    /// The page's label and hint, where the model gives the knob a meaning of its own.
    pub label: Option<String>,
    pub hint: Option<String>,
}

/// The defaults that depend on the mode.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModeDefaults {
    pub seed: u64,
    pub fs: i64,
}

/// `GET /api/v1/model`: the loaded model, its controls and limits.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub model: String,
    /// Trained for two keyframes (interpolation, looping).
    pub interpolation_model: bool,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub device: String,
    pub precision: String,
    /// The kernel of each layer kind (and the CPU's instruction set).
    pub kernels: BTreeMap<String, String>,
    /// Every knob the API takes.
    pub controls: BTreeMap<String, Control>,
    /// The modes this model runs (`i2v`, and `interpolate` and `loop` unless the model is
    /// known not to be trained for two keyframes), with their defaults.
    #[schema(value_type = Object)]
    pub modes: BTreeMap<&'static str, ModeDefaults>,
    #[schema(value_type = Object)]
    pub limits: BTreeMap<&'static str, u64>,
}

/// The motion control's label and hint as in upstream's demos.
fn fs_label(cfg: &ModelConfig) -> (&'static str, &'static str) {
    match cfg.diffusion.fs_kind {
        FsKind::FrameStride => ("Motion magnitude", "Frame stride of the motion: larger values move more."),
        FsKind::Fps => ("FPS", "Frame rate the motion is conditioned on: smaller values move more per frame."),
    }
}

#[utoipa::path(get, path = "/api/v1/model", summary = "The loaded model, its controls and limits", responses((status = 200, body = ModelInfo)))]
pub async fn model_info(State(state): State<Arc<AppState>>) -> Json<ModelInfo> {
    let cfg = &state.model.config;
    let (label, hint) = fs_label(cfg);
    let controls = KNOBS
        .iter()
        .filter(|k| k.ui.is_some())
        .map(|k| {
            let fs = k.name == "fs";
            let default = match k.choices {
                Some(_) => cfg.defaults.choice(k.name).map(serde_json::Value::from),
                None => cfg.defaults.number(k.name).map(serde_json::Value::from),
            };
            let control = Control {
                range: k.ui_range(cfg),
                choices: k.choices.map(|c| c.to_vec()),
                default,
                help: k.help.trim().to_string(),
                label: fs.then(|| label.to_string()),
                hint: fs.then(|| hint.to_string()),
            };
            (k.name.to_string(), control)
        })
        .collect();
    let modes = cfg
        .modes()
        .map(|m| {
            let d = cfg.defaults_for(m);
            (m.name(), ModeDefaults { seed: d.seed, fs: d.fs })
        })
        .collect();
    let limits = BTreeMap::from([
        ("max_image_bytes", state.limits.max_image_bytes as u64),
        ("max_image_pixels", state.limits.max_image_pixels),
        ("max_prompt_tokens", state.limits.max_prompt_tokens as u64),
        ("max_queue", state.max_queue as u64),
    ]);
    Json(ModelInfo {
        model: state.model_name.clone(),
        interpolation_model: cfg.interpolation == Some(true),
        width: cfg.defaults.width,
        height: cfg.defaults.height,
        frames: cfg.defaults.frames,
        // A pure API node: each worker reports its own in the job's report.
        device: state.model.pipeline.as_ref().map_or("workers", |p| if p.device().is_cpu() { "cpu" } else { "cuda" }).into(),
        precision: state.model.pipeline.as_ref().map_or_else(|| "per worker".into(), |p| p.precision().name()),
        kernels: state.model.pipeline.as_ref().map(|p| p.backend().summary()).unwrap_or_default(),
        controls,
        modes,
        limits,
    })
}

#[utoipa::path(get, path = "/healthz", summary = "Liveness", responses((status = 200, description = "ok"), (status = 503, description = "Shutting down")))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting down" }))).into_response()
    } else {
        Json(json!({ "status": "ok", "model": state.model_name })).into_response()
    }
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics", responses((status = 200, description = "The metrics", content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    // A shared queue's gauges are read from it; when it is down the last values stand.
    if let Ok(Err(e)) = call(&state, |b| b.refresh_metrics()).await {
        tracing::warn!("metrics of the shared queue: {}", e.0);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render()).into_response()
}

pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// Example inputs shipped with the binary (images made for this project, CC0).
const EXAMPLES: [(&str, &[u8], &str); 3] = [
    ("sunset.png", include_bytes!("../../examples/images/sunset.png"), "waves rolling onto the shore at sunset"),
    ("balloon.png", include_bytes!("../../examples/images/balloon.png"), "a hot air balloon drifting across the sky"),
    ("test_card.png", include_bytes!("../../examples/images/test_card.png"), "the colours shimmer and slowly drift"),
];

#[utoipa::path(get, path = "/api/v1/examples", summary = "Example inputs", responses((status = 200, description = "List of examples")))]
pub async fn examples() -> Json<Value> {
    let list: Vec<Value> = EXAMPLES
        .iter()
        .map(|(name, _, prompt)| json!({ "name": name, "image_url": format!("/examples/{name}"), "prompt": prompt }))
        .collect();
    Json(Value::Array(list))
}

pub async fn example_image(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, bytes, _) = EXAMPLES
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| ApiError::field(StatusCode::NOT_FOUND, "name", format!("no example image '{name}'")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], *bytes).into_response())
}

/// A route that exists, asked with a method it does not take: 405 JSON like every other error.
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, None, format!("{} {} is not supported (see /openapi.json for the methods)", req.method(), req.uri().path()))
}

pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, None, format!("no route for {} {}", req.method(), req.uri().path()))
}
