//! HTTP handlers: the JSON API under `/api/v1`, the page, health and metrics. Handlers only
//! parse, check and hand jobs to the queue; workers run the pipeline.

use super::jobs::{CancelOutcome, Event, JobSpec, State as JobState};
use super::queue::PushError;
use super::{metrics, AppState};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use dynamicrafter_engine::config::FsKind;
use dynamicrafter_engine::pipeline::default_seed;
use dynamicrafter_engine::{Mode, ModelConfig, Request as GenRequest, RgbImage};
use futures_util::Stream;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Cursor;
use std::sync::Arc;
use tower::ServiceExt;

/// A refused request: status, the offending field (if one), and a sentence naming the problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { status, field: field.map(String::from), message: message.into(), retry_after: None }
    }

    fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        Self::new(status, Some(field), message)
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::field(StatusCode::UNPROCESSABLE_ENTITY, field, message)
    }

    fn bad(field: &str, message: impl Into<String>) -> Self {
        Self::field(StatusCode::BAD_REQUEST, field, message)
    }

    fn unknown_job(id: &str) -> Self {
        Self::field(StatusCode::NOT_FOUND, "id", format!("no job with id '{id}' (finished jobs are kept for a limited time)"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "field": self.field });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The range of a numeric control, shared by the page and the API's checks.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Range {
    pub min: f64,
    pub max: f64,
    pub step: f64,
}

impl Range {
    fn check(&self, field: &str, v: f64) -> Result<f64, ApiError> {
        if !(v.is_finite() && v >= self.min && v <= self.max) {
            return Err(ApiError::invalid(field, format!("{field} must be between {} and {}, got {v}", self.min, self.max)));
        }
        if self.step == 1.0 && v.fract() != 0.0 {
            return Err(ApiError::invalid(field, format!("{field} must be a whole number, got {v}")));
        }
        Ok(v)
    }
}

/// Upstream Gradio's controls (`interfaces.md` §2): steps 1–60, CFG 1–15, ETA 0–1, seed 0–2³¹.
pub const STEPS: Range = Range { min: 1.0, max: 60.0, step: 1.0 };
pub const CFG_SCALE: Range = Range { min: 1.0, max: 15.0, step: 0.5 };
pub const ETA: Range = Range { min: 0.0, max: 1.0, step: 0.1 };
pub const SEED: Range = Range { min: 0.0, max: 2147483648.0, step: 1.0 };
/// Characters accepted in a prompt before tokenizing (the token limit is the real one).
const MAX_PROMPT_CHARS: usize = 2000;

/// The motion control of a model: its label, hint and range as in upstream's demos.
pub struct FsControl {
    pub label: &'static str,
    pub hint: &'static str,
    pub range: Range,
}

pub fn fs_control(cfg: &ModelConfig) -> FsControl {
    let default = cfg.defaults.fs as f64;
    let (label, hint, (min, max)): (_, _, (f64, f64)) = match cfg.diffusion.fs_kind {
        FsKind::FrameStride => (
            "Motion magnitude",
            "Frame stride of the motion: larger values move more.",
            if cfg.name == "256" { (1.0, 4.0) } else { (1.0, 8.0) },
        ),
        FsKind::Fps => (
            "FPS",
            "Frame rate the motion is conditioned on: smaller values move more per frame.",
            match cfg.name.as_str() {
                "1024" => (5.0, 20.0),
                "512" => (15.0, 30.0),
                _ => (5.0, 30.0),
            },
        ),
    };
    FsControl { label, hint, range: Range { min: min.min(default), max: max.max(default), step: 1.0 } }
}

/// A job as submitted, before checking.
#[derive(Debug, Default)]
pub struct JobForm {
    image: Option<Vec<u8>>,
    image2: Option<Vec<u8>>,
    mode: Option<String>,
    prompt: Option<String>,
    steps: Option<f64>,
    cfg_scale: Option<f64>,
    eta: Option<f64>,
    fs: Option<f64>,
    seed: Option<f64>,
}

