//! The command-line front ends (`generate`, `batch`, `convert`) and what they share: flags,
//! progress display, reading images, writing reports. Glue only: the engine does the work.

mod args;
pub mod batch;
pub mod convert;
pub mod generate;
mod progress;

pub use args::{ComputeArgs, OutputArgs, SamplingArgs, Settings};
pub use progress::ProgressView;

use crate::generation::{generate_videos, VideoOutput};
use anyhow::{Context, Result};
use dynamicrafter_engine::{Pipeline, Report, Request, RgbImage};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Reads and decodes an image file.
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
    view.line(&format!("seed {}", req.sampling.seed));
    let output = VideoOutput { format: settings.format, fps: settings.fps };
    let cancel = AtomicBool::new(false);
    let report = generate_videos(pipeline, model_name, req, output, outputs, load_time, &mut |p| view.update(p), &cancel);
    view.finish();
    if report.is_ok() {
        for path in outputs {
            view.line(&format!("wrote {}", path.display()));
        }
    }
    report
}

/// Writes `value` as pretty JSON to a temporary file created exclusively beside `path`
/// (removed if anything fails), then renames it to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new();
    temp.prefix(".report.").suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = temp.tempfile_in(dir).with_context(|| format!("writing {}: its folder", path.display()))?;
    tmp.write_all(&serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
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
