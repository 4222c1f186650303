//! The knobs of one generation, each defined once in [`knobs!`] below. From that one list come
//! [`Sampling`] (every knob's value: a model's defaults, a request's settings),
//! [`SamplingOverrides`] (the knobs a user set: the CLI's flags derive from it, the API's form
//! fills it), and [`KNOBS`] (name, flag, help, valid range, what the API and the page offer),
//! which the validation, the API's form parser, its OpenAPI document and the page's controls
//! read. A new knob is one entry there.

use super::{ModeKind, ModelConfig, TimestepSpacing};
use crate::samplers::SamplerKind;
use serde::{Deserialize, Serialize};

/// The values a knob may take: `min..=max` in steps of `step` (1: whole numbers).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Range {
    pub min: f64,
    pub max: f64,
    pub step: f64,
}

impl Range {
    pub const fn new(min: f64, max: f64, step: f64) -> Self {
        Self { min, max, step }
    }

    /// `v` if it is in range (and whole, for a step of 1); else an error naming `knob`.
    pub fn check(&self, knob: &str, v: f64) -> Result<f64, KnobError> {
        if !(v.is_finite() && v >= self.min && v <= self.max) {
            return Err(KnobError::new(knob, format!("{knob} must be between {} and {}, got {v}", self.min, self.max)));
        }
        if self.step == 1.0 && v.fract() != 0.0 {
            return Err(KnobError::new(knob, format!("{knob} must be a whole number, got {v}")));
        }
        Ok(v)
    }
}

/// What the API and the page offer of a knob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ui {
    /// The range of upstream's demo (Gradio) control.
    Fixed(Range),
    /// The model's motion range ([`ModelConfig::fs_range`]).
    ModelFs,
    /// 1 to the model's temporal window ([`ModelConfig::window`]).
    ModelWindow,
    /// One of the knob's named values ([`Knob::choices`]).
    Choice,
}

/// One knob, as the front ends and the OpenAPI document see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knob {
    /// The field name (API, JSON, report).
    pub name: &'static str,
    /// The command-line flag, without `--`.
    pub flag: &'static str,
    pub help: &'static str,
    /// Whole numbers only.
    pub integer: bool,
    /// A knob that takes one of these names instead of a number.
    pub choices: Option<&'static [&'static str]>,
    /// Values the engine runs; `None`: every value of the type.
    pub range: Option<Range>,
    /// `Some`: the API takes it (and the page shows it) within this range.
    pub ui: Option<Ui>,
}

impl Knob {
    /// The range the API accepts for this knob on the model `cfg`.
    pub fn ui_range(&self, cfg: &ModelConfig) -> Option<Range> {
        match self.ui? {
            Ui::Fixed(r) => Some(r),
            Ui::ModelFs => Some(Range::new(cfg.fs_range.0 as f64, cfg.fs_range.1 as f64, 1.0)),
            Ui::ModelWindow => Some(Range::new(1.0, cfg.window() as f64, 1.0)),
            Ui::Choice => None,
        }
    }
}

/// A knob with a value it does not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnobError {
    pub knob: String,
    pub message: String,
}

impl KnobError {
    pub fn new(knob: &str, message: String) -> Self {
        Self { knob: knob.to_string(), message }
    }
}

impl std::fmt::Display for KnobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A knob's value type: how it shows as a number (range checks) and reads from one (the API),
/// or, for a knob of named values, from and as its name.
pub trait KnobValue: Copy {
    const INTEGER: bool;
    const CHOICES: Option<&'static [&'static str]> = None;
    fn to_number(self) -> Option<f64>;
    fn from_number(v: f64) -> Option<Self>;
    fn to_choice(self) -> Option<&'static str> {
        None
    }
    fn from_choice(_: &str) -> Option<Self> {
        None
    }
}

macro_rules! whole_number {
    ($($t:ty),*) => {$(
        impl KnobValue for $t {
            const INTEGER: bool = true;
            fn to_number(self) -> Option<f64> {
                Some(self as f64)
            }
            fn from_number(v: f64) -> Option<Self> {
                (v.fract() == 0.0 && v >= <$t>::MIN as f64 && v <= <$t>::MAX as f64).then_some(v as $t)
            }
        }
    )*};
}
whole_number!(usize, u64, i64);

impl KnobValue for f64 {
    const INTEGER: bool = false;
    fn to_number(self) -> Option<f64> {
        Some(self)
    }
    fn from_number(v: f64) -> Option<Self> {
        Some(v)
    }
}

