//! The HTTP API of `dynamicrafter serve`, end to end on the tiny fixture model.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use support::redis::Redis;
use support::{file, text, Part, Server};

const SUNSET: &str = "examples/images/sunset.png";

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

/// Runs `test` on a server with `extra` flags on each job backend: in this process, and a shared
/// Redis queue (with the worker in the node) — what the handlers see must not differ.
fn on_each_backend(extra: &[&str], test: impl Fn(&Server)) {
    test(&Server::start(extra));
    let redis = Redis::start();
    let url = redis.url();
    let mut args = vec!["--queue", url.as_str()];
    args.extend_from_slice(extra);
    test(&Server::start(&args));
}

#[test]
fn a_job_streams_its_events_in_order_and_equals_the_cli_run() {
    on_each_backend(&[], a_job_streams_its_events_in_order);
}

fn a_job_streams_its_events_in_order(server: &Server) {
    let id = server.submit(&[file("image", SUNSET), text("prompt", "waves at sunset"), text("steps", 3), text("seed", 7)]);
    let events = server.events(&id);
    assert_eq!(
        names(&events),
        ["queued", "stage", "stage", "stage", "stage", "step", "step", "step", "stage", "done"],
        "{events:?}"
    );
    let stages: Vec<&str> = events.iter().filter(|(n, _)| n == "stage").map(|(_, d)| d["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["text encode", "image encode", "VAE encode", "denoise", "VAE decode"]);
    let steps: Vec<u64> = events.iter().filter(|(n, _)| n == "step").map(|(_, d)| d["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3]);
    assert_eq!(events[0].1["position"], 1);

    let status = server.get(&format!("/api/v1/jobs/{id}")).json();
    assert_eq!(status["state"], "done");
    assert_eq!(status["seed"], 7);
    let report = &status["report"];
    let auto = dynamicrafter_engine::PrecisionPolicy::new(dynamicrafter_engine::Precision::Auto, &candle_core::Device::Cpu).unwrap();
    assert_eq!(report["precision"], auto.name());
    assert_eq!(report["denoise_steps"]["count"], 3);
    assert_eq!(&events.last().unwrap().1["report"], report);

    let video = server.get(&format!("/api/v1/jobs/{id}/video"));
    assert_eq!(video.status, 200);
    assert_eq!(video.header("content-type"), Some("video/mp4"));

    // The same request on the command line gives the same file, byte for byte: one code path.
    let dir = std::env::temp_dir().join(format!("dynamicrafter-serve-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("cli.mp4");
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(support::repo())
        .args(["generate", "--model", "fixtures/tiny-v", "--image", SUNSET, "--prompt", "waves at sunset"])
        .args(["--steps", "3", "--seed", "7", "--quiet", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == video.body, "server and CLI videos differ");
    let _ = std::fs::remove_dir_all(&dir);

    // A late subscriber gets the whole history.
    assert_eq!(names(&server.events(&id)), names(&events));
    assert_eq!(server.metric_reaches("dynamicrafter_jobs_total{state=\"done\"}", 1.0), Some(1.0));
    assert_eq!(server.metric("dynamicrafter_denoise_step_duration_seconds_count"), Some(3.0));
    assert_eq!(server.metric("dynamicrafter_queue_depth"), Some(0.0));
    assert!(server.metric("dynamicrafter_model_load_seconds").is_some());
    assert!(server.get("/metrics").text().contains("dynamicrafter_stage_duration_seconds_bucket{stage=\"VAE decode\""));

    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("id=\"generate\""));
    let api = server.get("/openapi.json").json();
    for path in ["/api/v1/jobs", "/api/v1/jobs/{id}", "/api/v1/jobs/{id}/events", "/api/v1/jobs/{id}/video"] {
        assert!(api["paths"][path].is_object(), "openapi lists {path}");
    }
    let examples = server.get("/api/v1/examples").json();
    for ex in examples.as_array().unwrap() {
        let img = server.get(ex["image_url"].as_str().unwrap());
        assert_eq!(img.status, 200);
        assert!(image::load_from_memory(&img.body).is_ok());
    }
}

#[test]
fn concurrent_jobs_each_get_their_own_result() {
    on_each_backend(&["--workers", "2"], concurrent_jobs);
}

fn concurrent_jobs(server: &Server) {
    let seeds = [11u64, 12, 13, 11];
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| {
                let server = &server;
                s.spawn(move || server.submit(&[file("image", SUNSET), text("prompt", "waves"), text("steps", 2), text("seed", seed)]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut videos = Vec::new();
    for (id, seed) in ids.iter().zip(seeds) {
        let status = server.wait(id);
        assert_eq!(status["state"], "done", "{status}");
        assert_eq!(status["report"]["seed"], seed);
        let v = server.get(&format!("/api/v1/jobs/{id}/video"));
        assert_eq!(v.status, 200);
        videos.push(v.body);
    }
    assert!(videos[0] == videos[3], "same seed, same video");
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        assert!(videos[i] != videos[j], "seeds {} and {} gave the same video", seeds[i], seeds[j]);
    }
    assert_eq!(server.metric_reaches("dynamicrafter_jobs_total{state=\"done\"}", 4.0), Some(4.0));
}

#[test]
fn cancel_queued_and_running_jobs_and_refuse_past_the_queue_bound() {
    on_each_backend(&["--max-queue", "1"], cancel_and_bound);
}

fn cancel_and_bound(server: &Server) {
    let long = || vec![file("image", SUNSET), text("prompt", "slow"), text("steps", 60)];
    let running = server.submit(&long());
    // Wait until it is denoising.
    server.events_until(&running, |(n, _)| n == "step");
    let queued = server.submit(&long());
    assert_eq!(server.get(&format!("/api/v1/jobs/{queued}")).json()["position"], 1);

    let full = server.post_form(&long());
    assert_eq!(full.status, 429, "{}", full.text());
    let secs: u64 = full.header("retry-after").expect("Retry-After header").parse().unwrap();
    assert!(secs >= 1);
    assert!(full.json()["error"].as_str().unwrap().contains("queue is full"));
    assert_eq!(server.metric("dynamicrafter_jobs_rejected_total"), Some(1.0));

    let r = server.cancel(&queued);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.get(&format!("/api/v1/jobs/{queued}")).json()["state"], "cancelled");
    assert_eq!(names(&server.events(&queued)), ["queued", "cancelled"]);

    let r = server.cancel(&running);
    assert_eq!(r.status, 202, "{}", r.text());
    let events = server.events(&running);
    assert_eq!(events.last().unwrap().0, "cancelled");
    let steps = events.iter().filter(|(n, _)| n == "step").count();
    assert!(steps < 60, "stopped between steps, after {steps}");
    let status = server.wait(&running);
    assert_eq!(status["state"], "cancelled");
    assert!(status["video_url"].is_null());
    assert_eq!(server.get(&format!("/api/v1/jobs/{running}/video")).status, 409);
    let again = server.cancel(&running);
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["field"], "id");
    assert_eq!(server.metric_reaches("dynamicrafter_jobs_total{state=\"cancelled\"}", 2.0), Some(2.0));

    // The worker is free again.
    let next = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&next)["state"], "done");
}

/// A PNG of `w`×`h` pixels.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    let server = Server::start(&["--max-image-bytes", "40000", "--max-image-pixels", "70000"]);
    let ok_image = || file("image", SUNSET);
    let long_prompt = "a very long prompt ".repeat(30);
    let cases: Vec<(Vec<Part>, u16, &str)> = vec![
        (vec![text("prompt", "no image")], 400, "image"),
        (vec![Part::File("image", b"not an image at all".to_vec())], 415, "image"),
        (vec![file("image", "examples/images/test_card.png")], 413, "image"),
        (vec![Part::File("image", png(300, 300))], 413, "image"),
        (vec![Part::File("image", png(8, 8)[..40].to_vec())], 400, "image"),
        (vec![ok_image(), text("steps", 0)], 422, "steps"),
        (vec![ok_image(), text("steps", 61)], 422, "steps"),
        (vec![ok_image(), text("steps", 2.5)], 422, "steps"),
        (vec![ok_image(), text("steps", "many")], 400, "steps"),
        (vec![ok_image(), text("cfg_scale", 20)], 422, "cfg_scale"),
        (vec![ok_image(), text("eta", -0.5)], 422, "eta"),
        (vec![ok_image(), text("fs", 100)], 422, "fs"),
        (vec![ok_image(), text("seed", -1)], 422, "seed"),
        (vec![ok_image(), text("prompt", &long_prompt)], 422, "prompt"),
        (vec![ok_image(), text("mode", "zoom")], 400, "mode"),
        (vec![ok_image(), text("mode", "interpolate")], 400, "image2"),
        (vec![ok_image(), text("mode", "loop"), file("image2", SUNSET)], 400, "image2"),
        (vec![ok_image(), text("colour", "red")], 400, "colour"),
        (vec![ok_image(), text("sampler", "heun")], 422, "sampler"),
        (vec![ok_image(), text("karras", "maybe")], 422, "karras"),
        (vec![ok_image(), text("karras", "true")], 422, "karras"),
        (vec![ok_image(), text("frames", 129)], 422, "frames"),
        (vec![ok_image(), text("mode", "loop"), text("frames", 9)], 422, "frames"),
        (vec![ok_image(), text("frames", 20), text("window_stride", 9)], 422, "window_stride"),
        (vec![ok_image(), text("noise_reschedule", "often")], 422, "noise_reschedule"),
        // Left out, a field takes its default; sent empty, it is refused (the document says so).
        (vec![ok_image(), text("steps", "")], 400, "steps"),
        (vec![ok_image(), text("sampler", "")], 400, "sampler"),
        (vec![ok_image(), text("mode", "")], 400, "mode"),
        (vec![ok_image(), Part::File("image2", Vec::new())], 400, "image2"),
    ];
    for (parts, status, field) in cases {
        let r = server.post_form(&parts);
        assert_eq!(r.status, status, "field {field}: {}", r.text());
        let body = r.json();
        assert_eq!(body["field"], field, "{body}");
        assert!(body["error"].as_str().unwrap().contains(field), "the message names {field}: {body}");
    }

    let json_cases = [
        (json!({ "image": "***" }), 400, "image"),
        (json!({ "image": "aGVsbG8=", "steps": "3" }), 400, "steps"),
        (json!({ "image": "aGVsbG8=", "colour": 1 }), 400, "colour"),
        (json!({ "image": "aGVsbG8=", "sampler": 2 }), 400, "sampler"),
        (json!({ "image": "aGVsbG8=" }), 415, "image"),
    ];
    for (body, status, field) in json_cases {
        let r = server.post_json(&body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_eq!(r.json()["field"], field);
    }
    assert_eq!(server.post_raw("application/json", b"{not json").status, 400);
    assert_eq!(server.post_raw("text/plain", b"hello").status, 415);

    for path in ["/api/v1/jobs/nope", "/api/v1/jobs/nope/events", "/api/v1/jobs/nope/video"] {
        let r = server.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["field"], "id");
    }
    assert_eq!(server.delete("/api/v1/jobs/nope").status, 404);
    assert_eq!(server.get("/api/v1/nothing").status, 404);

    // Nothing was queued, and a good JSON job still runs.
    assert_eq!(server.metric("dynamicrafter_jobs_total{state=\"done\"}"), Some(0.0));
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(support::repo().join(SUNSET)).unwrap());
    let r = server.post_json(&json!({ "image": format!("data:image/png;base64,{b64}"), "prompt": "waves", "steps": 1, "mode": "loop" }));
    assert_eq!(r.status, 202, "{}", r.text());
    let status = server.wait(r.json()["id"].as_str().unwrap());
    assert_eq!(status["state"], "done");
    assert_eq!(status["mode"], "loop");
    assert_eq!(status["report"]["frames"], 7, "a loop drops the last frame");
    assert_eq!(status["report"]["sampler"], "ddim eta 1, 1 step");

    // The samplers: named values in the API, the model's controls and the OpenAPI document.
    let r = server.post_json(&json!({ "image": b64, "steps": 2, "sampler": "dpmpp-2m-sde", "karras": true }));
    assert_eq!(r.status, 202, "{}", r.text());
    let status = server.wait(r.json()["id"].as_str().unwrap());
    assert_eq!(status["report"]["sampler"], "dpmpp-2m-sde karras, 2 steps");
    // Long videos: more frames than the model's window (8 for the tiny model).
    let r = server.post_json(&json!({ "image": b64, "steps": 1, "frames": 12, "noise_reschedule": true }));
    assert_eq!(r.status, 202, "{}", r.text());
    let status = server.wait(r.json()["id"].as_str().unwrap());
    assert_eq!(status["report"]["frames"], 12);
    assert_eq!(status["report"]["windows"], "2 windows of 8 frames, stride 4");
    let controls = &server.get("/api/v1/model").json()["controls"];
    assert_eq!(controls["sampler"]["default"], "ddim");
    assert_eq!(controls["sampler"]["choices"].as_array().unwrap().len(), 6);
    assert_eq!(controls["karras"]["default"], "false");
    let api = server.get("/openapi.json").json();
    let sampler = &api["components"]["schemas"]["JobMultipart"]["properties"]["sampler"];
    assert_eq!(sampler["type"], "string");
    // In JSON, null leaves a knob unset.
    assert_eq!(api["components"]["schemas"]["JobJson"]["properties"]["sampler"]["type"], json!(["string", "null"]));
    assert!(sampler["enum"].as_array().unwrap().iter().any(|v| v == "unipc"), "{sampler}");
}

#[test]
fn sigterm_cancels_work_and_exits_cleanly() {
    let results = tempfile::tempdir().unwrap();
    let results = results.path();
    let mut server = Server::start(&["--data-dir", results.to_str().unwrap()]);
    let long = || vec![file("image", SUNSET), text("steps", 60)];
    let running = server.submit(&long());
    let waiting = server.submit(&long());
    server.events_until(&running, |(n, _)| n == "step");
    let url = server.url.clone();
    let watched = running.clone();
    let watcher = std::thread::spawn(move || support::read_events(&url, &watched, |_| false));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let events = watcher.join().unwrap();
    assert_eq!(events.last().unwrap().0, "cancelled", "{events:?}");
    // No partial video left behind: the folder holds the two jobs' records and its lock.
    let mut left: Vec<String> = std::fs::read_dir(results).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    let mut expected = vec![".lock".to_string(), format!("{running}.json"), format!("{waiting}.json")];
    expected.sort();
    assert_eq!(left, expected);
    // Started again on the folder, the server answers for both: cancelled.
    let again = Server::start(&["--data-dir", results.to_str().unwrap()]);
    for id in [&running, &waiting] {
        assert_eq!(again.get(&format!("/api/v1/jobs/{id}")).json()["state"], "cancelled", "{id}");
    }
}

/// Hardening (#22): finished jobs outlive a `kill -9` of the server: started again on the same
/// data folder it serves their state, events and video; a job that was running ends failed as
/// interrupted (its inputs were not kept); half-written files and videos without a record are
/// removed; a second server on the same folder is refused.
#[test]
fn finished_jobs_survive_a_kill_and_leftovers_are_swept() {
    let data = tempfile::tempdir().unwrap();
    let dir = ["--data-dir", data.path().to_str().unwrap()];
    let mut server = Server::start(&dir);
    let done = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&done)["state"], "done");
    let video = server.get(&format!("/api/v1/jobs/{done}/video")).body;
    let running = server.submit(&[file("image", SUNSET), text("steps", 60)]);
    server.events_until(&running, |(n, _)| n == "step");

    let second = support::run_serve(&dir);
    assert_eq!(second.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another server"), "{}", String::from_utf8_lossy(&second.stderr));

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let planted = [format!(".{done}.mp4.abc123.partial"), format!("{}.mp4", "0123456789abcdef0123456789abcdef")];
    for name in &planted {
        std::fs::write(data.path().join(name), b"leftover").unwrap();
    }

    let again = Server::start(&dir);
    let view = again.get(&format!("/api/v1/jobs/{done}")).json();
    assert_eq!(view["state"], "done", "{view}");
    assert!(view["report"]["stages"].is_array() || view["report"].is_object(), "{view}");
    assert_eq!(again.get(&format!("/api/v1/jobs/{done}/video")).body, video);
    let events = support::read_events(&again.url, &done, |_| false);
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    let view = again.get(&format!("/api/v1/jobs/{running}")).json();
    assert_eq!(view["state"], "failed", "{view}");
    assert!(view["error"].as_str().unwrap().starts_with("interrupted"), "{view}");
    for name in &planted {
        assert!(!data.path().join(name).exists(), "{name} was left behind");
    }
    // The server goes on taking jobs.
    let next = again.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(again.wait(&next)["state"], "done");
}

/// DELETE forgets a job on both backends: a finished one with its video and record, a running
/// one at once (its worker stops between steps and takes the next job); 404 from then on.
#[test]
fn deleted_jobs_are_gone() {
    let data = tempfile::tempdir().unwrap();
    let local = Server::start(&["--data-dir", data.path().to_str().unwrap()]);
    let next = deletes(&local);
    let mut left: Vec<_> = std::fs::read_dir(data.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != ".lock").collect();
    left.sort();
    assert_eq!(left, [format!("{next}.json"), format!("{next}.mp4")], "only the last job's files stay");
    let redis = Redis::start();
    deletes(&Server::start(&["--queue", &redis.url()]));
}

/// Deletes a done and a running job; returns the id of the job run after them.
fn deletes(server: &Server) -> String {
    let done = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&done)["state"], "done");
    let running = server.submit(&[file("image", SUNSET), text("steps", 60)]);
    server.events_until(&running, |(n, _)| n == "step");
    for id in [&done, &running] {
        let r = server.delete(&format!("/api/v1/jobs/{id}"));
        assert_eq!(r.status, 204, "{}", r.text());
        for path in [format!("/api/v1/jobs/{id}"), format!("/api/v1/jobs/{id}/video"), format!("/api/v1/jobs/{id}/events")] {
            assert_eq!(server.get(&path).status, 404, "{path}");
        }
        assert_eq!(server.delete(&format!("/api/v1/jobs/{id}")).status, 404);
    }
    let next = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&next)["state"], "done");
    next
}

