//! Every job the server knows: its request, state, progress, the ordered list of events it has
//! produced (replayed to each event-stream subscriber), and its result.

use dynamicrafter_engine::{ModeKind, Report, Request};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub finished_unix: Option<f64>,
    pub cancel: Arc<AtomicBool>,
    events: Vec<Event>,
    /// Carries the number of events, so subscribers wake on each new one.
    changed: watch::Sender<usize>,
}

impl Job {
    /// A job as recorded, as of `now` (monotonic, wall clock), and whether it had not ended: a
    /// finished one comes back with its final event (its event stream answers), one that had not
    /// ended fails as interrupted, a done one whose `video` is gone fails.
    fn from_record(r: Record, video: &Path, now: (Instant, f64)) -> (Job, bool) {
        let interrupted = !r.state.is_final();
        let (state, report, error, video) = match (r.state, r.report) {
            _ if interrupted => (State::Failed, None, Some(INTERRUPTED.to_string()), None),
            (State::Done, Some(report)) if video.is_file() => (State::Done, Some(report), None, Some(video.to_path_buf())),
            (State::Done, _) => (State::Failed, None, Some("its video was lost (removed from the data folder)".to_string()), None),
            (state, report) => (state, report, r.error, None),
        };
        let event = match (state, &report) {
            (State::Done, Some(report)) => Event::Done { report: Box::new(report.clone()) },
            (State::Cancelled, _) => Event::Cancelled,
            _ => Event::Error { error: error.clone().unwrap_or_default() },
        };
        let finished_unix = r.finished_unix.unwrap_or(now.1);
        let mut job = Job {
            spec: None,
            mode: r.mode,
            seed: r.seed,
            state,
            position: None,
            progress: None,
            report,
            error,
            video,
            created_unix: r.created_unix,
            // Its age carries over, so `--keep-seconds` counts from when it really ended.
            finished: Some(Duration::try_from_secs_f64(now.1 - finished_unix).ok().and_then(|age| now.0.checked_sub(age)).unwrap_or(now.0)),
            finished_unix: Some(finished_unix),
            cancel: Arc::new(AtomicBool::new(true)),
            events: Vec::new(),
            changed: watch::channel(0).0,
        };
        JobStore::emit(&mut job, event);
        (job, interrupted)
    }
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
    /// Where each job's record is kept (`<id>.json`, beside its video `<id>.mp4`), so finished
    /// jobs outlive the process; `None` keeps them in memory only.
    records: Option<PathBuf>,
}

/// A job as its record file keeps it: written atomically when it is accepted and when it ends,
/// enough to answer for it after a restart.
#[derive(Serialize, Deserialize)]
struct Record {
    mode: ModeKind,
    seed: u64,
    state: State,
    report: Option<Report>,
    error: Option<String>,
    created_unix: f64,
    finished_unix: Option<f64>,
}

/// What a job that had not ended when its server stopped (killed, crashed) ends as on restart:
/// its images were not kept, so it cannot be run again.
pub const INTERRUPTED: &str = "interrupted: the server stopped before this job finished; submit it again";

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Job ids are 32 lowercase hex digits (a simple UUID): nothing else in a data folder is a record.
fn is_job_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What [`JobStore::open`] found in a data folder.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Finished jobs answered for again.
    pub finished: usize,
    /// Jobs that were queued or running when the server stopped, now failed ([`INTERRUPTED`]).
    pub interrupted: usize,
    /// Files removed: temporary files of writes that never completed, videos without a record,
    /// unreadable records.
    pub swept: usize,
}

impl JobStore {
    /// A store in memory only.
    #[cfg(test)]
    pub fn new(max_finished: usize) -> Self {
        Self { jobs: Mutex::default(), max_finished, records: None }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Job>> {
        // Every update below leaves a job consistent before it can panic.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A store that keeps each job's record in `dir` (this process's alone: the caller holds its
    /// lock), answering again for the finished jobs recorded there: a job that had not ended ends
    /// failed ([`INTERRUPTED`]), a done job whose video is gone failed; leftovers are removed.
    pub fn open(max_finished: usize, dir: &Path) -> std::io::Result<(Self, Restored)> {
        let mut restored = Restored::default();
        let mut records = Vec::new();
        let mut videos = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match name.rsplit_once('.') {
                Some((id, "json")) if is_job_id(id) => records.push((id.to_string(), path)),
                Some((id, "mp4")) if is_job_id(id) => videos.push((id.to_string(), path)),
                _ if name.ends_with(".partial") => {
                    restored.swept += usize::from(std::fs::remove_file(&path).is_ok());
                }
                _ => {}
            }
        }
        let store = Self { jobs: Mutex::default(), max_finished, records: Some(dir.to_path_buf()) };
        let now = (Instant::now(), unix_now());
        {
            let mut jobs = store.lock();
            for (id, path) in records {
                let Some(record) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()) else {
                    tracing::warn!("removing unreadable job record {}", path.display());
                    restored.swept += usize::from(std::fs::remove_file(&path).is_ok());
                    continue;
                };
                let video = dir.join(format!("{id}.mp4"));
                let recorded = record.state;
                let (job, interrupted) = Job::from_record(record, &video, now);
                *if interrupted { &mut restored.interrupted } else { &mut restored.finished } += 1;
                if job.state != recorded {
                    store.save(&id, &job);
                }
                jobs.insert(id, job);
            }
            for (id, path) in videos {
                if jobs.get(&id).is_none_or(|j| j.video.is_none()) {
                    restored.swept += usize::from(std::fs::remove_file(&path).is_ok());
                }
            }
            store.evict_beyond(&mut jobs);
        }
        Ok((store, restored))
    }

