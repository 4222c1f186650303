//! A `dynamicrafter serve` process on a free port, and a small HTTP client for it.

#![allow(dead_code)]

pub mod redis;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Server {
    pub child: Child,
    pub url: String,
    /// The in-process queue's data folder when the test gave none (removed with the server).
    _data: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `serve` on the tiny v-prediction fixture with `extra` arguments (and, for the
    /// in-process queue, a data folder of its own unless `extra` names one).
    pub fn start(extra: &[&str]) -> Self {
        let data = (!extra.iter().any(|a| *a == "--queue" || *a == "--data-dir")).then(|| tempfile::tempdir().unwrap());
        let data_arg = data.iter().flat_map(|d| ["--data-dir".to_string(), d.path().to_string_lossy().into_owned()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
            .current_dir(repo())
            .args(["serve", "--model", "fixtures/tiny-v", "--port", "0"])
            .args(extra)
            .args(data_arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
        let server = Self { child, url, _data: data };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = ureq::get(&format!("{}/healthz", self.url)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not become ready");
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(ureq::get(&format!("{}{path}", self.url)).call())
    }

    pub fn delete(&self, path: &str) -> Reply {
        reply(ureq::delete(&format!("{}{path}", self.url)).call())
    }

    /// `POST /api/v1/jobs/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Reply {
        reply(ureq::post(&format!("{}/api/v1/jobs/{id}/cancel", self.url)).call())
    }

    pub fn post_json(&self, body: &Value) -> Reply {
        reply(ureq::post(&format!("{}/api/v1/jobs", self.url)).send_json(body.clone()))
    }

    pub fn post_raw(&self, content_type: &str, body: &[u8]) -> Reply {
        reply(ureq::post(&format!("{}/api/v1/jobs", self.url)).set("Content-Type", content_type).send_bytes(body))
    }

    /// A POST to the jobs route that declares `declared_length` bytes of body but sends only
    /// `body`, then reads the reply: the server must answer from the header alone (and a reply
    /// before the body is read cannot be lost to a broken pipe, as with a large real body).
    pub fn post_declaring(&self, content_type: &str, declared_length: u64, body: &[u8]) -> (u16, Value) {
        use std::io::Write;
        let addr = self.url.strip_prefix("http://").expect("an http:// url");
        let mut stream = std::net::TcpStream::connect(addr).expect("connecting");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!("POST /api/v1/jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {declared_length}\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut length = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut reply = vec![0; length.expect("a content-length on the reply")];
        reader.read_exact(&mut reply).unwrap();
        (status, serde_json::from_slice(&reply).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&reply))))
    }

    pub fn post_form(&self, parts: &[Part]) -> Reply {
        let (content_type, body) = multipart(parts);
        self.post_raw(&content_type, &body)
    }

    /// Submits and returns the job id (panics unless 202).
    pub fn submit(&self, parts: &[Part]) -> String {
        let r = self.post_form(parts);
        assert_eq!(r.status, 202, "submit: {}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Reads a job's server-sent events until the stream ends; `(event, data)` pairs.
    pub fn events(&self, id: &str) -> Vec<(String, Value)> {
        self.events_until(id, |_| false)
    }

    /// Reads events until the stream ends or `stop` returns true for one.
    pub fn events_until(&self, id: &str, stop: impl FnMut(&(String, Value)) -> bool) -> Vec<(String, Value)> {
        read_events(&self.url, id, stop)
    }

    /// Polls a job until it ends; returns its status JSON.
    pub fn wait(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = self.get(&format!("/api/v1/jobs/{id}")).json();
            if ["done", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id} did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of a Prometheus sample line `name` (with labels, as printed).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.get("/metrics").text();
        text.lines().find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
    }

    /// Waits (up to 10 s) for sample `sample` to read `want`: a worker counts a job's final state
    /// just after it makes the state visible, so a metric may trail the status by a moment.
    #[allow(dead_code)]
    pub fn metric_reaches(&self, sample: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.metric(sample);
            if got == Some(want) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `serve` on the tiny fixture with `args` to its end: for starts that are refused.
pub fn run_serve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dynamicrafter")).current_dir(repo()).args(["serve", "--model", "fixtures/tiny-v", "--port", "0"]).args(args).output().unwrap()
}

/// Reads the server-sent events of job `id` at `url` until the stream ends or `stop` says so.
pub fn read_events(url: &str, id: &str, mut stop: impl FnMut(&(String, Value)) -> bool) -> Vec<(String, Value)> {
    let resp = ureq::get(&format!("{url}/api/v1/jobs/{id}/events")).call().unwrap();
    assert_eq!(resp.content_type(), "text/event-stream");
    let mut events = Vec::new();
    let mut name = String::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let e = (std::mem::take(&mut name), serde_json::from_str(d).unwrap());
            let done = stop(&e);
            events.push(e);
            if done {
                break;
            }
        }
    }
    events
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let headers = resp.headers_names().into_iter().filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string()))).collect();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).unwrap();
    Reply { status, headers, body }
}

pub enum Part {
    Text(&'static str, String),
    File(&'static str, Vec<u8>),
}

pub fn text(name: &'static str, value: impl ToString) -> Part {
    Part::Text(name, value.to_string())
}

pub fn file(name: &'static str, path: &str) -> Part {
    Part::File(name, std::fs::read(repo().join(path)).unwrap())
}

pub fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = "----dynamicrafter-test-boundary";
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match p {
            Part::Text(name, value) => {
                body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
            }
            Part::File(name, bytes) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                        .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
