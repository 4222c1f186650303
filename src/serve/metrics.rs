//! Prometheus metrics of the server, rendered at `/metrics`.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

pub const QUEUE_DEPTH: &str = "dynamicrafter_queue_depth";
pub const RUNNING: &str = "dynamicrafter_jobs_running";
pub const JOBS: &str = "dynamicrafter_jobs_total";
pub const REJECTED: &str = "dynamicrafter_jobs_rejected_total";
pub const STAGE_SECONDS: &str = "dynamicrafter_stage_duration_seconds";
pub const STEP_SECONDS: &str = "dynamicrafter_denoise_step_duration_seconds";
pub const LOAD_SECONDS: &str = "dynamicrafter_model_load_seconds";
pub const PEAK_RSS: &str = "dynamicrafter_peak_rss_bytes";
pub const PEAK_GPU: &str = "dynamicrafter_peak_gpu_bytes";
pub const PENDING: &str = "dynamicrafter_jobs_pending";
pub const WORKER_UP: &str = "dynamicrafter_worker_up";

/// Installs the process-wide recorder once and returns its handle.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Stages run from milliseconds (tiny models) to minutes (1024 on CPU).
        let buckets = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .expect("bucket list is not empty");
        // A recorder installed by someone else means metrics go there; render ours (empty) then.
        match builder.install_recorder() {
            Ok(handle) => handle,
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Declares every metric so `/metrics` lists them before the first job.
pub fn describe(load: Duration) {
    metrics::describe_gauge!(QUEUE_DEPTH, "Jobs waiting in the queue.");
    metrics::describe_gauge!(RUNNING, "Jobs being generated.");
    metrics::describe_counter!(JOBS, "Jobs by final state.");
    metrics::describe_counter!(REJECTED, "Submissions refused because the queue was full.");
    metrics::describe_histogram!(STAGE_SECONDS, metrics::Unit::Seconds, "Wall time of a pipeline stage.");
    metrics::describe_histogram!(STEP_SECONDS, metrics::Unit::Seconds, "Wall time of one denoising step.");
    metrics::describe_gauge!(LOAD_SECONDS, metrics::Unit::Seconds, "Time the model took to load.");
    metrics::describe_gauge!(PEAK_RSS, metrics::Unit::Bytes, "Peak resident memory of the process.");
    metrics::describe_gauge!(PEAK_GPU, metrics::Unit::Bytes, "Peak GPU memory allocated by the process (GPU runs only).");
    metrics::describe_gauge!(PENDING, "Shared queue: jobs claimed by a worker, live or not (a dead one's are taken over after the visibility timeout).");
    metrics::describe_gauge!(WORKER_UP, "Shared queue: 1 for a worker seen in the last 10 s, 0 for one seen in the last hour.");
    gauge!(LOAD_SECONDS).set(load.as_secs_f64());
    gauge!(QUEUE_DEPTH).set(0.0);
    gauge!(RUNNING).set(0.0);
    counter!(REJECTED).absolute(0);
    for state in ["done", "failed", "cancelled"] {
        counter!(JOBS, "state" => state).absolute(0);
    }
}

pub fn queue_depth(n: usize) {
    gauge!(QUEUE_DEPTH).set(n as f64);
}

pub fn running(n: usize) {
    gauge!(RUNNING).set(n as f64);
}

/// The shared queue as a whole: waiting, claimed, claimed by live workers, and each worker's
/// liveness.
pub fn cluster(waiting: usize, pending: usize, running: usize, workers: &[(String, bool)]) {
    queue_depth(waiting);
    gauge!(PENDING).set(pending as f64);
    gauge!(RUNNING).set(running as f64);
    for (name, up) in workers {
        gauge!(WORKER_UP, "worker" => name.clone()).set(if *up { 1.0 } else { 0.0 });
    }
}

pub fn rejected() {
    counter!(REJECTED).increment(1);
}

pub fn job_finished(state: &'static str) {
    counter!(JOBS, "state" => state).increment(1);
}

pub fn stage(name: &str, seconds: f64) {
    histogram!(STAGE_SECONDS, "stage" => name.to_string()).record(seconds);
}

pub fn step(seconds: f64) {
    histogram!(STEP_SECONDS).record(seconds);
}

/// Peak resident memory and, on a GPU, peak device memory, from a run's report.
pub fn peak_memory(rss: Option<u64>, gpu: Option<u64>) {
    if let Some(b) = rss {
        gauge!(PEAK_RSS).set(b as f64);
    }
    if let Some(b) = gpu {
        gauge!(PEAK_GPU).set(b as f64);
    }
}

pub fn render() -> String {
    let h = handle();
    h.run_upkeep();
    h.render()
}
