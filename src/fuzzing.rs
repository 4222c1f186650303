//! The fuzz targets' entry points (`fuzz/fuzz_targets/`, run by `scripts/fuzz.sh` under
//! `cargo fuzz`), here so the ordinary test suite replays every committed input on stable
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, runs them through what reads untrusted
//! input, and panics only where a property the rest of the code relies on fails: an error is
//! fine, a panic, an abort or an allocation beyond the limits is the finding.

use crate::serve::form;
use crate::serve::state::{Limits, ServedModel};
use candle_core::Device;
use dynamicrafter_engine::preprocess::{check_resizable, resize_and_crop};
use dynamicrafter_engine::tokenizer::Tokenizer;
use dynamicrafter_engine::weights::Checkpoint;
use dynamicrafter_engine::{ModeKind, ModelConfig};
use std::path::PathBuf;
use std::sync::OnceLock;

/// A target: arbitrary bytes in, a panic only for a finding.
pub type Target = fn(&[u8]);

/// The targets, by the names of their corpus folders.
pub const TARGETS: [(&str, Target); 5] =
    [("checkpoint", checkpoint), ("config", config), ("image", image), ("submission", submission), ("tokenizer", tokenizer)];

/// Limits as `serve` sets them by default, smaller where the fuzzer would only spend time.
fn limits() -> Limits {
    Limits { max_image_bytes: 1 << 20, max_image_pixels: 1 << 20, max_prompt_tokens: 75, upload_timeout: std::time::Duration::from_secs(5) }
}

/// The tiny fixture's config (the API checks requests against a model's config and tokenizer).
fn model() -> &'static ServedModel {
    static MODEL: OnceLock<ServedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let text = include_str!("../fixtures/tiny-v/config.json");
        ServedModel::new(ModelConfig::from_json_str(text).expect("the fixture's config"), None).expect("the tokenizer")
    })
}

/// A `model.ckpt` or `model.safetensors` (told apart by content, as the loader does): opened,
/// every tensor read.
pub fn checkpoint(data: &[u8]) {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    let path = FILE.get_or_init(|| std::env::temp_dir().join(format!("dynamicrafter-fuzz-checkpoint-{}", std::process::id())));
    if std::fs::write(path, data).is_err() {
        return;
    }
    if let Ok(ckpt) = Checkpoint::open(path) {
        for (key, shape) in ckpt.shapes() {
            if let Ok(t) = ckpt.load(key, &Device::Cpu) {
                assert_eq!(t.dims(), shape, "{key}: the tensor read is not the shape listed");
            }
        }
    }
}

/// A model `config.json`: parsed, and its defaults checked as a request would be.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ModelConfig::from_json_str(text) {
        for mode in ModeKind::ALL {
            let _ = cfg.defaults_for(mode).validate(&cfg, mode);
        }
        let _ = (cfg.size_multiple(), cfg.window());
    }
}

/// An uploaded image: decoded within the limits, then resized to the fixture model's size as a
/// job would be once it passes the aspect check.
pub fn image(data: &[u8]) {
    let limits = limits();
    if let Ok(img) = form::decode_image("image", data, &limits) {
        assert!((img.width * img.height) as u64 <= limits.max_image_pixels, "decoded past the pixel limit");
        let s = &model().config.defaults;
        if check_resizable(&img, s.height, s.width, "image").is_ok() {
            let out = resize_and_crop(&img, s.height, s.width);
            assert_eq!((out.width, out.height), (s.width, s.height));
        }
    }
}

/// A job submission body: the first byte picks JSON or multipart (boundary `X`), the rest is the
/// body. A refusal must be a 4xx naming the problem, never a 5xx.
pub fn submission(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    let content_type = if kind & 1 == 0 { "application/json" } else { "multipart/form-data; boundary=X" };
    if let Err(e) = form::parse_submission(content_type, body.to_vec(), model(), &limits()) {
        assert!(e.status.is_client_error(), "{} for a submission: {}", e.status, e.message);
        assert!(!e.message.is_empty());
    }
}

/// A prompt: tokenized to the text encoder's context.
pub fn tokenizer(data: &[u8]) {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| Tokenizer::new().expect("the BPE vocabulary"));
    let text = String::from_utf8_lossy(data);
    let tokens = tokenizer.tokenize(&text, 77);
    assert_eq!(tokens.len(), 77);
}