/// Unset: nothing to check.
impl KnobValue for Option<f64> {
    const INTEGER: bool = false;
    fn to_number(self) -> Option<f64> {
        self
    }
    fn from_number(v: f64) -> Option<Self> {
        Some(Some(v))
    }
}

impl KnobValue for SamplerKind {
    const INTEGER: bool = false;
    const CHOICES: Option<&'static [&'static str]> = Some(&SamplerKind::NAMES);
    fn to_number(self) -> Option<f64> {
        None
    }
    fn from_number(_: f64) -> Option<Self> {
        None
    }
    fn to_choice(self) -> Option<&'static str> {
        Some(self.name())
    }
    fn from_choice(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl KnobValue for bool {
    const INTEGER: bool = false;
    const CHOICES: Option<&'static [&'static str]> = Some(&["false", "true"]);
    fn to_number(self) -> Option<f64> {
        None
    }
    fn from_number(_: f64) -> Option<Self> {
        None
    }
    fn to_choice(self) -> Option<&'static str> {
        Some(if self { "true" } else { "false" })
    }
    fn from_choice(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" | "yes" => Some(true),
            "false" | "off" | "0" | "no" => Some(false),
            _ => None,
        }
    }
}

impl KnobValue for TimestepSpacing {
    const INTEGER: bool = false;
    fn to_number(self) -> Option<f64> {
        None
    }
    fn from_number(_: f64) -> Option<Self> {
        None
    }
}