/// A finished job's record and video are gone `--keep-seconds` after it ends, on both backends
/// (Redis by the keys' TTL).
#[test]
fn finished_jobs_and_their_videos_expire() {
    let results = tempfile::tempdir().unwrap();
    let results = results.path();
    let server = Server::start(&["--keep-seconds", "3", "--data-dir", results.to_str().unwrap()]);
    let id = expires(&server, |id| assert!(results.join(format!("{id}.mp4")).is_file() && results.join(format!("{id}.json")).is_file()));
    assert!(!results.join(format!("{id}.mp4")).exists(), "its video was left behind");
    assert!(!results.join(format!("{id}.json")).exists(), "its record was left behind");

    let redis = Redis::start();
    expires(&Server::start(&["--queue", &redis.url(), "--keep-seconds", "3"]), |_| {});
}

/// Runs a one-step job, checks it with `while_kept`, and waits until the server forgets it.
fn expires(server: &Server, while_kept: impl Fn(&str)) -> String {
    let id = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&id)["state"], "done");
    assert_eq!(server.get(&format!("/api/v1/jobs/{id}/video")).status, 200);
    while_kept(&id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.get(&format!("/api/v1/jobs/{id}")).status != 404 {
        assert!(std::time::Instant::now() < deadline, "job {id} was never removed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(server.get(&format!("/api/v1/jobs/{id}/video")).status, 404);
    id
}

/// Hardening (#22): a small PNG of extreme aspect ratio, whose resize would take gigabytes, is
/// refused before anything is allocated, and the server keeps serving.
#[test]
fn an_elongated_image_is_refused_not_fatal() {
    let server = Server::start(&[]);
    for (w, h) in [(1, 60_000), (60_000, 1)] {
        let r = server.post_form(&[Part::File("image", png(w, h)), text("steps", 1)]);
        assert_eq!(r.status, 422, "{w}×{h}: {}", r.text());
        assert_eq!(r.json()["field"], "image");
        assert!(r.json()["error"].as_str().unwrap().contains("too elongated"), "{}", r.text());
    }
    let id = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&id)["state"], "done");
}

