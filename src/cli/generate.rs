//! `dynamicrafter generate`: one image (or two keyframes) to one video.

use super::{emit_report, read_image, run_request, OutputArgs, ProgressView, SamplingArgs, Settings};
use crate::model_source;
use anyhow::Result;
use dynamicrafter_engine::Mode;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Input image (PNG, JPEG, WebP or BMP); the first keyframe with --image2.
    #[arg(long)]
    pub image: PathBuf,
    /// Second keyframe: generate the frames between --image and this (interpolation model).
    #[arg(long, conflicts_with = "loop_video")]
    pub image2: Option<PathBuf>,
    /// Make a looping video (interpolation model); the last frame is dropped, as upstream.
    #[arg(long = "loop")]
    pub loop_video: bool,
    /// Text prompt describing the motion.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Model: a preset (256, 512, 1024, 512_interp; downloaded from Hugging Face into its
    /// cache), a model.ckpt / .safetensors file, a folder holding one, or a repo id (owner/name).
    #[arg(long, default_value = "1024")]
    pub model: String,
    /// Network config when the model does not say: a preset name or a config.json.
    #[arg(long)]
    pub config: Option<String>,
    /// Output file (a folder with --format png). Several samples add `_sample<i>` to the name.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let settings = Settings::new(args.sampling.clone(), &args.output)?;
    let image = read_image(&args.image)?;
    let mode = match (&args.image2, args.loop_video) {
        (Some(p), _) => Mode::Interpolate { end: read_image(p)? },
        (None, true) => Mode::Loop,
        (None, false) => Mode::ImageToVideo,
    };
    settings.check_output(&args.out)?;
    // The request is checked against the model's config before anything is downloaded or loaded.
    let spec = model_source::describe(&args.model, args.config.as_deref())?;
    let req = settings.request(&spec.config, image, mode, &args.prompt);
    req.sampling.validate(&spec.config, req.mode.kind()).map_err(|e| anyhow::anyhow!("{}: {}", e.knob, e.message))?;
    let source = spec.fetch()?;
    let mut view = ProgressView::new(settings.quiet);
    view.line(&format!("loading {}", source.weights.display()));
    let start = Instant::now();
    let pipeline = settings.load(&source)?;
    let load_time = start.elapsed();
    let outputs = settings.output_paths(&args.out);
    let report = run_request(&pipeline, &source.name, &settings, &req, &outputs, Some(load_time), &mut view)?;
    emit_report(&report, args.output.report_json.as_deref())
}
