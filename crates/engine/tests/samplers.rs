//! The samplers against diffusers' schedulers (`tests/data/samplers.*`, written by
//! `scripts/sampler_fixtures.py`): every step's latent of every run, driven by the same fixed
//! linear "model". Also: DDIM through the sampler path, zero terminal SNR, and the dynamic
//! rescale carried by the k-diffusion samplers.

use candle_core::{DType, Device, Tensor};
use dynamicrafter_engine::config::presets::Preset;
use dynamicrafter_engine::config::{DiffusionConfig, Parameterization, TimestepSpacing};
use dynamicrafter_engine::diffusion::{ddim_step, DdimSchedule, NoiseSchedule};
use dynamicrafter_engine::samplers::{ddim_points, k_points, Denoiser, SamplerKind, ScheduleOptions, Solver};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Relative L2 error allowed per step against diffusers (f32 against f32, different but
/// equivalent formulas; the bound).
const STEP_TOL: f64 = 1e-5;

/// ᾱ of each point against diffusers' (both from the f64 ᾱ; the noise levels are stored as f32).
const ALPHA_BAR_TOL: f64 = 1e-7;

fn data() -> (Value, HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("samplers.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("samplers.safetensors"), &Device::Cpu).unwrap();
    (meta, tensors)
}

fn diffusion(prediction: &str, zero_snr: bool) -> DiffusionConfig {
    let preset = if prediction == "v_prediction" { Preset::Dc1024 } else { Preset::Dc256 };
    let mut d = preset.config().diffusion;
    d.rescale_betas_zero_snr = zero_snr;
    // diffusers has no dynamic rescale; its own test is below.
    d.use_dynamic_rescale = false;
    d
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// `out = W·x + b·t/1000` over channels, in f64 (the script's model).
fn linear_model(w: &Tensor, b: &Tensor) -> impl FnMut(&Tensor, usize) -> dynamicrafter_engine::Result<Tensor> {
    let w: Vec<Vec<f64>> = w.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    move |x: &Tensor, t: usize| {
        let dims = x.dims().to_vec();
        let c = dims[1];
        let per = x.elem_count() / (dims[0] * c);
        let v: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let mut out = vec![0f32; v.len()];
        for n in 0..dims[0] {
            for o in 0..c {
                for k in 0..per {
                    let mut acc = b[o] * (t as f64 / 1000.0);
                    for i in 0..c {
                        acc += w[o][i] * v[(n * c + i) * per + k];
                    }
                    out[(n * c + o) * per + k] = acc as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, dims, x.device())?)
    }
}

#[test]
fn every_sampler_matches_diffusers_at_every_step() {
    let (meta, t) = data();
    let runs = meta["runs"].as_array().unwrap();
    assert!(runs.len() >= 10, "the fixture holds {} runs", runs.len());
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for run in runs {
        let name = run["name"].as_str().unwrap();
        let kind: SamplerKind = run["sampler"].as_str().unwrap().parse().unwrap();
        seen.insert(kind.name());
        let prediction = run["prediction"].as_str().unwrap();
        let schedule = NoiseSchedule::new(&diffusion(prediction, run["zero_snr"].as_bool().unwrap()));
        let spacing = match run["spacing"].as_str().unwrap() {
            "trailing" => TimestepSpacing::UniformTrailing,
            _ => TimestepSpacing::Uniform,
        };
        let opts = ScheduleOptions { spacing, steps: run["steps"].as_u64().unwrap() as usize, karras: run["karras"].as_bool().unwrap() };
        let points = k_points(&schedule, &opts).unwrap();
        let ts: Vec<u64> = points[..points.len() - 1].iter().map(|p| p.t as u64).collect();
        let want_ts: Vec<u64> = run["timesteps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ts, want_ts, "{name}: timesteps");
        // Noise levels compared as ᾱ = 1/(1+σ²) (σ spans 0.03 to 4096).
        for (p, s) in points.iter().zip(run["sigmas"].as_array().unwrap()) {
            let (ours, theirs) = (1.0 / (1.0 + p.sigma_ve * p.sigma_ve), 1.0 / (1.0 + s.as_f64().unwrap().powi(2)));
            assert!((ours - theirs).abs() <= ALPHA_BAR_TOL, "{name}: ᾱ {ours} vs diffusers {theirs}");
        }
        let parameterization = if prediction == "v_prediction" { Parameterization::V } else { Parameterization::Eps };
        let mut denoiser = Denoiser { model: linear_model(&t[&format!("{name}.w")], &t[&format!("{name}.b")]), parameterization };
        let mut solver = Solver::k(kind, points);
        let want = &t[&format!("{name}.x")];
        let noise = t.get(&format!("{name}.noise"));
        assert_eq!(noise.is_some(), kind.stochastic(), "{name}: noise in the fixture");
        let mut x = t[&format!("{name}.x_t")].clone();
        let mut worst = 0f64;
        for i in 0..solver.steps() {
            let pred = denoiser.predict(&x, solver.point(i)).unwrap();
            let mut draw = || -> dynamicrafter_engine::Result<Tensor> { Ok(noise.expect("a stochastic sampler").get(i)?) };
            x = solver.step(i, &x, &pred, &mut draw).unwrap();
            let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            assert!(got.iter().all(|v| v.is_finite()), "{name}: step {i} is not finite");
            let e = rel_err(&x, &want.get(i).unwrap());
            worst = worst.max(e);
            if e > STEP_TOL {
                failures.push(format!("{name} step {i}: relative error {e:.2e}"));
                break;
            }
        }
        eprintln!("{name:<28} worst step {worst:.1e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let all: std::collections::BTreeSet<_> = SamplerKind::ALL.iter().filter(|k| **k != SamplerKind::Ddim).map(|k| k.name()).collect();
    assert_eq!(seen, all, "every k-diffusion sampler has fixtures");
}

/// A small random latent and model for the tests below.
fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed;
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn model_weights() -> (Tensor, Tensor) {
    let w = (random(&[4, 4], 7) * 0.1).unwrap();
    let eye = Tensor::eye(4, DType::F32, &Device::Cpu).unwrap();
    ((w + (eye * 0.8).unwrap()).unwrap(), random(&[4], 8))
}

/// DDIM through `Solver` is the DDIM step of the parity tests, bit for bit, with the dynamic
/// rescale and zero terminal SNR of the 1024 model and with the 256 model's eps schedule.
#[test]
fn ddim_through_the_solver_is_the_ddim_step() {
    for preset in [Preset::Dc1024, Preset::Dc256] {
        let cfg = preset.config();
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let param = cfg.diffusion.parameterization;
        let ddim = DdimSchedule::new(&schedule, cfg.defaults.spacing, 7, 1.0).unwrap();
        let (w, b) = model_weights();
        let mut model = linear_model(&w, &b);
        let mut denoiser = Denoiser { model: linear_model(&w, &b), parameterization: param };
        let mut solver = Solver::ddim(ddim.clone(), ddim_points(&schedule, &ddim, param));
        let shape = [1, 4, 2, 3, 3];
        let (mut x, mut y) = (random(&shape, 1), random(&shape, 1));
        for i in 0..solver.steps() {
            let z = random(&shape, 100 + i as u64);
            let index = ddim.len() - 1 - i;
            let out = model(&y, ddim.timesteps[index]).unwrap();
            let want = ddim_step(&schedule, &ddim, param, &y, &out, index, &z).unwrap();
            let pred = denoiser.predict(&x, solver.point(i)).unwrap();
            assert_eq!(pred.x0.to_vec1_flat(), want.pred_x0.to_vec1_flat(), "{preset:?} step {i}: x0");
            x = solver.step(i, &x, &pred, &mut || Ok(z.clone())).unwrap();
            y = want.x_prev;
            assert_eq!(x.to_vec1_flat(), y.to_vec1_flat(), "{preset:?} step {i}");
        }
    }
}

trait Flat {
    fn to_vec1_flat(&self) -> Vec<f32>;
}
impl Flat for Tensor {
    fn to_vec1_flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// Zero terminal SNR (σ = ∞ at t = 999): every sampler starts there from pure noise and stays
/// finite, with and without Karras levels.
#[test]
fn zero_terminal_snr_stays_finite() {
    let cfg = Preset::Dc1024.config();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    assert_eq!(schedule.alphas_cumprod[999], 0.0);
    let (w, b) = model_weights();
    for kind in SamplerKind::ALL.into_iter().filter(|&k| k != SamplerKind::Ddim) {
        for karras in [false, true] {
            let points = k_points(&schedule, &ScheduleOptions { spacing: TimestepSpacing::UniformTrailing, steps: 6, karras }).unwrap();
            assert_eq!(points[0].t, 999);
            assert!(points.iter().all(|p| p.sigma_ve.is_finite() && p.alpha.is_finite() && p.sigma.is_finite()));
            let mut denoiser = Denoiser { model: linear_model(&w, &b), parameterization: Parameterization::V };
            let mut solver = Solver::k(kind, points);
            let mut x = random(&[1, 4, 2, 3, 3], 3);
            for i in 0..solver.steps() {
                let pred = denoiser.predict(&x, solver.point(i)).unwrap();
                x = solver.step(i, &x, &pred, &mut || Ok(random(&[1, 4, 2, 3, 3], 50 + i as u64))).unwrap();
                assert!(x.to_vec1_flat().iter().all(|v| v.is_finite()), "{kind} karras={karras} step {i}");
            }
        }
    }
}

/// The dynamic rescale as DDIM applies it, carried to Euler: Euler is DDIM with eta 0 in
/// these coordinates, so with the rescale each Euler step must equal
/// `alpha_next·x0_rescaled + sigma_next·eps` (eps straight from the model).
#[test]
fn euler_carries_the_dynamic_rescale_as_ddim() {
    let cfg = Preset::Dc1024.config();
    assert!(cfg.diffusion.use_dynamic_rescale);
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let points = k_points(&schedule, &ScheduleOptions { spacing: TimestepSpacing::UniformTrailing, steps: 8, karras: false }).unwrap();
    assert!(points.iter().any(|p| p.rescale.is_some_and(|r| (r - 1.0).abs() > 0.01)), "the schedule rescales somewhere");
    let (w, b) = model_weights();
    let mut denoiser = Denoiser { model: linear_model(&w, &b), parameterization: Parameterization::V };
    let mut solver = Solver::k(SamplerKind::Euler, points.clone());
    let mut x = random(&[1, 4, 2, 3, 3], 5);
    for i in 0..solver.steps() {
        let pred = denoiser.predict(&x, solver.point(i)).unwrap();
        let to = points[i + 1];
        let want = ((&pred.x0 * to.alpha as f64).unwrap() + (&pred.eps * to.sigma as f64).unwrap()).unwrap();
        x = solver.step(i, &x, &pred, &mut || unreachable!("euler draws no noise")).unwrap();
        let e = rel_err(&x, &want);
        assert!(e < 1e-5, "step {i}: {e:.2e}");
    }
}
