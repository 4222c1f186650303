//! DynamiCrafter image-to-video inference on candle.
//!
//! [`Pipeline`] is the one entry point: it loads a checkpoint against a [`ModelConfig`] and turns a
//! [`Request`] into a [`Video`]. The networks live in [`models`], one file per checkpoint prefix;
//! [`compute`] decides the precision and, through the [`Backend`], the kernel of every layer.

pub mod compute;
pub mod config;
pub mod diffusion;
mod error;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod preprocess;
pub mod samplers;
pub mod report;
pub mod tokenizer;
pub mod weights;

pub use compute::{device, Backend, Precision, PrecisionPolicy, Quantization};
pub use config::{ModeKind, ModelConfig, Sampling, SamplingOverrides};
pub use error::{Error, Result};
pub use noise::{GivenNoise, NoiseSource, SeededNoise};
pub use pipeline::{CollectFrames, FrameSink, Mode, Pipeline, Progress, Request, Sample, SinkResult, Stage, Video};
pub use preprocess::RgbImage;
pub use report::Report;
