//! What `generate` and `batch` share: the sampling knobs, turning them into a `Request`, progress
//! display, running the pipeline, writing the video and the report.

use anyhow::{Context, Result};
use candle_core::Device;
use dynamicrafter_engine::config::TimestepSpacing;
use dynamicrafter_engine::report::peak_rss_bytes;
use dynamicrafter_engine::pipeline::default_seed;
use dynamicrafter_engine::quant::Quantization;
use dynamicrafter_engine::{Mode, ModelConfig, Pipeline, Precision, PrecisionPolicy, Progress, Report, Request, RgbImage, SeededNoise, Stage};
use dynamicrafter_video::{Format, Frames};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Sampling knobs; unset ones take the model's launch-script defaults (upstream `run.sh`).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// DDIM steps [default: 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Text classifier-free guidance scale; 1 disables guidance [default: 7.5].
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Image guidance scale: enables the three-pass multi-condition guidance (upstream
    /// `--multiple_cond_cfg --cfg_img`).
    #[arg(long)]
    pub cfg_img: Option<f64>,
    /// DDIM eta: 0 is deterministic, 1 adds fresh noise every step [default: 1.0].
    #[arg(long)]
    pub eta: Option<f64>,
    /// Motion conditioning: frame stride for the 256 model (larger = more motion), frames per
    /// second for 512/1024 (smaller = more motion) [default: 3 / 24 / 10, 5 for 512_interp].
    #[arg(long)]
    pub fs: Option<i64>,
    /// Random seed [default: 123; 12306 for 512_interp]. The seed used is always printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of frames [default: 16].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Output height in pixels, a multiple of 64 [default: the model's].
    #[arg(long)]
    pub height: Option<usize>,
    /// Output width in pixels, a multiple of 64 [default: the model's].
    #[arg(long)]
    pub width: Option<usize>,
    /// Guidance rescale φ in [0, 1] [default: 0.7 for 512/1024, 0 for 256].
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// DDIM timestep spacing: uniform or uniform_trailing [default: trailing for 512/1024].
    #[arg(long)]
    pub spacing: Option<String>,
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
}

impl ComputeArgs {
    pub fn resolve(&self) -> Result<(Device, PrecisionPolicy)> {
        let device = parse_device(&self.device)?;
        let precision = precision_policy(&self.precision, self.quantize.as_deref(), &device)?;
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
    pub sampling: SamplingArgs,
    pub format: Format,
    pub fps: f64,
    pub quiet: bool,
    pub precision: PrecisionPolicy,
    pub device: Device,
    pub spacing: Option<TimestepSpacing>,
}

impl Settings {
    pub fn new(sampling: SamplingArgs, output: &OutputArgs) -> Result<Self> {
        let (device, precision) = sampling.compute.resolve()?;
        let spacing = sampling.spacing.as_deref().map(str::parse).transpose()?;
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
            spacing,
            sampling,
        })
    }

    /// Refuses outputs that cannot be written before any work is done.
    pub fn check_output(&self, out: &Path) -> Result<()> {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                anyhow::bail!("output folder {} does not exist", dir.display());
            }
        }
        if self.format != Format::Png && out.is_dir() {
            anyhow::bail!("output {} is a folder; give a file name for --format {}", out.display(), self.format.extension());
        }
        Ok(())
    }

    /// Loads the model with this run's precision policy.
    pub fn load(&self, source: &crate::model::ModelSource) -> Result<Pipeline> {
        Ok(Pipeline::load_with(source.config.clone(), &source.weights, &self.device, self.precision.clone())?)
    }

    /// The user's seed, else the launch script's.
    pub fn seed(&self, cfg: &ModelConfig, mode: &Mode) -> u64 {
        self.sampling.seed.unwrap_or_else(|| default_seed(cfg, mode))
    }

    pub fn request(&self, cfg: &ModelConfig, image: RgbImage, mode: Mode, prompt: &str) -> Request {
        let a = &self.sampling;
        let mut req = Request::new(cfg, image, prompt);
        req.mode = mode;
        req.steps = a.steps.unwrap_or(req.steps);
        req.cfg_scale = a.cfg.unwrap_or(req.cfg_scale);
        req.cfg_img = a.cfg_img;
        req.eta = a.eta.unwrap_or(req.eta);
        req.fs = a.fs.unwrap_or(req.fs);
        req.frames = a.frames.unwrap_or(req.frames);
        req.height = a.height.unwrap_or(req.height);
        req.width = a.width.unwrap_or(req.width);
        req.guidance_rescale = a.guidance_rescale.unwrap_or(req.guidance_rescale);
        req.spacing = self.spacing.unwrap_or(req.spacing);
        req
    }

    /// `out` for one sample, `<stem>_sample<i>.<ext>` for several.
    pub fn output_paths(&self, out: &Path) -> Vec<PathBuf> {
        let n = self.sampling.n_samples;
        if n == 1 {
            return vec![out.to_path_buf()];
        }
        let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = out.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        (0..n).map(|i| out.with_file_name(format!("{stem}_sample{i}{ext}"))).collect()
    }
}

