//! Checkpoint loading: strict key checks that name every problem, clear errors for files that
//! are not checkpoints, and no pickle code ever executed.

use candle_core::{Device, Tensor};
use dynamicrafter_engine::{Error, ModelConfig, Pipeline};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dynamicrafter-ck-{}-{name}", std::process::id()))
}

fn tiny_eps() -> ModelConfig {
    ModelConfig::from_json_file(&fixture("tiny-eps/config.json")).unwrap()
}

fn load_err(cfg: ModelConfig, path: &Path) -> String {
    match Pipeline::load(cfg, path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e @ Error::Checkpoint { .. }) => e.to_string(),
        Err(e) => panic!("expected a checkpoint error, got {e}"),
    }
}

#[test]
fn both_formats_load_the_same_tensors() {
    let cfg = tiny_eps();
    let a = Pipeline::load(cfg.clone(), &fixture("tiny-eps/model.safetensors"), &Device::Cpu).unwrap();
    let b = Pipeline::load(cfg, &fixture("tiny-eps/model.ckpt"), &Device::Cpu).unwrap();
    let ids = a.token_ids(&["a cat"]).unwrap();
    let ea = a.text_encoder().unwrap().forward(&ids).unwrap();
    let eb = b.text_encoder().unwrap().forward(&ids).unwrap();
    let d = (ea - eb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn every_key_problem_is_listed() {
    let src = fixture("tiny-eps/model.safetensors");
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    tensors.remove("first_stage_model.decoder.conv_out.bias").unwrap();
    tensors.insert("model.diffusion_model.bogus.weight".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
    tensors.insert(
        "image_proj_model.proj_in.bias".into(),
        Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let path = tmp("edited.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = load_err(tiny_eps(), &path);
    std::fs::remove_file(&path).unwrap();
    assert!(msg.contains("1 missing keys: first_stage_model.decoder.conv_out.bias"), "{msg}");
    assert!(msg.contains("1 unexpected keys: model.diffusion_model.bogus.weight"), "{msg}");
    assert!(msg.contains("image_proj_model.proj_in.bias: checkpoint [5]"), "{msg}");
}

#[test]
fn weights_of_another_config_are_refused() {
    let cfg = ModelConfig::from_json_file(&fixture("tiny-v/config.json")).unwrap();
    let msg = load_err(cfg, &fixture("tiny-eps/model.safetensors"));
    assert!(msg.contains("missing keys") && msg.contains("unexpected keys"), "{msg}");
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let st = std::fs::read(fixture("tiny-eps/model.safetensors")).unwrap();
    let ck = std::fs::read(fixture("tiny-eps/model.ckpt")).unwrap();
    let cases: [(&str, &[u8]); 5] = [
        ("empty", b""),
        ("text", b"this is not a checkpoint at all\n"),
        ("truncated.safetensors", &st[..st.len() / 2]),
        ("truncated-header.safetensors", &st[..100]),
        ("truncated.ckpt", &ck[..ck.len() / 2]),
    ];
    for (name, bytes) in cases {
        let path = tmp(name);
        std::fs::write(&path, bytes).unwrap();
        let msg = load_err(tiny_eps(), &path);
        std::fs::remove_file(&path).unwrap();
        assert!(msg.contains(&path.display().to_string()), "{name}: {msg}");
    }
}

#[test]
fn pickle_code_is_never_executed() {
    let marker = tmp("pwned");
    let _ = std::fs::remove_file(&marker);
    // Protocol 2: GLOBAL os.system, a one-string tuple, REDUCE — what a malicious checkpoint does.
    let cmd = format!("touch {}", marker.display());
    let mut pickle = b"\x80\x02cos\nsystem\nX".to_vec();
    pickle.extend((cmd.len() as u32).to_le_bytes());
    pickle.extend(cmd.as_bytes());
    pickle.extend(b"\x85R.");
    let path = tmp("evil.ckpt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&pickle).unwrap();
    zip.finish().unwrap();
    let msg = load_err(tiny_eps(), &path);
    std::fs::remove_file(&path).unwrap();
    assert!(!marker.exists(), "pickle code ran");
    assert!(msg.contains("no tensors"), "{msg}");
}
