//! What the integration tests share.

use candle_core::Device;
use std::path::{Path, PathBuf};

/// The device the tests run on: `DYNAMICRAFTER_TEST_DEVICE` (auto, cpu, cuda, cuda:N; default
/// cpu), so a CUDA build checks the same tolerances on its GPU.
pub fn device() -> Device {
    let name = std::env::var("DYNAMICRAFTER_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    dynamicrafter_engine::device::parse(&name).unwrap_or_else(|e| panic!("DYNAMICRAFTER_TEST_DEVICE: {e}"))
}

/// `DYNAMICRAFTER_FIXTURES`, or the repository's copy of the reference fixtures.
#[allow(dead_code)] // not every test binary reads fixtures
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("DYNAMICRAFTER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// Every fixture directory (a `config.json` and its `stages.safetensors`) under the root.
#[allow(dead_code)]
pub fn fixture_dirs() -> Vec<PathBuf> {
    let root = fixtures_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures folder {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file() && p.join("stages.safetensors").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixture directories under {}", root.display());
    dirs
}

/// The tiny-v fixture the pipeline tests run: under [`fixtures_root`], else the repository's
/// (a test binary carried to another machine finds it through `DYNAMICRAFTER_FIXTURES`).
#[allow(dead_code)]
pub fn tiny_v_dir() -> PathBuf {
    let dir = fixtures_root().join("tiny-v");
    if dir.is_dir() {
        dir
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-v")
    }
}
