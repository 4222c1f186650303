//! The official checkpoints: their network configs (`configs/inference_*_v1.0.yaml`), the
//! launch scripts' settings (`run.sh`, `run_application.sh`), the demo's motion range and where
//! each is published (`docs/spec/configs.md`).

use super::*;

/// An official DynamiCrafter checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    Dc256,
    Dc512,
    Dc1024,
    /// The interpolation/looping checkpoint (the 512 network).
    Dc512Interp,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Dc256, Preset::Dc512, Preset::Dc1024, Preset::Dc512Interp];

    /// The name users give (`--model 1024`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Dc256 => "256",
            Preset::Dc512 => "512",
            Preset::Dc1024 => "1024",
            Preset::Dc512Interp => "512_interp",
        }
    }

    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Upstream's Hugging Face repository.
    pub fn repo(self) -> &'static str {
        match self {
            Preset::Dc256 => "Doubiiu/DynamiCrafter",
            Preset::Dc512 => "Doubiiu/DynamiCrafter_512",
            Preset::Dc1024 => "Doubiiu/DynamiCrafter_1024",
            Preset::Dc512Interp => "Doubiiu/DynamiCrafter_512_Interp",
        }
    }

    pub fn from_repo(repo: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.repo() == repo)
    }

    /// The names of all presets, for messages.
    pub fn names() -> String {
        Preset::ALL.map(Preset::name).join(", ")
    }

    pub fn config(self) -> ModelConfig {
        match self {
            Preset::Dc256 => official("256", false),
            Preset::Dc512 => v_model("512", (320, 512), 24, (15, 30)),
            Preset::Dc1024 => {
                let mut c = v_model("1024", (576, 1024), 10, (5, 20));
                c.diffusion.base_scale = 0.3;
                c
            }
            Preset::Dc512Interp => {
                let mut c = Preset::Dc512.config();
                c.name = "512_interp".into();
                c.defaults.fs = 5;
                c.defaults.seed = 12306;
                c.fs_range = (5, 30);
                c.loop_seed = Some(234);
                c.interpolation = Some(true);
                c
            }
        }
    }
}

impl ModelConfig {
    pub fn preset(name: &str) -> Result<Self> {
        Preset::from_name(name)
            .map(Preset::config)
            .ok_or_else(|| Error::Config(format!("unknown preset '{name}' (expected one of {})", Preset::names())))
    }
}

/// What upstream's demo offers for the motion control of a model whose `fs` means `kind`, when
/// it is not one of the presets.
pub(super) fn generic_fs_range(kind: FsKind) -> (i64, i64) {
    match kind {
        FsKind::FrameStride => (1, 8),
        FsKind::Fps => (5, 30),
    }
}

/// A model of the 512/1024 family at its `(height, width)`, with its default `fs` and the
/// demo's motion range.
fn v_model(name: &str, (height, width): (usize, usize), fs: i64, fs_range: (i64, i64)) -> ModelConfig {
    let mut c = official(name, true);
    c.unet.default_fs = fs;
    c.defaults.height = height;
    c.defaults.width = width;
    c.defaults.fs = fs;
    c.fs_range = fs_range;
    c
}

/// The networks and settings the official checkpoints share: the 256 model's (eps) or the
/// 512/1024 family's (v-prediction, zero SNR).
fn official(name: &str, v_model: bool) -> ModelConfig {
    ModelConfig {
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
        vae: VaeConfig { in_channels: 3, out_ch: 3, ch: 128, ch_mult: vec![1, 2, 4, 4], num_res_blocks: 2, z_channels: 4, embed_dim: 4, double_z: true },
        text: ClipTextConfig { width: 1024, heads: 16, layers: 24, vocab_size: 49408, context_length: 77, mlp_ratio: 4.0 },
        vision: ClipVisionConfig { width: 1280, heads: 16, layers: 32, patch_size: 14, image_size: 224, mlp_ratio: 4.0, embed_dim: 1024 },
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
        defaults: Sampling::launch_script(256, 256, 16, 3, v_model),
        fs_range: if v_model { (5, 30) } else { (1, 4) },
        loop_seed: None,
        interpolation: Some(false),
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
        assert_eq!(c.unet, Preset::Dc512.config().unet);
        assert_eq!(c.defaults.fs, 5);
        assert!(ModelConfig::preset("2048").is_err());
    }

    #[test]
    fn names_and_repos_round_trip() {
        for p in Preset::ALL {
            assert_eq!(Preset::from_name(p.name()), Some(p));
            assert_eq!(Preset::from_repo(p.repo()), Some(p));
            assert_eq!(p.config().name, p.name());
            let (lo, hi) = p.config().fs_range;
            assert!(lo <= p.config().defaults.fs && p.config().defaults.fs <= hi, "{}", p.name());
        }
        assert_eq!(Preset::Dc512Interp.config().defaults_for(ModeKind::Loop).seed, 234);
        assert_eq!(Preset::Dc512Interp.config().defaults_for(ModeKind::Interpolate).seed, 12306);
        assert_eq!(Preset::Dc1024.config().defaults_for(ModeKind::Loop).seed, 123);
    }
}
