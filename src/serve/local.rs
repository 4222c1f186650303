//! The in-process backend (the default): the job store and a bounded queue in this process,
//! videos in a results folder. Both seams at once: the handlers' [`Backend`] and the worker
//! threads' [`WorkSource`].

use super::backend::{Backend, EventBatch, NewJob, Outcome, SubmitError, Taken, Ticket, Unavailable, Video, Wait, WorkSource};
use super::jobs::{CancelOutcome, JobStore, JobView, State};
use super::metrics;
use super::queue::{JobQueue, MemoryQueue, PushError};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub struct Local {
    jobs: JobStore,
    queue: MemoryQueue,
    data_dir: PathBuf,
    fps: f64,
    workers: usize,
    /// Mean wall time of recent jobs (f64 bits), for `Retry-After`.
    mean_job_seconds: AtomicU64,
    positions_lock: Mutex<()>,
    /// Held while the process runs: one server per data folder.
    _lock: std::fs::File,
}

impl Local {
    /// The backend keeping its jobs' records and videos in `data_dir` (created if need be, held
    /// by this process alone), with the finished jobs recorded there.
    pub fn open(max_queue: usize, max_finished: usize, data_dir: &Path, fps: f64, workers: usize) -> anyhow::Result<Self> {
        let folder = || format!("data folder {}", data_dir.display());
        std::fs::create_dir_all(data_dir).with_context(folder)?;
        let lock = std::fs::File::create(data_dir.join(".lock")).with_context(folder)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                anyhow::bail!("data folder {} is in use by another server: give each its own --data-dir", data_dir.display())
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(folder),
        }
        let (jobs, restored) = JobStore::open(max_finished, data_dir).with_context(folder)?;
        if restored == Default::default() {
            tracing::info!("data folder {}", data_dir.display());
        } else {
            tracing::info!(
                "data folder {}: {} finished jobs restored, {} interrupted ones failed, {} leftover files removed",
                data_dir.display(),
                restored.finished,
                restored.interrupted,
                restored.swept
            );
        }
        Ok(Self {
            jobs,
            queue: MemoryQueue::new(max_queue),
            data_dir: data_dir.to_path_buf(),
            fps,
            workers: workers.max(1),
            mean_job_seconds: AtomicU64::new(0),
            positions_lock: Mutex::default(),
            _lock: lock,
        })
    }

    fn positions_changed(&self) {
        // Serialised so an older snapshot of the queue never overwrites a newer one.
        let _order = self.positions_lock.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = self.queue.waiting();
        metrics::queue_depth(waiting.len());
        self.jobs.set_positions(&waiting);
    }

    fn video_path(&self, id: &str) -> PathBuf {
        self.data_dir.join(format!("{id}.mp4"))
    }
}

impl Backend for Local {
    fn submit(&self, job: NewJob) -> Result<(String, usize), SubmitError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        // The uploads' bytes are not kept: the decoded request is all a local worker needs.
        self.jobs.insert(&id, job.request);
        match self.queue.push(&id) {
            Ok(position) => {
                self.positions_changed();
                Ok((id, position))
            }
            Err(e) => {
                self.jobs.discard(&id);
                Err(match e {
                    PushError::Full { capacity } => SubmitError::Full { capacity },
                    PushError::Closed => SubmitError::Closed,
                })
            }
        }
    }

    fn view(&self, id: &str) -> Result<Option<JobView>, Unavailable> {
        Ok(self.jobs.view(id))
    }

    fn events_since(&self, id: &str, from: usize) -> Result<Option<EventBatch>, Unavailable> {
        Ok(self.jobs.events_since(id, from).map(|(events, ended, changed)| EventBatch { events, ended, position: None, wait: Wait { changed: Some(changed), at_most: None } }))
    }

    fn video(&self, id: &str) -> Result<Option<(State, Option<Video>)>, Unavailable> {
        Ok(self.jobs.video(id).map(|(state, path)| (state, path.map(Video::File))))
    }

    fn cancel(&self, id: &str) -> Result<Option<CancelOutcome>, Unavailable> {
        if !self.jobs.contains(id) {
            return Ok(None);
        }
        let was_waiting = self.queue.remove(id);
        let outcome = self.jobs.cancel(id, was_waiting);
        if outcome == Some(CancelOutcome::Dequeued) {
            metrics::job_finished(State::Cancelled.name());
            self.positions_changed();
        }
        Ok(outcome)
    }

    fn delete(&self, id: &str) -> Result<bool, Unavailable> {
        if self.cancel(id)?.is_none() {
            return Ok(false);
        }
        Ok(self.jobs.forget(id))
    }

    fn retry_after_seconds(&self) -> u64 {
        let mean = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
        let waiting = self.queue.waiting().len() as f64;
        ((mean * waiting / self.workers as f64).ceil() as u64).max(1)
    }

    fn shut_down(&self) {
        for id in self.queue.close() {
            if self.jobs.finish(&id, Err(None)) {
                metrics::job_finished(State::Cancelled.name());
            }
        }
        metrics::queue_depth(0);
        self.jobs.cancel_running();
    }

    fn expire(&self, keep: Duration) {
        self.jobs.expire(keep);
    }
}

impl WorkSource for Local {
    fn take(&self) -> Option<Taken> {
        loop {
            let id = self.queue.pop()?;
            self.positions_changed();
            // `None`: cancelled between the queue and here.
            let Some((request, cancel)) = self.jobs.start(&id) else { continue };
            metrics::running(self.jobs.count_running());
            let video_path = self.video_path(&id);
            return Some(Taken { id, request, cancel, fps: self.fps, video_path, ticket: Ticket::Local });
        }
    }

    fn stage(&self, job: &Taken, stage: &str) {
        self.jobs.stage(&job.id, stage);
    }

    fn step(&self, job: &Taken, step: usize, total: usize, eta_seconds: Option<f64>) {
        self.jobs.step(&job.id, step, total, eta_seconds);
    }

    fn finish(&self, job: Taken, outcome: Outcome) -> bool {
        if let Ok((report, _)) = &outcome {
            let secs = report.total_seconds;
            let old = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
            let mean = if old == 0.0 { secs } else { 0.8 * old + 0.2 * secs };
            self.mean_job_seconds.store(mean.to_bits(), Ordering::Relaxed);
        }
        let state = match &outcome {
            Ok(_) => State::Done,
            Err(Some(_)) => State::Failed,
            Err(None) => State::Cancelled,
        };
        let video = outcome.as_ref().ok().map(|(_, path)| path.clone());
        let finished = self.jobs.finish(&job.id, outcome);
        if finished {
            metrics::job_finished(state.name());
        } else if let Some(video) = video {
            // Deleted while it ran: nothing of it stays.
            let _ = std::fs::remove_file(video);
        }
        metrics::running(self.jobs.count_running());
        finished
    }
}