/// Hardening (#22): a malformed multipart body (truncated part, no closing boundary, no
/// boundary at all) is a 400 with a JSON error, not a 413.
#[test]
fn malformed_multipart_is_a_400() {
    let server = Server::start(&[]);
    let truncated = b"--XYZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello".as_slice();
    for (content_type, body) in [
        ("multipart/form-data; boundary=XYZ", truncated),
        ("multipart/form-data; boundary=XYZ", b"no boundary here".as_slice()),
        ("multipart/form-data", b"no boundary here".as_slice()),
    ] {
        let r = server.post_raw(content_type, body);
        assert_eq!(r.status, 400, "{content_type}: {}", r.text());
        assert!(r.json()["error"].as_str().is_some(), "{}", r.text());
    }
}

/// Hardening (#22): a method a route does not take is a 405 with a JSON error, like every other.
/// A web page on another site cannot queue jobs through a visitor's browser: a foreign
/// `Origin` on a state-changing request is a 403 JSON; the server's own origin and requests
/// without one pass.
#[test]
fn foreign_origins_cannot_change_state() {
    let server = Server::start(&[]);
    let url = format!("{}/api/v1/jobs", server.url);
    let own = server.url.clone();
    for (origin, want) in [("http://evil.example", 403), ("http://127.0.0.1:1", 403), (own.as_str(), 415)] {
        let (status, body) = reply_of(ureq::post(&url).set("Origin", origin).set("Content-Type", "text/plain").send_string("x"));
        assert_eq!(status, want, "{origin}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert!(json["error"].is_string(), "{body}");
        if want == 403 {
            assert!(json["error"].as_str().unwrap().contains("cross-origin"), "{body}");
        }
    }
    let (status, _) = reply_of(ureq::delete(&format!("{url}/nope")).set("Origin", "http://evil.example").call());
    assert_eq!(status, 403);
    let (status, _) = reply_of(ureq::delete(&format!("{url}/nope")).call());
    assert_eq!(status, 404, "no Origin: a script");
    let (status, _) = reply_of(ureq::get(&format!("{}/api/v1/model", server.url)).set("Origin", "http://evil.example").call());
    assert_eq!(status, 200, "reads are not state changes");
}

#[test]
fn wrong_methods_get_json_405() {
    let server = Server::start(&[]);
    for (method, path) in [("PUT", "/api/v1/jobs"), ("DELETE", "/api/v1/model"), ("POST", "/healthz")] {
        let r = reply_of(ureq::request(method, &format!("{}{path}", server.url)).call());
        assert_eq!(r.0, 405, "{method} {path}");
        let body: serde_json::Value = serde_json::from_str(&r.1).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {:?}", r.1));
        assert!(body["error"].as_str().unwrap().contains(method), "{body}");
    }
}

fn reply_of(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => (resp.status(), resp.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// Hardening (#22): a JSON body over the upload limit is refused with 413 JSON from its declared
/// length, not buffered first (a 2 GB declaration costs nothing); one within the limit is read.
#[test]
fn json_bodies_are_bounded() {
    let server = Server::start(&["--max-image-bytes", "40000"]);
    let (status, body) = server.post_declaring("application/json", 2 << 30, b"{\"image\": \"AAAA");
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().is_some(), "{body}");
    let small = br#"{"prompt": "waves"}"#;
    let (status, body) = server.post_declaring("application/json", small.len() as u64, small);
    assert_eq!(status, 400, "a small body is read and checked: {body}");
    assert_eq!(body["field"], "image", "{body}");
}

/// Hardening (#22): with `--api-key` (or `DYNAMICRAFTER_API_KEY`) every /api/ route needs the
/// key, as a bearer token or the page's cookie: 401 JSON without it or with a wrong one;
/// `/healthz` and the page stay open. A key that could not travel in a header is refused at start.
#[test]
fn an_api_key_guards_every_api_route() {
    let server = Server::start(&["--api-key", "k3y_0f+the/server="]);
    let call = |method: &str, path: &str, auth: Option<(&str, &str)>| {
        let mut req = ureq::request(method, &format!("{}{path}", server.url));
        if let Some((name, value)) = auth {
            req = req.set(name, value);
        }
        match req.call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => (r.status(), r.header("www-authenticate").map(String::from), r.into_string().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    };
    for (method, path) in [("GET", "/api/v1/model"), ("GET", "/api/v1/examples"), ("GET", "/api/v1/jobs/x"), ("DELETE", "/api/v1/jobs/x"), ("POST", "/api/v1/jobs/x/cancel"), ("GET", "/api/v1/jobs/x/events"), ("GET", "/api/v1/jobs/x/video"), ("POST", "/api/v1/jobs")] {
        for auth in [None, Some(("Authorization", "Bearer wrong")), Some(("Authorization", "k3y_0f+the/server=")), Some(("Cookie", "dynamicrafter_key=nope"))] {
            let (status, challenge, body) = call(method, path, auth);
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"));
            let json: Value = serde_json::from_str(&body).unwrap();
            assert!(json["error"].as_str().unwrap().contains("API key"), "{body}");
        }
    }
    assert_eq!(call("GET", "/api/v1/model", Some(("Authorization", "Bearer k3y_0f+the/server="))).0, 200);
    assert_eq!(call("GET", "/api/v1/model", Some(("Cookie", "theme=dark; dynamicrafter_key=k3y_0f+the/server="))).0, 200);
    assert_eq!(call("GET", "/api/v1/jobs/x", Some(("Authorization", "Bearer k3y_0f+the/server="))).0, 404);
    assert_eq!(call("GET", "/healthz", None).0, 200);
    assert_eq!(call("GET", "/", None).0, 200);
    // The OpenAPI document says so.
    let doc: Value = serde_json::from_str(&call("GET", "/openapi.json", None).2).unwrap();
    assert_eq!(doc["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    assert_eq!(doc["paths"]["/api/v1/jobs"]["post"]["security"][0]["api_key"], json!([]));
    assert!(doc["paths"]["/healthz"]["get"]["security"].is_null());

    // From the environment, as a deployment would set it.
    let data = tempfile::tempdir().unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
            .current_dir(support::repo())
            .args(["serve", "--model", "fixtures/tiny-v", "--port", "0", "--data-dir", data.path().to_str().unwrap()])
            .env("DYNAMICRAFTER_API_KEY", "from-env")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap().to_string();
    let status = |auth: &str| match ureq::get(&format!("{url}/api/v1/model")).set("Authorization", auth).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r.status(),
        Err(e) => panic!("{e}"),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ureq::get(&format!("{url}/healthz")).call().is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!((status("Bearer from-env"), status("bearer from-env"), status("Bearer other")), (200, 200, 401));
    drop(child);

    for bad in ["", "has space", "semi;colon", &"x".repeat(257)] {
        let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter")).args(["serve", "--model", "fixtures/tiny-v", "--api-key", bad]).current_dir(support::repo()).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("API key"), "{stderr}");
    }
}

/// Sends `request` on a fresh connection and reads the answer until the server closes it (or
/// `wait` passes): the status code and the whole text, or `None` when the server closed or
/// reset the connection without answering.
fn raw_exchange(server: &Server, request: &[u8], wait: std::time::Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(request).unwrap();
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

/// Hardening (#22): a client that stalls in its headers is dropped after `--header-timeout`; past
/// `--max-connections` open connections a new one gets 503 JSON; a job upload that stalls gets
/// 408 JSON after `--body-timeout`; the server keeps serving throughout.
#[test]
fn stalled_clients_are_bounded() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let server = Server::start(&["--max-connections", "3", "--header-timeout", "4", "--body-timeout", "2"]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let opened = Instant::now();
    // Clients that stall in their headers, opened until the server refuses one (the cap, less
    // any connection of the start-up check not yet closed).
    let mut stalled = Vec::new();
    let refusal = loop {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        if !answer.is_empty() {
            break String::from_utf8_lossy(&answer).into_owned();
        }
        stalled.push(s);
        assert!(stalled.len() <= 3, "more than --max-connections 3 connections held open");
    };
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("too many open connections"), "{refusal}");
    assert!(!stalled.is_empty());
    // The stalled clients are disconnected once their headers are overdue.
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let waited = opened.elapsed();
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(20), "stalled clients dropped after {waited:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.get("/healthz").status != 200 {
        assert!(Instant::now() < deadline, "the server did not take connections again");
        std::thread::sleep(Duration::from_millis(100));
    }
    // An upload whose body never comes.
    let started = Instant::now();
    let (status, answer) = raw_exchange(
        &server,
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image\": \"",
        Duration::from_secs(20),
    )
    .expect("an answer to the stalled upload");
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let id = server.submit(&[file("image", SUNSET), text("steps", 1)]);
    assert_eq!(server.wait(&id)["state"], "done");
}

/// Hardening (#22): with `--allowed-host`, a request naming another host (DNS rebinding: a page
/// whose own name now points here) gets 421 JSON; the allowed name is served.
#[test]
fn only_allowed_hosts_are_answered() {
    let server = Server::start(&["--allowed-host", "127.0.0.1", "--allowed-host", "Studio.Local"]);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let wait = std::time::Duration::from_secs(5);
    for host in ["evil.example", "evil.example:80", "127.0.0.2", "[::1]"] {
        let req = format!("GET /api/v1/model HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw_exchange(&server, req.as_bytes(), wait).unwrap();
        assert_eq!(status, 421, "{host}: {answer}");
        assert!(answer.contains("--allowed-host"), "{answer}");
    }
    for host in [format!("127.0.0.1:{port}"), "studio.local".to_string(), format!("STUDIO.LOCAL:{port}")] {
        let req = format!("GET /api/v1/model HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(raw_exchange(&server, req.as_bytes(), wait).unwrap().0, 200, "{host}");
    }
}
