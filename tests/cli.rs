//! End-to-end checks of the `dynamicrafter` binary on the repository's tiny fixture models.

use candle_core::Device;
use dynamicrafter_engine::{ModelConfig, Pipeline, Precision, PrecisionPolicy, Request, SeededNoise};
use dynamicrafter_video::{chroma_420, decode_mp4, luma, psnr, Frames};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamicrafter-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynamicrafter")).current_dir(repo()).args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\n{}", o.status.code(), String::from_utf8_lossy(&o.stderr));
}

const CARD: &str = "examples/images/test_card.png";

/// The precision policy `--precision auto` (the default) resolves to on this machine's CPU.
fn auto() -> PrecisionPolicy {
    PrecisionPolicy::new(Precision::Auto, &Device::Cpu).unwrap()
}

/// The frames the engine itself produces for the same request and seed, in the default precision.
fn engine_frames(model: &str, weights: &str, prompt: &str, steps: usize, seed: u64) -> (Vec<u8>, usize, usize, usize) {
    let dir = repo().join("fixtures").join(model);
    let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
    let p = Pipeline::load_with(cfg.clone(), &dir.join(weights), &Device::Cpu, auto()).unwrap();
    let img = image::open(repo().join(CARD)).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let image = dynamicrafter_engine::RgbImage::new(w as usize, h as usize, img.into_raw()).unwrap();
    let mut req = Request::new(&cfg, image, prompt);
    req.sampling.steps = steps;
    let v = p.generate(&req, &mut SeededNoise::new(seed, &Device::Cpu), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    (v.frames_u8, v.sample.frames, v.sample.width, v.sample.height)
}

#[test]
fn generate_writes_a_browser_playable_mp4_of_the_pipeline_frames() {
    let dir = tmp("mp4");
    let out = dir.join("fox.mp4");
    let report = dir.join("report.json");
    let o = run(&[
        "generate", "--model", "fixtures/tiny-v", "--image", CARD, "--prompt", "a red fox", "--steps", "2", "--seed", "7",
        "--out", out.to_str().unwrap(), "--report-json", report.to_str().unwrap(),
    ]);
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("seed 7"), "the seed is printed: {stderr}");
    for stage in ["model load", "text encode", "image encode", "VAE encode", "denoise", "per step", "VAE decode", "video write", "total", "peak RSS", &auto().name()] {
        assert!(stderr.contains(stage), "report names {stage}: {stderr}");
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["denoise_steps"]["count"], 2);
    assert_eq!(json["precision"], auto().name());

    let video = decode_mp4(&std::fs::read(&out).unwrap()).unwrap();
    let (want, n, w, h) = engine_frames("tiny-v", "model.safetensors", "a red fox", 2, 7);
    assert_eq!((video.count, video.width, video.height), (n, w, h));
    assert!((video.fps - 8.0).abs() < 1e-9, "upstream writes 8 fps, got {}", video.fps);
    assert!(video.moov_first, "moov must come first for progressive playback");
    // yuv420p halves chroma resolution by design; measure the encoder against what 4:2:0 can
    // hold, and the luma (full resolution) against the pipeline's frames directly.
    let frames = Frames::new(&want, n, w, h).unwrap();
    let db = psnr(&video.frames, &chroma_420(frames));
    assert!(db >= 35.0, "PSNR vs 4:2:0 frames {db:.1} dB");
    let db = psnr(&luma(&video.frames), &luma(&want));
    assert!(db >= 35.0, "luma PSNR {db:.1} dB");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "no temporary files left");
}