impl JobForm {
    fn number_slot(&mut self, name: &str) -> Option<&mut Option<f64>> {
        Some(match name {
            "steps" => &mut self.steps,
            "cfg_scale" => &mut self.cfg_scale,
            "eta" => &mut self.eta,
            "fs" => &mut self.fs,
            "seed" => &mut self.seed,
            _ => return None,
        })
    }

    /// The JSON body: an object with images as base64 (a `data:` URL prefix is accepted).
    fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, None, format!("body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, None, "body must be a JSON object"));
        };
        let mut form = Self::default();
        for (name, v) in &fields {
            if v.is_null() {
                continue;
            }
            let text = || v.as_str().ok_or_else(|| ApiError::bad(name, format!("{name} must be a string")));
            match name.as_str() {
                "image" => form.image = Some(base64_image(name, text()?)?),
                "image2" => form.image2 = Some(base64_image(name, text()?)?),
                "mode" => form.mode = Some(text()?.to_string()),
                "prompt" => form.prompt = Some(text()?.to_string()),
                _ => match form.number_slot(name) {
                    Some(slot) => *slot = Some(v.as_f64().ok_or_else(|| ApiError::bad(name, format!("{name} must be a number")))?),
                    None => return Err(ApiError::bad(name, format!("unknown field '{name}'"))),
                },
            }
        }
        Ok(form)
    }
}

fn base64_image(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let data = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(field, format!("{field} is not valid base64: {e}")))
}

async fn read_form(req: Request, state: &Arc<AppState>) -> Result<JobForm, ApiError> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let too_big = |e: &dyn std::fmt::Display| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, None, format!("request body could not be read (too large?): {e}"))
    };
    if content_type.starts_with("multipart/form-data") {
        let mut multipart =
            Multipart::from_request(req, state).await.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, None, e.body_text()))?;
        let mut form = JobForm::default();
        while let Some(field) = multipart.next_field().await.map_err(|e| too_big(&e))? {
            let name = field.name().unwrap_or("").to_string();
            let bytes = field.bytes().await.map_err(|e| too_big(&e))?;
            let text = || String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::bad(&name, format!("{name} is not UTF-8 text")));
            let number = |t: String| -> Result<Option<f64>, ApiError> {
                let t = t.trim();
                if t.is_empty() {
                    return Ok(None);
                }
                t.parse().map(Some).map_err(|_| ApiError::bad(&name, format!("{name} must be a number, got '{t}'")))
            };
            match name.as_str() {
                // An empty file input is sent as a part with no bytes.
                "image" => form.image = Some(bytes.to_vec()).filter(|b| !b.is_empty()),
                "image2" => form.image2 = Some(bytes.to_vec()).filter(|b| !b.is_empty()),
                "mode" => form.mode = Some(text()?).filter(|m| !m.is_empty()),
                "prompt" => form.prompt = Some(text()?),
                _ => match form.number_slot(&name) {
                    Some(slot) => *slot = number(text()?)?,
                    None => return Err(ApiError::bad(&name, format!("unknown field '{name}'"))),
                },
            }
        }
        Ok(form)
    } else if content_type.starts_with("application/json") {
        let body = axum::body::to_bytes(req.into_body(), usize::MAX).await.map_err(|e| too_big(&e))?;
        JobForm::from_json(&body)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            format!("send multipart/form-data or application/json, not '{content_type}'"),
        ))
    }
}

