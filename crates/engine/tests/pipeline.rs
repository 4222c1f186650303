//! `Pipeline::generate` as front ends use it: progress, cancel, modes, input validation.

mod common;

use common::device;
use dynamicrafter_engine::{CollectFrames, Error, FrameSink, Mode, ModelConfig, Pipeline, Progress, Request, RgbImage, SeededNoise, SinkResult, Stage};
use std::sync::atomic::{AtomicBool, Ordering};

fn tiny_v() -> (ModelConfig, Pipeline) {
    let dir = common::tiny_v_dir();
    let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
    let p = Pipeline::load(cfg.clone(), &dir.join("model.safetensors"), &device()).unwrap();
    (cfg, p)
}

/// PSNR of u8 frames against a reference, in dB.
fn psnr(got: &[u8], want: &[u8]) -> f64 {
    let mse = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / want.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

fn image(w: usize, h: usize) -> RgbImage {
    RgbImage::new(w, h, (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect()).unwrap()
}

#[test]
fn progress_reports_every_stage_and_step_and_cancel_stops_between_steps() {
    let (cfg, p) = tiny_v();
    let mut req = Request::new(&cfg, image(90, 50), "a cat");
    req.sampling.steps = 3;
    let cancel = AtomicBool::new(false);
    let mut seen: Vec<Progress> = Vec::new();
    let video = p.generate(&req, &mut SeededNoise::new(1, &device()), &mut |pr| seen.push(pr), &cancel).unwrap();
    let stages: Vec<Stage> = seen.iter().filter(|p| p.step == 0).map(|p| p.stage).collect();
    assert_eq!(stages, [Stage::TextEncode, Stage::ImageEncode, Stage::VaeEncode, Stage::Denoise, Stage::VaeDecode]);
    let steps: Vec<usize> = seen.iter().filter(|p| p.stage == Stage::Denoise).map(|p| p.step).collect();
    assert_eq!(steps, [0, 1, 2, 3]);
    let s = &req.sampling;
    assert_eq!(video.sample.frames, s.frames);
    assert_eq!(video.frames_u8.len(), s.frames * s.height * s.width * 3);

    let mut after = 0;
    let r = p.generate(&req, &mut SeededNoise::new(1, &device()), &mut |pr| {
        if pr.stage == Stage::Denoise && pr.step == 1 {
            cancel.store(true, Ordering::Relaxed);
        }
        if cancel.load(Ordering::Relaxed) {
            after += 1;
        }
    }, &cancel);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(after, 1, "no step may run after the cancel");
}

#[test]
fn same_seed_same_video_and_loop_drops_the_last_frame() {
    let (cfg, p) = tiny_v();
    let mut req = Request::new(&cfg, image(64, 64), "waves");
    req.sampling.steps = 2;
    let never = AtomicBool::new(false);
    let run = |req: &Request, seed| p.generate(req, &mut SeededNoise::new(seed, &device()), &mut |_| {}, &never).unwrap();
    let a = run(&req, 5);
    assert_eq!(a.frames_u8, run(&req, 5).frames_u8);
    assert_ne!(a.frames_u8, run(&req, 6).frames_u8);
    req.mode = Mode::Loop;
    assert_eq!(run(&req, 5).sample.frames, req.sampling.frames - 1);
    req.mode = Mode::Interpolate { end: image(80, 40) };
    assert_eq!(run(&req, 5).sample.frames, req.sampling.frames);
}

/// Records what a sink is given; fails or raises the cancel flag at a chosen frame.
struct Recorder<'a> {
    events: Vec<String>,
    frames: Vec<Vec<u8>>,
    fail_at: Option<usize>,
    cancel_at: Option<(usize, &'a AtomicBool)>,
}

impl FrameSink for Recorder<'_> {
    fn begin(&mut self, sample: usize, count: usize, width: usize, height: usize) -> SinkResult {
        self.events.push(format!("begin {sample}: {count} of {width}x{height}"));
        Ok(())
    }
    fn frame(&mut self, rgb: &[u8]) -> SinkResult {
        self.events.push("frame".into());
        self.frames.push(rgb.to_vec());
        if self.fail_at == Some(self.frames.len()) {
            return Err("disk full".into());
        }
        if let Some((n, flag)) = self.cancel_at {
            if self.frames.len() == n {
                flag.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn end(&mut self) -> SinkResult {
        self.events.push("end".into());
        Ok(())
    }
}

/// Frames reach the sink one at a time as they are decoded (a cancel raised by the first stops
/// the decode of the rest), in order, sample after sample, the same frames `generate` keeps;
/// a failing sink ends the run with its error.
#[test]
fn frames_stream_to_the_sink_as_they_are_decoded() {
    let (cfg, p) = tiny_v();
    let mut req = Request::new(&cfg, image(64, 64), "waves");
    req.sampling.steps = 1;
    let (n, h, w) = (req.sampling.frames, req.sampling.height, req.sampling.width);
    let never = AtomicBool::new(false);
    let recorder = || Recorder { events: Vec::new(), frames: Vec::new(), fail_at: None, cancel_at: None };
    let mut sink = recorder();
    let runs = p.generate_samples(&req, 2, &mut SeededNoise::new(4, &device()), &mut |_| {}, &never, &mut sink).unwrap();
    let mut want = Vec::new();
    for i in 0..2 {
        want.push(format!("begin {i}: {n} of {w}x{h}"));
        want.extend(std::iter::repeat_n("frame".to_string(), n));
        want.push("end".into());
    }
    assert_eq!(sink.events, want);
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.frames == n));
    let one = p.generate(&req, &mut SeededNoise::new(4, &device()), &mut |_| {}, &never).unwrap();
    assert_eq!(sink.frames[..n].concat(), one.frames_u8, "the first sample is generate's video");
    assert_ne!(sink.frames[..n], sink.frames[n..], "the second sample has its own noise");
    let mut collected = CollectFrames::default();
    p.generate_samples(&req, 2, &mut SeededNoise::new(4, &device()), &mut |_| {}, &never, &mut collected).unwrap();
    assert_eq!(collected.samples, [sink.frames[..n].concat(), sink.frames[n..].concat()]);

    let cancel = AtomicBool::new(false);
    let mut sink = Recorder { cancel_at: Some((1, &cancel)), ..recorder() };
    let r = p.generate_samples(&req, 1, &mut SeededNoise::new(4, &device()), &mut |_| {}, &cancel, &mut sink);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(sink.frames.len(), 1, "the first frame arrived before the second was decoded");

    let mut sink = Recorder { fail_at: Some(2), ..recorder() };
    let err = p.generate_samples(&req, 1, &mut SeededNoise::new(4, &device()), &mut |_| {}, &never, &mut sink).unwrap_err();
    assert!(matches!(err, Error::Output(_)) && err.to_string().contains("disk full"), "{err}");
    assert_eq!(sink.events.last().map(String::as_str), Some("frame"), "no frame or end after the failure");
    assert_eq!(sink.frames.len(), 2);
}

#[test]
fn invalid_requests_name_the_problem() {
    let (cfg, p) = tiny_v();
    let never = AtomicBool::new(false);
    let base = Request::new(&cfg, image(64, 64), "x");
    let with = |change: &dyn Fn(&mut Request)| {
        let mut req = base.clone();
        change(&mut req);
        req
    };
    let cases: Vec<(Request, &str)> = vec![
        (with(&|r| r.sampling.steps = 0), "steps"),
        (with(&|r| r.sampling.frames = 0), "frames"),
        (with(&|r| r.sampling.height = 65), "multiples of 64"),
        (with(&|r| r.sampling.cfg_scale = f64::NAN), "cfg"),
        (with(&|r| r.sampling.eta = -1.0), "eta"),
        (with(&|r| (r.mode, r.sampling.frames) = (Mode::Loop, 1)), "frames"),
    ];
    for (req, needle) in cases {
        match p.generate(&req, &mut SeededNoise::new(1, &device()), &mut |_| {}, &never) {
            Err(Error::InvalidInput(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected invalid input naming {needle}, got {other:?}"),
        }
    }
}

/// The reduced-precision path GPUs take (weights and compute in bf16 or f16, norms and softmax in
/// f32, chunked attention), on the test device (the CPU unless `DYNAMICRAFTER_TEST_DEVICE` says
/// otherwise): decoded frames within 35 dB of fp32.
#[test]
fn reduced_precision_pipelines_stay_within_35_db_of_fp32() {
    use dynamicrafter_engine::{Precision, PrecisionPolicy};
    let dir = common::tiny_v_dir();
    let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
    let mut req = Request::new(&cfg, image(96, 64), "waves at sunset");
    req.sampling.steps = 4;
    let never = AtomicBool::new(false);
    let frames = |policy: PrecisionPolicy| {
        let p = Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &device(), policy).unwrap();
        p.generate(&req, &mut SeededNoise::new(3, &device()), &mut |_| {}, &never).unwrap().frames_u8
    };
    let reference = frames(PrecisionPolicy::f32());
    for precision in [Precision::Bf16, Precision::F16] {
        let got = frames(PrecisionPolicy::unchecked(precision));
        let db = psnr(&got, &reference);
        eprintln!("{}: {db:.1} dB vs fp32", precision.name());
        assert!(db >= 35.0, "{}: {db:.1} dB", precision.name());
    }
}

/// `--precision bf16` on a CPU with AMX (the products of linear layers, convolutions and
/// attention in bf16) or AVX512-BF16 (those of linear layers and convolutions), where `auto`
/// picks it too, or on any other CPU (f32 products of bf16-rounded weights), the rest in f32;
/// decoded frames within 35 dB of fp32 (the precision policy's bar for a CPU mode), for every
/// fixture model.
#[test]
fn cpu_bf16_products_stay_within_35_db_of_fp32() {
    use dynamicrafter_engine::{Precision, PrecisionPolicy};
    let policy = PrecisionPolicy::new(Precision::Bf16, &candle_core::Device::Cpu).unwrap();
    let features = dynamicrafter_kernels::cpu::features();
    let auto = PrecisionPolicy::new(Precision::Auto, &candle_core::Device::Cpu).unwrap();
    if features.amx || features.avx512_bf16 {
        assert_eq!(auto, policy);
    } else {
        assert_eq!(auto, PrecisionPolicy::f32(), "without bf16 products auto stays fp32");
    }
    for dir in common::fixture_dirs() {
        let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
        let mut req = Request::new(&cfg, image(96, 64), "waves at sunset");
        req.sampling.steps = 4;
        let never = AtomicBool::new(false);
        let cpu = candle_core::Device::Cpu;
        let frames = |policy: PrecisionPolicy| {
            let p = Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &cpu, policy).unwrap();
            p.generate(&req, &mut SeededNoise::new(3, &cpu), &mut |_| {}, &never).unwrap().frames_u8
        };
        let reference = frames(PrecisionPolicy::f32());
        let got = frames(policy.clone());
        assert_ne!(got, reference, "the bf16 products must change something");
        let db = psnr(&got, &reference);
        eprintln!("{}: cpu {} {db:.1} dB vs fp32", dir.display(), policy.name());
        assert!(db >= 35.0, "{}: cpu bf16 {db:.1} dB", dir.display());
    }
}

/// The bf16 modes of the CPUs below this one pass the same bar: the test above again, in a
/// process capped at `avx512-bf16` (bf16 pairs, where this CPU has AMX) and at `avx2` (rounded
/// weights, where it has more than AVX2).
#[test]
fn cpu_bf16_modes_of_lesser_cpus_pass_the_bar_too() {
    use dynamicrafter_kernels::cpu::{features, Isa, CAP_VAR};
    let best = features().best();
    for cap in [Isa::Avx512Bf16, Isa::Avx2].into_iter().filter(|&cap| cap < best) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(CAP_VAR, cap.name())
            .args(["cpu_bf16_products_stay_within_35_db_of_fp32", "--exact", "--nocapture"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{}: {stdout}\n{}", cap.name(), String::from_utf8_lossy(&out.stderr));
    }
}

/// Hardening (#22): an image whose resize would take gigabytes (a 1 × 2 000 000 strip) is refused
/// with an error naming it, before the pipeline allocates anything for it.
#[test]
fn an_elongated_image_is_refused_before_any_work() {
    let (cfg, p) = tiny_v();
    let never = AtomicBool::new(false);
    for req in [Request::new(&cfg, image(1, 2_000_000), "x"), Request::new(&cfg, image(2_000_000, 1), "x")] {
        match p.generate(&req, &mut SeededNoise::new(1, &device()), &mut |_| {}, &never) {
            Err(Error::InvalidInput(m)) => assert!(m.contains("image is") && m.contains("too elongated"), "{m}"),
            other => panic!("expected the image refused, got {other:?}"),
        }
    }
}

/// Long videos (#20): more frames than the model's window run in sliding windows, fewer keep
/// evenly spaced frames of one window, and the window itself is the plain path, bit for bit.
#[test]
fn frames_beyond_and_below_the_window() {
    let (cfg, p) = tiny_v();
    let window = cfg.window();
    let never = AtomicBool::new(false);
    let mut req = Request::new(&cfg, image(64, 64), "waves");
    req.sampling.steps = 2;
    let run = |req: &Request| p.generate(req, &mut SeededNoise::new(3, &device()), &mut |_| {}, &never).unwrap();

    // The window: sample() is the plain sampler loop over the guided output.
    req.sampling.frames = window;
    let plain = run(&req);
    assert_eq!((plain.sample.frames, plain.sample.plan.describe()), (window, format!("1 window of {window} frames")));
    let cond = p.condition(&req, &mut SeededNoise::new(3, &device()), &mut |_| {}, &mut Vec::new()).unwrap();
    // The sampler's draws are their own stream: a fresh one gives the run's x_T and step noise.
    let mut noise = SeededNoise::new(3, &device());
    let mut solver = p.solver(&req.sampling).unwrap();
    let shape = cond.c_concat.dims().to_vec();
    let mut x = dynamicrafter_engine::NoiseSource::initial(&mut noise, &shape).unwrap();
    let mut denoiser = dynamicrafter_engine::samplers::Denoiser {
        model: |x: &candle_core::Tensor, t: usize| p.guided_output(&cond, &req.sampling, x, t),
        parameterization: p.parameterization(),
    };
    for i in 0..solver.steps() {
        let pred = denoiser.predict(&x, solver.point(i)).unwrap();
        x = solver.step(i, &x, &pred, &mut || dynamicrafter_engine::NoiseSource::step(&mut noise, i, &shape)).unwrap();
    }
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&x), flat(&plain.sample.latent), "one window is the plain path");

    // Longer: every frame is made, in windows of the model's length.
    req.sampling.frames = 2 * window + 4;
    let long = run(&req);
    assert_eq!(long.sample.frames, 2 * window + 4);
    assert_eq!(long.sample.latent.dim(2).unwrap(), 2 * window + 4);
    assert_eq!(long.sample.plan.windows(), (window + 4) / 4 + 1);
    assert!(long.sample.plan.describe().contains(&format!("of {window} frames, stride 4")), "{}", long.sample.plan.describe());
    let mut rescheduled = req.clone();
    rescheduled.sampling.noise_reschedule = true;
    let r = run(&rescheduled);
    assert_eq!(r.sample.frames, long.sample.frames);
    assert_ne!(r.frames_u8, long.frames_u8, "FreeNoise changes the initial noise");
    let size = req.sampling.height * req.sampling.width * 3;

    // Shorter: the whole window runs and evenly spaced frames are kept.
    req.sampling.frames = 3;
    let short = run(&req);
    assert_eq!((short.sample.frames, short.sample.latent.dim(2).unwrap()), (3, window));
    let keep = short.sample.plan.keep.clone().unwrap();
    assert_eq!((keep.len(), keep[0], keep[2]), (3, 0, window - 1));
    assert_eq!(&short.frames_u8[..size], &plain.frames_u8[..size], "frame 0 is the window's first");
    assert_eq!(&short.frames_u8[2 * size..], &plain.frames_u8[(window - 1) * size..], "the last frame is the window's last");

    // Interpolation and looping keep their keyframes in one window.
    req.mode = Mode::Loop;
    req.sampling.frames = window + 1;
    let e = p.generate(&req, &mut SeededNoise::new(3, &device()), &mut |_| {}, &never).unwrap_err().to_string();
    assert!(e.contains("frames must be at most"), "{e}");
}

/// `--offload`: the encoders and the VAE parked in host memory and rebuilt for their stages give
/// the same videos as resident networks (the same weights and kernels: bit for bit), sample after
/// sample and in every mode, and the kernels are counted once.
#[test]
fn offloaded_networks_give_the_same_videos() {
    use dynamicrafter_engine::PrecisionPolicy;
    for dir in common::fixture_dirs() {
        let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
        let load = |offload: bool| {
            Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &device(), PrecisionPolicy::f32().with_offload(offload)).unwrap()
        };
        let offloaded = load(true);
        // `--offload` keeps the guidance passes apart on a GPU; the resident run does the same here.
        let resident = load(false).with_batched_guidance(offloaded.backend().batched_guidance());
        assert_eq!(resident.parked_bytes(), None);
        let parked = offloaded.parked_bytes().unwrap();
        assert!(parked > 0, "{}: nothing parked", dir.display());
        assert_eq!(offloaded.backend().describe(), resident.backend().describe(), "rebuilt networks counted again");
        assert!(offloaded.precision().name().ends_with(", offload"), "{}", offloaded.precision().name());
        let mut req = Request::new(&cfg, image(96, 64), "waves at sunset");
        req.sampling.steps = 2;
        let modes = [Mode::ImageToVideo, Mode::Interpolate { end: image(64, 96) }];
        let never = AtomicBool::new(false);
        for mode in modes.into_iter().filter(|m| cfg.supports(m.kind())) {
            req.mode = mode;
            let videos = |p: &Pipeline| {
                let mut frames = CollectFrames::default();
                p.generate_samples(&req, 2, &mut SeededNoise::new(5, &device()), &mut |_| {}, &never, &mut frames).unwrap();
                frames.samples
            };
            let want = videos(&resident);
            assert_eq!(videos(&offloaded), want, "{}: {:?}", dir.display(), req.mode);
            assert_ne!(want[0], want[1], "two samples, two videos");
        }
        assert_eq!(offloaded.parked_bytes(), Some(parked));
    }
}

