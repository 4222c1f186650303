//! What a front end asks the pipeline for, and what it gets back.

use crate::config::{ModeKind, ModelConfig, Sampling, SamplingOverrides};
use crate::preprocess::RgbImage;
use candle_core::Tensor;
use std::time::Duration;

/// What the video is made from.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Animate one image.
    ImageToVideo,
    /// Generate the frames between the image and `end` (the interpolation checkpoint).
    Interpolate { end: RgbImage },
    /// A looping video of the image; the last frame is dropped.
    Loop,
}

impl Mode {
    pub fn kind(&self) -> ModeKind {
        match self {
            Mode::ImageToVideo => ModeKind::ImageToVideo,
            Mode::Interpolate { .. } => ModeKind::Interpolate,
            Mode::Loop => ModeKind::Loop,
        }
    }
}

/// One generation request: the image(s), the prompt and every knob.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub image: RgbImage,
    pub mode: Mode,
    pub prompt: String,
    pub sampling: Sampling,
}

impl Request {
    /// An image-to-video request with the model's launch-script defaults.
    pub fn new(cfg: &ModelConfig, image: RgbImage, prompt: impl Into<String>) -> Self {
        Self::with(cfg, image, Mode::ImageToVideo, prompt, &SamplingOverrides::default())
    }

    /// A request in `mode`: the knobs `overrides` sets, the model's defaults for `mode` for the
    /// rest.
    pub fn with(cfg: &ModelConfig, image: RgbImage, mode: Mode, prompt: impl Into<String>, overrides: &SamplingOverrides) -> Self {
        let mut sampling = cfg.defaults_for(mode.kind());
        sampling.apply(overrides);
        Self { image, mode, prompt: prompt.into(), sampling }
    }
}

/// Pipeline stages, for progress and timing reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    TextEncode,
    ImageEncode,
    VaeEncode,
    Denoise,
    VaeDecode,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncode => "text encode",
            Stage::ImageEncode => "image encode",
            Stage::VaeEncode => "VAE encode",
            Stage::Denoise => "denoise",
            Stage::VaeDecode => "VAE decode",
        }
    }
}

/// Progress of a run: step `step` of `total` within `stage` (0 of N when a stage starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Video {
    /// Saved frames `(t, h, w, 3)` after clamping and the truncating u8 cast (loop: last frame dropped).
    pub frames_u8: Vec<u8>,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Final latent `(1, 4, t, h/8, w/8)` (every frame the sampler ran).
    pub latent: Tensor,
    /// How the frames ran: the windows, or the frames kept of one window.
    pub plan: super::FramePlan,
    /// Wall time per stage, in order; each denoising step listed separately. With several
    /// samples, the shared conditioning stages are in the first sample's list.
    pub timings: Vec<(Stage, Duration)>,
}