fn decode_image(field: &str, bytes: &[u8], state: &AppState) -> Result<RgbImage, ApiError> {
    let limits = &state.limits;
    if bytes.len() > limits.max_image_bytes {
        return Err(ApiError::field(
            StatusCode::PAYLOAD_TOO_LARGE,
            field,
            format!("{field} is {} bytes; the limit is {}", bytes.len(), limits.max_image_bytes),
        ));
    }
    let reader = || image::ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let not_image = || ApiError::field(StatusCode::UNSUPPORTED_MEDIA_TYPE, field, format!("{field} is not a PNG, JPEG, WebP or BMP image"));
    let r = reader().map_err(|_| not_image())?;
    if r.format().is_none() {
        return Err(not_image());
    }
    let (w, h) = r.into_dimensions().map_err(|e| ApiError::bad(field, format!("{field} is not a readable image: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_image_pixels {
        return Err(ApiError::field(
            StatusCode::PAYLOAD_TOO_LARGE,
            field,
            format!("{field} is {w}×{h} = {pixels} pixels; the limit is {}", limits.max_image_pixels),
        ));
    }
    let img = reader()
        .map_err(|_| not_image())?
        .decode()
        .map_err(|e| ApiError::bad(field, format!("{field} is not a readable image: {e}")))?
        .to_rgb8();
    RgbImage::new(w as usize, h as usize, img.into_raw()).map_err(|e| ApiError::bad(field, format!("{field}: {e}")))
}

/// Checks a submitted job against the model and the limits; fills in the model's defaults.
pub fn check_job(form: JobForm, state: &AppState) -> Result<JobSpec, ApiError> {
    let cfg = state.pipeline.config();
    let image = decode_image("image", form.image.as_deref().ok_or_else(|| ApiError::bad("image", "image is required"))?, state)?;
    let mode_name = match (form.mode.as_deref(), form.image2.is_some()) {
        (None, false) | (Some("i2v" | "image_to_video"), false) => "i2v",
        (None, true) | (Some("interpolate" | "interpolation"), _) => "interpolate",
        (Some("loop" | "looping"), false) => "loop",
        (Some("i2v" | "image_to_video" | "loop" | "looping"), true) => {
            return Err(ApiError::bad("image2", "image2 is only used with mode 'interpolate'"))
        }
        (Some(m), _) => return Err(ApiError::bad("mode", format!("mode must be i2v, interpolate or loop, got '{m}'"))),
    };
    let mode = match mode_name {
        "interpolate" => {
            let bytes = form.image2.as_deref().ok_or_else(|| ApiError::bad("image2", "mode 'interpolate' needs image2"))?;
            Mode::Interpolate { end: decode_image("image2", bytes, state)? }
        }
        "loop" => Mode::Loop,
        _ => Mode::ImageToVideo,
    };
    let prompt = form.prompt.unwrap_or_default();
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::invalid("prompt", format!("prompt is longer than {MAX_PROMPT_CHARS} characters")));
    }
    let tokens = state.pipeline.tokenizer().encode(&prompt).len();
    if tokens > state.limits.max_prompt_tokens {
        return Err(ApiError::invalid(
            "prompt",
            format!("prompt is {tokens} tokens; the text encoder reads at most {}", state.limits.max_prompt_tokens),
        ));
    }
    let mut request = GenRequest::new(cfg, image, prompt);
    request.mode = mode;
    if let Some(v) = form.steps {
        request.steps = STEPS.check("steps", v)? as usize;
    }
    if let Some(v) = form.cfg_scale {
        request.cfg_scale = CFG_SCALE.check("cfg_scale", v)?;
    }
    if let Some(v) = form.eta {
        request.eta = ETA.check("eta", v)?;
    }
    if let Some(v) = form.fs {
        request.fs = fs_control(cfg).range.check("fs", v)? as i64;
    }
    let seed = match form.seed {
        Some(v) => SEED.check("seed", v)? as u64,
        None => default_seed(cfg, &request.mode),
    };
    Ok(JobSpec { request, seed, mode: mode_name })
}

pub async fn submit(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    if state.is_closing() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, "the server is shutting down"));
    }
    let form = read_form(req, &state).await?;
    // Decoding and resizing images is CPU work: keep it off the async threads.
    let checker = state.clone();
    let spec = tokio::task::spawn_blocking(move || check_job(form, &checker))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, "checking the request failed"))??;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let position = state.enqueue(&id, spec).map_err(|e| match e {
        PushError::Full { capacity } => {
            metrics::rejected();
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                None,
                format!("the queue is full ({capacity} jobs waiting); try again later"),
            );
            err.retry_after = Some(state.retry_after_seconds());
            err
        }
        PushError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, "the server is shutting down"),
    })?;
    let body = json!({
        "id": id,
        "state": "queued",
        "position": position,
        "status_url": format!("/api/v1/jobs/{id}"),
        "events_url": format!("/api/v1/jobs/{id}/events"),
        "video_url": format!("/api/v1/jobs/{id}/video"),
    });
    let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/jobs/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

