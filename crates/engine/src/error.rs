//! The engine's error type: what went wrong, named so a front end can map it to a message or status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed (shape bug, out of memory, device error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The checkpoint does not match the network the config describes.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    /// A config file or preset is unusable.
    #[error("config: {0}")]
    Config(String),
    /// A caller-supplied input (image, prompt, option) is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The caller's cancel flag was raised.
    #[error("cancelled")]
    Cancelled,
    /// Where the frames go (a video writer) failed.
    #[error("writing the frames: {0}")]
    Output(Box<dyn std::error::Error + Send + Sync>),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;