/// `--device`: auto, cpu, cuda or cuda:N (the engine's names, with the flag's name in errors).
fn parse_device(name: &str) -> Result<Device> {
    dynamicrafter_engine::device::parse(name).map_err(|e| match e {
        dynamicrafter_engine::Error::InvalidInput(m) => anyhow::anyhow!("--{m}"),
        e => e.into(),
    })
}

/// The precision policy of `--precision` and `--quantize` on `device`, for every front end.
pub fn precision_policy(precision: &str, quantize: Option<&str>, device: &Device) -> Result<PrecisionPolicy> {
    let quantization = quantize.map(str::parse::<Quantization>).transpose()?;
    Ok(PrecisionPolicy::new(precision.parse::<Precision>()?, device)?.with_quantization(quantization))
}

pub fn read_image(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("image {}", path.display()))?
        .decode()
        .with_context(|| format!("image {}: not a readable image", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(RgbImage::new(w as usize, h as usize, img.into_raw())?)
}

/// A progress bar over denoising steps and a line per stage, on stderr; plain lines when
/// stderr is not a terminal.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    quiet: bool,
    tty: bool,
}

impl ProgressView {
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet, tty: std::io::stderr().is_terminal() }
    }

    pub fn line(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) if self.tty => bar.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    pub fn update(&mut self, p: Progress) {
        if self.quiet {
            return;
        }
        if p.stage != Stage::Denoise {
            self.finish();
            if p.step == 0 {
                self.line(&format!("{}…", p.stage.name()));
            }
            return;
        }
        if p.step == 0 {
            self.finish();
            let bar = ProgressBar::with_draw_target(Some(p.total as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("denoise {bar:30} step {pos}/{len} {per_sec} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(p.step as u64);
            if !self.tty && p.step > 0 {
                eprintln!("denoise step {}/{}", p.step, p.total);
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Where a run's videos go and how they are encoded.
#[derive(Debug, Clone, Copy)]
pub struct VideoOutput {
    pub format: Format,
    pub fps: f64,
}

/// The one generation path of every front end (CLI, batch, server): run the pipeline for `req`
/// with `seed`, write one video per path in `outputs` (one sample each), and return the report.
/// Device and precision come from the loaded pipeline, never from the caller.
#[allow(clippy::too_many_arguments)]
pub fn generate_videos(
    pipeline: &Pipeline,
    model_name: &str,
    req: &Request,
    seed: u64,
    output: VideoOutput,
    outputs: &[PathBuf],
    load_time: Option<Duration>,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<Report> {
    let start = Instant::now();
    let device = dynamicrafter_engine::device::name(pipeline.device());
    let mut report = Report::new(model_name, device, pipeline.precision().name());
    if let Some(d) = load_time {
        report.add("model load", d);
    }
    let mut noise = SeededNoise::new(seed, pipeline.device());
    let videos = pipeline.generate_samples(req, outputs.len(), &mut noise, progress, cancel)?;
    for (video, path) in videos.iter().zip(outputs) {
        report.add_timings(&video.timings);
        let t = Instant::now();
        let frames = Frames::new(&video.frames_u8, video.frames, video.width, video.height)?;
        dynamicrafter_video::write(frames, output.format, output.fps, path)?;
        report.add("video write", t.elapsed());
    }
    report.seed = Some(seed);
    report.frames = videos[0].frames;
    report.width = req.width;
    report.height = req.height;
    report.total_seconds = start.elapsed().as_secs_f64() + load_time.map_or(0.0, |d| d.as_secs_f64());
    report.peak_rss_bytes = peak_rss_bytes();
    report.peak_gpu_bytes = dynamicrafter_engine::device::peak_memory_bytes(pipeline.device());
    Ok(report)
}

/// Runs one CLI request with a progress display; returns the report.
pub fn run_request(
    pipeline: &Pipeline,
    model_name: &str,
    settings: &Settings,
    req: &Request,
    outputs: &[PathBuf],
    load_time: Option<Duration>,
    view: &mut ProgressView,
) -> Result<Report> {
    let seed = settings.seed(pipeline.config(), &req.mode);
    view.line(&format!("seed {seed}"));
    let output = VideoOutput { format: settings.format, fps: settings.fps };
    let cancel = AtomicBool::new(false);
    let report = generate_videos(pipeline, model_name, req, seed, output, outputs, load_time, &mut |p| view.update(p), &cancel);
    view.finish();
    for path in outputs {
        view.line(&format!("wrote {}", path.display()));
    }
    report
}

/// Writes `value` as pretty JSON to a temporary name, then renames it to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Prints the report and writes it as JSON when asked.
pub fn emit_report(report: &Report, json: Option<&Path>) -> Result<()> {
    eprint!("{}", report.to_text());
    match json {
        Some(path) => write_json(path, report),
        None => Ok(()),
    }
}
