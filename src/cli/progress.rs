//! Progress on stderr: a bar over the denoising steps and a line per stage.

use dynamicrafter_engine::{Progress, Stage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

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
