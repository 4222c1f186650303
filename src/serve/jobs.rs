//! Every job the server knows: its request, state, progress, the ordered list of events it has
//! produced (replayed to each event-stream subscriber), and its result.

use dynamicrafter_engine::{ModeKind, Report, Request};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [State::Queued, State::Running, State::Done, State::Failed, State::Cancelled].into_iter().find(|s| s.name() == name)
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

/// One server-sent event. The SSE event name is the variant's, the data its JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Accepted; `position` 1 is next.
    Queued { position: usize },
    /// The queue moved.
    Position { position: usize },
    /// A pipeline stage began.
    Stage { stage: String },
    /// A denoising step finished.
    Step { step: usize, total: usize, eta_seconds: Option<f64> },
    Done { report: Box<Report> },
    Error { error: String },
    Cancelled,
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued { .. } => "queued",
            Event::Position { .. } => "position",
            Event::Stage { .. } => "stage",
            Event::Step { .. } => "step",
            Event::Done { .. } => "done",
            Event::Error { .. } => "error",
            Event::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProgressInfo {
    pub stage: String,
    pub step: usize,
    pub total: usize,
    pub eta_seconds: Option<f64>,
}

pub struct Job {
    /// The request, with its images, until a worker takes it (or the job ends unstarted): a
    /// finished job keeps only what its view shows.
    pub spec: Option<Request>,
    pub mode: ModeKind,
    pub seed: u64,
    pub state: State,
    pub position: Option<usize>,
    pub progress: Option<ProgressInfo>,
    pub report: Option<Report>,
    pub error: Option<String>,
    pub video: Option<PathBuf>,
    pub created_unix: f64,
    pub finished: Option<Instant>,
    pub cancel: Arc<AtomicBool>,
    events: Vec<Event>,
    /// Carries the number of events, so subscribers wake on each new one.
    changed: watch::Sender<usize>,
}

/// The JSON of `GET /jobs/{id}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: String,
    pub state: State,
    #[schema(value_type = String, example = "i2v")]
    pub mode: ModeKind,
    pub seed: u64,
    /// 1 is next; while queued.
    pub position: Option<usize>,
    pub progress: Option<ProgressInfo>,
    /// Stage timings, steps, precision, kernels, peak memory (the CLI's report), once done.
    #[schema(value_type = Option<Object>)]
    pub report: Option<Report>,
    pub error: Option<String>,
    pub video_url: Option<String>,
    pub created_unix: f64,
    /// The worker running it, or that ran it (a shared queue's workers have names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Result of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Was waiting; now cancelled.
    Dequeued,
    /// Is running; stops between denoising steps.
    Stopping,
    /// Already finished in this state.
    AlreadyFinal(State),
}

pub struct JobStore {
    jobs: Mutex<HashMap<String, Job>>,
    /// Finished jobs kept at most (the oldest go first, with their videos).
    max_finished: usize,
}