#[test]
fn gif_png_fps_and_samples() {
    let dir = tmp("formats");
    let png = dir.join("frames");
    // `--offload` (networks rebuilt from host memory for their stages) changes nothing in the frames.
    let o = run(&["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--prompt", "a red fox", "--steps", "2", "--seed", "7", "--format", "png", "--offload", "--out", png.to_str().unwrap(), "-q"]);
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(&format!("{}, offload", auto().name())), "the report says offload: {stderr}");
    let (want, n, w, h) = engine_frames("tiny-v", "model.safetensors", "a red fox", 2, 7);
    let mut got = Vec::new();
    for i in 0..n {
        got.extend(image::open(png.join(format!("frame_{i:03}.png"))).unwrap().to_rgb8().into_raw());
    }
    assert_eq!(got, want, "PNG frames are the pipeline's frames exactly");
    assert_eq!(std::fs::read_dir(&png).unwrap().count(), n);

    let gif = dir.join("fox.gif");
    ok(&run(&["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--steps", "1", "--format", "gif", "--fps", "4", "--out", gif.to_str().unwrap(), "-q"]));
    use image::AnimationDecoder;
    let frames: Vec<_> = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap()))
        .unwrap()
        .into_frames()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames.len(), n);
    assert_eq!(frames[0].buffer().dimensions(), (w as u32, h as u32));
    assert_eq!(frames[0].delay().numer_denom_ms(), (250, 1));

    let mp4 = dir.join("two.mp4");
    ok(&run(&["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--steps", "1", "--n-samples", "2", "--fps", "12", "--loop", "--out", mp4.to_str().unwrap(), "-q"]));
    for i in 0..2 {
        let v = decode_mp4(&std::fs::read(dir.join(format!("two_sample{i}.mp4"))).unwrap()).unwrap();
        assert_eq!(v.count, n - 1, "loop drops the last frame");
        assert!((v.fps - 12.0).abs() < 1e-9);
    }
}