/// The UNet's feed-forwards run in pieces of rows (`--offload`'s memory mode) give the same
/// videos up to f32 rounding: pieces of 7 rows, none of them aligned to a frame or a block,
/// against whole.
#[test]
fn feed_forwards_in_pieces_give_the_same_videos() {
    use dynamicrafter_engine::PrecisionPolicy;
    for dir in common::fixture_dirs() {
        let cfg = ModelConfig::from_json_file(&dir.join("config.json")).unwrap();
        let frames = |rows: Option<usize>| {
            let mut policy = PrecisionPolicy::f32();
            policy.ff_chunk_rows = rows;
            let p = Pipeline::load_with(cfg.clone(), &dir.join("model.safetensors"), &device(), policy).unwrap();
            assert_eq!(p.backend().ff_chunk_rows(), rows);
            let mut req = Request::new(&cfg, image(96, 64), "waves at sunset");
            req.sampling.steps = 2;
            p.generate(&req, &mut SeededNoise::new(9, &device()), &mut |_| {}, &AtomicBool::new(false)).unwrap().frames_u8
        };
        let (pieces, whole) = (frames(Some(7)), frames(None));
        let db = psnr(&pieces, &whole);
        let max = pieces.iter().zip(&whole).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap_or(0);
        eprintln!("{}: pieces vs whole {db:.1} dB, max |Δ| {max}", dir.display());
        // The products' row blocking differs in the last f32 bits; a pixel may round the other way.
        assert!(max <= 1 && db >= 60.0, "{}: {db:.1} dB, max |Δ| {max}", dir.display());
    }
}
