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

/// Weights that stay in float whatever the precision policy (no int8, no bf16 products): the
/// whole VAE (its decode is the picture; one exception, the backend's: its 3×3 convolutions in
/// the bf16 mode of AVX512-BF16 CPUs), embedding tables and positional/learned-query
/// tensors, the time and fs embedding MLPs, the UNet's first and last convolutions and the CLIP
/// patch embedding.
pub fn keeps_float(name: &str) -> bool {
    const FLOAT: [&str; 8] = [
        "time_embed.",
        "fps_embedding.",
        "token_embedding",
        "positional_embedding",
        "class_embedding",
        "latents",
        "visual.conv1.",
        "visual.proj",
    ];
    name.starts_with(VAE_PREFIX)
        || name.starts_with(&format!("{UNET_PREFIX}.input_blocks.0.0."))
        || name.starts_with(&format!("{UNET_PREFIX}.out."))
        || FLOAT.iter().any(|f| name.contains(f))
}
