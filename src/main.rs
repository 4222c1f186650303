//! `dynamicrafter`: the command-line front end. Glue only: it turns arguments into a
//! `Request`, calls `Pipeline::generate`, and writes what comes back.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use dynamicrafter_engine::config::TimestepSpacing;
use dynamicrafter_engine::{ModelConfig, Pipeline, Request, RgbImage, SeededNoise};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

mod bench;

#[derive(Parser)]
#[command(name = "dynamicrafter", version, about = "DynamiCrafter image-to-video generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Animate an image guided by a text prompt; writes the frames as PNG files.
    Generate(GenerateArgs),
    /// Time the networks with random weights (no checkpoint needed).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (config.json + model.safetensors or model.ckpt) or a weight file.
    #[arg(long)]
    model: PathBuf,
    /// Network config: a preset (256, 512, 1024, 512_interp) or a config.json; default: the
    /// model folder's config.json.
    #[arg(long)]
    config: Option<String>,
    /// Input image (PNG, JPEG, WebP, BMP).
    #[arg(long)]
    image: PathBuf,
    /// Text prompt.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Output folder for the frames (frame_000.png, …); created if missing.
    #[arg(long)]
    out: PathBuf,
    /// DDIM steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Text classifier-free guidance scale (1 disables guidance).
    #[arg(long)]
    cfg: Option<f64>,
    /// Image guidance scale; enables the three-pass multi-condition guidance.
    #[arg(long)]
    cfg_img: Option<f64>,
    /// DDIM eta (0 = deterministic).
    #[arg(long)]
    eta: Option<f64>,
    /// Frame stride (256 model) or FPS (512/1024) conditioning.
    #[arg(long)]
    fs: Option<i64>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of frames.
    #[arg(long)]
    frames: Option<usize>,
    /// Output height in pixels.
    #[arg(long)]
    height: Option<usize>,
    /// Output width in pixels.
    #[arg(long)]
    width: Option<usize>,
    /// Guidance rescale φ.
    #[arg(long)]
    guidance_rescale: Option<f64>,
    /// DDIM timestep spacing: uniform or uniform_trailing.
    #[arg(long)]
    spacing: Option<String>,
}

/// Finds the weights and config of `--model`/`--config`.
fn resolve_model(model: &Path, config: Option<&str>) -> Result<(ModelConfig, PathBuf)> {
    let (dir, weights) = if model.is_dir() {
        let w = ["model.safetensors", "model.ckpt"]
            .iter()
            .map(|f| model.join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("{}: no model.safetensors or model.ckpt inside", model.display()))?;
        (Some(model.to_path_buf()), w)
    } else if model.is_file() {
        (None, model.to_path_buf())
    } else {
        bail!("model {}: no such file or folder", model.display());
    };
    let cfg = match (config, &dir) {
        (Some(c), _) if c.ends_with(".json") => ModelConfig::from_json_file(Path::new(c))?,
        (Some(c), _) => ModelConfig::preset(c)?,
        (None, Some(d)) if d.join("config.json").is_file() => ModelConfig::from_json_file(&d.join("config.json"))?,
        _ => bail!("no config for {}: pass --config with a preset ({}) or a config.json", model.display(), ModelConfig::PRESETS.join(", ")),
    };
    Ok((cfg, weights))
}

fn read_image(path: &Path) -> Result<RgbImage> {
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

fn generate(args: GenerateArgs) -> Result<()> {
    let image = read_image(&args.image)?;
    let (cfg, weights) = resolve_model(&args.model, args.config.as_deref())?;
    let device = Device::Cpu;
    let start = Instant::now();
    let pipeline = Pipeline::load(cfg.clone(), &weights, &device)?;
    eprintln!("loaded {} in {:.2?}", weights.display(), start.elapsed());

    let mut req = Request::new(&cfg, image, args.prompt);
    req.steps = args.steps.unwrap_or(req.steps);
    req.cfg_scale = args.cfg.unwrap_or(req.cfg_scale);
    req.cfg_img = args.cfg_img;
    req.eta = args.eta.unwrap_or(req.eta);
    req.fs = args.fs.unwrap_or(req.fs);
    req.frames = args.frames.unwrap_or(req.frames);
    req.height = args.height.unwrap_or(req.height);
    req.width = args.width.unwrap_or(req.width);
    req.guidance_rescale = args.guidance_rescale.unwrap_or(req.guidance_rescale);
    if let Some(s) = &args.spacing {
        req.spacing = s.parse::<TimestepSpacing>()?;
    }
    let seed = args.seed.unwrap_or(cfg.defaults.seed);
    eprintln!("seed {seed}");
    let mut noise = SeededNoise::new(seed, &device);
    let cancel = AtomicBool::new(false);
    let video = pipeline.generate(&req, &mut noise, &mut |p| {
        if p.step > 0 {
            eprintln!("{} {}/{}", p.stage.name(), p.step, p.total);
        }
    }, &cancel)?;
    for (stage, d) in &video.timings {
        eprintln!("{:<12} {:>9.2?}", stage.name(), d);
    }

    // Write into a temporary folder and rename it, so a failed run leaves nothing behind.
    let tmp = args.out.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let frame_len = video.height * video.width * 3;
    for (i, frame) in video.frames_u8.chunks_exact(frame_len).enumerate() {
        let path = tmp.join(format!("frame_{i:03}.png"));
        image::save_buffer(&path, frame, video.width as u32, video.height as u32, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out).with_context(|| format!("replacing {}", args.out.display()))?;
    }
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {} frames to {}", video.frames, args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamicrafter: {e:#}");
            ExitCode::from(2)
        }
    }
}
