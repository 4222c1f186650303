//! The shared queue on a real `redis-server` (started here, on a free loopback port, with its
//! append-only file in a temp folder), with `serve --queue` API nodes and `worker` processes on
//! the tiny fixture model.

mod support;

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::redis::Redis;
use support::{file, text, Server};

const SUNSET: &str = "examples/images/sunset.png";
const MODEL: &str = "fixtures/tiny-v";

/// A `dynamicrafter worker` process.
struct Worker(Child);

impl Worker {
    /// A worker whose jobs another takes over after `visibility` seconds without its heartbeat.
    fn start(redis: &Redis, visibility: u32, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
            .current_dir(support::repo())
            .args(["worker", "--model", MODEL, "--queue", &redis.url(), "--visibility-timeout", &visibility.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a worker");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn api_node(redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--queue", url.as_str(), "--workers", "0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn submit(server: &Server, steps: u32, seed: u64) -> String {
    server.submit(&[file("image", SUNSET), text("prompt", "waves"), text("steps", steps), text("seed", seed)])
}

fn status(server: &Server, id: &str) -> Value {
    server.get(&format!("/api/v1/jobs/{id}")).json()
}

/// Waits until `id` runs a denoising step on one of `workers`; returns that worker's pid (the
/// one in its name).
fn wait_running(server: &Server, id: &str, workers: &[&Worker]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = status(server, id);
        let pid = v["worker"].as_str().and_then(|w| w.split(':').nth(1)).and_then(|p| p.parse().ok());
        let on_ours = pid.is_some_and(|p| workers.iter().any(|w| w.pid() == p));
        if v["state"] == "running" && on_ours && v["progress"]["stage"] == "denoise" && v["progress"]["step"].as_u64() >= Some(1) {
            return pid.unwrap();
        }
        assert!(!["done", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()), "job ended before it was seen running: {v}");
        assert!(Instant::now() < deadline, "job {id} did not start: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The same request through `generate`.
fn cli_video(steps: u32, seed: u64) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("dynamicrafter-redis-cli-{}-{seed}-{steps}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("cli.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(support::repo())
        .args(["generate", "--model", MODEL, "--image", SUNSET, "--prompt", "waves", "--quiet"])
        .args(["--steps", &steps.to_string(), "--seed", &seed.to_string(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let video = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    video
}

fn final_events(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).filter(|n| ["done", "error", "cancelled"].contains(n)).collect()
}

/// #19: two workers and one API node, six jobs; one worker is killed with SIGKILL while it runs
/// a job. Every job still ends done exactly once, each video byte-identical to `generate`.
#[test]
fn a_killed_worker_loses_no_job() {
    let redis = Redis::start();
    let api = api_node(&redis, &[]);
    let mut workers = [Worker::start(&redis, 2, &[]), Worker::start(&redis, 2, &[])];
    let steps = 4;
    let seeds = [21u64, 22, 23, 24, 25, 26];
    let ids: Vec<String> = seeds.iter().map(|&s| submit(&api, steps, s)).collect();
    let victim = wait_running(&api, &ids[0], &[&workers[0], &workers[1]]);
    let index = workers.iter().position(|w| w.pid() == victim).expect("the job runs on one of our workers");
    workers[index].kill9();
    for (id, &seed) in ids.iter().zip(&seeds) {
        let v = api.wait(id);
        assert_eq!(v["state"], "done", "{v}");
        assert_eq!(v["report"]["seed"], seed);
        let events = api.events(id);
        assert_eq!(final_events(&events), ["done"], "one final event: {events:?}");
        let video = api.get(&format!("/api/v1/jobs/{id}/video"));
        assert_eq!((video.status, video.header("content-type")), (200, Some("video/mp4")));
        assert!(video.body == cli_video(steps, seed), "job with seed {seed}: the video differs from generate's");
    }
    // Videos kept in Redis answer range requests too (browsers seek with them).
    let url = format!("{}/api/v1/jobs/{}/video", api.url, ids[0]);
    let whole = api.get(&format!("/api/v1/jobs/{}/video", ids[0])).body;
    let range = |r: &str| match ureq::get(&url).set("Range", r).call() {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => {
            let status = resp.status();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
            (status, body)
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(range("bytes=10-19"), (206, whole[10..20].to_vec()));
    assert_eq!(range("bytes=-5"), (206, whole[whole.len() - 5..].to_vec()));
    assert_eq!(range("bytes=999999999-").0, 416);
    let survivor = &workers[1 - index];
    assert_ne!(status(&api, &ids[0])["worker"].as_str().unwrap().split(':').nth(1), Some(victim.to_string().as_str()));
    assert!(status(&api, &ids[0])["worker"].as_str().unwrap().contains(&format!(":{}:", survivor.pid())));
}

/// #19: a worker that stalls (SIGSTOP) past the visibility timeout loses its job to another,
/// which runs it to the end; when the stalled worker wakes, its late attempt is discarded: one
/// final event, the video of the attempt that counts, and the woken worker takes new jobs.
#[test]
fn a_late_duplicate_is_discarded() {
    let redis = Redis::start();
    let api = api_node(&redis, &[]);
    let results = tempfile::tempdir().unwrap();
    let shared = ["--results-dir", results.path().to_str().unwrap()];
    let (steps, seed) = (40, 11);
    let id = submit(&api, steps, seed);
    let mut stalled = Worker::start(&redis, 1, &shared);
    wait_running(&api, &id, &[&stalled]);
    signal(&stalled, "STOP");
    let taker = Worker::start(&redis, 1, &shared);
    let v = api.wait(&id);
    assert_eq!(v["state"], "done", "{v}");
    assert!(v["worker"].as_str().unwrap().contains(&format!(":{}:", taker.pid())), "{v}");
    let kept = api.get(&format!("/api/v1/jobs/{id}/video")).body;
    signal(&stalled, "CONT");
    // The woken worker finds the job is no longer its own, drops its attempt and goes on.
    drop(taker);
    let next = submit(&api, 2, 12);
    assert_eq!(api.wait(&next)["state"], "done");
    assert_eq!(final_events(&api.events(&id)), ["done"]);
    assert!(api.get(&format!("/api/v1/jobs/{id}/video")).body == kept, "the kept video changed");
    assert!(kept == cli_video(steps, seed), "the video differs from generate's");
    let files: Vec<String> = std::fs::read_dir(results.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.iter().filter(|f| f.starts_with(&id)).count(), 1, "one video of the job: {files:?}");
    stalled.kill9();
}

fn signal(worker: &Worker, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &worker.pid().to_string()]).status().unwrap();
    assert!(status.success());
}

/// #19: capacity is counted across API nodes; any node answers for any job; cancel through a
/// second node stops the job on its worker within a step, and the worker goes on to the next.
#[test]
fn capacity_and_cancel_span_api_nodes() {
    let redis = Redis::start();
    let a = api_node(&redis, &["--max-queue", "2"]);
    let b = api_node(&redis, &["--max-queue", "2"]);
    // No worker yet: jobs wait.
    let long = submit(&a, 60, 1);
    let queued = submit(&b, 2, 2);
    let refused = b.post_form(&[file("image", SUNSET), text("prompt", "waves"), text("steps", 2)]);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.json()["error"].as_str().unwrap().contains("queue is full"));
    assert!(refused.header("retry-after").is_some());
    assert_eq!(status(&a, &queued)["position"], 2);
    // Each node's /metrics shows the cluster.
    assert_eq!(a.metric("dynamicrafter_queue_depth"), Some(2.0));
    let r = a.cancel(&queued);
    assert_eq!((r.status, r.json()["state"].clone()), (200, Value::from("cancelled")));
    assert_eq!(status(&b, &queued)["state"], "cancelled");

    let worker = Worker::start(&redis, 2, &[]);
    wait_running(&b, &long, &[&worker]);
    let name = status(&a, &long)["worker"].as_str().unwrap().to_string();
    assert_eq!(b.metric(&format!("dynamicrafter_worker_up{{worker=\"{name}\"}}")), Some(1.0));
    assert_eq!((b.metric("dynamicrafter_jobs_running"), b.metric("dynamicrafter_jobs_pending")), (Some(1.0), Some(1.0)));
    assert_eq!(b.metric("dynamicrafter_queue_depth"), Some(0.0));
    let r = b.cancel(&long);
    assert_eq!(r.status, 202, "{}", r.text());
    let at_cancel = status(&b, &long)["progress"]["step"].as_u64().unwrap();
    let events = a.events(&long);
    assert_eq!(final_events(&events), ["cancelled"], "{events:?}");
    let steps = events.iter().filter(|(n, _)| n == "step").count() as u64;
    assert!(steps <= at_cancel + 2, "the job ran {steps} steps, cancelled at step {at_cancel}");
    let after = a.wait(&submit(&b, 2, 3));
    assert_eq!(after["state"], "done", "the worker takes the next job: {after}");
}

/// #19: a job whose worker dies every time ends failed after the retry limit, with the reason.
#[test]
fn a_poison_job_fails_after_the_retry_limit() {
    let redis = Redis::start();
    let api = api_node(&redis, &[]);
    let id = submit(&api, 60, 5);
    for _ in 0..2 {
        let mut worker = Worker::start(&redis, 1, &["--max-attempts", "2"]);
        wait_running(&api, &id, &[&worker]);
        worker.kill9();
    }
    let _last = Worker::start(&redis, 1, &["--max-attempts", "2"]);
    let v = api.wait(&id);
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("2 attempts"), "{v}");
    assert_eq!(final_events(&api.events(&id)), ["error"]);
}

/// #19: Redis down: submit and status answer 503 JSON, a worker will not start (exit 2, one
/// line); when Redis is back (its append-only file intact) the queued jobs run, also after
/// the API node restarts, and a worker that was running rides out the outage.
#[test]
fn redis_and_api_node_restarts_lose_no_job() {
    let mut redis = Redis::start();
    let mut api = api_node(&redis, &[]);
    let id = submit(&api, 3, 8);
    redis.down();
    let r = api.post_form(&[file("image", SUNSET), text("prompt", "waves"), text("steps", 2)]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("job queue is unavailable"), "{}", r.text());
    assert_eq!(api.get(&format!("/api/v1/jobs/{id}")).status, 503);
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(support::repo())
        .args(["worker", "--model", MODEL, "--queue", &redis.url()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot use Redis at") && stderr.contains(&redis.url()), "{stderr}");

    redis.up();
    // The API node reconnects; the job accepted before the outage is still there.
    assert_eq!(status(&api, &id)["state"], "queued");
    // The visibility timeout outlasts the outage below: the running worker keeps its job.
    let worker = Worker::start(&redis, 20, &[]);
    assert_eq!(api.wait(&id)["state"], "done");

    // A job running while Redis restarts, and an API node restarted meanwhile.
    let id = submit(&api, 40, 9);
    wait_running(&api, &id, &[&worker]);
    api.terminate();
    redis.down();
    std::thread::sleep(Duration::from_millis(500));
    redis.up();
    api = api_node(&redis, &[]);
    let v = api.wait(&id);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(api.get(&format!("/api/v1/jobs/{id}/video")).status, 200);
    assert_eq!(final_events(&api.events(&id)), ["done"]);
}

/// #19: SIGTERM on a worker hands its running job back at once, without counting the try: a
/// second worker allowed a single attempt still runs it to the end.
#[test]
fn a_stopping_worker_hands_its_job_back() {
    let redis = Redis::start();
    let api = api_node(&redis, &[]);
    let id = submit(&api, 20, 4);
    let mut first = Worker::start(&redis, 30, &["--max-attempts", "1"]);
    wait_running(&api, &id, &[&first]);
    let _ = Command::new("kill").args(["-TERM", &first.pid().to_string()]).status();
    let code = first.0.wait().unwrap();
    assert!(code.success(), "the worker exits cleanly: {code:?}");
    let v = status(&api, &id);
    assert_eq!((v["state"].as_str(), v["position"].as_u64()), (Some("queued"), Some(1)), "{v}");
    // Taken at once, not after the 30 s visibility timeout.
    let second = Worker::start(&redis, 30, &["--max-attempts", "1"]);
    let started = Instant::now();
    wait_running(&api, &id, &[&second]);
    assert!(started.elapsed() < Duration::from_secs(20));
    let v = api.wait(&id);
    assert_eq!(v["state"], "done", "{v}");
}

/// #19: `batch --queue` fans a prompt folder out as jobs to the cluster and writes each video as
/// its job ends, the same bytes as a local `batch`; a run interrupted before its jobs ended
/// waits for those jobs when run again, and a rerun skips what exists.
#[test]
fn batch_fans_out_to_the_cluster_and_resumes() {
    use std::io::{BufRead, BufReader};
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!("dynamicrafter-redis-batch-{}", std::process::id()));
    let (prompts, local, shared) = (dir.join("prompts"), dir.join("local"), dir.join("shared"));
    std::fs::create_dir_all(&prompts).unwrap();
    for name in ["sunset.png", "balloon.png", "test_card.png"] {
        std::fs::copy(support::repo().join("examples/images").join(name), prompts.join(name)).unwrap();
    }
    std::fs::write(prompts.join("prompts.txt"), "a balloon drifts\nwaves\nthe colours shimmer\n").unwrap();
    let batch = |out: &std::path::Path, queue: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"));
        cmd.current_dir(support::repo()).args(["batch", "--model", MODEL, "--steps", "2", "--seed", "5"]).arg("--prompt-dir").arg(&prompts).arg("--out-dir").arg(out);
        if let Some(url) = queue {
            cmd.args(["--queue", url]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    batch(&local, None);
    // Interrupted once its three jobs are queued (no worker has started yet).
    let mut first = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(support::repo())
        .args(["batch", "--model", MODEL, "--steps", "2", "--seed", "5", "--queue", &redis.url()])
        .arg("--prompt-dir")
        .arg(&prompts)
        .arg("--out-dir")
        .arg(&shared)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(first.stderr.take().unwrap());
    let queued = stderr.lines().map_while(Result::ok).filter(|l| l.contains("queued as job")).take(3).count();
    assert_eq!(queued, 3);
    let _ = first.kill();
    let _ = first.wait();
    let _workers = [Worker::start(&redis, 30, &[]), Worker::start(&redis, 30, &[])];
    let log = batch(&shared, Some(&redis.url()));
    assert_eq!((log.matches("resuming job").count(), log.matches("queued as job").count()), (3, 0), "{log}");
    let names = ["balloon_sample0.mp4", "sunset_sample0.mp4", "test_card_sample0.mp4"];
    for name in names {
        assert!(std::fs::read(shared.join(name)).unwrap() == std::fs::read(local.join(name)).unwrap(), "{name} differs from the local batch's");
    }
    std::fs::remove_file(shared.join(names[1])).unwrap();
    let log = batch(&shared, Some(&redis.url()));
    assert_eq!((log.matches("exists, skipped").count(), log.matches("queued as job").count()), (2, 1), "{log}");
    assert!(std::fs::read(shared.join(names[1])).unwrap() == std::fs::read(local.join(names[1])).unwrap());
    assert!(std::fs::read_dir(&shared).unwrap().all(|e| e.unwrap().path().extension().is_some_and(|x| x == "mp4")), "no temp or job file left");
    let _ = std::fs::remove_dir_all(&dir);
}

/// #19: a pure API node (`--workers 0`) loads no weights: it serves a preset whose checkpoint is
/// nowhere on this machine, checking requests against the preset's config.
#[test]
fn an_api_node_needs_no_weights() {
    use std::io::{BufRead, BufReader};
    let redis = Redis::start();
    let empty_cache = std::env::temp_dir().join(format!("dynamicrafter-redis-hf-{}", std::process::id()));
    std::fs::create_dir_all(&empty_cache).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(support::repo())
        .args(["serve", "--model", "256", "--port", "0", "--workers", "0", "--queue", &redis.url()])
        .env("HF_HOME", &empty_cache)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    let get = |path: &str| -> Value { ureq::get(&format!("{url}{path}")).call().unwrap().into_json().unwrap() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        assert!(Instant::now() < deadline, "the API node did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let model = get("/api/v1/model");
    assert_eq!((model["model"].as_str(), model["width"].as_u64(), model["device"].as_str()), (Some("Doubiiu/DynamiCrafter"), Some(256), Some("workers")), "{model}");
    let (content_type, body) = support::multipart(&[file("image", SUNSET), text("prompt", "waves"), text("steps", 100)]);
    let refused = ureq::post(&format!("{url}/api/v1/jobs")).set("Content-Type", &content_type).send_bytes(&body);
    let Err(ureq::Error::Status(422, resp)) = refused else { panic!("steps 100 is out of the 256 model's range: {refused:?}") };
    assert_eq!(resp.into_json::<Value>().unwrap()["field"], "steps");
    let (content_type, body) = support::multipart(&[file("image", SUNSET), text("prompt", "waves")]);
    let accepted: Value = ureq::post(&format!("{url}/api/v1/jobs")).set("Content-Type", &content_type).send_bytes(&body).unwrap().into_json().unwrap();
    assert_eq!(get(&format!("/api/v1/jobs/{}", accepted["id"].as_str().unwrap()))["state"], "queued");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&empty_cache);
}

/// #19: workers with `--results-dir` (a folder every node sees) write the videos there; Redis
/// keeps only their paths, and the API node serves the file, range requests included.
#[test]
fn videos_can_live_in_a_shared_folder() {
    let redis = Redis::start();
    let results = std::env::temp_dir().join(format!("dynamicrafter-redis-results-{}", std::process::id()));
    let api = api_node(&redis, &[]);
    let _worker = Worker::start(&redis, 30, &["--results-dir", results.to_str().unwrap()]);
    let id = submit(&api, 2, 6);
    assert_eq!(api.wait(&id)["state"], "done");
    let file = std::fs::read(results.join(format!("{id}-1.mp4"))).expect("the video is in the shared folder");
    let video = api.get(&format!("/api/v1/jobs/{id}/video"));
    assert_eq!(video.status, 200);
    assert!(video.body == file && video.body == cli_video(2, 6));
    let part = ureq::get(&format!("{}/api/v1/jobs/{id}/video", api.url)).set("Range", "bytes=0-9").call().unwrap();
    assert_eq!(part.status(), 206);
    let held = Command::new("redis-cli").args(["-u", &redis.url(), "HEXISTS", &format!("dynamicrafter:job:{id}"), "video"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&held.stdout).trim(), "0", "Redis holds no video bytes");
    let _ = std::fs::remove_dir_all(&results);
}
