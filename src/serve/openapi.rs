//! `GET /openapi.json`: the API described for clients and code generators, generated from the
//! handlers' and response types' annotations, and the job form from the knobs ([`KNOBS`]) with
//! the loaded model's ranges.

use super::form::{IMAGE, IMAGE2, MODE, PROMPT};
use super::state::AppState;
use axum::extract::State;
use axum::Json;
use dynamicrafter_engine::config::{Range, KNOBS};
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
    let modes: Vec<&str> = ModeKind::ALL.iter().map(|m| m.name()).collect();
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
        .property(PROMPT, ObjectBuilder::new().schema_type(Type::String).description(Some("Text guiding the motion; at most 75 CLIP tokens.")));
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

pub async fn document(State(state): State<Arc<AppState>>) -> Json<utoipa::openapi::OpenApi> {
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
    Json(doc)
}
