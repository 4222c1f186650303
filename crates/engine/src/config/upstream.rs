//! A fixture's `config.json`: upstream's inference YAML as JSON, plus open_clip's model config
//! and the launch settings. The network configs that are 1:1 with upstream's are deserialised
//! directly; the rest is assembled here, and variants the engine does not implement are refused
//! rather than silently computed as something else.

use super::presets::generic_fs_range;
use super::*;
use std::path::Path;

#[derive(Deserialize)]
struct Root {
    name: Option<String>,
    model: Model,
    open_clip_model: OpenClip,
    inference: Option<Inference>,
}

#[derive(Deserialize)]
struct Model {
    params: ModelParams,
}

#[derive(Deserialize)]
struct ModelParams {
    #[serde(flatten)]
    diffusion: DiffusionConfig,
    image_size: Vec<usize>,
    unet_config: Target<UnetParams>,
    first_stage_config: Target<VaeParams>,
    image_proj_stage_config: Target<ResamplerConfig>,
    /// Set (true) in upstream's interpolation training config; the inference configs omit it.
    #[serde(default)]
    interp_mode: Option<bool>,
}

#[derive(Deserialize)]
struct Target<P> {
    params: P,
}

#[derive(Deserialize)]
struct UnetParams {
    #[serde(flatten)]
    config: UnetConfig,
    #[serde(flatten)]
    variant: UnetVariant,
}

/// Switches of upstream's UNet; the engine implements DynamiCrafter's setting of each.
#[derive(Deserialize)]
struct UnetVariant {
    #[serde(default = "yes")]
    use_linear: bool,
    #[serde(default = "yes")]
    temporal_selfatt_only: bool,
    #[serde(default)]
    use_relative_position: bool,
    #[serde(default)]
    use_causal_attention: bool,
    #[serde(default = "yes")]
    image_cross_attention: bool,
    #[serde(default = "yes")]
    fs_condition: bool,
    #[serde(default = "yes")]
    temporal_conv: bool,
    #[serde(default = "yes")]
    temporal_attention: bool,
}

#[derive(Deserialize)]
struct VaeParams {
    embed_dim: usize,
    ddconfig: DdConfig,
}

#[derive(Deserialize)]
struct DdConfig {
    double_z: bool,
    z_channels: usize,
    in_channels: usize,
    out_ch: usize,
    ch: usize,
    ch_mult: Vec<usize>,
    num_res_blocks: usize,
    attn_resolutions: Vec<usize>,
}

#[derive(Deserialize)]
struct OpenClip {
    config: OpenClipConfig,
}

#[derive(Deserialize)]
struct OpenClipConfig {
    embed_dim: usize,
    vision_cfg: VisionCfg,
    text_cfg: ClipTextConfig,
}

#[derive(Deserialize)]
struct VisionCfg {
    image_size: usize,
    layers: usize,
    width: usize,
    #[serde(default = "head_width")]
    head_width: usize,
    patch_size: usize,
    #[serde(default = "mlp_ratio")]
    mlp_ratio: f64,
}

fn head_width() -> usize {
    64
}

/// The launch settings of the reference run.
#[derive(Deserialize)]
struct Inference {
    height: usize,
    width: usize,
    video_length: usize,
    frame_stride: i64,
    ddim_steps: usize,
    ddim_eta: f64,
    unconditional_guidance_scale: f64,
    timestep_spacing: String,
    guidance_rescale: f64,
}

fn unsupported(what: &str) -> Error {
    Error::Config(format!("unsupported setting: {what}"))
}

impl ModelConfig {
    /// Reads a fixture-style `config.json` (the upstream YAML as JSON plus the open_clip config).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: Root = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        raw.into_config()
    }
}

/// The largest size (channels, widths, counts) a config may state.
const MAX_SIZE: usize = 1 << 16;
/// The most resolution levels of the UNet or the VAE.
const MAX_LEVELS: usize = 8;