/// `name: Type => SetType, "flag", range, ui;` per knob: `Type` is the value in [`Sampling`],
/// `SetType` what a user gives (the flag's and the API field's type; `Type: From<SetType>`);
/// `#[arg(…)]` lines after the docs go to the CLI flag.
macro_rules! knobs {
    ($(
        $(#[doc = $doc:literal])+
        $(#[arg($($arg:tt)*)])*
        $name:ident: $ty:ty => $set:ty, $flag:literal, range: $range:expr, ui: $ui:expr;
    )+) => {
        /// Every knob of one generation (a job's settings as a shared queue carries them).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct Sampling {
            $($(#[doc = $doc])+ pub $name: $ty,)+
        }

        /// The knobs a user set; the rest take the model's defaults ([`Sampling::apply`]).
        #[derive(Debug, Clone, Default, PartialEq)]
        #[cfg_attr(feature = "cli", derive(clap::Args))]
        pub struct SamplingOverrides {
            $($(#[doc = $doc])+ #[cfg_attr(feature = "cli", arg(long = $flag $(, $($arg)*)*))] pub $name: Option<$set>,)+
        }

        /// Every knob, in [`Sampling`]'s order.
        pub const KNOBS: &[Knob] = &[$(
            Knob {
                name: stringify!($name),
                flag: $flag,
                help: concat!($($doc),+),
                integer: <$set as KnobValue>::INTEGER,
                choices: <$set as KnobValue>::CHOICES,
                range: $range,
                ui: $ui,
            },
        )+];

        impl Sampling {
            /// Sets every knob `overrides` has.
            pub fn apply(&mut self, overrides: &SamplingOverrides) {
                $(if let Some(v) = overrides.$name {
                    self.$name = v.into();
                })+
            }

            /// Knob `name`'s value as a number (`None` for one that is not, or is unset).
            pub fn number(&self, name: &str) -> Option<f64> {
                match name {
                    $(stringify!($name) => KnobValue::to_number(self.$name),)+
                    _ => None,
                }
            }

            /// Knob `name`'s value by name (knobs of named values).
            pub fn choice(&self, name: &str) -> Option<&'static str> {
                match name {
                    $(stringify!($name) => KnobValue::to_choice(self.$name),)+
                    _ => None,
                }
            }
        }

        impl SamplingOverrides {
            /// Knob `name`'s value as a number, if set and a number.
            pub fn number(&self, name: &str) -> Option<f64> {
                match name {
                    $(stringify!($name) => self.$name.and_then(KnobValue::to_number),)+
                    _ => None,
                }
            }

            /// Sets knob `name` from a number (the API's form); false for an unknown knob or one
            /// that is not a number of its type.
            pub fn set_number(&mut self, name: &str, v: f64) -> bool {
                match name {
                    $(stringify!($name) => {
                        self.$name = <$set as KnobValue>::from_number(v);
                        self.$name.is_some()
                    })+
                    _ => false,
                }
            }

            /// Sets knob `name` from one of its names (the API's form); false for an unknown
            /// knob or name.
            pub fn set_choice(&mut self, name: &str, v: &str) -> bool {
                match name {
                    $(stringify!($name) => {
                        self.$name = <$set as KnobValue>::from_choice(v);
                        self.$name.is_some()
                    })+
                    _ => false,
                }
            }
        }
    };
}

const GRADIO_STEPS: Range = Range::new(1.0, 60.0, 1.0);
const GRADIO_CFG: Range = Range::new(1.0, 15.0, 0.5);
const GRADIO_ETA: Range = Range::new(0.0, 1.0, 0.1);
const GRADIO_SEED: Range = Range::new(0.0, 2147483648.0, 1.0);
// Upstream's demo has no frame count; the API's bound keeps one job's run and its video bounded.
const API_FRAMES: Range = Range::new(1.0, 128.0, 1.0);

// The ranges the API offers are upstream Gradio's controls (docs/spec/interfaces.md §2); the
// engine's are what runs and stays bounded.
knobs! {
    /// Sampler: ddim (upstream's), euler, euler-ancestral, dpmpp-2m, dpmpp-2m-sde or unipc
    /// [default: ddim]. DPM-Solver++ and UniPC are reported to reach DDIM-50 quality on
    /// latent-diffusion models in about 15–25 steps.
    sampler: SamplerKind => SamplerKind, "sampler", range: None, ui: Some(Ui::Choice);
    /// Karras noise levels (ρ = 7) for the samplers other than ddim [default: off].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    karras: bool => bool, "karras", range: None, ui: Some(Ui::Choice);
    /// Sampling steps: model calls per sample [default: 50].
    steps: usize => usize, "steps", range: Some(Range::new(1.0, 1000.0, 1.0)), ui: Some(Ui::Fixed(GRADIO_STEPS));
    /// Text classifier-free guidance scale; 1 disables guidance [default: 7.5].
    cfg_scale: f64 => f64, "cfg", range: Some(Range::new(0.0, 50.0, 0.0)), ui: Some(Ui::Fixed(GRADIO_CFG));
    /// Image guidance scale: enables the three-pass multi-condition guidance (upstream
    /// `--multiple_cond_cfg --cfg_img`).
    cfg_img: Option<f64> => f64, "cfg-img", range: Some(Range::new(0.0, 50.0, 0.0)), ui: None;
    /// DDIM eta: 0 is deterministic, 1 adds fresh noise every step [default: 1.0]; only ddim
    /// reads it.
    eta: f64 => f64, "eta", range: Some(Range::new(0.0, 1.0, 0.0)), ui: Some(Ui::Fixed(GRADIO_ETA));
    /// Motion conditioning: frame stride for the 256 model (larger = more motion), frames per
    /// second for 512/1024 (smaller = more motion) [default: 3 / 24 / 10, 5 for 512_interp].
    fs: i64 => i64, "fs", range: Some(Range::new(1.0, 120.0, 1.0)), ui: Some(Ui::ModelFs);
    /// Random seed [default: 123; 12306 for 512_interp, 234 for its loops]. The seed used is
    /// always printed.
    seed: u64 => u64, "seed", range: None, ui: Some(Ui::Fixed(GRADIO_SEED));
    /// Number of frames [default: 16, the model's window]. More: sliding windows of the
    /// model's length (image-to-video); fewer: the whole window runs and evenly spaced frames
    /// are kept.
    frames: usize => usize, "frames", range: Some(Range::new(1.0, 256.0, 1.0)), ui: Some(Ui::Fixed(API_FRAMES));
    /// Frames between the starts of sliding windows when frames exceed the model's window
    /// [default: 4].
    window_stride: usize => usize, "window-stride", range: Some(Range::new(1.0, 64.0, 1.0)), ui: Some(Ui::ModelWindow);
    /// FreeNoise rescheduling for long videos: each stride of frames past the first window
    /// starts from the shuffled noise of the frames a window earlier [default: off].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    noise_reschedule: bool => bool, "noise-reschedule", range: None, ui: Some(Ui::Choice);
    /// Output height in pixels, a multiple of 64 [default: the model's].
    height: usize => usize, "height", range: Some(Range::new(1.0, 2048.0, 1.0)), ui: None;
    /// Output width in pixels, a multiple of 64 [default: the model's].
    width: usize => usize, "width", range: Some(Range::new(1.0, 2048.0, 1.0)), ui: None;
    /// Guidance rescale φ in [0, 1] [default: 0.7 for 512/1024, 0 for 256].
    guidance_rescale: f64 => f64, "guidance-rescale", range: Some(Range::new(0.0, 1.0, 0.0)), ui: None;
    /// DDIM timestep spacing [default: uniform_trailing for 512/1024, uniform for 256].
    spacing: TimestepSpacing => TimestepSpacing, "spacing", range: None, ui: None;
}

fn check_karras(sampler: SamplerKind) -> Result<(), KnobError> {
    if sampler == SamplerKind::Ddim {
        return Err(KnobError::new("karras", "karras noise levels apply to euler, euler-ancestral, dpmpp-2m, dpmpp-2m-sde and unipc, not ddim (its timesteps are upstream's); choose another sampler".into()));
    }
    Ok(())
}

impl SamplingOverrides {
    /// Every knob that is set within its range (what can be checked before a model is known);
    /// the error names the knob.
    pub fn check_ranges(&self) -> Result<(), KnobError> {
        for knob in KNOBS {
            if let (Some(range), Some(v)) = (knob.range, self.number(knob.name)) {
                range.check(knob.name, v)?;
            }
        }
        // Every model samples with DDIM unless told otherwise.
        if self.karras == Some(true) {
            check_karras(self.sampler.unwrap_or_default())?;
        }
        Ok(())
    }
}

impl Sampling {
    /// The sampler and its schedule in words, e.g. `dpmpp-2m karras, 20 steps` or
    /// `ddim eta 1, 50 steps`.
    pub fn sampler_summary(&self) -> String {
        let detail = match self.sampler {
            SamplerKind::Ddim => format!(" eta {}", self.eta),
            _ if self.karras => " karras".to_string(),
            _ => String::new(),
        };
        format!("{}{detail}, {} step{}", self.sampler, self.steps, if self.steps == 1 { "" } else { "s" })
    }

    /// What `run.sh` uses for a model of the 256 (eps) or the 512/1024 (v) family at `height ×
    /// width`, `frames` frames and motion `fs`: 50 DDIM steps, CFG 7.5, eta 1, seed 123, no
    /// image guidance; trailing spacing and guidance rescale 0.7 for v models.
    pub fn launch_script(height: usize, width: usize, frames: usize, fs: i64, v_model: bool) -> Self {
        Self {
            sampler: SamplerKind::Ddim,
            karras: false,
            steps: 50,
            cfg_scale: 7.5,
            cfg_img: None,
            eta: 1.0,
            fs,
            seed: 123,
            frames,
            window_stride: 4,
            noise_reschedule: false,
            height,
            width,
            guidance_rescale: if v_model { 0.7 } else { 0.0 },
            spacing: if v_model { TimestepSpacing::UniformTrailing } else { TimestepSpacing::Uniform },
        }
    }

    /// Every knob in its range, the size a multiple of what the model `cfg` divides it by, and
    /// a frame for each keyframe of `mode`.
    pub fn validate(&self, cfg: &ModelConfig, mode: ModeKind) -> Result<(), KnobError> {
        if !cfg.supports(mode) {
            return Err(KnobError::new(
                "mode",
                format!("mode '{}' needs a model trained for two keyframes (the 512_interp model); '{}' was not", mode.name(), cfg.name),
            ));
        }
        for knob in KNOBS {
            if let (Some(range), Some(v)) = (knob.range, self.number(knob.name)) {
                range.check(knob.name, v)?;
            }
        }
        let multiple = cfg.size_multiple();
        if !self.height.is_multiple_of(multiple) || !self.width.is_multiple_of(multiple) {
            let knob = if self.height.is_multiple_of(multiple) { "width" } else { "height" };
            return Err(KnobError::new(knob, format!("height and width must be positive multiples of {multiple}, got {}×{}", self.height, self.width)));
        }
        if self.karras {
            check_karras(self.sampler)?;
        }
        crate::pipeline::FramePlan::new(self, mode, cfg.window())?;
        if self.frames < mode.keyframes() {
            return Err(KnobError::new("frames", format!("frames must be at least {} for {}, got {}", mode.keyframes(), mode.name(), self.frames)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keyframe modes are refused (naming `mode`) on the image-to-video presets, taken by the
    /// interpolation preset, and by a config that does not say, unless it says `interp_mode`.
    #[test]
    fn keyframe_modes_follow_what_the_model_was_trained_for() {
        use super::super::presets::Preset;
        for (cfg, taken) in [(Preset::Dc256.config(), false), (Preset::Dc1024.config(), false), (Preset::Dc512Interp.config(), true)] {
            for mode in [ModeKind::Interpolate, ModeKind::Loop] {
                let r = cfg.defaults_for(mode).validate(&cfg, mode);
                assert_eq!(r.is_ok(), taken, "{} {}", cfg.name, mode.name());
                if let Err(e) = r {
                    assert_eq!(e.knob, "mode");
                    assert!(e.message.contains(mode.name()) && e.message.contains(&cfg.name), "{}", e.message);
                }
            }
            assert!(cfg.defaults.validate(&cfg, ModeKind::ImageToVideo).is_ok());
        }
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-v/config.json");
        let text = std::fs::read_to_string(fixture).unwrap();
        let unsaid = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(unsaid.interpolation, None);
        assert!(unsaid.supports(ModeKind::Loop) && unsaid.supports(ModeKind::Interpolate));
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["model"]["params"]["interp_mode"] = false.into();
        let said = ModelConfig::from_json_str(&json.to_string()).unwrap();
        assert_eq!(said.interpolation, Some(false));
        assert!(!said.supports(ModeKind::Loop) && said.supports(ModeKind::ImageToVideo));
    }

    #[test]
    fn overrides_apply_and_ranges_hold() {
        let cfg = super::super::presets::Preset::Dc256.config();
        let mut s = cfg.defaults.clone();
        assert!(s.validate(&cfg, ModeKind::ImageToVideo).is_ok());
        let o = SamplingOverrides { steps: Some(7), cfg_img: Some(2.0), spacing: Some(TimestepSpacing::UniformTrailing), ..Default::default() };
        s.apply(&o);
        assert_eq!((s.steps, s.cfg_img, s.spacing), (7, Some(2.0), TimestepSpacing::UniformTrailing));
        assert_eq!(s.number("steps"), Some(7.0));
        assert_eq!(s.number("spacing"), None);
        for (bad, knob) in [
            (Sampling { steps: 0, ..s.clone() }, "steps"),
            (Sampling { cfg_scale: f64::NAN, ..s.clone() }, "cfg_scale"),
            (Sampling { eta: -1.0, ..s.clone() }, "eta"),
            (Sampling { frames: 257, ..s.clone() }, "frames"),
            (Sampling { window_stride: 0, ..s.clone() }, "window_stride"),
            (Sampling { height: 100, ..s.clone() }, "height"),
            (Sampling { width: 4096, ..s.clone() }, "width"),
            (Sampling { cfg_img: Some(1e308), ..s.clone() }, "cfg_img"),
        ] {
            let e = bad.validate(&cfg, ModeKind::ImageToVideo).unwrap_err();
            assert_eq!(e.knob, knob, "{e}");
            assert!(e.message.contains(knob.split('_').next().unwrap()), "{e}");
        }
        let interp = super::super::presets::Preset::Dc512Interp.config();
        assert_eq!(Sampling { frames: 1, ..interp.defaults.clone() }.validate(&interp, ModeKind::Loop).unwrap_err().knob, "frames");
        let mut o = SamplingOverrides::default();
        assert!(o.set_number("steps", 3.0) && o.steps == Some(3));
        assert!(!o.set_number("steps", 2.5) && o.steps.is_none());
        assert!(!o.set_number("spacing", 1.0));
        assert!(!o.set_number("colour", 1.0));
        assert!(KNOBS.iter().all(|k| k.help.len() > 10));
        // Knobs of named values: the sampler and Karras levels.
        assert!(o.set_choice("sampler", "DPMPP_2M") && o.sampler == Some(SamplerKind::DpmPp2m));
        assert!(!o.set_choice("sampler", "heun") && o.sampler.is_none());
        assert!(o.set_choice("karras", "true") && o.karras == Some(true));
        assert_eq!(o.check_ranges().unwrap_err().knob, "karras", "karras with the default sampler, ddim");
        assert!(!o.set_number("sampler", 1.0));
        assert!(o.set_choice("sampler", "unipc") && o.check_ranges().is_ok());
        let mut k = cfg.defaults.clone();
        assert_eq!((k.sampler, k.karras, k.choice("sampler"), k.choice("steps")), (SamplerKind::Ddim, false, Some("ddim"), None));
        k.apply(&o);
        assert_eq!(k.sampler_summary(), "unipc karras, 50 steps");
        assert!(k.validate(&cfg, ModeKind::ImageToVideo).is_ok());
        k.sampler = SamplerKind::Ddim;
        assert_eq!(k.validate(&cfg, ModeKind::ImageToVideo).unwrap_err().knob, "karras");
        assert_eq!(KNOBS.iter().find(|k| k.name == "sampler").unwrap().choices, Some(&SamplerKind::NAMES[..]));
        assert_eq!(KNOBS.iter().find(|k| k.name == "fs").unwrap().ui_range(&cfg), Some(Range::new(1.0, 4.0, 1.0)));
    }
}
