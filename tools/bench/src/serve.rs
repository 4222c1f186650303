//! The front-end cases: serve-vs-cli (the same request through `dynamicrafter generate` and
//! through `dynamicrafter serve`) and queue (the shared Redis queue against the in-process one).
//! Both run the binary beside this one: `cargo build --release --workspace`.

use crate::{time, Timing};
use anyhow::{bail, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The same request (tiny-v, its 5 steps with CFG, seed 1) through the command line and through
/// the server. CLI: the whole process, and its report's time without the model load (the server
/// keeps the model resident). Server: multipart upload → `done` event → video downloaded.
pub(crate) fn serve_vs_cli(runs: usize) -> Result<Vec<Timing>> {
    let (image, prompt) = ("examples/images/sunset.png", "waves rolling onto the shore at sunset");
    if !std::path::Path::new("fixtures/tiny-v").is_dir() || !std::path::Path::new(image).is_file() {
        bail!("serve-vs-cli needs fixtures/tiny-v and {image}: run from the repository root");
    }
    let exe = sibling_binary()?;
    let dir = std::env::temp_dir().join(format!("dynamicrafter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (out, report) = (dir.join("cli.mp4"), dir.join("report.json"));
    let mut generation_ms = Vec::new();
    let cli = time("serve-vs-cli: CLI process (tiny-v, 5 steps)", runs, || {
        let status = Command::new(&exe)
            .args(["generate", "--model", "fixtures/tiny-v", "--image", image, "--prompt", prompt, "--seed", "1", "--quiet"])
            .arg("--out")
            .arg(&out)
            .arg("--report-json")
            .arg(&report)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("generate failed: {status}");
        }
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let load = r["stages"].as_array().into_iter().flatten().find(|s| s["stage"] == "model load").and_then(|s| s["seconds"].as_f64());
        generation_ms.push((r["total_seconds"].as_f64().unwrap_or(0.0) - load.unwrap_or(0.0)) * 1e3);
        Ok(())
    })?;
    generation_ms.remove(0); // the warm-up run
    generation_ms.sort_by(f64::total_cmp);
    let cli_generation = Timing { name: "serve-vs-cli: CLI without model load".into(), ms: generation_ms, peak_gpu_bytes: None };
    println!("{:<44} median {:>10.2} ms", cli_generation.name, cli_generation.median());

    let mut server = Process::spawn(&exe, &["serve", "--model", "fixtures/tiny-v", "--port", "0"])?;
    let url = server.url.clone();
    let body = job_body(image, prompt, 1)?;
    let served = time("serve-vs-cli: server submit→video (tiny-v)", runs, || run_job(&url, &body));
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let served = served?;
    println!(
        "serve-vs-cli ratio: server/CLI-without-load {:.3}, server/CLI-process {:.3}",
        served.median() / cli_generation.median(),
        served.median() / cli.median()
    );
    Ok(vec![cli, cli_generation, served])
}


/// The `dynamicrafter` binary beside this one.
fn sibling_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?.with_file_name(format!("dynamicrafter{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        bail!("this case runs {}: build it first (cargo build --release --workspace)", exe.display());
    }
    Ok(exe)
}

/// A child process, killed when dropped; `url` is what a server printed.
struct Process {
    child: Child,
    url: String,
}

impl Process {
    /// Starts `serve …` and waits until it answers.
    fn spawn(exe: &Path, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(exe).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
        let mut process = Self { child, url: String::new() };
        process.url = line.trim().strip_prefix("listening on ").ok_or_else(|| anyhow::anyhow!("the server did not print its address"))?.to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        while ureq::get(&format!("{}/healthz", process.url)).call().is_err() {
            if Instant::now() > deadline {
                bail!("the server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// Starts a process that prints nothing to wait for (a worker).
    fn background(exe: &Path, args: &[&str]) -> Result<Self> {
        let child = Command::new(exe).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Self { child, url: String::new() })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A multipart job: `image`, `prompt`, `seed`, the model's default steps.
fn job_body(image: &str, prompt: &str, seed: u64) -> Result<Vec<u8>> {
    let image_bytes = std::fs::read(image)?;
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n").as_bytes());
    body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n{seed}\r\n").as_bytes());
    body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n\r\n").as_bytes());
    body.extend_from_slice(&image_bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    Ok(body)
}

const BOUNDARY: &str = "dynamicrafter-bench";

fn submit(url: &str, body: &[u8]) -> Result<String> {
    let job: serde_json::Value =
        ureq::post(&format!("{url}/api/v1/jobs")).set("Content-Type", &format!("multipart/form-data; boundary={BOUNDARY}")).send_bytes(body)?.into_json()?;
    Ok(job["id"].as_str().unwrap_or_default().to_string())
}

/// Waits for the job's `done` event and downloads its video.
fn await_video(url: &str, id: &str) -> Result<()> {
    let events = ureq::get(&format!("{url}/api/v1/jobs/{id}/events")).call()?;
    let done = BufReader::new(events.into_reader()).lines().map_while(|l| l.ok()).any(|l| l == "event: done");
    if !done {
        bail!("job {id} did not finish");
    }
    let mut video = Vec::new();
    ureq::get(&format!("{url}/api/v1/jobs/{id}/video")).call()?.into_reader().read_to_end(&mut video)?;
    Ok(())
}

/// Submit → `done` event → video downloaded.
fn run_job(url: &str, body: &[u8]) -> Result<()> {
    await_video(url, &submit(url, body)?)
}

/// As [`run_job`], and records the time not spent generating (submit→video minus the job
/// report's own total) in `overhead`: the queue's cost without the noise of the generation.
fn run_job_overhead(url: &str, body: &[u8], overhead: &mut Vec<f64>) -> Result<()> {
    let start = Instant::now();
    let id = submit(url, body)?;
    await_video(url, &id)?;
    let wall = start.elapsed().as_secs_f64();
    let status: serde_json::Value = ureq::get(&format!("{url}/api/v1/jobs/{id}")).call()?.into_json()?;
    overhead.push((wall - status["report"]["total_seconds"].as_f64().unwrap_or(0.0)) * 1e3);
    Ok(())
}

/// Samples in ms as a timing, printed (the warm-up's dropped).
fn overhead_timing(name: &str, mut ms: Vec<f64>) -> Timing {
    ms.remove(0);
    ms.sort_by(f64::total_cmp);
    let t = Timing { name: name.to_string(), ms, peak_gpu_bytes: None };
    println!("{:<44} median {:>10.2} ms", t.name, t.median());
    t
}

/// The shared queue (issue #19), on a `redis-server` of its own: one job's submit→video latency
/// through Redis (an API node and one `worker` process) against the in-process queue, and the
/// throughput of a burst of jobs with 1 and 2 workers.
pub(crate) fn queue(runs: usize) -> Result<Vec<Timing>> {
    let (image, prompt) = ("examples/images/sunset.png", "waves rolling onto the shore at sunset");
    if !Path::new("fixtures/tiny-v").is_dir() || !Path::new(image).is_file() {
        bail!("queue needs fixtures/tiny-v and {image}: run from the repository root");
    }
    let exe = sibling_binary()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = std::env::temp_dir().join(format!("dynamicrafter-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("queue needs redis-server (apt install redis-server): {e}"))?;
    let result = (|| -> Result<Vec<Timing>> {
        let body = job_body(image, prompt, 1)?;
        let local = Process::spawn(&exe, &["serve", "--model", "fixtures/tiny-v", "--port", "0"])?;
        let queue_args = ["--model", "fixtures/tiny-v", "--queue", redis_url.as_str()];
        let api = Process::spawn(&exe, &[&["serve", "--port", "0", "--workers", "0"], &queue_args[..]].concat())?;
        let mut workers = vec![Process::background(&exe, &[&["worker"], &queue_args[..]].concat())?];
        // Alternating, so a drift of the machine's speed hits both paths alike.
        let (mut in_process, mut local_overhead, mut shared, mut shared_overhead) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..=runs.max(1) {
            for (url, wall, overhead) in [(&local.url, &mut in_process, &mut local_overhead), (&api.url, &mut shared, &mut shared_overhead)] {
                let t = Instant::now();
                run_job_overhead(url, &body, overhead)?;
                wall.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        drop(local);
        let in_process = overhead_timing("queue: in-process submit→video", in_process);
        let local_overhead = overhead_timing("queue: in-process, not generating", local_overhead);
        let shared = overhead_timing("queue: Redis submit→video (1 worker)", shared);
        let shared_overhead = overhead_timing("queue: Redis, not generating", shared_overhead);
        println!(
            "queue latency ratio: Redis / in-process {:.3} (medians); generation time aside, {:.3}",
            shared.median() / in_process.median(),
            (in_process.median() - local_overhead.median() + shared_overhead.median()) / in_process.median()
        );
        // A burst of jobs: wall time until all are done, as jobs per minute.
        let burst = 8;
        let mut throughput = Vec::new();
        for n in 1..=2 {
            if n == 2 {
                workers.push(Process::background(&exe, &[&["worker"], &queue_args[..]].concat())?);
                // Ready once it has loaded the model: a warm-up job for each.
                for _ in 0..2 {
                    run_job(&api.url, &body)?;
                }
            }
            let t = time(&format!("queue: burst of {burst} jobs, {n} worker(s)"), runs.min(2), || {
                let ids = (0..burst).map(|_| submit(&api.url, &body)).collect::<Result<Vec<_>>>()?;
                ids.iter().try_for_each(|id| await_video(&api.url, id))
            })?;
            println!("queue: {n} worker(s): {:.1} jobs/min", burst as f64 * 60e3 / t.median());
            throughput.push(t);
        }
        drop(workers);
        Ok([in_process, local_overhead, shared, shared_overhead].into_iter().chain(throughput).collect())
    })();
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
