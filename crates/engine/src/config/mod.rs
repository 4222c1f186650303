//! Typed hyperparameters of every network (deserialised straight from upstream's config where
//! they are 1:1 with it), the knobs of a generation ([`Sampling`]), the built-in presets of the
//! official checkpoints with their facts ([`presets`], `docs/spec/configs.md`), and the loader
//! of a fixture's `config.json` ([`upstream`]).

pub mod presets;
mod sampling;
mod upstream;

pub use sampling::{Knob, KnobError, Range, Sampling, SamplingOverrides, Ui, KNOBS};

use crate::{Error, Result};
use serde::Deserialize;

fn yes() -> bool {
    true
}

/// 3-D UNet (`lvdm/modules/networks/openaimodel3d.py::UNetModel`), as its `unet_config.params`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Base width; also the dimension of the sinusoidal timestep embedding.
    pub model_channels: usize,
    /// Downsample factors at which spatial/temporal transformers are used.
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    /// Channels per attention head (heads = C / this).
    pub num_head_channels: usize,
    pub transformer_depth: usize,
    pub context_dim: usize,
    /// Frames the model was trained with; fixes the number of image tokens per frame.
    pub temporal_length: usize,
    /// The extra temporal transformer after the first conv (8 heads of `num_head_channels`).
    #[serde(default)]
    pub addition_attention: bool,
    /// 256 model only: a learned `alpha` scales the image cross-attention by `tanh(alpha)+1`.
    #[serde(default)]
    pub image_cross_attention_scale_learnable: bool,
    /// fs used when the caller passes none.
    pub default_fs: i64,
}

impl UnetConfig {
    pub fn time_embed_dim(&self) -> usize {
        self.model_channels * 4
    }
}

/// SD-style KL autoencoder (`lvdm/models/autoencoder.py::AutoencoderKL`).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub embed_dim: usize,
    pub double_z: bool,
}

impl VaeConfig {
    /// Pixel-to-latent downsampling factor.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

fn mlp_ratio() -> f64 {
    4.0
}

/// OpenCLIP text tower used with `layer="penultimate"`, as open_clip's `text_cfg`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
}

impl ClipTextConfig {
    /// Blocks actually run: all but the last ("penultimate" layer).
    pub fn layers_used(&self) -> usize {
        self.layers - 1
    }
}

/// OpenCLIP vision tower (`FrozenOpenCLIPImageEmbedderV2`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub mlp_ratio: f64,
    /// Output width of the unused `proj` (kept so the checkpoint check knows its shape).
    pub embed_dim: usize,
}

impl ClipVisionConfig {
    pub fn num_tokens(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g + 1
    }
}

/// Perceiver resampler mapping CLIP image tokens to per-frame context tokens, as its
/// `image_proj_stage_config.params`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResamplerConfig {
    pub dim: usize,
    pub depth: usize,
    pub dim_head: usize,
    pub heads: usize,
    pub num_queries: usize,
    pub embedding_dim: usize,
    pub output_dim: usize,
    pub ff_mult: usize,
    pub video_length: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parameterization {
    #[default]
    Eps,
    V,
}

/// What the `fs` conditioning means: frame stride (256) or frames per second (512/1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FsKind {
    #[default]
    #[serde(rename = "fs")]
    FrameStride,
    #[serde(rename = "fps")]
    Fps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum TimestepSpacing {
    #[serde(rename = "uniform")]
    #[cfg_attr(feature = "cli", value(name = "uniform"))]
    Uniform,
    #[serde(rename = "uniform_trailing")]
    #[cfg_attr(feature = "cli", value(name = "uniform_trailing"))]
    UniformTrailing,
}

impl std::str::FromStr for TimestepSpacing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "uniform_trailing" => Ok(Self::UniformTrailing),
            _ => Err(Error::InvalidInput(format!(
                "timestep spacing '{s}' (expected uniform or uniform_trailing)"
            ))),
        }
    }
}

fn base_scale() -> f64 {
    0.7
}