pub async fn status(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let view = state.jobs.view(&id).ok_or_else(|| ApiError::unknown_job(&id))?;
    Ok(Json(view).into_response())
}

pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !state.jobs.contains(&id) {
        return Err(ApiError::unknown_job(&id));
    }
    match state.cancel(&id).ok_or_else(|| ApiError::unknown_job(&id))? {
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

pub async fn video(State(state): State<Arc<AppState>>, Path(id): Path<String>, req: Request) -> Result<Response, ApiError> {
    let (job_state, path) = state.jobs.video(&id).ok_or_else(|| ApiError::unknown_job(&id))?;
    let Some(path) = path.filter(|_| job_state == JobState::Done) else {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "id",
            format!("job '{id}' has no video ({})", job_state.name()),
        ));
    };
    // ServeFile answers range requests, which browsers use to seek in a <video>.
    let resp = tower_http::services::ServeFile::new_with_mime(path, &"video/mp4".parse().expect("valid mime"))
        .oneshot(req)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, format!("reading the video: {e}")))?;
    Ok(resp.map(Body::new))
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
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    if !state.jobs.contains(&id) {
        return Err(ApiError::unknown_job(&id));
    }
    struct Cursor {
        state: Arc<AppState>,
        id: String,
        next: usize,
        pending: VecDeque<Event>,
        ended: bool,
    }
    let start = Cursor { state, id, next: 0, pending: VecDeque::new(), ended: false };
    let stream = futures_util::stream::unfold(start, |mut c| async move {
        loop {
            if let Some(e) = c.pending.pop_front() {
                return Some((Ok(sse_event(&e)), c));
            }
            if c.ended {
                return None;
            }
            // `None`: the job expired while we were streaming.
            let (events, is_final, mut changed) = c.state.jobs.events_since(&c.id, c.next)?;
            c.ended = is_final;
            if events.is_empty() && !is_final {
                changed.changed().await.ok()?;
            }
            c.next += events.len();
            c.pending.extend(events);
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

pub async fn model_info(State(state): State<Arc<AppState>>) -> Json<Value> {
    let cfg = state.pipeline.config();
    let fs = fs_control(cfg);
    let mode_defaults = |mode: Mode| json!({ "seed": default_seed(cfg, &mode), "fs": cfg.defaults.fs });
    Json(json!({
        "model": state.model_name,
        "interpolation_model": cfg.name == "512_interp",
        "width": cfg.defaults.width,
        "height": cfg.defaults.height,
        "frames": cfg.defaults.frames,
        "device": if state.pipeline.device().is_cpu() { "cpu" } else { "cuda" },
        "precision": state.pipeline.precision().name(),
        "controls": {
            "steps": { "range": STEPS, "default": cfg.defaults.steps },
            "cfg_scale": { "range": CFG_SCALE, "default": cfg.defaults.cfg_scale },
            "eta": { "range": ETA, "default": cfg.defaults.eta },
            "fs": { "range": fs.range, "default": cfg.defaults.fs, "label": fs.label, "hint": fs.hint },
            "seed": { "range": SEED },
        },
        "modes": {
            "i2v": mode_defaults(Mode::ImageToVideo),
            // Only looping has a seed of its own; interpolation takes image-to-video's.
            "interpolate": mode_defaults(Mode::ImageToVideo),
            "loop": mode_defaults(Mode::Loop),
        },
        "limits": {
            "max_image_bytes": state.limits.max_image_bytes,
            "max_image_pixels": state.limits.max_image_pixels,
            "max_prompt_tokens": state.limits.max_prompt_tokens,
            "max_queue": state.max_queue,
        },
    }))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "shutting down" }))).into_response()
    } else {
        Json(json!({ "status": "ok", "model": state.model_name })).into_response()
    }
}

pub async fn metrics_text() -> Response {
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

pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, None, format!("no route for {} {}", req.method(), req.uri().path()))
}
