//! Samplers: DDIM (upstream's, the default) and the k-diffusion family users know from ComfyUI
//! and diffusers (Euler, Euler ancestral, DPM-Solver++ 2M and its SDE form, UniPC), all over one
//! [`Denoiser`]. The denoiser owns everything model-specific (guidance, v/eps, the dynamic x0
//! rescale); a sampler sees only points of the noise schedule and x0/eps estimates.
//! `docs/SAMPLERS.md` gives the design and how the dynamic rescale carries to multistep samplers.

mod solvers;

use crate::config::{Parameterization, TimestepSpacing};
use crate::diffusion::{ddim_timesteps, predict, DdimSchedule, NoiseSchedule};
use crate::{Error, Result};
use candle_core::Tensor;
pub use solvers::Solver;

/// The samplers, named as in ComfyUI (`dpmpp_2m` there, `dpmpp-2m` here, like every flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Upstream's DDIM (eta from `--eta`).
    #[default]
    Ddim,
    /// Euler: first-order ODE steps.
    Euler,
    /// Euler ancestral: first order, fresh noise every step.
    EulerAncestral,
    /// DPM-Solver++ 2M: second-order multistep.
    #[cfg_attr(feature = "cli", value(name = "dpmpp-2m"))]
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M SDE: second order, fresh noise every step.
    #[cfg_attr(feature = "cli", value(name = "dpmpp-2m-sde"))]
    #[serde(rename = "dpmpp-2m-sde")]
    DpmPp2mSde,
    /// UniPC: second-order predictor-corrector (bh2).
    #[cfg_attr(feature = "cli", value(name = "unipc"))]
    #[serde(rename = "unipc")]
    UniPc,
}

impl SamplerKind {
    pub const ALL: [Self; 6] = [Self::Ddim, Self::Euler, Self::EulerAncestral, Self::DpmPp2m, Self::DpmPp2mSde, Self::UniPc];
    pub const NAMES: [&'static str; 6] = ["ddim", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-sde", "unipc"];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|&k| k == self).expect("every kind is listed")]
    }

    /// Draws fresh noise at every step.
    pub fn stochastic(self) -> bool {
        matches!(self, Self::Ddim | Self::EulerAncestral | Self::DpmPp2mSde)
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::NAMES
            .iter()
            .position(|&n| n == key)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| Error::InvalidInput(format!("sampler '{s}' (expected one of {})", Self::NAMES.join(", "))))
    }
}

/// One point of a sampler's schedule: what the model is asked at, and the coefficients of the
/// variance-preserving latent there, `x = alpha·x0 + sigma·eps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// The timestep the model sees.
    pub t: usize,
    /// The coefficients the model output is converted with (f32, as the reference).
    pub alpha: f32,
    pub sigma: f32,
    /// `sigma / alpha`: the noise level the k-diffusion samplers step in (0: clean).
    pub sigma_ve: f64,
    /// Dynamic x0 rescale towards the step's target (`scale(t_next) / scale(t)`), where the
    /// model was trained with it.
    pub rescale: Option<f32>,
}

impl Point {
    /// The clean end of the schedule.
    pub const CLEAN: Point = Point { t: 0, alpha: 1.0, sigma: 0.0, sigma_ve: 0.0, rescale: None };

    /// The point at noise level `sigma_ve`.
    fn from_sigma(t: usize, sigma_ve: f64) -> Self {
        let (a, s) = vp_coefficients(sigma_ve);
        Self { t, alpha: a as f32, sigma: s as f32, sigma_ve, rescale: None }
    }

    /// The VP coefficients `(alpha, sigma)` in f64, for the solvers' scalars.
    fn alpha_sigma(&self) -> (f64, f64) {
        vp_coefficients(self.sigma_ve)
    }

    /// `log(alpha / sigma)`; infinite at the clean end.
    fn lambda(&self) -> f64 {
        -self.sigma_ve.ln()
    }
}

/// `(alpha, sigma)` of the VP latent at noise level `sigma_ve` (diffusers'
/// `_sigma_to_alpha_sigma_t`).
fn vp_coefficients(sigma_ve: f64) -> (f64, f64) {
    let a = 1.0 / (sigma_ve * sigma_ve + 1.0).sqrt();
    (a, sigma_ve * a)
}

/// What the denoiser says about a latent at one point.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// The noise estimate, from the model output directly.
    pub eps: Tensor,
    /// The clean-latent estimate in the point's own scale.
    pub x0_raw: Tensor,
    /// The clean-latent estimate towards the step's target (`x0_raw` times the point's rescale).
    pub x0: Tensor,
}

/// The model at one point: the guided output (v or eps, as the model predicts) for the latent.
pub trait Model {
    fn output(&mut self, x: &Tensor, t: usize) -> Result<Tensor>;
}

