//! A submitted job: the form (multipart or JSON, both through axum's extractors and their body
//! limit), its fields, and the check that turns it into a [`Request`] or a 4xx naming the field.

use super::error::ApiError;
use super::backend::NewJob;
use super::state::{AppState, Limits, ServedModel};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use axum::Json;
use base64::Engine as _;
use dynamicrafter_engine::config::KNOBS;
use dynamicrafter_engine::preprocess::check_resizable;
use dynamicrafter_engine::{Mode, ModeKind, RgbImage, SamplingOverrides};
use serde_json::{Map, Value};
use std::io::Cursor;
use std::sync::Arc;

/// Characters accepted in a prompt before tokenizing (the token limit is the real one).
pub const MAX_PROMPT_CHARS: usize = 2000;

/// The non-knob fields of a job.
pub const IMAGE: &str = "image";
pub const IMAGE2: &str = "image2";
pub const MODE: &str = "mode";
pub const PROMPT: &str = "prompt";

/// A job as submitted, before checking.
#[derive(Debug, Default)]
pub struct JobForm {
    image: Option<Vec<u8>>,
    image2: Option<Vec<u8>>,
    mode: Option<String>,
    prompt: Option<String>,
    /// The API's numeric knobs as given, in order (checked against the model's ranges later).
    knobs: Vec<(&'static str, f64)>,
    /// The knobs of named values, already parsed.
    overrides: SamplingOverrides,
}

/// One field's value as it arrived.
enum Field {
    /// A multipart part's bytes.
    Part(Vec<u8>),
    /// A JSON member's value.
    Json(Value),
}

impl JobForm {
    /// Takes field `name`. A field is set or left out (JSON: or null); an empty value is refused
    /// (the prompt aside), so the OpenAPI document can state every field's values exactly.
    fn set(&mut self, name: &str, value: Field) -> Result<(), ApiError> {
        let empty = || ApiError::bad(name, format!("{name} is empty: leave the field out instead"));
        let text = |v: Field| match v {
            Field::Part(b) => String::from_utf8(b).map_err(|_| ApiError::bad(name, format!("{name} is not UTF-8 text"))),
            Field::Json(Value::String(s)) => Ok(s),
            Field::Json(_) => Err(ApiError::bad(name, format!("{name} must be a string"))),
        };
        match name {
            IMAGE | IMAGE2 => {
                let bytes = match value {
                    Field::Part(b) => b,
                    Field::Json(Value::String(s)) => base64_image(name, &s)?,
                    Field::Json(_) => return Err(ApiError::bad(name, format!("{name} must be a string (base64)"))),
                };
                if bytes.is_empty() {
                    return Err(empty());
                }
                let slot = if name == IMAGE { &mut self.image } else { &mut self.image2 };
                *slot = Some(bytes);
            }
            MODE => {
                let mode = text(value)?;
                if mode.is_empty() {
                    return Err(empty());
                }
                self.mode = Some(mode);
            }
            PROMPT => self.prompt = Some(text(value)?),
            _ => {
                let Some(knob) = KNOBS.iter().find(|k| k.name == name && k.ui.is_some()) else {
                    return Err(ApiError::bad(name, format!("unknown field '{name}'")));
                };
                if let Some(choices) = knob.choices {
                    let choice = match value {
                        Field::Json(Value::Bool(b)) => b.to_string(),
                        Field::Json(Value::String(s)) => s,
                        Field::Json(_) => return Err(ApiError::bad(name, format!("{name} must be one of {}", choices.join(", ")))),
                        part => text(part)?,
                    };
                    if choice.trim().is_empty() {
                        return Err(empty());
                    }
                    if !self.overrides.set_choice(knob.name, &choice) {
                        return Err(ApiError::invalid(name, format!("{name} must be one of {}, got '{}'", choices.join(", "), choice.trim())));
                    }
                    return Ok(());
                }
                let number = match value {
                    Field::Json(v) => v.as_f64().ok_or_else(|| ApiError::bad(name, format!("{name} must be a number")))?,
                    part => {
                        let t = text(part)?;
                        let t = t.trim();
                        if t.is_empty() {
                            return Err(empty());
                        }
                        t.parse().map_err(|_| ApiError::bad(name, format!("{name} must be a number, got '{t}'")))?
                    }
                };
                self.knobs.push((knob.name, number));
            }
        }
        Ok(())
    }

    fn from_json(fields: Map<String, Value>) -> Result<Self, ApiError> {
        let mut form = Self::default();
        for (name, v) in fields.into_iter().filter(|(_, v)| !v.is_null()) {
            form.set(&name, Field::Json(v))?;
        }
        Ok(form)
    }

    async fn from_multipart(mut multipart: Multipart) -> Result<Self, ApiError> {
        let unreadable = |e: axum::extract::multipart::MultipartError| {
            ApiError::new(e.status(), None, format!("the multipart body could not be read: {}", e.body_text()))
        };
        let mut form = Self::default();
        while let Some(field) = multipart.next_field().await.map_err(unreadable)? {
            let name = field.name().unwrap_or("").to_string();
            let bytes = field.bytes().await.map_err(unreadable)?;
            form.set(&name, Field::Part(bytes.to_vec()))?;
        }
        Ok(form)
    }

