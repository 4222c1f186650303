//! The web page in headless Chromium: pick an example, generate, watch progress, play the video.
//! Needs Debian's `chromium` and `node`/`npm` (`.ci/run` installs them); fetches its npm
//! packages (`playwright-core`, pinned by `tests/browser/package-lock.json`) itself when missing.

mod support;

use std::path::PathBuf;
use std::process::Command;
use support::{repo, Server};

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return p.into();
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("Chromium not found: install Debian's `chromium` (`.ci/run` does) or set CHROMIUM")
}

#[test]
fn the_page_generates_a_video_that_plays_in_headless_chromium() {
    run_page(&[], None);
}

/// Hardening (#22): behind `--api-key` the page asks for the key once and sends it with every
/// request, the event stream and the video included.
#[test]
fn the_page_asks_for_the_api_key_once() {
    run_page(&["--api-key", "s3cret-key"], Some("s3cret-key"));
}

fn run_page(server_args: &[&str], key: Option<&str>) {
    let chromium = chromium();
    if !repo().join("tests/browser/node_modules/playwright-core").is_dir() {
        let out = Command::new("npm")
            .current_dir(repo())
            .args(["ci", "--prefix", "tests/browser", "--no-audit", "--no-fund", "--loglevel=error"])
            .output()
            .expect("running npm (install Debian's npm)");
        assert!(out.status.success(), "npm ci --prefix tests/browser: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let server = Server::start(server_args);
    let out = Command::new("node")
        .current_dir(repo())
        .arg("tests/browser/ui.mjs")
        .arg(&server.url)
        .args(key)
        .env("CHROMIUM", chromium)
        .output()
        .expect("running node (install nodejs)");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{log}");
    assert!(log.contains("browser test passed"), "{log}");
}
