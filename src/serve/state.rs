//! What the handlers and the workers share: the loaded model, the job store, the queue, limits.

use super::jobs::{CancelOutcome, JobStore, State as JobState};
use super::metrics;
use super::queue::{JobQueue, PushError};
use dynamicrafter_engine::{Pipeline, Request};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a submission may be.
pub struct Limits {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_prompt_tokens: usize,
}

impl Limits {
    /// The most bytes a job submission may have: two images, base64 in JSON (4/3), plus the
    /// other fields.
    pub fn max_body_bytes(&self) -> usize {
        self.max_image_bytes * 8 / 3 + (1 << 20)
    }
}

/// Everything the handlers and workers share.
pub struct AppState {
    pub pipeline: Pipeline,
    pub model_name: String,
    pub jobs: JobStore,
    pub queue: Box<dyn JobQueue>,
    pub max_queue: usize,
    pub limits: Limits,
    pub results_dir: PathBuf,
    pub fps: f64,
    pub closing: AtomicBool,
    /// Mean wall time of recent jobs (f64 bits), for `Retry-After`.
    pub mean_job_seconds: AtomicU64,
    pub workers: usize,
    pub positions_lock: std::sync::Mutex<()>,
}

impl AppState {
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Creates a job and queues it; returns its position.
    pub fn enqueue(&self, id: &str, spec: Request) -> Result<usize, PushError> {
        self.jobs.insert(id, spec);
        match self.queue.push(id) {
            Ok(position) => {
                self.positions_changed();
                Ok(position)
            }
            Err(e) => {
                self.jobs.discard(id);
                Err(e)
            }
        }
    }

    pub fn positions_changed(&self) {
        // Serialised so an older snapshot of the queue never overwrites a newer one.
        let _order = self.positions_lock.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = self.queue.waiting();
        metrics::queue_depth(waiting.len());
        self.jobs.set_positions(&waiting);
    }

    pub fn cancel(&self, id: &str) -> Option<CancelOutcome> {
        let was_waiting = self.queue.remove(id);
        let outcome = self.jobs.cancel(id, was_waiting)?;
        if outcome == CancelOutcome::Dequeued {
            metrics::job_finished(JobState::Cancelled.name());
            self.positions_changed();
        }
        Some(outcome)
    }

    pub fn retry_after_seconds(&self) -> u64 {
        let mean = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
        let waiting = self.queue.waiting().len() as f64;
        ((mean * waiting / self.workers as f64).ceil() as u64).max(1)
    }

    /// Stops taking jobs: the waiting ones are cancelled, running ones stop at their next step.
    pub fn shut_down(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for id in self.queue.close() {
            if self.jobs.finish(&id, Err(None)) {
                metrics::job_finished(JobState::Cancelled.name());
            }
        }
        metrics::queue_depth(0);
        self.jobs.cancel_running();
    }

    pub fn video_path(&self, id: &str) -> PathBuf {
        self.results_dir.join(format!("{id}.mp4"))
    }
}

