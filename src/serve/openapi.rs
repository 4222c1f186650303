//! `GET /openapi.json`: the API described for clients and code generators.

use super::api::{CFG_SCALE, ETA, SEED, STEPS};
use axum::Json;
use serde_json::{json, Value};

fn job_fields() -> Value {
    json!({
        "mode": { "type": "string", "enum": ["i2v", "interpolate", "loop"],
                  "description": "i2v animates image; interpolate fills the frames between image and image2; loop makes a looping video. Default: interpolate when image2 is given, else i2v." },
        "prompt": { "type": "string", "description": "Text guiding the motion; at most 75 CLIP tokens." },
        "steps": { "type": "integer", "minimum": STEPS.min, "maximum": STEPS.max, "description": "DDIM steps (model default 50)." },
        "cfg_scale": { "type": "number", "minimum": CFG_SCALE.min, "maximum": CFG_SCALE.max, "description": "Classifier-free guidance scale." },
        "eta": { "type": "number", "minimum": ETA.min, "maximum": ETA.max, "description": "DDIM eta." },
        "fs": { "type": "integer", "description": "Motion control: FPS (512/1024 models) or frame stride (256); range in GET /api/v1/model." },
        "seed": { "type": "integer", "minimum": SEED.min, "maximum": SEED.max, "description": "Random seed (default: the model's launch-script seed)." }
    })
}

pub async fn document() -> Json<Value> {
    let error = json!({ "$ref": "#/components/schemas/Error" });
    let id_param = json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let err = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": error } } });
    let mut multipart_props = job_fields();
    multipart_props["image"] = json!({ "type": "string", "format": "binary" });
    multipart_props["image2"] = json!({ "type": "string", "format": "binary" });
    let mut json_props = job_fields();
    json_props["image"] = json!({ "type": "string", "format": "byte", "description": "Base64 (a data: URL is accepted)." });
    json_props["image2"] = json!({ "type": "string", "format": "byte" });
    Json(json!({
        "openapi": "3.0.3",
        "info": {
            "title": "DynamiCrafter",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Image-to-video generation. Submit a job, follow its events, fetch the MP4."
        },
        "paths": {
            "/api/v1/jobs": { "post": {
                "summary": "Queue a generation job",
                "requestBody": { "required": true, "content": {
                    "multipart/form-data": { "schema": { "type": "object", "required": ["image"], "properties": multipart_props } },
                    "application/json": { "schema": { "type": "object", "required": ["image"], "properties": json_props } }
                }},
                "responses": {
                    "202": { "description": "Queued", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Accepted" } } } },
                    "400": err("Malformed request or unknown field"),
                    "413": err("Image too large (bytes or pixels)"),
                    "415": err("Not an image, or an unsupported body type"),
                    "422": err("A parameter is out of range or the prompt is too long"),
                    "429": err("Queue full; see the Retry-After header"),
                    "503": err("Shutting down")
                }
            }},
            "/api/v1/jobs/{id}": {
                "parameters": id_param,
                "get": { "summary": "Job state, queue position, progress, report or error",
                         "responses": { "200": { "description": "The job", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Job" } } } },
                                        "404": err("Unknown job") } },
                "delete": { "summary": "Cancel: a queued job at once, a running one between denoising steps",
                            "responses": { "200": { "description": "Cancelled" }, "202": { "description": "Cancelling" },
                                           "404": err("Unknown job"), "409": err("Already ended") } }
            },
            "/api/v1/jobs/{id}/events": { "parameters": id_param, "get": {
                "summary": "Server-sent events: queued, position, stage, step, done, error, cancelled (replayed from the start)",
                "responses": { "200": { "description": "text/event-stream" }, "404": err("Unknown job") }
            }},
            "/api/v1/jobs/{id}/video": { "parameters": id_param, "get": {
                "summary": "The H.264 MP4 of a finished job",
                "responses": { "200": { "description": "video/mp4" }, "404": err("Unknown job"), "409": err("Not done") }
            }},
            "/api/v1/model": { "get": { "summary": "The loaded model, its controls and limits", "responses": { "200": { "description": "Model info" } } } },
            "/api/v1/examples": { "get": { "summary": "Example inputs", "responses": { "200": { "description": "List of examples" } } } },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "ok" }, "503": { "description": "Shutting down" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text/plain" } } } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "required": ["error"], "properties": {
                "error": { "type": "string" }, "field": { "type": "string", "nullable": true } } },
            "Accepted": { "type": "object", "properties": {
                "id": { "type": "string" }, "state": { "type": "string" }, "position": { "type": "integer" },
                "status_url": { "type": "string" }, "events_url": { "type": "string" }, "video_url": { "type": "string" } } },
            "Job": { "type": "object", "properties": {
                "id": { "type": "string" },
                "state": { "type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"] },
                "mode": { "type": "string" }, "seed": { "type": "integer" },
                "position": { "type": "integer", "nullable": true },
                "progress": { "type": "object", "nullable": true },
                "report": { "type": "object", "nullable": true, "description": "Stage timings, steps, precision, peak memory (the CLI's report)" },
                "error": { "type": "string", "nullable": true },
                "video_url": { "type": "string", "nullable": true },
                "created_unix": { "type": "number" } } }
        }}
    }))
}
