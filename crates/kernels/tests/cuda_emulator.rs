//! Our CUDA kernels' logic, tested on any machine: `src/cuda/*.cu` compiled as C++ against the
//! CPU emulator in `tests/cuda_emulator/` (threads as fibers in a random order, warp-wide PTX
//! from the ISA's fragment layouts, cp.async landing late) and checked against references there.
//! The device itself is tested by the GPU-only tests of `src/cuda`; this catches indexing,
//! fragment, barrier and bounds mistakes before a device session is spent on them.
//!
//! Needs a C++17 compiler (`c++`, or `CXX`).

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 6] = ["conv_igemm", "epilogue", "flash_attention", "flash_attention2", "group_norm", "permute"];

fn compile(cxx: &str, source: &Path, object: &Path, language: Option<&str>) -> std::process::Child {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(cxx);
    // -fno-strict-aliasing: the kernels reinterpret T memory as 32/128-bit words, as CUDA code
    // does; nvcc compiles that as intended, and here it must mean the same.
    cmd.args(["-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-c"]);
    if let Some(language) = language {
        cmd.args(["-x", language]);
    }
    cmd.arg("-I").arg(dir.join("tests/cuda_emulator")).arg(source).arg("-o").arg(object);
    cmd.spawn().unwrap_or_else(|e| panic!("running {cxx} (a C++17 compiler; set CXX): {e}"))
}

#[test]
fn cuda_kernels_compute_the_reference_in_the_emulator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulator");
    std::fs::create_dir_all(&out).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());

    let mut jobs = vec![(compile(&cxx, &dir.join("tests/cuda_emulator/main.cpp"), &out.join("main.o"), None), "main.cpp".to_string())];
    for kernel in KERNELS {
        let source = dir.join(format!("src/cuda/{kernel}.cu"));
        jobs.push((compile(&cxx, &source, &out.join(format!("{kernel}.o")), Some("c++")), format!("src/cuda/{kernel}.cu")));
    }
    for (mut job, what) in jobs {
        assert!(job.wait().unwrap().success(), "{cxx} failed on {what} (emulator build)");
    }
    let exe = out.join("emulate");
    let mut link = Command::new(&cxx);
    link.arg("-o").arg(&exe).arg(out.join("main.o"));
    for kernel in KERNELS {
        link.arg(out.join(format!("{kernel}.o")));
    }
    assert!(link.status().unwrap().success(), "linking the emulator failed");

    // Two processes side by side (the attention cases take about as long as the rest).
    let parts: [&[&str]; 2] = [&["attention"], &["conv", "permute", "group_norm", "epilogue"]];
    let runs: Vec<_> = parts.iter().map(|p| Command::new(&exe).args(*p).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()).collect();
    let mut stdout = String::new();
    let mut failed = false;
    for run in runs {
        let run = run.wait_with_output().unwrap();
        stdout.push_str(&String::from_utf8_lossy(&run.stdout));
        eprintln!("{}", String::from_utf8_lossy(&run.stderr));
        failed |= !run.status.success();
    }
    eprintln!("{stdout}");
    assert!(!failed, "kernels failed in the emulator:\n{}", stdout.lines().filter(|l| !l.starts_with("ok")).collect::<Vec<_>>().join("\n"));
    // Every kernel family ran (a harness that skipped one would also "pass").
    for family in ["conv_igemm ", "channels-last copy ", "flash_attention ", "flash_attention2 ", "flash_attention2w ", "flash_attention_short ", "group norm ", "bias_rows", "geglu_bias", "bias_channels", "conv_bias", "permute_bias_add", "add_layer_norm", "permute rows", "permute tiles"] {
        assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains(family)), "no passing case of {family} in the emulator's output");
    }
}