    /// Checks the job against the model and the limits; the knobs it does not set take the
    /// model's defaults for its mode.
    pub fn check(self, model: &ServedModel, limits: &Limits) -> Result<NewJob, ApiError> {
        let cfg = &model.config;
        let image_bytes = self.image.ok_or_else(|| ApiError::bad(IMAGE, "image is required"))?;
        let image = decode_image(IMAGE, &image_bytes, limits)?;
        let mode = match (self.mode.as_deref(), self.image2.is_some()) {
            (None, false) | (Some("i2v" | "image_to_video"), false) => ModeKind::ImageToVideo,
            (None, true) | (Some("interpolate" | "interpolation"), _) => ModeKind::Interpolate,
            (Some("loop" | "looping"), false) => ModeKind::Loop,
            (Some("i2v" | "image_to_video" | "loop" | "looping"), true) => {
                return Err(ApiError::bad(IMAGE2, "image2 is only used with mode 'interpolate'"))
            }
            (Some(m), _) => return Err(ApiError::bad(MODE, format!("mode must be i2v, interpolate or loop, got '{m}'"))),
        };
        let mode = match mode {
            ModeKind::Interpolate => {
                let bytes = self.image2.as_deref().ok_or_else(|| ApiError::bad(IMAGE2, "mode 'interpolate' needs image2"))?;
                Mode::Interpolate { end: decode_image(IMAGE2, bytes, limits)? }
            }
            ModeKind::Loop => Mode::Loop,
            ModeKind::ImageToVideo => Mode::ImageToVideo,
        };
        let prompt = self.prompt.unwrap_or_default();
        if prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(ApiError::invalid(PROMPT, format!("prompt is longer than {MAX_PROMPT_CHARS} characters")));
        }
        let tokens = model.tokenizer.encode(&prompt).len();
        if tokens > limits.max_prompt_tokens {
            return Err(ApiError::invalid(
                PROMPT,
                format!("prompt is {tokens} tokens; the text encoder reads at most {}", limits.max_prompt_tokens),
            ));
        }
        let mut overrides = self.overrides;
        for (name, v) in self.knobs {
            let knob = KNOBS.iter().find(|k| k.name == name).expect("only known knobs are collected");
            if let Some(range) = knob.ui_range(cfg) {
                range.check(name, v).map_err(|e| ApiError::invalid(name, e.message))?;
            }
            if !overrides.set_number(name, v) {
                return Err(ApiError::invalid(name, format!("{name} must be a whole number, got {v}")));
            }
        }
        let request = dynamicrafter_engine::Request::with(cfg, image, mode, prompt, &overrides);
        let s = &request.sampling;
        s.validate(cfg, request.mode.kind()).map_err(|e| ApiError::invalid(&e.knob, e.message))?;
        let fits = |img: &RgbImage, field: &str| check_resizable(img, s.height, s.width, field).map_err(|e| ApiError::invalid(field, e.to_string()));
        fits(&request.image, IMAGE)?;
        if let Mode::Interpolate { end } = &request.mode {
            fits(end, IMAGE2)?;
        }
        let image2 = if matches!(request.mode, Mode::Interpolate { .. }) { self.image2 } else { None };
        Ok(NewJob { request, image: image_bytes, image2 })
    }
}

impl FromRequest<Arc<AppState>> for JobForm {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        // A stalled upload holds a connection and its buffered parts: bounded in time.
        let timeout = state.limits.upload_timeout;
        tokio::time::timeout(timeout, Self::read(req, &state.limits)).await.unwrap_or_else(|_| {
            Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, None, format!("the job submission took longer than {} s to arrive (--body-timeout)", timeout.as_secs())))
        })
    }
}

impl JobForm {
    async fn read(req: Request, limits: &Limits) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        // A declared length over the limit is refused before a byte of the body is read (the
        // body limit layer also stops undeclared ones once they pass it).
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let limit = limits.max_body_bytes();
        if let Some(declared) = declared.filter(|&n| n > limit as u64) {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, None, format!("request body is {declared} bytes; the limit is {limit}")));
        }
        if content_type.starts_with("multipart/form-data") {
            let multipart = Multipart::from_request(req, &()).await.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, None, e.body_text()))?;
            Self::from_multipart(multipart).await
        } else if content_type.starts_with("application/json") {
            let Json(fields) = Json::<Map<String, Value>>::from_request(req, &()).await.map_err(|e| {
                use axum::extract::rejection::JsonRejection as R;
                match &e {
                    R::JsonDataError(_) => ApiError::new(StatusCode::BAD_REQUEST, None, format!("body must be a JSON object: {}", e.body_text())),
                    R::JsonSyntaxError(_) => ApiError::new(StatusCode::BAD_REQUEST, None, format!("body is not valid JSON: {}", e.body_text())),
                    other => ApiError::new(other.status(), None, format!("request body could not be read (too large?): {}", e.body_text())),
                }
            })?;
            Self::from_json(fields)
        } else {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
                format!("send multipart/form-data or application/json, not '{content_type}'"),
            ))
        }
    }
}

/// A job submission as the API reads and checks it, from a body of `content_type` to the job
/// or the 4xx: the fuzz target's entry (`fuzz/`), and its corpus replayed by the tests.
pub fn parse_submission(content_type: &str, body: Vec<u8>, model: &ServedModel, limits: &Limits) -> Result<NewJob, ApiError> {
    let req = Request::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(axum::body::Body::from(body))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, None, e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().build().map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string()))?;
    runtime.block_on(JobForm::read(req, limits))?.check(model, limits)
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

/// Decodes an upload within the byte and pixel limits (a worker decodes a queued job's uploads
/// again through here).
pub fn decode_image(field: &str, bytes: &[u8], limits: &Limits) -> Result<RgbImage, ApiError> {
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