impl<F: FnMut(&Tensor, usize) -> Result<Tensor>> Model for F {
    fn output(&mut self, x: &Tensor, t: usize) -> Result<Tensor> {
        self(x, t)
    }
}

/// The model output turned into x0 and eps estimates: the parameterization and the dynamic
/// rescale live here, once for every sampler.
pub struct Denoiser<M> {
    pub model: M,
    pub parameterization: Parameterization,
}

impl<M: Model> Denoiser<M> {
    pub fn predict(&mut self, x: &Tensor, at: &Point) -> Result<Prediction> {
        let out = self.model.output(x, at.t)?;
        let (eps, x0_raw) = predict(self.parameterization, x, &out, at.alpha, at.sigma)?;
        let x0 = match at.rescale {
            Some(r) => crate::diffusion::mul(&x0_raw, r)?,
            None => x0_raw.clone(),
        };
        Ok(Prediction { eps, x0_raw, x0 })
    }
}

/// Where a sampler's points come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleOptions {
    pub spacing: TimestepSpacing,
    pub steps: usize,
    /// Karras et al. (2022) noise levels, ρ = 7, over the model's whole range.
    pub karras: bool,
}

/// The noise level of every timestep (`sqrt((1 - ᾱ) / ᾱ)`), with a zero-terminal-SNR model's
/// ᾱ_T = 0 taken as 2⁻²⁴ as diffusers does, so the first step from pure noise is finite.
fn sigmas_ve(schedule: &NoiseSchedule) -> Vec<f64> {
    schedule
        .alphas_cumprod_f64
        .iter()
        .map(|&a| {
            let a = if a <= 0.0 { 2f64.powi(-24) } else { a };
            ((1.0 - a) / a).sqrt()
        })
        .collect()
}

/// The timestep of noise level `sigma`: log-sigma interpolation (diffusers' `_sigma_to_t`),
/// rounded half to even as diffusers' DPM-Solver and UniPC do.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> usize {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas.iter().rposition(|&l| ls - l >= 0.0).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    ((1.0 - w) * low as f64 + w * (low + 1) as f64).round_ties_even() as usize
}

/// `steps` Karras noise levels from the largest to the smallest of `all`.
fn karras(all: &[f64], steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min, max) = (all[0], all[all.len() - 1]);
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// The points a k-diffusion sampler steps through, noisiest first, ending at [`Point::CLEAN`].
pub fn k_points(schedule: &NoiseSchedule, opts: &ScheduleOptions) -> Result<Vec<Point>> {
    let all = sigmas_ve(schedule);
    let mut points: Vec<Point> = if opts.karras {
        if opts.steps == 0 || opts.steps > all.len() {
            return Err(Error::InvalidInput(format!("steps must be in 1..={}, got {}", all.len(), opts.steps)));
        }
        let logs: Vec<f64> = all.iter().map(|s| s.ln()).collect();
        // The noise levels are stored as f32, as diffusers' schedulers do.
        karras(&all, opts.steps).into_iter().map(|s| Point::from_sigma(sigma_to_t(s, &logs), s as f32 as f64)).collect()
    } else {
        let ts = ddim_timesteps(opts.spacing, opts.steps, all.len())?;
        ts.iter().rev().map(|&t| Point::from_sigma(t, all[t] as f32 as f64)).collect()
    };
    if let Some(scale) = &schedule.scale_arr {
        for i in 0..points.len() {
            let next = points.get(i + 1).map_or(points[i].t, |p| p.t);
            points[i].rescale = Some(scale[next] / scale[points[i].t]);
        }
    }
    points.push(Point::CLEAN);
    Ok(points)
}

/// DDIM's points (its own schedule arrays, so the default path stays the reference's),
/// noisiest first.
pub fn ddim_points(schedule: &NoiseSchedule, ddim: &DdimSchedule, parameterization: Parameterization) -> Vec<Point> {
    (0..ddim.len()).rev().map(|index| ddim_point(schedule, ddim, parameterization, index)).collect()
}

/// DDIM's point at DDIM `index`: the v model converts with the schedule's buffers at `t`, the
/// eps model with DDIM's own arrays, as upstream's `p_sample_ddim` does.
pub fn ddim_point(schedule: &NoiseSchedule, ddim: &DdimSchedule, parameterization: Parameterization, index: usize) -> Point {
    let t = ddim.timesteps[index];
    let (alpha, sigma) = match parameterization {
        Parameterization::V => (schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]),
        Parameterization::Eps => (ddim.alphas[index].sqrt(), ddim.sqrt_one_minus_alphas[index]),
    };
    let a = schedule.alphas_cumprod_f64[t];
    let rescale = ddim.scale_arr.as_ref().zip(ddim.scale_arr_prev.as_ref()).map(|(sc, prev)| prev[index] / sc[index]);
    Point { t, alpha, sigma, sigma_ve: ((1.0 - a) / a).sqrt(), rescale }
}
