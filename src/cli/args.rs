//! The flags `generate` and `batch` share, checked once into [`Settings`] before any work.

use anyhow::Result;
use candle_core::Device;
use dynamicrafter_engine::{Mode, ModelConfig, Pipeline, PrecisionPolicy, Request, RgbImage, SamplingOverrides};
use dynamicrafter_video::Format;
use std::path::{Path, PathBuf};

/// The knobs (unset ones take the model's launch-script defaults, upstream `run.sh`) and how
/// many videos to make of each input.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    #[command(flatten)]
    pub knobs: SamplingOverrides,
    /// Videos per input, each a full sampling run with new noise.
    #[arg(long, default_value_t = 1)]
    pub n_samples: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Where and in which precision the model runs: the same flags for `generate`, `batch` and
/// `serve`, resolved by one function.
#[derive(clap::Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Numeric precision: auto, fp32, bf16 or f16 (auto picks the fastest that keeps quality).
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Quantize to int8 as the model loads: q8_0 (a `convert --quantize` file already is).
    #[arg(long)]
    pub quantize: Option<String>,
    /// Device: auto (CUDA when built with it and a GPU is present, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Keep the networks not in use (text and image encoders, VAE) in host memory and move
    /// each to the device for its stage; the UNet stays. Less GPU memory, a little more time.
    #[arg(long)]
    pub offload: bool,
}

impl ComputeArgs {
    pub fn resolve(&self) -> Result<(Device, PrecisionPolicy)> {
        let device = dynamicrafter_engine::device::parse(&self.device).map_err(|e| match e {
            // The engine names the device; the flag names itself.
            dynamicrafter_engine::Error::InvalidInput(m) => anyhow::anyhow!("--{m}"),
            e => e.into(),
        })?;
        let precision = PrecisionPolicy::from_flags(&self.precision, self.quantize.as_deref(), &device)?.with_offload(self.offload);
        Ok((device, precision))
    }
}

/// How results are written and shown.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output format: mp4 (H.264, plays in browsers), gif, or png (a folder of frames).
    #[arg(long, default_value = "mp4")]
    pub format: String,
    /// Frames per second of the written video (upstream always writes 8).
    #[arg(long, default_value_t = 8.0)]
    pub fps: f64,
    /// No progress or stage lines (errors and the final report still print).
    #[arg(long, short)]
    pub quiet: bool,
    /// Also write the run report as JSON to this file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
}

/// The settings of one CLI invocation, checked once before any work.
pub struct Settings {
    pub knobs: SamplingOverrides,
    pub n_samples: usize,
    pub format: Format,
    pub fps: f64,
    pub quiet: bool,
    pub precision: PrecisionPolicy,
    pub device: Device,
}

impl Settings {
    pub fn new(sampling: SamplingArgs, output: &OutputArgs) -> Result<Self> {
        if let Err(e) = sampling.knobs.check_ranges() {
            let flag = dynamicrafter_engine::config::KNOBS.iter().find(|k| k.name == e.knob).map_or(e.knob.as_str(), |k| k.flag);
            anyhow::bail!("--{flag}: {e}");
        }
        let (device, precision) = sampling.compute.resolve()?;
        if sampling.n_samples == 0 {
            anyhow::bail!("--n-samples must be at least 1");
        }
        if !(output.fps.is_finite() && output.fps > 0.0) {
            anyhow::bail!("--fps must be a positive number, got {}", output.fps);
        }
        Ok(Self {
            format: output.format.parse()?,
            fps: output.fps,
            quiet: output.quiet,
            precision,
            device,
            knobs: sampling.knobs,
            n_samples: sampling.n_samples,
        })
    }

    /// Refuses outputs that cannot be written before any work is done.
    pub fn check_output(&self, out: &Path) -> Result<()> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                anyhow::bail!("output folder {} does not exist", dir.display());
            }
        }
        dynamicrafter_video::check_destination(self.format, out)?;
        if self.format != Format::Png && out.is_dir() {
            anyhow::bail!("output {} is a folder; give a file name for --format {}", out.display(), self.format.extension());
        }
        Ok(())
    }

    /// Loads the model with this run's precision policy.
    pub fn load(&self, source: &crate::model_source::ModelSource) -> Result<Pipeline> {
        Ok(Pipeline::load_with(source.config.clone(), &source.weights, &self.device, self.precision.clone())?)
    }

    /// The request of one input: the flags' knobs over the model's defaults for `mode`.
    pub fn request(&self, cfg: &ModelConfig, image: RgbImage, mode: Mode, prompt: &str) -> Request {
        Request::with(cfg, image, mode, prompt, &self.knobs)
    }

    /// `out` for one sample, `<stem>_sample<i>.<ext>` for several.
    pub fn output_paths(&self, out: &Path) -> Vec<PathBuf> {
        let n = self.n_samples;
        if n == 1 {
            return vec![out.to_path_buf()];
        }
        let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = out.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        (0..n).map(|i| out.with_file_name(format!("{stem}_sample{i}{ext}"))).collect()
    }
}