fn turning_step() -> usize {
    400
}

/// The diffusion wrapper (`lvdm/models/ddpm3d.py::LatentVisualDiffusion`), as its `model.params`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DiffusionConfig {
    #[serde(default)]
    pub parameterization: Parameterization,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    pub linear_start: f64,
    pub linear_end: f64,
    pub timesteps: usize,
    #[serde(default)]
    pub use_dynamic_rescale: bool,
    #[serde(default = "base_scale")]
    pub base_scale: f64,
    #[serde(default = "turning_step")]
    pub turning_step: usize,
    pub scale_factor: f64,
    /// The reference encodes/decodes one frame at a time when set (memory only; same math). The
    /// pipeline always decodes per frame.
    #[serde(default)]
    pub perframe_ae: bool,
    #[serde(default, rename = "fps_condition_type")]
    pub fs_kind: FsKind,
}

/// Everything needed to build and run one DynamiCrafter model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// Output width of the unused `text_projection` (checkpoint check only).
    pub clip_embed_dim: usize,
    pub resampler: ResamplerConfig,
    pub diffusion: DiffusionConfig,
    /// The knobs' values when the user sets none: the launch script's (`run.sh`).
    pub defaults: Sampling,
    /// What upstream's demo offers for the motion control (`fs`), always including the default.
    pub fs_range: (i64, i64),
    /// The seed `run_application.sh` uses for looping videos, where it differs from `defaults`'.
    pub loop_seed: Option<u64>,
    /// Whether the model was trained for two keyframes (interpolation and looping): `Some(true)`
    /// the 512_interp checkpoint, `Some(false)` the image-to-video checkpoints (the two keyframe
    /// modes are refused: their output is not what the mode promises), `None` a config that does
    /// not say (upstream's CLI runs the modes on any model, and so do we).
    pub interpolation: Option<bool>,
}

/// What a video is made from, without the images: the request's mode as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKind {
    /// Animate one image.
    #[serde(rename = "i2v")]
    ImageToVideo,
    /// The frames between two keyframes.
    Interpolate,
    /// A looping video of one image.
    Loop,
}

impl ModeKind {
    pub const ALL: [ModeKind; 3] = [ModeKind::ImageToVideo, ModeKind::Interpolate, ModeKind::Loop];

    pub fn name(self) -> &'static str {
        match self {
            ModeKind::ImageToVideo => "i2v",
            ModeKind::Interpolate => "interpolate",
            ModeKind::Loop => "loop",
        }
    }

    /// The images the model is conditioned on at the first and (interpolate, loop) last frame.
    pub fn keyframes(self) -> usize {
        match self {
            ModeKind::ImageToVideo => 1,
            ModeKind::Interpolate | ModeKind::Loop => 2,
        }
    }
}

impl ModelConfig {
    /// The knobs' defaults for a request in `mode`: a loop takes the model's loop seed.
    pub fn defaults_for(&self, mode: ModeKind) -> Sampling {
        let mut s = self.defaults.clone();
        if mode == ModeKind::Loop {
            s.seed = self.loop_seed.unwrap_or(s.seed);
        }
        s
    }

    /// Pixels per side of the smallest block of an image (VAE downsampling × UNet levels).
    pub fn size_multiple(&self) -> usize {
        self.vae.downsample_factor() << (self.unet.channel_mult.len() - 1)
    }

    /// Whether `mode` may run on this model (see `interpolation`).
    pub fn supports(&self, mode: ModeKind) -> bool {
        mode.keyframes() == 1 || self.interpolation != Some(false)
    }

    /// The modes this model runs.
    pub fn modes(&self) -> impl Iterator<Item = ModeKind> + '_ {
        ModeKind::ALL.into_iter().filter(|&m| self.supports(m))
    }

    /// Frames the model was trained on (its temporal window): longer videos run in sliding
    /// windows of this length.
    pub fn window(&self) -> usize {
        self.unet.temporal_length
    }
}
