//! DynamiCrafter image-to-video inference on candle.
//!
//! [`Pipeline`] is the one entry point: it loads a checkpoint against a [`ModelConfig`] and turns a
//! [`Request`] into a [`Video`]. The networks live in [`models`], one file per checkpoint prefix.

pub mod config;
pub mod device;
pub mod diffusion;
mod error;
pub mod kernels;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod precision;
pub mod preprocess;
pub mod quant;
pub mod report;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use noise::{GivenNoise, NoiseSource, SeededNoise};
pub use pipeline::{Mode, Pipeline, Progress, Request, Stage, Video};
pub use preprocess::RgbImage;
pub use report::Report;
pub use config::Precision;
pub use precision::PrecisionPolicy;