    /// Writes `job`'s record (a temporary file renamed over it); a failure is logged, not fatal:
    /// the job itself goes on.
    fn save(&self, id: &str, job: &Job) {
        let Some(dir) = &self.records else { return };
        let record = Record {
            mode: job.mode,
            seed: job.seed,
            state: job.state,
            report: job.report.clone(),
            error: job.error.clone(),
            created_unix: job.created_unix,
            finished_unix: job.finished_unix,
        };
        let write = || -> std::io::Result<()> {
            let mut temp = tempfile::Builder::new().prefix(&format!(".{id}.")).suffix(".partial").tempfile_in(dir)?;
            serde_json::to_writer(&mut temp, &record)?;
            temp.persist(dir.join(format!("{id}.json"))).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!("job {id}: writing its record in {}: {e}", dir.display());
        }
    }

    /// Removes a forgotten job's files: its record and its video.
    fn remove_files(&self, id: &str, video: Option<PathBuf>) {
        if let Some(dir) = &self.records {
            let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
        }
        if let Some(video) = video {
            let _ = std::fs::remove_file(video);
        }
    }

    pub fn insert(&self, id: &str, spec: Request) {
        let created_unix = unix_now();
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
            finished_unix: None,
            cancel: Arc::new(AtomicBool::new(false)),
            events: Vec::new(),
            changed: watch::channel(0).0,
        };
        let mut jobs = self.lock();
        self.save(id, &job);
        jobs.insert(id.to_string(), job);
    }

    /// Forgets a job that never made it into the queue.
    pub fn discard(&self, id: &str) {
        let mut jobs = self.lock();
        if jobs.remove(id).is_some() {
            self.remove_files(id, None);
        }
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
        job.finished_unix = Some(unix_now());
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
        self.save(id, job);
        self.evict_beyond(&mut jobs);
        true
    }

    /// Removes the oldest finished jobs while more than `max_finished` are kept, and their files.
    fn evict_beyond(&self, jobs: &mut HashMap<String, Job>) {
        let mut finished: Vec<(Instant, String)> = jobs.iter().filter_map(|(id, j)| j.finished.map(|t| (t, id.clone()))).collect();
        if finished.len() <= self.max_finished {
            return;
        }
        finished.sort();
        for (_, id) in &finished[..finished.len() - self.max_finished] {
            if let Some(job) = jobs.remove(id) {
                self.remove_files(id, job.video);
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

    /// Removes a job and its files; false when it was not there.
    pub fn forget(&self, id: &str) -> bool {
        let mut jobs = self.lock();
        let Some(job) = jobs.remove(id) else { return false };
        self.remove_files(id, job.video);
        true
    }

    /// Flags every running job to stop.
    pub fn cancel_running(&self) {
        for job in self.lock().values() {
            if job.state == State::Running {
                job.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Removes jobs that ended more than `keep` ago, with their files.
    pub fn expire(&self, keep: Duration) {
        let mut jobs = self.lock();
        let old: Vec<String> =
            jobs.iter().filter(|(_, j)| j.finished.is_some_and(|t| t.elapsed() >= keep)).map(|(id, _)| id.clone()).collect();
        for id in old {
            if let Some(job) = jobs.remove(&id) {
                self.remove_files(&id, job.video);
            }
        }
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

    /// Hardening (#22): a store reopened on its folder answers for the finished jobs: a done one
    /// with its video and report, one whose video is gone failed, one that had not ended failed
    /// as interrupted; a stray temporary file and a video without a record are removed, and a
    /// record's age carries over (it expires as if the process had never stopped).
    #[test]
    fn a_reopened_store_answers_for_its_finished_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let id = |i: u8| format!("{:032x}", i);
        let (store, found) = JobStore::open(10, dir.path()).unwrap();
        assert_eq!(found, Restored::default());
        for i in 0..4 {
            store.insert(&id(i), request());
        }
        for i in 0..2 {
            let video = dir.path().join(format!("{}.mp4", id(i)));
            std::fs::write(&video, b"mp4").unwrap();
            store.start(&id(i)).unwrap();
            assert!(store.finish(&id(i), Ok((Report::new("tiny", "cpu", "fp32"), video))));
        }
        store.start(&id(2)).unwrap();
        assert_eq!(store.cancel(&id(3), true), Some(CancelOutcome::Dequeued));
        drop(store);
        std::fs::remove_file(dir.path().join(format!("{}.mp4", id(1)))).unwrap();
        std::fs::write(dir.path().join(format!(".{}.mp4.x1y2.partial", id(0))), b"half").unwrap();
        std::fs::write(dir.path().join(format!("{}.mp4", id(9))), b"orphan").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();

        let (store, found) = JobStore::open(10, dir.path()).unwrap();
        assert_eq!(found, Restored { finished: 3, interrupted: 1, swept: 2 });
        let state = |i| store.view(&id(i)).unwrap();
        assert_eq!((state(0).state, state(0).video_url.is_some(), state(0).report.is_some()), (State::Done, true, true));
        assert_eq!((state(1).state, state(1).video_url), (State::Failed, None));
        assert_eq!((state(2).state, state(2).error.as_deref()), (State::Failed, Some(INTERRUPTED)));
        assert_eq!(state(3).state, State::Cancelled);
        let (events, ended, _) = store.events_since(&id(0), 0).unwrap();
        assert!(ended && matches!(events[..], [Event::Done { .. }]));
        assert!(!dir.path().join(format!("{}.mp4", id(9))).exists() && dir.path().join("notes.txt").exists());
        // The interrupted job's new state is on disk: a third opening agrees.
        drop(store);
        let (store, _) = JobStore::open(10, dir.path()).unwrap();
        assert_eq!(store.view(&id(2)).unwrap().error.as_deref(), Some(INTERRUPTED));
        store.expire(Duration::ZERO);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["notes.txt"], "expired jobs leave nothing behind");
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
