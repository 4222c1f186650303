//! The two seams between the front end and where jobs live. Handlers talk to a [`Backend`]
//! (submit, status, events, video, cancel); workers to a [`WorkSource`] (take a job, report
//! progress, finish it). [`Local`](super::local::Local) keeps everything in this process;
//! [`Redis`](super::redis_queue) keeps it in Redis so API nodes and workers on many machines
//! share one queue.

use super::jobs::{CancelOutcome, Event, JobView, State};
use dynamicrafter_engine::{Mode, ModeKind, Report, Request, RgbImage, Sampling};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A checked submission: the request, and the uploads as sent (a backend that ships jobs to
/// other processes carries those, not the decoded pixels).
pub struct NewJob {
    pub request: Request,
    pub image: Vec<u8>,
    pub image2: Option<Vec<u8>>,
}

/// A job's settings as a shared queue carries them; with the uploads they rebuild the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub mode: ModeKind,
    pub prompt: String,
    pub sampling: Sampling,
    /// Frames per second of the video (the API node's `--fps`).
    pub fps: f64,
}

impl JobSpec {
    pub fn of(request: &Request, fps: f64) -> Self {
        Self { mode: request.mode.kind(), prompt: request.prompt.clone(), sampling: request.sampling.clone(), fps }
    }

    /// The request again, from the decoded uploads.
    pub fn request(self, image: RgbImage, image2: Option<RgbImage>) -> anyhow::Result<Request> {
        let mode = match (self.mode, image2) {
            (ModeKind::ImageToVideo, None) => Mode::ImageToVideo,
            (ModeKind::Loop, None) => Mode::Loop,
            (ModeKind::Interpolate, Some(end)) => Mode::Interpolate { end },
            (mode, end) => anyhow::bail!("job record is inconsistent: mode {} with{} a second image", mode.name(), if end.is_some() { "" } else { "out" }),
        };
        Ok(Request { image, mode, prompt: self.prompt, sampling: self.sampling })
    }
}

/// Why a job was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// `capacity` jobs are already waiting.
    Full { capacity: usize },
    /// The server is shutting down.
    Closed,
    Unavailable(Unavailable),
}

/// The job store cannot be reached (a shared backend whose server is down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl From<Unavailable> for SubmitError {
    fn from(e: Unavailable) -> Self {
        SubmitError::Unavailable(e)
    }
}

/// A finished job's video.
pub enum Video {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// How an event-stream reader waits for more: until the store signals a change, or at most
/// a while (whichever comes first; neither set: at once).
pub struct Wait {
    pub changed: Option<watch::Receiver<usize>>,
    pub at_most: Option<Duration>,
}

/// Events of a job from some index on.
pub struct EventBatch {
    pub events: Vec<Event>,
    /// The job has ended: no more events come.
    pub ended: bool,
    /// Its queue position now, where the backend does not publish position events itself.
    pub position: Option<usize>,
    pub wait: Wait,
}

/// Where the handlers find jobs.
pub trait Backend: Send + Sync {
    /// Queues a job; returns its id and 1-based position.
    fn submit(&self, job: NewJob) -> Result<(String, usize), SubmitError>;
    fn view(&self, id: &str) -> Result<Option<JobView>, Unavailable>;
    /// Events from index `from` on; `None` for an unknown job.
    fn events_since(&self, id: &str, from: usize) -> Result<Option<EventBatch>, Unavailable>;
    /// The job's state and, once done, its video.
    fn video(&self, id: &str) -> Result<Option<(State, Option<Video>)>, Unavailable>;
    fn cancel(&self, id: &str) -> Result<Option<CancelOutcome>, Unavailable>;
    /// Cancels the job if it has not ended and forgets it with its video; false for an unknown
    /// job. A worker still running it stops between steps and its result is discarded.
    fn delete(&self, id: &str) -> Result<bool, Unavailable>;
    /// Seconds a refused client should wait before trying again.
    fn retry_after_seconds(&self) -> u64;
    /// Stops taking jobs. In-process jobs are cancelled; a shared queue keeps its jobs for the
    /// other workers.
    fn shut_down(&self);
    /// Forgets jobs that ended more than `keep` ago (a shared store expires them itself).
    fn expire(&self, keep: Duration);
    /// Brings the gauges of a store shared with other processes up to date (before `/metrics`).
    fn refresh_metrics(&self) -> Result<(), Unavailable> {
        Ok(())
    }
}

/// How a job ended: its report and video, an error (`Some`), or cancelled (`None`).
pub type Outcome = Result<(Report, PathBuf), Option<String>>;

/// A job a worker took.
pub struct Taken {
    pub id: String,
    pub request: Request,
    pub cancel: Arc<AtomicBool>,
    /// Frames per second of its video.
    pub fps: f64,
    /// Where the worker writes the video.
    pub video_path: PathBuf,
    /// What the source needs to finish it.
    pub ticket: Ticket,
}

/// A source's own record of a taken job.
pub enum Ticket {
    Local,
    Redis(super::redis_queue::Claim),
}

/// Where workers find jobs.
pub trait WorkSource: Send + Sync {
    /// The next job, blocking while none waits; `None` once the source is closed.
    fn take(&self) -> Option<Taken>;
    fn stage(&self, job: &Taken, stage: &str);
    fn step(&self, job: &Taken, step: usize, total: usize, eta_seconds: Option<f64>);
    /// Ends the job; false when it had already ended elsewhere (the outcome is discarded).
    fn finish(&self, job: Taken, outcome: Outcome) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamicrafter_engine::config::presets::Preset;

    /// A job crosses to another process as JSON: its settings come back exactly (floats too),
    /// or a worker would make another video than `generate` for the same request.
    #[test]
    fn a_job_spec_round_trips_through_json() {
        let image = RgbImage { width: 8, height: 8, data: vec![7; 8 * 8 * 3] };
        let mut request = Request::new(&Preset::Dc512Interp.config(), image.clone(), "a fox");
        request.mode = Mode::Interpolate { end: image.clone() };
        request.sampling.seed = u64::MAX - 3;
        request.sampling.cfg_scale = 7.3 + 1e-12;
        let spec = JobSpec::of(&request, 12.5);
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back.fps, 12.5);
        let rebuilt = back.request(image.clone(), Some(image.clone())).unwrap();
        assert_eq!((rebuilt.sampling, rebuilt.prompt.as_str(), rebuilt.mode.kind()), (request.sampling.clone(), "a fox", ModeKind::Interpolate));
        let wrong = JobSpec::of(&request, 8.0).request(image, None);
        assert!(wrong.unwrap_err().to_string().contains("inconsistent"));
    }
}
