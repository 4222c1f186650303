//! What the handlers share: the loaded model, the job backend, limits.

use super::backend::Backend;
use dynamicrafter_engine::tokenizer::Tokenizer;
use dynamicrafter_engine::{ModelConfig, Pipeline};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The model requests are checked against. Its weights are loaded only where this node
/// generates; a pure API node (`--workers 0` on a shared queue) has the config and tokenizer.
pub struct ServedModel {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub pipeline: Option<Arc<Pipeline>>,
}

impl ServedModel {
    pub fn new(config: ModelConfig, pipeline: Option<Arc<Pipeline>>) -> anyhow::Result<Self> {
        Ok(Self { config, tokenizer: Tokenizer::new()?, pipeline })
    }
}

/// What a submission may be.
pub struct Limits {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_prompt_tokens: usize,
    /// How long reading and checking a submission may take (`--body-timeout`).
    pub upload_timeout: std::time::Duration,
}

impl Limits {
    /// The most bytes a job submission may have: two images, base64 in JSON (4/3), plus the
    /// other fields.
    pub fn max_body_bytes(&self) -> usize {
        self.max_image_bytes * 8 / 3 + (1 << 20)
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub model: ServedModel,
    pub model_name: String,
    pub backend: Arc<dyn Backend>,
    pub max_queue: usize,
    pub limits: Limits,
    pub closing: AtomicBool,
    /// `--api-key`: what every /api/ request must carry.
    pub api_key: Option<String>,
    /// `--allowed-host`: the only `Host` names answered (empty: any).
    pub allowed_hosts: Vec<String>,
}

impl AppState {
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Stops taking jobs (see [`Backend::shut_down`]).
    pub fn shut_down(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.backend.shut_down();
    }
}
