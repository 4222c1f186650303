//! Typed hyperparameters of every network, the built-in presets of the official checkpoints
//! (`spec/configs.md`), and loading of a fixture's `config.json` (which mirrors the upstream YAML).

use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// 3-D UNet (`lvdm/modules/networks/openaimodel3d.py::UNetModel`).
#[derive(Debug, Clone, PartialEq)]
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
    pub addition_attention: bool,
    /// 256 model only: a learned `alpha` scales the image cross-attention by `tanh(alpha)+1`.
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

/// OpenCLIP text tower used with `layer="penultimate"`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
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

/// Perceiver resampler mapping CLIP image tokens to per-frame context tokens.
#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parameterization {
    Eps,
    V,
}

/// What the `fs` conditioning means: frame stride (256) or frames per second (512/1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    FrameStride,
    Fps,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Uniform,
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

/// What the user asks for with `--precision`. The engine decides per device what that means
/// (one policy for every front end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "fp32" | "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Ok(Self::F16),
            _ => Err(Error::InvalidInput(format!("precision '{s}' (expected auto, fp32, bf16 or f16)"))),
        }
    }
}

impl Precision {
    /// The precision a run actually uses on `device`. On CPU, bf16 exists where the CPU has AMX
    /// (bf16 products, the rest in f32), and `auto` takes it there: it is faster and keeps
    /// quality (≥ 35 dB of decoded frames against fp32, tested); elsewhere `auto` is fp32. What
    /// the CPU lacks is refused rather than silently ignored.
    pub fn resolve(self, device: &candle_core::Device) -> Result<Self> {
        match (self, device.is_cpu()) {
            (Self::Auto, true) if crate::kernels::amx::available() => Ok(Self::Bf16),
            (Self::Auto, true) | (Self::F32, _) => Ok(Self::F32),
            (Self::Auto, false) => Ok(Self::Bf16),
            (Self::Bf16, true) if crate::kernels::amx::available() => Ok(Self::Bf16),
            (p, true) => Err(Error::InvalidInput(format!(
                "precision {} is not available on this CPU (bf16 needs AMX); use fp32 or auto",
                p.name()
            ))),
            (p, false) => Ok(p),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "fp32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// The diffusion wrapper (`lvdm/models/ddpm3d.py::LatentVisualDiffusion`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionConfig {
    pub parameterization: Parameterization,
    pub rescale_betas_zero_snr: bool,
    pub linear_start: f64,
    pub linear_end: f64,
    pub timesteps: usize,
    pub use_dynamic_rescale: bool,
    pub base_scale: f64,
    pub turning_step: usize,
    pub scale_factor: f64,
    /// The reference encodes/decodes one frame at a time when set (memory only; same math). The
    /// pipeline always decodes per frame.
    pub perframe_ae: bool,
    pub fs_kind: FsKind,
}

/// Sampling settings a launch script uses for this model (`run.sh` / `run_application.sh`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingDefaults {
    pub height: usize,
    pub width: usize,
    pub frames: usize,
    pub steps: usize,
    pub eta: f64,
    pub cfg_scale: f64,
    pub fs: i64,
    pub spacing: TimestepSpacing,
    pub guidance_rescale: f64,
    pub seed: u64,
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
    pub defaults: SamplingDefaults,
}

impl ModelConfig {
    /// The official model names accepted as presets.
    pub const PRESETS: [&'static str; 4] = ["256", "512", "1024", "512_interp"];

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "256" => Ok(Self::dc_256()),
            "512" => Ok(Self::dc_512()),
            "1024" => Ok(Self::dc_1024()),
            "512_interp" => Ok(Self::dc_512_interp()),
            _ => Err(Error::Config(format!(
                "unknown preset '{name}' (expected one of {})",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    fn official(name: &str, v_model: bool) -> Self {
        Self {
            name: name.to_string(),
            unet: UnetConfig {
                in_channels: 8,
                out_channels: 4,
                model_channels: 320,
                attention_resolutions: vec![4, 2, 1],
                num_res_blocks: 2,
                channel_mult: vec![1, 2, 4, 4],
                num_head_channels: 64,
                transformer_depth: 1,
                context_dim: 1024,
                temporal_length: 16,
                addition_attention: true,
                image_cross_attention_scale_learnable: !v_model,
                default_fs: 3,
            },
            vae: VaeConfig {
                in_channels: 3,
                out_ch: 3,
                ch: 128,
                ch_mult: vec![1, 2, 4, 4],
                num_res_blocks: 2,
                z_channels: 4,
                embed_dim: 4,
                double_z: true,
            },
            text: ClipTextConfig {
                width: 1024,
                heads: 16,
                layers: 24,
                vocab_size: 49408,
                context_length: 77,
                mlp_ratio: 4.0,
            },
            vision: ClipVisionConfig {
                width: 1280,
                heads: 16,
                layers: 32,
                patch_size: 14,
                image_size: 224,
                mlp_ratio: 4.0,
                embed_dim: 1024,
            },
            clip_embed_dim: 1024,
            resampler: ResamplerConfig {
                dim: 1024,
                depth: 4,
                dim_head: 64,
                heads: 12,
                num_queries: 16,
                embedding_dim: 1280,
                output_dim: 1024,
                ff_mult: 4,
                video_length: 16,
            },
            diffusion: DiffusionConfig {
                parameterization: if v_model { Parameterization::V } else { Parameterization::Eps },
                rescale_betas_zero_snr: v_model,
                linear_start: 0.00085,
                linear_end: 0.012,
                timesteps: 1000,
                use_dynamic_rescale: v_model,
                base_scale: 0.7,
                turning_step: 400,
                scale_factor: 0.18215,
                perframe_ae: v_model,
                fs_kind: if v_model { FsKind::Fps } else { FsKind::FrameStride },
            },
            defaults: SamplingDefaults {
                height: 256,
                width: 256,
                frames: 16,
                steps: 50,
                eta: 1.0,
                cfg_scale: 7.5,
                fs: 3,
                spacing: if v_model {
                    TimestepSpacing::UniformTrailing
                } else {
                    TimestepSpacing::Uniform
                },
                guidance_rescale: if v_model { 0.7 } else { 0.0 },
                seed: 123,
            },
        }
    }

    /// `configs/inference_256_v1.0.yaml` with `run.sh 256` settings.
    pub fn dc_256() -> Self {
        Self::official("256", false)
    }

    /// `configs/inference_512_v1.0.yaml` with `run.sh 512` settings.
    pub fn dc_512() -> Self {
        let mut c = Self::official("512", true);
        c.unet.default_fs = 24;
        c.defaults.height = 320;
        c.defaults.width = 512;
        c.defaults.fs = 24;
        c
    }

    /// `configs/inference_1024_v1.0.yaml` with `run.sh 1024` settings.
    pub fn dc_1024() -> Self {
        let mut c = Self::official("1024", true);
        c.unet.default_fs = 10;
        c.diffusion.base_scale = 0.3;
        c.defaults.height = 576;
        c.defaults.width = 1024;
        c.defaults.fs = 10;
        c
    }

    /// The interpolation/looping checkpoint: the 512 network and YAML, `run_application.sh` settings.
    pub fn dc_512_interp() -> Self {
        let mut c = Self::dc_512();
        c.name = "512_interp".into();
        c.defaults.fs = 5;
        c.defaults.seed = 12306;
        c
    }

    /// Reads a fixture-style `config.json` (the upstream YAML as JSON plus the open_clip config).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: json::Root =
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        raw.into_config()
    }
}

/// Serde mirror of `config.json`; only the fields the engine needs.
mod json {
    use super::*;

    #[derive(Deserialize)]
    pub struct Root {
        pub name: Option<String>,
        pub model: Model,
        pub open_clip_model: OpenClip,
        pub inference: Option<Inference>,
    }

    #[derive(Deserialize)]
    pub struct Model {
        pub params: ModelParams,
    }

    #[derive(Deserialize)]
    pub struct ModelParams {
        #[serde(default)]
        pub rescale_betas_zero_snr: bool,
        #[serde(default = "eps")]
        pub parameterization: String,
        pub linear_start: f64,
        pub linear_end: f64,
        pub timesteps: usize,
        pub image_size: Vec<usize>,
        pub scale_factor: f64,
        #[serde(default)]
        pub use_dynamic_rescale: bool,
        #[serde(default = "base_scale")]
        pub base_scale: f64,
        #[serde(default = "turning_step")]
        pub turning_step: usize,
        #[serde(default)]
        pub perframe_ae: bool,
        #[serde(default = "fs")]
        pub fps_condition_type: String,
        pub unet_config: Target<UnetParams>,
        pub first_stage_config: Target<VaeParams>,
        pub image_proj_stage_config: Target<ResamplerConfigJson>,
    }

    fn eps() -> String {
        "eps".into()
    }
    fn fs() -> String {
        "fs".into()
    }
    fn base_scale() -> f64 {
        0.7
    }
    fn turning_step() -> usize {
        400
    }

    #[derive(Deserialize)]
    pub struct Target<P> {
        pub params: P,
    }

    #[derive(Deserialize)]
    pub struct UnetParams {
        pub in_channels: usize,
        pub out_channels: usize,
        pub model_channels: usize,
        pub attention_resolutions: Vec<usize>,
        pub num_res_blocks: usize,
        pub channel_mult: Vec<usize>,
        pub num_head_channels: usize,
        pub transformer_depth: usize,
        pub context_dim: usize,
        pub temporal_length: usize,
        #[serde(default)]
        pub addition_attention: bool,
        #[serde(default)]
        pub image_cross_attention_scale_learnable: bool,
        pub default_fs: i64,
        #[serde(default = "yes")]
        pub use_linear: bool,
        #[serde(default = "yes")]
        pub temporal_selfatt_only: bool,
        #[serde(default)]
        pub use_relative_position: bool,
        #[serde(default)]
        pub use_causal_attention: bool,
        #[serde(default = "yes")]
        pub image_cross_attention: bool,
        #[serde(default = "yes")]
        pub fs_condition: bool,
        #[serde(default = "yes")]
        pub temporal_conv: bool,
        #[serde(default = "yes")]
        pub temporal_attention: bool,
    }

    fn yes() -> bool {
        true
    }

    #[derive(Deserialize)]
    pub struct VaeParams {
        pub embed_dim: usize,
        pub ddconfig: DdConfig,
    }

    #[derive(Deserialize)]
    pub struct DdConfig {
        pub double_z: bool,
        pub z_channels: usize,
        pub in_channels: usize,
        pub out_ch: usize,
        pub ch: usize,
        pub ch_mult: Vec<usize>,
        pub num_res_blocks: usize,
        pub attn_resolutions: Vec<usize>,
    }

    #[derive(Deserialize)]
    pub struct ResamplerConfigJson {
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

    #[derive(Deserialize)]
    pub struct OpenClip {
        pub config: OpenClipConfig,
    }

    #[derive(Deserialize)]
    pub struct OpenClipConfig {
        pub embed_dim: usize,
        pub vision_cfg: VisionCfg,
        pub text_cfg: TextCfg,
    }

    #[derive(Deserialize)]
    pub struct VisionCfg {
        pub image_size: usize,
        pub layers: usize,
        pub width: usize,
        #[serde(default = "head_width")]
        pub head_width: usize,
        pub patch_size: usize,
        #[serde(default = "mlp_ratio")]
        pub mlp_ratio: f64,
    }

    fn head_width() -> usize {
        64
    }
    fn mlp_ratio() -> f64 {
        4.0
    }

    #[derive(Deserialize)]
    pub struct TextCfg {
        pub context_length: usize,
        pub vocab_size: usize,
        pub width: usize,
        pub heads: usize,
        pub layers: usize,
        #[serde(default = "mlp_ratio")]
        pub mlp_ratio: f64,
    }

    #[derive(Deserialize)]
    pub struct Inference {
        pub height: usize,
        pub width: usize,
        pub video_length: usize,
        pub frame_stride: i64,
        pub ddim_steps: usize,
        pub ddim_eta: f64,
        pub unconditional_guidance_scale: f64,
        pub timestep_spacing: String,
        pub guidance_rescale: f64,
    }

    fn unsupported(what: &str) -> Error {
        Error::Config(format!("unsupported setting: {what}"))
    }

    impl Root {
        pub fn into_config(self) -> Result<ModelConfig> {
            let p = self.model.params;
            let u = p.unet_config.params;
            // The engine implements the DynamiCrafter variant of the UNet only; refuse the others
            // rather than silently computing something else.
            if !u.use_linear {
                return Err(unsupported("unet use_linear=false"));
            }
            if !u.temporal_selfatt_only || u.use_relative_position || u.use_causal_attention {
                return Err(unsupported("temporal attention variant"));
            }
            if !u.image_cross_attention || !u.fs_condition || !u.temporal_conv || !u.temporal_attention {
                return Err(unsupported("unet without image cross-attention/fs/temporal layers"));
            }
            let dd = p.first_stage_config.params.ddconfig;
            if !dd.attn_resolutions.is_empty() {
                return Err(unsupported("vae attn_resolutions"));
            }
            let parameterization = match p.parameterization.as_str() {
                "eps" => Parameterization::Eps,
                "v" => Parameterization::V,
                other => return Err(unsupported(&format!("parameterization {other}"))),
            };
            let fs_kind = match p.fps_condition_type.as_str() {
                "fs" => FsKind::FrameStride,
                "fps" => FsKind::Fps,
                other => return Err(unsupported(&format!("fps_condition_type {other}"))),
            };
            let oc = self.open_clip_model.config;
            if !oc.vision_cfg.width.is_multiple_of(oc.vision_cfg.head_width) {
                return Err(Error::Config("vision width not a multiple of head_width".into()));
            }
            let vae = VaeConfig {
                in_channels: dd.in_channels,
                out_ch: dd.out_ch,
                ch: dd.ch,
                ch_mult: dd.ch_mult,
                num_res_blocks: dd.num_res_blocks,
                z_channels: dd.z_channels,
                embed_dim: p.first_stage_config.params.embed_dim,
                double_z: dd.double_z,
            };
            let factor = vae.downsample_factor();
            let r = p.image_proj_stage_config.params;
            let v_model = parameterization == Parameterization::V;
            let defaults = match self.inference {
                Some(i) => SamplingDefaults {
                    height: i.height,
                    width: i.width,
                    frames: i.video_length,
                    steps: i.ddim_steps,
                    eta: i.ddim_eta,
                    cfg_scale: i.unconditional_guidance_scale,
                    fs: i.frame_stride,
                    spacing: i.timestep_spacing.parse()?,
                    guidance_rescale: i.guidance_rescale,
                    seed: 123,
                },
                None => SamplingDefaults {
                    height: p.image_size.first().copied().unwrap_or(32) * factor,
                    width: p.image_size.get(1).copied().unwrap_or(32) * factor,
                    frames: u.temporal_length,
                    steps: 50,
                    eta: 1.0,
                    cfg_scale: 7.5,
                    fs: u.default_fs,
                    spacing: if v_model {
                        TimestepSpacing::UniformTrailing
                    } else {
                        TimestepSpacing::Uniform
                    },
                    guidance_rescale: if v_model { 0.7 } else { 0.0 },
                    seed: 123,
                },
            };
            Ok(ModelConfig {
                name: self.name.unwrap_or_else(|| "custom".into()),
                unet: UnetConfig {
                    in_channels: u.in_channels,
                    out_channels: u.out_channels,
                    model_channels: u.model_channels,
                    attention_resolutions: u.attention_resolutions,
                    num_res_blocks: u.num_res_blocks,
                    channel_mult: u.channel_mult,
                    num_head_channels: u.num_head_channels,
                    transformer_depth: u.transformer_depth,
                    context_dim: u.context_dim,
                    temporal_length: u.temporal_length,
                    addition_attention: u.addition_attention,
                    image_cross_attention_scale_learnable: u.image_cross_attention_scale_learnable,
                    default_fs: u.default_fs,
                },
                vae,
                text: ClipTextConfig {
                    width: oc.text_cfg.width,
                    heads: oc.text_cfg.heads,
                    layers: oc.text_cfg.layers,
                    vocab_size: oc.text_cfg.vocab_size,
                    context_length: oc.text_cfg.context_length,
                    mlp_ratio: oc.text_cfg.mlp_ratio,
                },
                vision: ClipVisionConfig {
                    width: oc.vision_cfg.width,
                    heads: oc.vision_cfg.width / oc.vision_cfg.head_width,
                    layers: oc.vision_cfg.layers,
                    patch_size: oc.vision_cfg.patch_size,
                    image_size: oc.vision_cfg.image_size,
                    mlp_ratio: oc.vision_cfg.mlp_ratio,
                    embed_dim: oc.embed_dim,
                },
                clip_embed_dim: oc.embed_dim,
                resampler: ResamplerConfig {
                    dim: r.dim,
                    depth: r.depth,
                    dim_head: r.dim_head,
                    heads: r.heads,
                    num_queries: r.num_queries,
                    embedding_dim: r.embedding_dim,
                    output_dim: r.output_dim,
                    ff_mult: r.ff_mult,
                    video_length: r.video_length,
                },
                diffusion: DiffusionConfig {
                    parameterization,
                    rescale_betas_zero_snr: p.rescale_betas_zero_snr,
                    linear_start: p.linear_start,
                    linear_end: p.linear_end,
                    timesteps: p.timesteps,
                    use_dynamic_rescale: p.use_dynamic_rescale,
                    base_scale: p.base_scale,
                    turning_step: p.turning_step,
                    scale_factor: p.scale_factor,
                    perframe_ae: p.perframe_ae,
                    fs_kind,
                },
                defaults,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_spec() {
        let c = ModelConfig::preset("1024").unwrap();
        assert_eq!(c.diffusion.base_scale, 0.3);
        assert_eq!(c.unet.default_fs, 10);
        assert_eq!((c.defaults.height, c.defaults.width), (576, 1024));
        assert!(!c.unet.image_cross_attention_scale_learnable);
        let c = ModelConfig::preset("256").unwrap();
        assert_eq!(c.diffusion.parameterization, Parameterization::Eps);
        assert!(c.unet.image_cross_attention_scale_learnable);
        assert_eq!(c.defaults.spacing, TimestepSpacing::Uniform);
        assert_eq!(c.vision.num_tokens(), 257);
        assert_eq!(c.unet.time_embed_dim(), 1280);
        let c = ModelConfig::preset("512_interp").unwrap();
        assert_eq!(c.unet, ModelConfig::dc_512().unet);
        assert_eq!(c.defaults.fs, 5);
        assert!(ModelConfig::preset("2048").is_err());
    }
}
