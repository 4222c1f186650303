//! `GET /openapi.json`: the API described for clients and code generators, generated from the
//! handlers' and response types' annotations, and the job form from the knobs ([`KNOBS`]) with
//! the loaded model's ranges.

use super::form::{IMAGE, IMAGE2, MAX_PROMPT_CHARS, MODE, PROMPT};
use super::state::AppState;
use axum::extract::State;
use axum::Json;
use dynamicrafter_engine::config::{Range, KNOBS};
use dynamicrafter_engine::samplers::SamplerKind;
use dynamicrafter_engine::{ModeKind, ModelConfig};
use std::sync::Arc;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{OpenApi, PartialSchema, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(title = "DynamiCrafter", description = "Image-to-video generation. Submit a job, follow its events, fetch the MP4."),
    paths(
        super::handlers::submit,
        super::handlers::status,
        super::handlers::cancel,
        super::handlers::delete,
        super::handlers::events,
        super::handlers::video,
        super::handlers::model_info,
        super::handlers::examples,
        super::handlers::health,
        super::handlers::metrics_text,
    )
)]
struct ApiDoc;

/// The JSON form of a job: images as base64 (a `data:` URL is accepted).
pub struct JobJson;
/// The multipart form of a job: images as files.
pub struct JobMultipart;

impl PartialSchema for JobJson {
    fn schema() -> RefOr<Schema> {
        job_schema(false, None)
    }
}
impl ToSchema for JobJson {}

impl PartialSchema for JobMultipart {
    fn schema() -> RefOr<Schema> {
        job_schema(true, None)
    }
}
impl ToSchema for JobMultipart {}

/// A job's fields: the images, mode and prompt, and every knob the API takes with its range on
/// `cfg` (without a model: the ranges that do not depend on one).
fn job_schema(multipart: bool, cfg: Option<&ModelConfig>) -> RefOr<Schema> {
    let image = |what: &str| {
        let s = ObjectBuilder::new().schema_type(Type::String).description(Some(what.to_string()));
        if multipart { s.format(Some(utoipa::openapi::SchemaFormat::Custom("binary".into()))) } else { s.content_encoding("base64") }
    };
    let modes: Vec<&str> = match cfg {
        Some(cfg) => cfg.modes().map(ModeKind::name).collect(),
        None => ModeKind::ALL.map(ModeKind::name).to_vec(),
    };
    let mut form = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(IMAGE, image("The image to animate (the first keyframe for interpolate)."))
        .required(IMAGE)
        .property(IMAGE2, image("The last keyframe: only and always with mode interpolate."))
        .property(
            MODE,
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(modes))
                .description(Some("i2v animates image; interpolate fills the frames between image and image2; loop makes a looping video. Default: interpolate when image2 is given, else i2v.")),
        )
        .property(
            PROMPT,
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_PROMPT_CHARS))
                .description(Some("Text guiding the motion; at most 75 CLIP tokens.")),
        );
    for knob in KNOBS.iter().filter(|k| k.ui.is_some()) {
        let range: Option<Range> = match cfg {
            Some(cfg) => knob.ui_range(cfg),
            None => match knob.ui {
                Some(dynamicrafter_engine::config::Ui::Fixed(r)) => Some(r),
                _ => None,
            },
        };
        if let Some(choices) = knob.choices {
            let p = ObjectBuilder::new().schema_type(Type::String).enum_values(Some(choices.to_vec())).description(Some(knob.help.trim().to_string()));
            form = form.property(knob.name, p);
            continue;
        }
        let mut p = ObjectBuilder::new()
            .schema_type(if knob.integer { Type::Integer } else { Type::Number })
            .description(Some(knob.help.trim().to_string()));
        if let Some(r) = range {
            p = p.minimum(Some(r.min)).maximum(Some(r.max));
        } else {
            p = p.description(Some(format!("{} The model's range: GET /api/v1/model.", knob.help.trim())));
        }
        form = form.property(knob.name, p);
    }
    RefOr::T(Schema::Object(Object::from(form)))
}

/// The image formats the API decodes.
const IMAGE_TYPES: &str = "image/png, image/jpeg, image/webp, image/bmp";

