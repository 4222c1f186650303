//! The networks, one file per checkpoint prefix.
//!
//! | file | checkpoint prefix |
//! |---|---|
//! | `unet.rs` | `model.diffusion_model.` |
//! | `vae.rs` | `first_stage_model.` |
//! | `clip_text.rs` | `cond_stage_model.model.` |
//! | `clip_vision.rs` | `embedder.model.` |
//! | `resampler.rs` | `image_proj_model.` |

pub mod clip_text;
pub mod clip_vision;
pub mod layers;
pub mod resampler;
pub mod unet;
pub mod vae;

pub const UNET_PREFIX: &str = "model.diffusion_model";
pub const VAE_PREFIX: &str = "first_stage_model";
pub const TEXT_PREFIX: &str = "cond_stage_model.model";
pub const VISION_PREFIX: &str = "embedder.model";
pub const RESAMPLER_PREFIX: &str = "image_proj_model";
