//! `dynamicrafter batch`: upstream `run.sh` semantics over a folder of images and a prompt file.

use super::{read_image, run_request, write_json, OutputArgs, ProgressView, SamplingArgs, Settings};
use crate::model_source;
use anyhow::{bail, Context, Result};
use dynamicrafter_engine::Mode;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// Folder with images (jpg, jpeg, png, any case) and a .txt prompt file: the i-th image in
    /// name order goes with the i-th non-empty line of the first .txt file.
    #[arg(long)]
    pub prompt_dir: PathBuf,
    /// Output folder; videos are named `<image name before the first '.'>_sample<i>.<ext>`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Interpolation: images are taken in pairs (2i, 2i+1) with prompt i.
    #[arg(long, conflicts_with = "loop_video")]
    pub interp: bool,
    /// Looping videos (last frame dropped).
    #[arg(long = "loop")]
    pub loop_video: bool,
    /// Model (see `generate --help`).
    #[arg(long, default_value = "1024")]
    pub model: String,
    /// Network config when the model does not say: a preset name or a config.json.
    #[arg(long)]
    pub config: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One unit of work: keyframe image(s), prompt, output stem.
struct Item {
    images: Vec<PathBuf>,
    prompt: Option<String>,
    stem: String,
}

fn list_inputs(dir: &Path, interp: bool) -> Result<Vec<Item>> {
    let mut images = Vec::new();
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("prompt dir {}", dir.display()))? {
        let path = entry?.path();
        let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        // Upstream globs *.jpg, *.png, *.jpeg, *.JPEG, *.PNG.
        if matches!(ext.as_str(), "jpg" | "png" | "jpeg" | "JPEG" | "PNG") {
            images.push(path);
        } else if ext == "txt" {
            texts.push(path);
        }
    }
    images.sort();
    texts.sort();
    let prompts: Vec<String> = match texts.first() {
        Some(t) => std::fs::read_to_string(t)
            .with_context(|| format!("prompt file {}", t.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => bail!("prompt dir {}: no .txt prompt file", dir.display()),
    };
    if images.is_empty() {
        bail!("prompt dir {}: no images (jpg, jpeg, png)", dir.display());
    }
    let group = if interp { 2 } else { 1 };
    let mut items: Vec<Item> = images
        .chunks(group)
        .enumerate()
        .map(|(i, imgs)| {
            let name = imgs[0].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Item {
                images: imgs.to_vec(),
                prompt: prompts.get(i).cloned(),
                stem: name.split('.').next().unwrap_or_default().to_string(),
            }
        })
        .collect();
    distinct_stems(&mut items)?;
    Ok(items)
}

/// Upstream names a result after its image's name up to the first dot, so `cat.png`,
/// `cat.jpg` and `cat.v2.png` would all write `cat_sample0.mp4`, each over the last. Items
/// whose stems collide take their whole file name instead (dots as underscores: `cat_png`);
/// any collision left is refused before work starts.
fn distinct_stems(items: &mut [Item]) -> Result<()> {
    let count = |items: &[Item], stem: &str| items.iter().filter(|i| i.stem == stem).count();
    let colliding: Vec<usize> = (0..items.len()).filter(|&i| count(items, &items[i].stem) > 1).collect();
    for i in colliding {
        let name = items[i].images[0].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        items[i].stem = name.replace('.', "_");
    }
    if let Some(item) = items.iter().find(|i| count(items, &i.stem) > 1) {
        let names: Vec<String> = items.iter().filter(|i| i.stem == item.stem).map(|i| i.images[0].display().to_string()).collect();
        bail!("images {} would write the same output name '{}'; rename one", names.join(", "), item.stem);
    }
    Ok(())
}

/// Returns whether every item succeeded.
pub fn run(args: BatchArgs) -> Result<bool> {
    let settings = Settings::new(args.sampling.clone(), &args.output)?;
    let items = list_inputs(&args.prompt_dir, args.interp)?;
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("output folder {}", args.out_dir.display()))?;
    let source = model_source::resolve(&args.model, args.config.as_deref())?;
    let mut view = ProgressView::new(settings.quiet);
    let start = Instant::now();
    let pipeline = settings.load(&source)?;
    let mut load_time = Some(start.elapsed());
    let mut reports = Vec::new();
    let mut failed = 0;
    let ext = settings.format.extension();
    for (i, item) in items.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, items.len(), item.stem);
        let result = (|| -> Result<_> {
            let prompt = item.prompt.as_deref().context("no prompt line for this image")?;
            let image = read_image(&item.images[0])?;
            let mode = if args.interp {
                let end = item.images.get(1).context("interpolation needs an even number of images")?;
                Mode::Interpolate { end: read_image(end)? }
            } else if args.loop_video {
                Mode::Loop
            } else {
                Mode::ImageToVideo
            };
            let req = settings.request(&source.config, image, mode, prompt);
            let outputs: Vec<PathBuf> = (0..settings.n_samples)
                .map(|s| args.out_dir.join(format!("{}_sample{s}.{ext}", item.stem)))
                .collect();
            view.line(&format!("{label}: {prompt}"));
            run_request(&pipeline, &source.name, &settings, &req, &outputs, load_time.take(), &mut view)
        })();
        match result {
            Ok(report) => {
                eprint!("{}", report.to_text());
                reports.push(report);
            }
            Err(e) => {
                failed += 1;
                eprintln!("dynamicrafter: {label}: skipped: {e:#}");
            }
        }
    }
    if let Some(path) = &args.output.report_json {
        write_json(path, &reports)?;
    }
    eprintln!("{} of {} done{}", items.len() - failed, items.len(), if failed > 0 { format!(", {failed} failed") } else { String::new() });
    Ok(failed == 0)
}