/// What the annotations cannot say, added to the document: the job form takes no other field,
/// `image2` goes with mode `interpolate` only (and that mode needs it), the images' media types
/// in multipart, and links from a queued job to the operations on it.
fn state_the_contract(doc: &mut serde_json::Value, cfg: &ModelConfig) {
    use serde_json::{json, Value};
    let (interpolate, looping) = (ModeKind::Interpolate.name(), ModeKind::Loop.name());
    let window = cfg.window();
    for (form, json_body) in [(JobJson::name(), true), (JobMultipart::name(), false)] {
        let Some(schema) = doc.pointer_mut(&format!("/components/schemas/{form}")).and_then(|s| s.as_object_mut()) else { continue };
        schema.insert("additionalProperties".into(), json!(false));
        if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            for (name, p) in properties.iter_mut() {
                let Some(p) = p.as_object_mut() else { continue };
                if name == IMAGE || name == IMAGE2 {
                    // An empty upload counts as none.
                    p.insert("minLength".into(), json!(1));
                }
                if json_body && name != IMAGE {
                    // JSON: null leaves a field unset, and the on/off knobs take booleans too.
                    if p.get("enum") == Some(&json!(["false", "true"])) {
                        p.remove("type");
                        p.insert("enum".into(), json!(["false", "true", false, true, null]));
                    } else if let Some(t) = p.get("type").cloned() {
                        p.insert("type".into(), json!([t, "null"]));
                        if let Some(values) = p.get_mut("enum").and_then(Value::as_array_mut) {
                            values.push(Value::Null);
                        }
                    }
                }
            }
        }
        // The rules between fields, as alternatives (schemathesis cannot judge binary values
        // against `if`/`not`). A mode's shape: i2v (the default) and loop without image2, loop
        // and interpolate within one window of at least their two frames, interpolate with
        // image2 (mode left out then means interpolate). JSON: null leaves a field unset.
        let unset = if json_body { json!({ "type": "null" }) } else { json!(false) };
        // A mode left out (or null) is i2v, or interpolate when image2 is given.
        let mode_or_unset = |mode: &str| if json_body { json!({ "enum": [mode, null] }) } else { json!({ "const": mode }) };
        let keyframes = json!({ "minimum": 2, "maximum": window });
        let mut shapes = vec![json!({ "properties": { MODE: mode_or_unset(ModeKind::ImageToVideo.name()), IMAGE2: unset } })];
        if cfg.supports(ModeKind::Loop) {
            shapes.push(json!({ "required": [MODE], "properties": { MODE: { "const": looping }, IMAGE2: unset, "frames": keyframes } }));
        }
        if cfg.supports(ModeKind::Interpolate) {
            shapes.push(json!({ "required": [IMAGE2], "properties": { MODE: mode_or_unset(interpolate), IMAGE2: { "type": "string" }, "frames": keyframes } }));
        }
        let other_samplers: Vec<&str> = SamplerKind::ALL.iter().map(|s| s.name()).filter(|&s| s != SamplerKind::Ddim.name()).collect();
        let rules = vec![
            json!({ "anyOf": shapes }),
            // Karras noise levels are for the samplers other than ddim (the default).
            json!({ "anyOf": [
                { "properties": { "karras": { "enum": ["false", false, null] } } },
                { "required": ["sampler"], "properties": { "sampler": { "enum": other_samplers } } },
            ] }),
        ];
        schema.insert("allOf".into(), json!(rules));
    }
    let jobs = "/paths/~1api~1v1~1jobs/post";
    if let Some(multipart) = doc.pointer_mut(&format!("{jobs}/requestBody/content/multipart~1form-data")).and_then(|m| m.as_object_mut()) {
        multipart.insert("encoding".into(), json!({ IMAGE: { "contentType": IMAGE_TYPES }, IMAGE2: { "contentType": IMAGE_TYPES } }));
    }
    if let Some(accepted) = doc.pointer_mut(&format!("{jobs}/responses/202")).and_then(|r| r.as_object_mut()) {
        let link = |op: &str, what: &str| json!({ "operationId": op, "parameters": { "id": "$response.body#/id" }, "description": what });
        accepted.insert(
            "links".into(),
            json!({
                "status": link("status", "The job's state"),
                "events": link("events", "Its events"),
                "video": link("video", "Its video, once done"),
                "cancel": link("cancel", "Cancel it"),
                "delete": link("delete", "Forget it"),
            }),
        );
    }
}

pub async fn document(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let cfg = &state.model.config;
    if let Some(components) = doc.components.as_mut() {
        components.schemas.insert(JobJson::name().into_owned(), job_schema(false, Some(cfg)));
        components.schemas.insert(JobMultipart::name().into_owned(), job_schema(true, Some(cfg)));
        if state.api_key.is_some() {
            use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
            components.add_security_scheme("api_key", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        }
    }
    if state.api_key.is_some() {
        // `serve --api-key`: every /api/ operation needs the key (401 without it).
        let needs_key = vec![utoipa::openapi::security::SecurityRequirement::new("api_key", Vec::<String>::new())];
        for (_, item) in doc.paths.paths.iter_mut().filter(|(p, _)| p.starts_with("/api/")) {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                op.security = Some(needs_key.clone());
            }
        }
    }
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    state_the_contract(&mut doc, cfg);
    Json(doc)
}