#[test]
fn batch_follows_run_sh_and_skips_bad_items() {
    let dir = tmp("batch");
    let prompts = dir.join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    for name in ["a_cat.v1.png", "b_dog.png", "c_bird.jpg"] {
        std::fs::copy(repo().join(CARD), prompts.join(name)).unwrap();
    }
    std::fs::write(prompts.join("c_bird.jpg"), b"not really a jpeg").unwrap();
    std::fs::copy(repo().join(CARD), prompts.join("d_fish.png")).unwrap();
    // Three non-empty lines for four images: the fourth has no prompt.
    std::fs::write(prompts.join("prompts.txt"), "a cat\n\n  a dog  \na bird\n").unwrap();
    let out = dir.join("out");
    let o = run(&["batch", "--model", "fixtures/tiny-v", "--prompt-dir", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--steps", "1", "-q"]);
    assert_eq!(o.status.code(), Some(1), "partial failure: {}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("c_bird") && stderr.contains("not a readable image"), "{stderr}");
    assert!(stderr.contains("d_fish") && stderr.contains("no prompt"), "{stderr}");
    let mut files: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["a_cat_sample0.mp4", "b_dog_sample0.mp4"]);
}

/// Hardening (#22): images whose upstream stems collide (`cat.png`, `cat.jpg`, `cat.v2.png`)
/// each get their own output instead of overwriting one another.
#[test]
fn batch_gives_images_with_the_same_stem_their_own_outputs() {
    let dir = tmp("batch-stems");
    let prompts = dir.join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    for name in ["cat.png", "cat.v2.png", "dog.png"] {
        std::fs::copy(repo().join(CARD), prompts.join(name)).unwrap();
    }
    std::fs::write(prompts.join("prompts.txt"), "a cat\na cat again\na dog\n").unwrap();
    let out = dir.join("out");
    ok(&run(&["batch", "--model", "fixtures/tiny-v", "--prompt-dir", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--steps", "1", "-q"]));
    let mut files: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["cat_png_sample0.mp4", "cat_v2_png_sample0.mp4", "dog_sample0.mp4"]);
}

/// Hardening (#22): `--format png` never deletes a folder: a non-empty one is refused up front
/// (its files untouched), an empty one is filled.
#[test]
fn png_output_refuses_a_non_empty_folder() {
    let dir = tmp("png-folder");
    let full = dir.join("full");
    std::fs::create_dir_all(full.join("sub")).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let args = |out: &Path| -> Vec<String> {
        ["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--prompt", "x", "--steps", "1", "--format", "png", "-q", "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.to_str().unwrap().to_string()])
            .collect()
    };
    let o = run(&args(&full).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an empty folder"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    assert!(full.join("sub").is_dir());
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    ok(&run(&args(&empty).iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(empty.join("frame_000.png").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Hardening (#22): `convert` writes through an exclusive temporary file, so a link planted at
/// the old predictable name is not followed, and nothing partial is left.
#[cfg(unix)]
#[test]
fn convert_follows_no_planted_link() {
    let dir = tmp("convert-link");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("model.safetensors.partial")).unwrap();
    let st = dir.join("model.safetensors");
    ok(&run(&["convert", "fixtures/tiny-eps/model.ckpt", st.to_str().unwrap()]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::metadata(&st).unwrap().len() > 1000);
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn convert_round_trips_to_the_same_video() {
    let dir = tmp("convert");
    let st = dir.join("model.safetensors");
    ok(&run(&["convert", "fixtures/tiny-eps/model.ckpt", st.to_str().unwrap()]));
    std::fs::copy(repo().join("fixtures/tiny-eps/config.json"), dir.join("config.json")).unwrap();
    let a = dir.join("a");
    let b = dir.join("b");
    let common = ["--image", CARD, "--prompt", "x", "--steps", "2", "--format", "png", "-q"];
    let mut args = vec!["generate", "--model", "fixtures/tiny-eps/model.ckpt", "--config", "fixtures/tiny-eps/config.json", "--out", a.to_str().unwrap()];
    args.extend(common);
    ok(&run(&args));
    let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--out", b.to_str().unwrap()];
    args.extend(common);
    ok(&run(&args));
    for i in 0..4 {
        let f = format!("frame_{i:03}.png");
        assert_eq!(std::fs::read(a.join(&f)).unwrap(), std::fs::read(b.join(&f)).unwrap(), "{f}");
    }
    let bf = dir.join("half.safetensors");
    ok(&run(&["convert", "fixtures/tiny-eps/model.ckpt", bf.to_str().unwrap(), "--dtype", "bf16"]));
    assert!(std::fs::metadata(&bf).unwrap().len() < std::fs::metadata(&st).unwrap().len() * 6 / 10);
}

/// `--sampler` and `--karras` reach the engine: the report names the sampler, every step
/// runs, and a different sampler gives a different video from the same seed.
#[test]
fn samplers_run_from_the_command_line() {
    let dir = tmp("samplers");
    let mut videos = Vec::new();
    for (sampler, karras, want) in [("ddim", None, "ddim eta 1, 3 steps"), ("dpmpp-2m", Some("--karras"), "dpmpp-2m karras, 3 steps"), ("unipc", None, "unipc, 3 steps")] {
        let out = dir.join(format!("{sampler}.mp4"));
        let report = dir.join(format!("{sampler}.json"));
        let mut args = vec!["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--steps", "3", "--seed", "5", "--sampler", sampler, "-q"];
        args.extend(karras);
        args.extend(["--out", out.to_str().unwrap(), "--report-json", report.to_str().unwrap()]);
        ok(&run(&args));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(json["sampler"], want);
        assert_eq!(json["denoise_steps"]["count"], 3);
        let video = decode_mp4(&std::fs::read(&out).unwrap()).unwrap();
        videos.push(video.frames);
    }
    assert!(videos[0] != videos[1] && videos[1] != videos[2], "each sampler gives its own video");
}

/// A 40-frame video from an 8-frame model: sliding windows, every frame in the mp4, the
/// windows in the report; interpolation past the window is refused up front.
#[test]
fn long_video_from_the_command_line() {
    let dir = tmp("long");
    let out = dir.join("long.mp4");
    let report = dir.join("long.json");
    ok(&run(&[
        "generate", "--model", "fixtures/tiny-v", "--image", CARD, "--steps", "1", "--frames", "40", "--window-stride", "4",
        "--noise-reschedule", "-q", "--out", out.to_str().unwrap(), "--report-json", report.to_str().unwrap(),
    ]));
    let video = decode_mp4(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(video.count, 40);
    // And as a third party reads it: ffprobe decodes every frame (`.ci/run` installs ffmpeg).
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries", "stream=codec_name,pix_fmt,nb_read_frames,width,height"])
        .args(["-of", "csv=p=0"])
        .arg(&out)
        .output()
        .expect("ffprobe runs (install ffmpeg)");
    assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let probed = format!("h264,{},{},yuv420p,40", json["width"], json["height"]);
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), probed);
    assert_eq!(json["frames"], 40);
    assert_eq!(json["windows"], "9 windows of 8 frames, stride 4");
    let r = run(&["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--image2", CARD, "--frames", "9", "--out", dir.join("i.mp4").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("frames must be at most 8"), "{err}");
    assert!(!dir.join("i.mp4").exists());
}

#[test]
fn bad_input_is_one_line_exit_2_and_nothing_written() {
    let dir = tmp("bad");
    let out = dir.join("o.mp4");
    let o = out.to_str().unwrap();
    let base = ["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--out", o];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        let mut v: Vec<&str> = base.to_vec();
        v.extend(extra);
        v
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--model", "fixtures/tiny-v", "--image", "nope.png", "--out", o], "nope.png"),
        (vec!["generate", "--model", "fixtures/tiny-v", "--image", "Cargo.toml", "--out", o], "not a readable image"),
        (with(&[]).into_iter().map(|a| if a == "fixtures/tiny-v" { "no-such-model" } else { a }).collect(), "unknown model"),
        (vec!["generate", "--model", "fixtures/tiny-eps/model.safetensors", "--config", "fixtures/tiny-v/config.json", "--image", CARD, "--out", o], "does not match the model config"),
        (with(&["--steps", "0"]), "steps"),
        (with(&["--cfg", "NaN"]), "cfg"),
        (with(&["--frames", "0"]), "frames"),
        (with(&["--height", "100"]), "multiples of 64"),
        (with(&["--precision", "fp64"]), "precision"),
        (with(&["--format", "avi"]), "format"),
        (with(&["--device", "tpu"]), "--device 'tpu'"),
        (with(&["--device", "cuda:x"]), "--device 'cuda:x'"),
        (with(&["--quantize", "q2"]), "quantization 'q2'"),
        (with(&["--karras"]), "karras"),
        (with(&["--sampler", "heun"]), "sampler"),
        (vec!["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--out", "/no/such/dir/o.mp4"], "does not exist"),
        (vec!["convert", "fixtures/tiny-v/config.json", "x.safetensors"], "checkpoint"),
    ];
    for (args, needle) in cases {
        let r = run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dynamicrafter: ")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(needle), "{args:?}: {err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{args:?} wrote something");
        assert!(!Path::new("x.safetensors").exists());
    }
}

#[test]
fn offline_preset_says_what_is_missing_and_where() {
    let home = tmp("hf-home");
    let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
        .current_dir(repo())
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["generate", "--model", "256", "--image", CARD, "--out", home.join("x.mp4").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("model.ckpt of Doubiiu/DynamiCrafter is not in the Hugging Face cache"), "{err}");
    assert!(err.contains(home.to_str().unwrap()), "names the cache folder: {err}");
}

/// Hardening (#22): the two keyframe modes are refused on a model known not to be trained for
/// them, before anything is downloaded; the interpolation model takes them (and then asks for
/// its weights).
#[test]
fn keyframe_modes_need_the_interpolation_model() {
    let home = tmp("hf-home-modes");
    let out = home.join("x.mp4");
    for (model, extra, needle) in [
        ("256", &["--loop"][..], "mode 'loop' needs a model trained for two keyframes"),
        ("1024", &["--image2", CARD][..], "mode 'interpolate' needs a model trained for two keyframes"),
        ("512_interp", &["--loop"][..], "not in the Hugging Face cache"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_dynamicrafter"))
            .current_dir(repo())
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .args(["generate", "--model", model, "--image", CARD, "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{model}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dynamicrafter: ")).collect();
        assert!(lines.len() == 1 && lines[0].contains(needle), "{model}: {err}");
    }
}

/// Hardening (#22): every knob has a stated range, checked before any work: huge sizes, frame
/// counts and guidance scales are one line and exit 2, not an abort or a black video.
#[test]
fn out_of_range_knobs_are_refused_up_front() {
    let dir = tmp("ranges");
    let out = dir.join("o.mp4");
    let base = ["generate", "--model", "fixtures/tiny-v", "--image", CARD, "--out", out.to_str().unwrap()];
    for (extra, needle) in [
        (&["--frames", "10000"][..], "frames"),
        (&["--width", "64000", "--height", "64000"][..], "height"),
        (&["--cfg", "1e308"][..], "cfg"),
        (&["--eta", "1e308"][..], "eta"),
        (&["--cfg-img", "1e308"][..], "cfg_img"),
        (&["--fs", "100000"][..], "fs"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let r = run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dynamicrafter: ")).collect();
        assert_eq!(lines.len(), 1, "{extra:?}: {err}");
        assert!(lines[0].contains(needle) && lines[0].contains("between"), "{extra:?}: {err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{extra:?} wrote something");
    }
}