impl Root {
    fn into_config(self) -> Result<ModelConfig> {
        let p = self.model.params;
        let UnetParams { config: unet, variant: v } = p.unet_config.params;
        if !v.use_linear {
            return Err(unsupported("unet use_linear=false"));
        }
        if !v.temporal_selfatt_only || v.use_relative_position || v.use_causal_attention {
            return Err(unsupported("temporal attention variant"));
        }
        if !v.image_cross_attention || !v.fs_condition || !v.temporal_conv || !v.temporal_attention {
            return Err(unsupported("unet without image cross-attention/fs/temporal layers"));
        }
        let dd = p.first_stage_config.params.ddconfig;
        if !dd.attn_resolutions.is_empty() {
            return Err(unsupported("vae attn_resolutions"));
        }
        let oc = self.open_clip_model.config;
        let r = &p.image_proj_stage_config.params;
        let (vc, tc) = (&oc.vision_cfg, &oc.text_cfg);
        // Sizes the networks are built from: positive, and small enough that no product of them
        // overflows; the level lists short enough to shift by.
        for (name, value) in [
            ("unet in_channels", unet.in_channels),
            ("unet out_channels", unet.out_channels),
            ("unet model_channels", unet.model_channels),
            ("unet num_head_channels", unet.num_head_channels),
            ("unet context_dim", unet.context_dim),
            ("unet temporal_length", unet.temporal_length),
            ("vae in_channels", dd.in_channels),
            ("vae out_ch", dd.out_ch),
            ("vae ch", dd.ch),
            ("vae z_channels", dd.z_channels),
            ("vae embed_dim", p.first_stage_config.params.embed_dim),
            ("vision width", vc.width),
            ("vision head_width", vc.head_width),
            ("vision layers", vc.layers),
            ("vision patch_size", vc.patch_size),
            ("vision image_size", vc.image_size),
            ("text width", tc.width),
            ("text heads", tc.heads),
            ("text layers", tc.layers),
            ("text vocab_size", tc.vocab_size),
            ("resampler dim", r.dim),
            ("resampler heads", r.heads),
            ("resampler dim_head", r.dim_head),
            ("resampler num_queries", r.num_queries),
            ("timesteps", p.diffusion.timesteps),
        ] {
            if !(1..=MAX_SIZE).contains(&value) {
                return Err(Error::Config(format!("{name} must be between 1 and {MAX_SIZE}, got {value}")));
            }
        }
        if !(3..=MAX_SIZE).contains(&tc.context_length) {
            return Err(Error::Config(format!("text context_length must be between 3 and {MAX_SIZE}, got {}", tc.context_length)));
        }
        for (name, mult) in [("unet channel_mult", &unet.channel_mult), ("vae ch_mult", &dd.ch_mult)] {
            if mult.is_empty() || mult.len() > MAX_LEVELS || mult.iter().any(|&m| !(1..=64).contains(&m)) {
                return Err(Error::Config(format!("{name} must list 1 to {MAX_LEVELS} factors between 1 and 64, got {mult:?}")));
            }
        }
        if p.image_size.iter().any(|&s| s > MAX_SIZE) {
            return Err(Error::Config(format!("image_size must be at most {MAX_SIZE}, got {:?}", p.image_size)));
        }
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
        let diffusion = p.diffusion;
        let v_model = diffusion.parameterization == Parameterization::V;
        let defaults = match self.inference {
            Some(i) => Sampling {
                sampler: Default::default(),
                karras: false,
                steps: i.ddim_steps,
                cfg_scale: i.unconditional_guidance_scale,
                cfg_img: None,
                eta: i.ddim_eta,
                fs: i.frame_stride,
                seed: 123,
                frames: i.video_length,
                window_stride: 4,
                noise_reschedule: false,
                height: i.height,
                width: i.width,
                guidance_rescale: i.guidance_rescale,
                spacing: i.timestep_spacing.parse()?,
            },
            None => Sampling::launch_script(
                p.image_size.first().copied().unwrap_or(32) * factor,
                p.image_size.get(1).copied().unwrap_or(32) * factor,
                unet.temporal_length,
                unet.default_fs,
                v_model,
            ),
        };
        let (lo, hi) = generic_fs_range(diffusion.fs_kind);
        Ok(ModelConfig {
            name: self.name.unwrap_or_else(|| "custom".into()),
            vision: ClipVisionConfig {
                width: oc.vision_cfg.width,
                heads: oc.vision_cfg.width / oc.vision_cfg.head_width,
                layers: oc.vision_cfg.layers,
                patch_size: oc.vision_cfg.patch_size,
                image_size: oc.vision_cfg.image_size,
                mlp_ratio: oc.vision_cfg.mlp_ratio,
                embed_dim: oc.embed_dim,
            },
            text: oc.text_cfg,
            clip_embed_dim: oc.embed_dim,
            resampler: p.image_proj_stage_config.params,
            fs_range: (lo.min(defaults.fs), hi.max(defaults.fs)),
            loop_seed: None,
            interpolation: p.interp_mode,
            unet,
            vae,
            diffusion,
            defaults,
        })
    }
}