impl JobStore {
    pub fn new(max_finished: usize) -> Self {
        Self { jobs: Mutex::default(), max_finished }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Job>> {
        // Every update below leaves a job consistent before it can panic.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, id: &str, spec: Request) {
        let created_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let job = Job {
            mode: spec.mode.kind(),
            seed: spec.sampling.seed,
            spec: Some(spec),
            state: State::Queued,
            position: None,
            progress: None,
            report: None,
            error: None,
            video: None,
            created_unix,
            finished: None,
            cancel: Arc::new(AtomicBool::new(false)),
            events: Vec::new(),
            changed: watch::channel(0).0,
        };
        self.lock().insert(id.to_string(), job);
    }

    /// Forgets a job that never made it into the queue.
    pub fn discard(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn view(&self, id: &str) -> Option<JobView> {
        let jobs = self.lock();
        let job = jobs.get(id)?;
        Some(JobView {
            id: id.to_string(),
            state: job.state,
            mode: job.mode,
            seed: job.seed,
            position: job.position,
            progress: job.progress.clone(),
            report: job.report.clone(),
            error: job.error.clone(),
            video_url: job.video.as_ref().map(|_| format!("/api/v1/jobs/{id}/video")),
            created_unix: job.created_unix,
            worker: None,
        })
    }

    pub fn video(&self, id: &str) -> Option<(State, Option<PathBuf>)> {
        let jobs = self.lock();
        jobs.get(id).map(|j| (j.state, j.video.clone()))
    }

    /// Events from index `from` on, whether the job has ended, and a receiver to wait for more.
    pub fn events_since(&self, id: &str, from: usize) -> Option<(Vec<Event>, bool, watch::Receiver<usize>)> {
        let jobs = self.lock();
        let job = jobs.get(id)?;
        let events = job.events.get(from..).unwrap_or_default().to_vec();
        Some((events, job.state.is_final(), job.changed.subscribe()))
    }

    fn emit(job: &mut Job, event: Event) {
        job.events.push(event);
        job.changed.send_replace(job.events.len());
    }

    /// Publishes each waiting job's new position (an event only when it moved).
    pub fn set_positions(&self, waiting: &[String]) {
        let mut jobs = self.lock();
        for (i, id) in waiting.iter().enumerate() {
            let Some(job) = jobs.get_mut(id) else { continue };
            let position = i + 1;
            if job.state != State::Queued || job.position == Some(position) {
                continue;
            }
            let event = match job.position {
                None => Event::Queued { position },
                Some(_) => Event::Position { position },
            };
            job.position = Some(position);
            Self::emit(job, event);
        }
    }

    /// Marks a job taken by a worker as running; `None` when it was cancelled meanwhile.
    pub fn start(&self, id: &str) -> Option<(Request, Arc<AtomicBool>)> {
        let mut jobs = self.lock();
        let job = jobs.get_mut(id)?;
        if job.state != State::Queued {
            return None;
        }
        let spec = job.spec.take()?;
        if job.events.is_empty() {
            // Taken before its position was published: it was next in line.
            Self::emit(job, Event::Queued { position: 1 });
        }
        job.state = State::Running;
        job.position = None;
        Some((spec, job.cancel.clone()))
    }

    pub fn stage(&self, id: &str, stage: &str) {
        if let Some(job) = self.lock().get_mut(id) {
            job.progress = Some(ProgressInfo { stage: stage.to_string(), step: 0, total: 0, eta_seconds: None });
            Self::emit(job, Event::Stage { stage: stage.to_string() });
        }
    }

    pub fn step(&self, id: &str, step: usize, total: usize, eta_seconds: Option<f64>) {
        if let Some(job) = self.lock().get_mut(id) {
            job.progress = Some(ProgressInfo { stage: "denoise".into(), step, total, eta_seconds });
            Self::emit(job, Event::Step { step, total, eta_seconds });
        }
    }

    /// Ends a job; returns false when it had already ended (nothing changes then).
    pub fn finish(&self, id: &str, outcome: Result<(Report, PathBuf), Option<String>>) -> bool {
        let mut jobs = self.lock();
        let Some(job) = jobs.get_mut(id) else { return false };
        if job.state.is_final() {
            return false;
        }
        job.position = None;
        job.spec = None;
        job.finished = Some(Instant::now());
        let event = match outcome {
            Ok((report, video)) => {
                job.state = State::Done;
                job.video = Some(video);
                job.report = Some(report.clone());
                Event::Done { report: Box::new(report) }
            }
            Err(Some(error)) => {
                job.state = State::Failed;
                job.error = Some(error.clone());
                Event::Error { error }
            }
            Err(None) => {
                job.state = State::Cancelled;
                Event::Cancelled
            }
        };
        Self::emit(job, event);
        Self::evict_beyond(&mut jobs, self.max_finished);
        true
    }

    /// Removes the oldest finished jobs while more than `max` are kept, and their videos.
    fn evict_beyond(jobs: &mut HashMap<String, Job>, max: usize) {
        let mut finished: Vec<(Instant, String)> = jobs.iter().filter_map(|(id, j)| j.finished.map(|t| (t, id.clone()))).collect();
        if finished.len() <= max {
            return;
        }
        finished.sort();
        for (_, id) in &finished[..finished.len() - max] {
            if let Some(video) = jobs.remove(id).and_then(|j| j.video) {
                let _ = std::fs::remove_file(video);
            }
        }
    }

    /// Cancels a job: a waiting one ends at once (the caller takes it out of the queue
    /// first), a running one is flagged and stops between denoising steps.
    pub fn cancel(&self, id: &str, was_waiting: bool) -> Option<CancelOutcome> {
        let state = {
            let jobs = self.lock();
            let job = jobs.get(id)?;
            job.cancel.store(true, Ordering::Relaxed);
            job.state
        };
        Some(match state {
            s if s.is_final() => CancelOutcome::AlreadyFinal(s),
            State::Queued if was_waiting => {
                self.finish(id, Err(None));
                CancelOutcome::Dequeued
            }
            _ => CancelOutcome::Stopping,
        })
    }

    /// Flags every running job to stop.
    pub fn cancel_running(&self) {
        for job in self.lock().values() {
            if job.state == State::Running {
                job.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Removes jobs that ended more than `keep` ago; returns their video files.
    pub fn expire(&self, keep: std::time::Duration) -> Vec<PathBuf> {
        let mut jobs = self.lock();
        let old: Vec<String> =
            jobs.iter().filter(|(_, j)| j.finished.is_some_and(|t| t.elapsed() >= keep)).map(|(id, _)| id.clone()).collect();
        old.iter().filter_map(|id| jobs.remove(id).and_then(|j| j.video)).collect()
    }

    pub fn count_running(&self) -> usize {
        self.lock().values().filter(|j| j.state == State::Running).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamicrafter_engine::config::presets::Preset;
    use dynamicrafter_engine::RgbImage;

    fn request() -> Request {
        let image = RgbImage { width: 64, height: 64, data: vec![0; 64 * 64 * 3] };
        Request::new(&Preset::Dc256.config(), image, "a fox")
    }

    /// Hardening (#22): a job's images leave the store when a worker takes it, or when it ends
    /// unstarted (cancelled while queued); the view keeps its mode and seed.
    #[test]
    fn inputs_are_dropped_when_a_job_starts_or_ends() {
        let store = JobStore::new(10);
        store.insert("a", request());
        store.insert("b", request());
        let (spec, _) = store.start("a").unwrap();
        assert_eq!(spec.prompt, "a fox");
        assert!(store.lock()["a"].spec.is_none());
        assert_eq!(store.cancel("b", true), Some(CancelOutcome::Dequeued));
        assert!(store.lock()["b"].spec.is_none());
        let view = store.view("b").unwrap();
        assert_eq!((view.mode, view.seed), (ModeKind::ImageToVideo, request().sampling.seed));
    }

    /// Hardening (#22): the store keeps at most `max_finished` finished jobs, dropping the oldest
    /// (and their videos); queued and running ones are never dropped.
    #[test]
    fn finished_jobs_are_bounded() {
        let dir = std::env::temp_dir().join(format!("dynamicrafter-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = JobStore::new(3);
        store.insert("running", request());
        store.start("running").unwrap();
        let videos: Vec<PathBuf> = (0..5).map(|i| dir.join(format!("{i}.mp4"))).collect();
        for (i, video) in videos.iter().enumerate() {
            std::fs::write(video, b"mp4").unwrap();
            let id = i.to_string();
            store.insert(&id, request());
            store.start(&id).unwrap();
            let report = Report::new("tiny", "cpu", "fp32");
            assert!(store.finish(&id, Ok((report, video.clone()))));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(store.contains("running"));
        let kept: Vec<bool> = (0..5).map(|i| store.contains(&i.to_string())).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert!(!videos[0].exists() && !videos[1].exists() && videos[4].exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
