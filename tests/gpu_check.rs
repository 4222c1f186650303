//! `scripts/gpu_check.sh` and `scripts/gpu_json.py`, the one script a device session runs, here
//! against stand-ins: an `nvidia-smi` that names a card, test binaries that pass, and a
//! `dynamicrafter-bench` that prints and writes (`--json`, in `tools/bench`'s format:
//! `{"results": [{"name", "median_ms", "peak_gpu_bytes", …}]}`) what the real one does for its
//! cases. A device session has 15 minutes; a script that fails in its own plumbing (a step that
//! does not run, a record left unwritten) spends them for nothing.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn executable(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The bench's stand-in: for `unet-N` a forward of N/8 ms at N·10⁷ bytes; for `pipeline-N` a run
/// of 10 000 + N ms at 8 GB (20 000 ms at 5 GB with `--offload`).
const BENCH: &str = r#"json= offload= cases=()
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json=$2; shift ;;
        --runs|--device|--precision) shift ;;
        --offload) offload=1 ;;
        -*) ;;
        *) cases+=("$1") ;;
    esac
    shift
done
results=()
for case in "${cases[@]}"; do
    size=${case#*-}
    case "$case" in
        unet-*) name="unet-$size forward cuda bf16 (16×h×w, ctx 333)"; ms=$((size / 8)); peak=$((size * 10000000)) ;;
        pipeline-*) name="pipeline-$size (16 frames, 50 steps, CFG 7.5) cuda bf16"
            if [ -n "$offload" ]; then ms=20000; peak=5000000000; else ms=$((10000 + size)); peak=8000000000; fi ;;
        *) echo "unknown case $case" >&2; exit 2 ;;
    esac
    echo "$name: median $ms ms"
    echo "$name: peak GPU memory $((peak / 1000000000)) GB"
    results+=("{\"name\": \"$name\", \"median_ms\": $ms, \"min_ms\": $ms, \"max_ms\": $ms, \"runs\": 1, \"peak_gpu_bytes\": $peak}")
done
if [ -n "$json" ]; then
    (IFS=,; echo "{\"precision\": \"bf16\", \"device\": \"cuda\", \"results\": [${results[*]}]}") > "$json"
fi"#;

#[test]
fn gpu_check_runs_the_steps_named_and_writes_the_record() {
    let repo = support::repo();
    let tmp = tempfile::tempdir().unwrap();
    let (bin, tools, out) = (tmp.path().join("bin"), tmp.path().join("tools"), tmp.path().join("out"));
    for dir in [&bin, &tools, &out] {
        std::fs::create_dir_all(dir).unwrap();
    }
    executable(
        &tools.join("nvidia-smi"),
        r#"case "$*" in *noheader*) echo "Stand-in H200" ;; *) echo "name, memory.total [MiB], driver_version"; echo "Stand-in H200, 143771 MiB, 580.1" ;; esac"#,
    );
    for test in ["kernels", "parity", "pipeline"] {
        executable(&bin.join(test), "echo \"running $# filters\"; echo 'test result: ok. 3 passed; 0 failed; 0 ignored'");
    }
    executable(&bin.join("dynamicrafter-bench"), BENCH);

    let steps = "kernel-tests bench-unet-bf16 bench-pipeline-1024 bench-pipeline-offload bench-pipeline-512 cuda-kernels-off";
    let run = Command::new("bash")
        .arg(repo.join("scripts/gpu_check.sh"))
        .arg(&bin)
        .current_dir(&repo)
        .env("PATH", format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default()))
        .env("OUT", &out)
        .env("COMMIT", "0123abc")
        .env("SKIP_TORCH", "1")
        .env("STEPS", steps)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "gpu_check.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));

    // The summary names each step asked for, passed, and no other.
    let summary = stdout.split("== summary").nth(1).expect("no summary");
    let ran: Vec<&str> = summary.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(ran, steps.split(' ').collect::<Vec<_>>(), "{summary}");
    for line in summary.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.contains("rc 0"), "{line}");
    }

    let record: Value = serde_json::from_slice(&std::fs::read(out.join("gpu.json")).unwrap()).unwrap();
    assert_eq!(record["card"], "Stand-in H200");
    assert_eq!(record["commit"], "0123abc");
    for (size, ms) in [("256", 32.0), ("512", 64.0), ("1024", 128.0)] {
        assert_eq!(record["unet_forward_ms"][size]["ours"].as_f64(), Some(ms), "{record}");
    }
    assert_eq!(record["pipeline_s"]["1024"].as_f64(), Some(11.02), "{record}");
    assert_eq!(record["pipeline_s"]["512"].as_f64(), Some(10.51), "{record}");
    assert_eq!(record["peak_gpu_gb"]["1024"].as_f64(), Some(8.0), "{record}");
    assert_eq!(record["peak_gpu_gb"]["1024_offload"].as_f64(), Some(5.0), "{record}");
    assert_eq!(record["pipeline_1024_offload_s"].as_f64(), Some(20.0), "{record}");
    assert!(record["pipeline_s"].get("256").is_none(), "a step not asked for left a figure: {record}");
    assert!(out.join("logs.tgz").metadata().unwrap().len() > 0);
}

/// PyTorch's figure per size is the faster of our re-statement and upstream's UNet, per mode,
/// and the ratio is ours over PyTorch's bf16.
#[test]
fn gpu_json_takes_the_faster_pytorch() {
    let repo = support::repo();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |name: &str, v: Value| std::fs::write(dir.join(name), v.to_string()).unwrap();
    write("unet.json", serde_json::json!({"results": [{"name": "unet-1024 forward cuda bf16 (16×72×128, ctx 333)", "median_ms": 250.0, "peak_gpu_bytes": 6e9}]}));
    write("torch.json", serde_json::json!({"1024": {"bf16": 320.0, "fp16": 300.0}}));
    write("upstream.json", serde_json::json!({"1024": {"bf16": 310.0, "fp16": 305.0}}));
    let run = Command::new("python3").arg(repo.join("scripts/gpu_json.py")).arg(dir).args(["--card", "c", "--commit", "x", "--date", "2026-12-07"]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let record: Value = serde_json::from_slice(&run.stdout).unwrap();
    let row = &record["unet_forward_ms"]["1024"];
    assert_eq!(row["ours"].as_f64(), Some(250.0));
    assert_eq!((row["torch_bf16"].as_f64(), row["torch_bf16_from"].as_str()), (Some(310.0), Some("upstream")));
    assert_eq!((row["torch_fp16"].as_f64(), row["torch_fp16_from"].as_str()), (Some(300.0), Some("torch")));
    assert_eq!(row["ratio_to_torch_bf16"].as_f64(), Some(0.806));
    assert_eq!(record["date"], "2026-12-07");
}
