//! A worker thread: takes jobs from the queue and runs each through the one generation call.

use super::jobs::State as JobState;
use super::metrics;
use super::state::AppState;
use crate::generation::{generate_videos, VideoOutput};
use dynamicrafter_engine::{Progress, Stage};
use dynamicrafter_video::Format;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// One worker: takes jobs until the queue closes.
pub fn run(state: Arc<AppState>) {
    while let Some(id) = state.queue.pop() {
        state.positions_changed();
        let Some((spec, cancel)) = state.jobs.start(&id) else { continue };
        metrics::running(state.jobs.count_running());
        let path = state.video_path(&id);
        let started = Instant::now();
        let mut denoise_start = Instant::now();
        let mut last_step = Instant::now();
        let mut on_progress = |p: Progress| {
            if p.stage != Stage::Denoise {
                if p.step == 0 {
                    state.jobs.stage(&id, p.stage.name());
                }
                return;
            }
            if p.step == 0 {
                state.jobs.stage(&id, p.stage.name());
                denoise_start = Instant::now();
            } else {
                metrics::step(last_step.elapsed().as_secs_f64());
                let per_step = denoise_start.elapsed().as_secs_f64() / p.step as f64;
                state.jobs.step(&id, p.step, p.total, Some(per_step * (p.total - p.step) as f64));
            }
            last_step = Instant::now();
        };
        let output = VideoOutput { format: Format::Mp4, fps: state.fps };
        // A panic in one job must not take the worker with it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            generate_videos(
                &state.pipeline,
                &state.model_name,
                &spec,
                output,
                std::slice::from_ref(&path),
                None,
                &mut on_progress,
                &cancel,
            )
        }));
        let outcome = match result {
            Ok(Ok(report)) => {
                for s in &report.stages {
                    metrics::stage(&s.stage, s.seconds);
                }
                metrics::peak_memory(report.peak_rss_bytes, report.peak_gpu_bytes);
                let secs = started.elapsed().as_secs_f64();
                let old = f64::from_bits(state.mean_job_seconds.load(Ordering::Relaxed));
                let mean = if old == 0.0 { secs } else { 0.8 * old + 0.2 * secs };
                state.mean_job_seconds.store(mean.to_bits(), Ordering::Relaxed);
                Ok((report, path.clone()))
            }
            Ok(Err(_)) if cancel.load(Ordering::Relaxed) => Err(None),
            Ok(Err(e)) => Err(Some(format!("{e:#}"))),
            Err(_) => Err(Some("internal error while generating (see the server log)".to_string())),
        };
        if outcome.is_err() {
            // Nothing half-written is left behind; the writer renames only complete files.
            let _ = std::fs::remove_file(&path);
        }
        let final_state = match &outcome {
            Ok(_) => JobState::Done,
            Err(Some(_)) => JobState::Failed,
            Err(None) => JobState::Cancelled,
        };
        if let Err(Some(e)) = &outcome {
            tracing::warn!(job = %id, "generation failed: {e}");
        }
        if state.jobs.finish(&id, outcome) {
            metrics::job_finished(final_state.name());
        }
        metrics::running(state.jobs.count_running());
    }
}

