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

/// One sample of a run, its frames aside (they went to a [`FrameSink`]).
#[derive(Debug, Clone)]
pub struct Sample {
    /// Frames saved (loop: the last one dropped), each `(h, w, 3)` RGB u8.
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// Final latent `(1, 4, t, h/8, w/8)` (every frame the sampler ran).
    pub latent: Tensor,
    /// How the frames ran: the windows, or the frames kept of one window.
    pub plan: super::FramePlan,
    /// Wall time per stage, in order; each denoising step listed separately. With several
    /// samples, the shared conditioning stages are in the first sample's list. The VAE decode
    /// excludes the time the sink took.
    pub timings: Vec<(Stage, Duration)>,
}

/// The result of one generation with its frames kept in memory ([`super::Pipeline::generate`]).
#[derive(Debug, Clone)]
pub struct Video {
    /// Saved frames `(t, h, w, 3)` after clamping and the truncating u8 cast (loop: last frame dropped).
    pub frames_u8: Vec<u8>,
    pub sample: Sample,
}

/// Where a run's frames go as the VAE decodes them, one at a time, so a long video is never
/// held whole: a video writer encodes each on arrival. For every sample: `begin`, then
/// `frame` once per saved frame, then `end`. An error from the sink ends the run.
pub trait FrameSink {
    /// Sample `sample` (from 0) starts: `count` frames of `width`×`height` follow.
    fn begin(&mut self, sample: usize, count: usize, width: usize, height: usize) -> SinkResult;
    /// The next frame, `(h, w, 3)` RGB u8.
    fn frame(&mut self, rgb: &[u8]) -> SinkResult;
    /// The sample's last frame has been given.
    fn end(&mut self) -> SinkResult;
}

pub type SinkResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A sink that keeps every frame in memory.
#[derive(Debug, Default)]
pub struct CollectFrames {
    /// One buffer per sample, frames back to back.
    pub samples: Vec<Vec<u8>>,
}

impl FrameSink for CollectFrames {
    fn begin(&mut self, _sample: usize, count: usize, width: usize, height: usize) -> SinkResult {
        self.samples.push(Vec::with_capacity(count * width * height * 3));
        Ok(())
    }
    fn frame(&mut self, rgb: &[u8]) -> SinkResult {
        self.samples.last_mut().ok_or("frame before begin")?.extend_from_slice(rgb);
        Ok(())
    }
    fn end(&mut self) -> SinkResult {
        Ok(())
    }
}
