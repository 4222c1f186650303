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
    /// Run the items on a shared queue's workers (redis://HOST:PORT[/DB], as `serve --queue`)
    /// instead of in this process; items whose output exists are skipped, so an interrupted run
    /// goes on where it stopped.
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,
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

fn mode_of(args: &BatchArgs, item: &Item) -> Result<Mode> {
    Ok(if args.interp {
        let end = item.images.get(1).context("interpolation needs an even number of images")?;
        Mode::Interpolate { end: read_image(end)? }
    } else if args.loop_video {
        Mode::Loop
    } else {
        Mode::ImageToVideo
    })
}

/// Returns whether every item succeeded.
pub fn run(args: BatchArgs) -> Result<bool> {
    let settings = Settings::new(args.sampling.clone(), &args.output)?;
    let items = list_inputs(&args.prompt_dir, args.interp)?;
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("output folder {}", args.out_dir.display()))?;
    let spec = model_source::describe(&args.model, args.config.as_deref())?;
    if let Some(url) = &args.queue {
        // The workers hold the weights; this process only needs the config.
        return run_on_queue(&args, url, &settings, &items, &spec);
    }
    let source = spec.fetch()?;
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
            let mode = mode_of(&args, item)?;
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

/// `batch --queue`: every item whose output is missing becomes a job on the shared queue (in
/// order, waiting while the queue is full); each video is written as its job ends.
fn run_on_queue(args: &BatchArgs, url: &str, settings: &Settings, items: &[Item], model: &model_source::ModelSpec) -> Result<bool> {
    use crate::serve::backend::{Backend, NewJob, SubmitError};
    use crate::serve::jobs::State;
    use std::time::Duration;
    if settings.format != dynamicrafter_video::Format::Mp4 {
        bail!("--queue: workers write MP4; drop --format {}", settings.format.extension());
    }
    if settings.n_samples != 1 {
        bail!("--queue runs one sample per item; drop --n-samples (or give each sample its own --seed run)");
    }
    // The same bound as `serve`'s default --max-queue: this run waits rather than crowding out
    // other clients.
    let (queue, scratch) = crate::serve::connect_queue(url, model, &Default::default(), 12, Duration::from_secs(24 * 3600), settings.fps, None)?;
    let _ = std::fs::remove_dir_all(&scratch);
    let cfg = &model.config;
    let mut failed = 0;
    let mut skipped = 0;
    let mut pending = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, items.len(), item.stem);
        let out = args.out_dir.join(format!("{}_sample0.mp4", item.stem));
        if out.exists() {
            skipped += 1;
            if !settings.quiet {
                eprintln!("{label}: {} exists, skipped", out.display());
            }
            continue;
        }
        // Submitted by an interrupted run and still known to the queue: wait for that job.
        let marker = job_marker(&out);
        let earlier = std::fs::read_to_string(&marker).ok().map(|id| id.trim().to_string());
        if let Some(id) = earlier.filter(|id| queue.view(id).is_ok_and(|v| v.is_some_and(|v| !matches!(v.state, State::Failed | State::Cancelled)))) {
            if !settings.quiet {
                eprintln!("{label}: resuming job {id}");
            }
            pending.push((id, label, out));
            continue;
        }
        let build = || -> Result<NewJob> {
            let prompt = item.prompt.as_deref().context("no prompt line for this image")?;
            let request = settings.request(cfg, read_image(&item.images[0])?, mode_of(args, item)?, prompt);
            let s = &request.sampling;
            s.validate(cfg, request.mode.kind()).map_err(|e| anyhow::anyhow!("{}: {}", e.knob, e.message))?;
            dynamicrafter_engine::preprocess::check_resizable(&request.image, s.height, s.width, "image")?;
            // The workers decode the files as sent, as `serve` does an upload.
            let image = std::fs::read(&item.images[0])?;
            let image2 = if args.interp { Some(std::fs::read(&item.images[1])?) } else { None };
            Ok(NewJob { request, image, image2 })
        };
        let mut told = false;
        let submitted = loop {
            let job = match build() {
                Ok(job) => job,
                Err(e) => break Err(e),
            };
            match queue.submit(job) {
                Ok((id, _)) => break Ok(id),
                Err(SubmitError::Full { capacity }) => {
                    if !told && !settings.quiet {
                        eprintln!("{label}: the queue is full ({capacity} waiting); waiting");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(SubmitError::Closed) => bail!("the queue is closing"),
                Err(SubmitError::Unavailable(e)) => bail!("the job queue at {url} is unavailable: {}", e.0),
            }
        };
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                failed += 1;
                eprintln!("dynamicrafter: {label}: skipped: {e:#}");
                continue;
            }
        };
        if let Err(e) = write_atomically(&args.out_dir, &marker, id.as_bytes()) {
            eprintln!("dynamicrafter: {label}: {}: {e:#} (a rerun would submit it again)", marker.display());
        }
        if !settings.quiet {
            eprintln!("{label}: queued as job {id}");
        }
        pending.push((id, label, out));
    }
    let mut reports = Vec::new();
    while !pending.is_empty() {
        std::thread::sleep(Duration::from_millis(250));
        let mut still = Vec::new();
        for (id, label, out) in pending {
            let ended = || {
                let _ = std::fs::remove_file(job_marker(&out));
            };
            let view = match queue.view(&id) {
                Ok(Some(v)) => v,
                Ok(None) => {
                    failed += 1;
                    eprintln!("dynamicrafter: {label}: job {id} is gone from the queue (expired?)");
                    ended();
                    continue;
                }
                // Redis away for a moment: ask again.
                Err(_) => {
                    still.push((id, label, out));
                    continue;
                }
            };
            match view.state {
                State::Queued | State::Running => still.push((id, label, out)),
                State::Done => {
                    use crate::serve::backend::Video;
                    let video = match queue.video(&id) {
                        Ok(Some((_, Some(Video::Bytes(bytes))))) => bytes,
                        // Workers with --results-dir: the file on the shared folder.
                        Ok(Some((_, Some(Video::File(path))))) if path.is_file() => std::fs::read(&path)?,
                        _ => {
                            still.push((id, label, out));
                            continue;
                        }
                    };
                    let written = write_atomically(&args.out_dir, &out, &video);
                    ended();
                    match written {
                        Ok(()) => {
                            if !settings.quiet {
                                eprintln!("{label}: wrote {}{}", out.display(), view.worker.map(|w| format!(" (worker {w})")).unwrap_or_default());
                            }
                            if let Some(report) = view.report {
                                eprint!("{}", report.to_text());
                                reports.push(report);
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            eprintln!("dynamicrafter: {label}: writing {}: {e:#}", out.display());
                        }
                    }
                }
                State::Failed | State::Cancelled => {
                    ended();
                    failed += 1;
                    eprintln!("dynamicrafter: {label}: {}: {}", view.state.name(), view.error.unwrap_or_default());
                }
            }
        }
        pending = still;
    }
    if let Some(path) = &args.output.report_json {
        write_json(path, &reports)?;
    }
    let total = items.len();
    eprintln!(
        "{} of {total} done{}{}",
        total - failed - skipped,
        if skipped > 0 { format!(", {skipped} already there") } else { String::new() },
        if failed > 0 { format!(", {failed} failed") } else { String::new() }
    );
    Ok(failed == 0)
}

/// The file beside a pending output that holds its job's id, so a rerun resumes the job.
fn job_marker(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".job");
    PathBuf::from(name)
}

/// Writes `path` whole or not at all (a temp file in `dir`, then a rename).
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path)?;
    Ok(())
}
