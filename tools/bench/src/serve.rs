//! The serve-vs-cli case: the same request through `dynamicrafter generate` and through
//! `dynamicrafter serve` (the binary beside this one: `cargo build --release --workspace`).

use crate::{time, Timing};
use anyhow::{bail, Result};
use std::time::Instant;

/// The same request (tiny-v, its 5 steps with CFG, seed 1) through the command line and through
/// the server. CLI: the whole process, and its report's time without the model load (the server
/// keeps the model resident). Server: multipart upload → `done` event → video downloaded.
pub(crate) fn serve_vs_cli(runs: usize) -> Result<Vec<Timing>> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let (image, prompt) = ("examples/images/sunset.png", "waves rolling onto the shore at sunset");
    if !std::path::Path::new("fixtures/tiny-v").is_dir() || !std::path::Path::new(image).is_file() {
        bail!("serve-vs-cli needs fixtures/tiny-v and {image}: run from the repository root");
    }
    let exe = std::env::current_exe()?.with_file_name(format!("dynamicrafter{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        bail!("serve-vs-cli runs {}: build it first (cargo build --release --workspace)", exe.display());
    }
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
    let cli_generation = Timing { name: "serve-vs-cli: CLI without model load".into(), ms: generation_ms };
    println!("{:<44} median {:>10.2} ms", cli_generation.name, cli_generation.median());

    let mut server = Command::new(&exe)
        .args(["serve", "--model", "fixtures/tiny-v", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    let url = line.trim().strip_prefix("listening on ").map(str::to_string);
    let image_bytes = std::fs::read(image)?;
    let boundary = "dynamicrafter-bench";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n1\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n\r\n").as_bytes());
    body.extend_from_slice(&image_bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let served = (|| -> Result<Timing> {
        let url = url.ok_or_else(|| anyhow::anyhow!("the server did not print its address"))?;
        // Ready once it answers.
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while ureq::get(&format!("{url}/healthz")).call().is_err() {
            if Instant::now() > deadline {
                bail!("the server did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        time("serve-vs-cli: server submit→video (tiny-v)", runs, || {
            let job: serde_json::Value = ureq::post(&format!("{url}/api/v1/jobs"))
                .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
                .send_bytes(&body)?
                .into_json()?;
            let id = job["id"].as_str().unwrap_or_default();
            let events = ureq::get(&format!("{url}/api/v1/jobs/{id}/events")).call()?;
            let done = BufReader::new(events.into_reader()).lines().map_while(|l| l.ok()).any(|l| l == "event: done");
            if !done {
                bail!("job {id} did not finish");
            }
            let mut video = Vec::new();
            ureq::get(&format!("{url}/api/v1/jobs/{id}/video")).call()?.into_reader().read_to_end(&mut video)?;
            Ok(())
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let served = served?;
    println!(
        "serve-vs-cli ratio: server/CLI-without-load {:.3}, server/CLI-process {:.3}",
        served.median() / cli_generation.median(),
        served.median() / cli.median()
    );
    Ok(vec![cli, cli_generation, served])
}

