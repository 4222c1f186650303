//! int8 (`q8_0`) models: `convert --quantize` → load → generate, at a stated quality bound, on
//! every fixture model.

use candle_core::Device;
use dynamicrafter_engine::Quantization;
use dynamicrafter_engine::{ModelConfig, Pipeline, PrecisionPolicy, Request, RgbImage, SeededNoise};
use dynamicrafter_video::psnr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

/// Decoded frames of an int8 model against fp32, same seed and noise (issue #6's target).
const MIN_PSNR_DB: f64 = 35.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_models() -> Vec<PathBuf> {
    let root = std::env::var_os("DYNAMICRAFTER_FIXTURES").map(PathBuf::from).unwrap_or_else(|| repo().join("fixtures"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file() && p.join("model.safetensors").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixture models under {}", root.display());
    dirs
}

fn frames(pipeline: &Pipeline, cfg: &ModelConfig) -> Vec<u8> {
    let img = image::open(repo().join("examples/images/sunset.png")).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let image = RgbImage::new(w as usize, h as usize, img.into_raw()).unwrap();
    let mut req = Request::new(cfg, image, "waves rolling onto the shore at sunset");
    req.sampling.steps = 4;
    let video = pipeline.generate(&req, &mut SeededNoise::new(5, &Device::Cpu), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    video.frames_u8
}

/// `convert --quantize q8_0`, with `--dtype` when given (the default stores the float rest in f16).
fn convert(input: &Path, output: &Path, dtype: Option<&str>) {
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .args(["convert", input.to_str().unwrap(), output.to_str().unwrap(), "--quantize", "q8_0"])
        .args(dtype.map(|d| ["--dtype", d]).into_iter().flatten())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn q8_0_models_generate_within_the_quality_bound() {
    let tmp = std::env::temp_dir().join(format!("dynamicrafter-quant-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in fixture_models() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
        let weights = dir.join("model.safetensors");
        let reference = frames(&Pipeline::load(cfg.clone(), &weights, &Device::Cpu).unwrap(), &cfg);

        // Converted files (float remainder in f32, or in f16 for the smallest file): they load
        // as quantized without being asked, and are smaller.
        for dtype in [Some("f32"), None] {
            let q8 = tmp.join(format!("{name}-q8_0-{}.safetensors", dtype.unwrap_or("default")));
            convert(&weights, &q8, dtype);
            let dtype = dtype.unwrap_or("f16 (default)");
            let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
            assert!(size(&q8) < 0.8 * size(&weights), "{name}: {} vs {} bytes", size(&q8), size(&weights));
            let loaded = Pipeline::load(cfg.clone(), &q8, &Device::Cpu).unwrap();
            assert_eq!(loaded.precision().quantization, Some(Quantization::Q8_0));
            assert_eq!(loaded.precision().name(), "fp32 + q8_0");
            let from_file = frames(&loaded, &cfg);
            let db = psnr(&from_file, &reference);
            eprintln!("{name}: q8_0 file (rest {dtype}) {db:.1} dB vs fp32, size {:.2}×", size(&q8) / size(&weights));
            assert!(db >= MIN_PSNR_DB, "{name}: q8_0 file (rest {dtype}) at {db:.1} dB");
        }

        // Quantizing a float file as it loads.
        let policy = PrecisionPolicy::f32().with_quantization(Some(Quantization::Q8_0));
        let on_load = frames(&Pipeline::load_with(cfg.clone(), &weights, &Device::Cpu, policy).unwrap(), &cfg);
        let db = psnr(&on_load, &reference);
        eprintln!("{name}: q8_0 on load {db:.1} dB vs fp32");
        assert!(db >= MIN_PSNR_DB, "{name}: q8_0 on load at {db:.1} dB");
        assert!(on_load != reference, "{name}: quantization changed nothing");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn generate_with_quantize_reports_it() {
    let dir = std::env::temp_dir().join(format!("dynamicrafter-quant-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(repo())
        .args(["generate", "--model", "fixtures/tiny-v", "--image", "examples/images/sunset.png", "--steps", "1", "--quantize", "q8_0"])
        .args(["--out", dir.join("q.mp4").to_str().unwrap(), "--report-json", report.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let auto = PrecisionPolicy::new(dynamicrafter_engine::Precision::Auto, &Device::Cpu).unwrap();
    assert_eq!(json["precision"], auto.with_quantization(Some(Quantization::Q8_0)).name());

    let bad = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(repo())
        .args(["generate", "--model", "fixtures/tiny-v", "--image", "examples/images/sunset.png", "--quantize", "q3"])
        .args(["--out", dir.join("bad.mp4").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("quantization 'q3'") && err.lines().count() == 1, "{err}");
    assert!(!dir.join("bad.mp4").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
