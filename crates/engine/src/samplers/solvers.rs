//! Each sampler's update, in the variance-preserving latent `x = alpha·x0 + sigma·eps` (the
//! latent the model sees; diffusers' Euler schedulers keep `x / alpha` instead, the same update
//! in other coordinates). Scalars in f64, tensors in f32; formulas follow diffusers'
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`
//! (`dpmsolver++` / `sde-dpmsolver++`, order 2, midpoint) and `UniPCMultistepScheduler` (bh2,
//! order 2, x0 prediction), whose steps the tests reproduce.

use super::{Point, Prediction, SamplerKind};
use crate::diffusion::{ddim_update, DdimSchedule};
use crate::Result;
use candle_core::Tensor;

fn scaled(x: &Tensor, s: f64) -> Result<Tensor> {
    Ok(crate::diffusion::mul(x, s as f32)?)
}

/// `a·x + b·y`.
fn axpby(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((scaled(x, a)? + scaled(y, b)?)?)
}

/// A sampler in the middle of a run: its schedule and whatever it remembers of earlier steps.
pub struct Solver {
    kind: SamplerKind,
    points: Vec<Point>,
    ddim: Option<DdimSchedule>,
    /// Earlier x0 estimates, newest last (multistep samplers), in the current target's scale.
    history: Vec<Tensor>,
    /// UniPC: the latent before its last predictor step, and that step's order.
    last: Option<(Tensor, usize)>,
}

impl Solver {
    /// DDIM over its own schedule (`points` from [`super::ddim_points`]).
    pub fn ddim(ddim: DdimSchedule, points: Vec<Point>) -> Self {
        Self { kind: SamplerKind::Ddim, points, ddim: Some(ddim), history: Vec::new(), last: None }
    }

    /// A k-diffusion sampler over `points` (from [`super::k_points`], ending clean).
    pub fn k(kind: SamplerKind, points: Vec<Point>) -> Self {
        assert!(kind != SamplerKind::Ddim, "DDIM runs on its own schedule");
        Self { kind, points, ddim: None, history: Vec::new(), last: None }
    }

    /// Number of steps (one model call each).
    pub fn steps(&self) -> usize {
        if self.ddim.is_some() { self.points.len() } else { self.points.len() - 1 }
    }

    /// The point step `i` asks the model at.
    pub fn point(&self, i: usize) -> &Point {
        &self.points[i]
    }

    /// Step `i` from latent `x` given the denoiser's prediction there; `noise` is called for
    /// the stochastic samplers' draw.
    pub fn step(&mut self, i: usize, x: &Tensor, pred: &Prediction, noise: &mut dyn FnMut() -> Result<Tensor>) -> Result<Tensor> {
        if let Some(ddim) = &self.ddim {
            let index = ddim.len() - 1 - i;
            return ddim_update(ddim, index, &pred.eps, &pred.x0, &noise()?);
        }
        let (from, to) = (self.points[i], self.points[i + 1]);
        let mut x = x.clone();
        if self.kind == SamplerKind::UniPc {
            x = self.unipc_correct(i, x, &pred.x0_raw)?;
        }
        let x0 = &pred.x0;
        if let Some(r) = from.rescale.filter(|&r| r != 1.0) {
            // Move the latent's clean part into the target's scale, as DDIM does implicitly by
            // rebuilding the latent from eps: x + alpha·(x0 - x0_raw).
            x = (x + scaled(&(x0 - &pred.x0_raw)?, from.alpha_sigma().0)?)?;
            for h in self.history.iter_mut() {
                *h = scaled(h, r as f64)?;
            }
        }
        let out = match self.kind {
            SamplerKind::Euler => euler(&x, x0, &from, &to)?,
            SamplerKind::EulerAncestral => {
                let z = noise()?;
                euler_ancestral(&x, x0, &from, &to, &z)?
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => {
                let z = if self.kind == SamplerKind::DpmPp2mSde { Some(noise()?) } else { None };
                let last_step = i + 1 == self.steps();
                let prev = self.history.last().filter(|_| i > 0 && !last_step).map(|m1| (m1, &self.points[i - 1]));
                dpmpp_2m(&x, x0, prev, &from, &to, z.as_ref())?
            }
            SamplerKind::UniPc => {
                let order = (self.steps() - i).min(2).min(self.history.len() + 1);
                let prev = self.history.last().filter(|_| order == 2).map(|m1| (m1, &self.points[i - 1]));
                let out = unipc_predict(&x, x0, prev, &from, &to)?;
                self.last = Some((x.clone(), order));
                out
            }
            SamplerKind::Ddim => unreachable!("handled above"),
        };
        self.history.push(x0.clone());
        if self.history.len() > 2 {
            self.history.remove(0);
        }
        Ok(out)
    }

    /// UniC: corrects the latent the last predictor step made, with the model's estimate
    /// `m0` there (no extra model call).
    fn unipc_correct(&self, i: usize, x: Tensor, m0: &Tensor) -> Result<Tensor> {
        let Some((last, order)) = &self.last else { return Ok(x) };
        let (to, from) = (&self.points[i], &self.points[i - 1]);
        let m_prev = self.history.last().expect("a corrector follows a step");
        let (alpha_t, sigma_t) = to.alpha_sigma();
        let (_, sigma_s) = from.alpha_sigma();
        let h = to.lambda() - from.lambda();
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        // bh2: B(h) = expm1(-h), the same number as h·φ₁(h).
        let b_h = h_phi_1;
        let base = axpby(sigma_t / sigma_s, last, -alpha_t * h_phi_1, m_prev)?;
        let d1_t = (m0 - m_prev)?;
        let corr = if *order == 1 {
            scaled(&d1_t, 0.5)?
        } else {
            // Order 2: the earlier estimate enters through D1 = (m_{i-2} - m_{i-1}) / r.
            let m_prev2 = &self.history[self.history.len() - 2];
            let r = (self.points[i - 2].lambda() - from.lambda()) / h;
            let d1 = scaled(&(m_prev2 - m_prev)?, 1.0 / r)?;
            let h_phi_k1 = h_phi_1 / hh - 1.0;
            let b1 = h_phi_k1 / b_h;
            let h_phi_k2 = h_phi_k1 / hh - 0.5;
            let b2 = h_phi_k2 * 2.0 / b_h;
            // Solve [[1, 1], [r, 1]]·rho = [b1, b2].
            let rho0 = (b1 - b2) / (1.0 - r);
            let rho1 = b1 - rho0;
            axpby(rho0, &d1, rho1, &d1_t)?
        };
        Ok((base - scaled(&corr, alpha_t * b_h)?)?)
    }
}

fn euler(x: &Tensor, x0: &Tensor, from: &Point, to: &Point) -> Result<Tensor> {
    let (a, _) = from.alpha_sigma();
    let (a_n, _) = to.alpha_sigma();
    let rho = to.sigma_ve / from.sigma_ve;
    axpby(a_n * rho / a, x, a_n * (1.0 - rho), x0)
}

fn euler_ancestral(x: &Tensor, x0: &Tensor, from: &Point, to: &Point, z: &Tensor) -> Result<Tensor> {
    let (s, s_n) = (from.sigma_ve, to.sigma_ve);
    let up = (s_n * s_n * (s * s - s_n * s_n) / (s * s)).sqrt();
    let down = (s_n * s_n - up * up).max(0.0).sqrt();
    let (a, _) = from.alpha_sigma();
    let (a_n, _) = to.alpha_sigma();
    let rho = down / s;
    let det = axpby(a_n * rho / a, x, a_n * (1.0 - rho), x0)?;
    Ok((det + scaled(z, a_n * up)?)?)
}

/// DPM-Solver++ 2M; `prev` is the previous x0 estimate and its point (second order), `z` the
/// SDE form's noise.
fn dpmpp_2m(x: &Tensor, x0: &Tensor, prev: Option<(&Tensor, &Point)>, from: &Point, to: &Point, z: Option<&Tensor>) -> Result<Tensor> {
    if to.sigma_ve == 0.0 {
        // The last step is first order onto the clean latent: x0 itself.
        return Ok(x0.clone());
    }
    let (_, sigma_s) = from.alpha_sigma();
    let (alpha_t, sigma_t) = to.alpha_sigma();
    let h = to.lambda() - from.lambda();
    let d = match prev {
        Some((m1, p1)) => {
            let r0 = (from.lambda() - p1.lambda()) / h;
            // D0 + D1/2 with D1 = (m0 - m1)/r0.
            axpby(1.0 + 0.5 / r0, x0, -0.5 / r0, m1)?
        }
        None => x0.clone(),
    };
    match z {
        None => axpby(sigma_t / sigma_s, x, -alpha_t * (-h).exp_m1(), &d),
        Some(z) => {
            let e2 = (-2.0 * h).exp_m1();
            let det = axpby(sigma_t / sigma_s * (-h).exp(), x, -alpha_t * e2, &d)?;
            Ok((det + scaled(z, sigma_t * (-e2).sqrt())?)?)
        }
    }
}

/// UniP (bh2): first order, or second with the previous x0 estimate.
fn unipc_predict(x: &Tensor, x0: &Tensor, prev: Option<(&Tensor, &Point)>, from: &Point, to: &Point) -> Result<Tensor> {
    if to.sigma_ve == 0.0 {
        return Ok(x0.clone());
    }
    let (_, sigma_s) = from.alpha_sigma();
    let (alpha_t, sigma_t) = to.alpha_sigma();
    let h = to.lambda() - from.lambda();
    let h_phi_1 = (-h).exp_m1();
    let base = axpby(sigma_t / sigma_s, x, -alpha_t * h_phi_1, x0)?;
    match prev {
        None => Ok(base),
        Some((m1, p1)) => {
            let r = (p1.lambda() - from.lambda()) / h;
            let d1 = scaled(&(m1 - x0)?, 1.0 / r)?;
            // rho_p = 1/2 for order 2; B(h) = expm1(-h).
            Ok((base - scaled(&d1, alpha_t * h_phi_1 * 0.5)?)?)
        }
    }
}
