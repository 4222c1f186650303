//! Noise schedule, DDIM timesteps and coefficients, the eps/x0 estimates of eps and v models,
//! the DDIM update, and classifier-free guidance (`docs/spec/sampling.md` §3–5). Scalar
//! coefficients are computed in f64 and used as f32, tensor arithmetic is f32, in the
//! reference's order of operations.

use crate::config::{DiffusionConfig, Parameterization, TimestepSpacing};
use crate::{Error, Result};
use candle_core::Tensor;

/// The DDPM buffers inference reads (`register_schedule`).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    /// f64 values before the cast to the f32 model buffer.
    pub alphas_cumprod_f64: Vec<f64>,
    pub alphas_cumprod: Vec<f32>,
    pub sqrt_alphas_cumprod: Vec<f32>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f32>,
    /// Dynamic-rescale factors by timestep (512/1024 models).
    pub scale_arr: Option<Vec<f32>>,
}

/// `torch.linspace` in f64 (symmetric formula, as PyTorch's CPU kernel).
fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| if i < half { start + step * i as f64 } else { end - step * (n - 1 - i) as f64 })
        .collect()
}

/// `numpy.linspace`.
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

fn cumprod(xs: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut acc = 1.0;
    xs.map(|x| {
        acc *= x;
        acc
    })
    .collect()
}

impl NoiseSchedule {
    pub fn new(cfg: &DiffusionConfig) -> Self {
        let n = cfg.timesteps;
        let mut betas: Vec<f64> = torch_linspace(cfg.linear_start.sqrt(), cfg.linear_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect();
        if cfg.rescale_betas_zero_snr {
            // Lin et al. 2023, Alg. 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0.
            let mut s: Vec<f64> = cumprod(betas.iter().map(|b| 1.0 - b)).into_iter().map(f64::sqrt).collect();
            let (a0, at) = (s[0], s[n - 1]);
            for v in s.iter_mut() {
                *v -= at;
                *v *= a0 / (a0 - at);
            }
            let ab: Vec<f64> = s.iter().map(|v| v * v).collect();
            betas = std::iter::once(ab[0])
                .chain((1..n).map(|i| ab[i] / ab[i - 1]))
                .map(|a| 1.0 - a)
                .collect();
        }
        let ac = cumprod(betas.iter().map(|b| 1.0 - b));
        let scale_arr = cfg.use_dynamic_rescale.then(|| {
            let mut v = np_linspace(1.0, cfg.base_scale, cfg.turning_step);
            v.extend(std::iter::repeat_n(cfg.base_scale, n));
            v.into_iter().map(|x| x as f32).collect()
        });
        Self {
            alphas_cumprod: ac.iter().map(|&a| a as f32).collect(),
            sqrt_alphas_cumprod: ac.iter().map(|&a| a.sqrt() as f32).collect(),
            sqrt_one_minus_alphas_cumprod: ac.iter().map(|&a| (1.0 - a).sqrt() as f32).collect(),
            alphas_cumprod_f64: ac,
            betas,
            scale_arr,
        }
    }

    pub fn num_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }
}

/// DDIM timesteps (`make_ddim_timesteps`), in increasing order.
pub fn ddim_timesteps(spacing: TimestepSpacing, steps: usize, num_timesteps: usize) -> Result<Vec<usize>> {
    if steps == 0 || steps > num_timesteps {
        return Err(Error::InvalidInput(format!("steps must be in 1..={num_timesteps}, got {steps}")));
    }
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Uniform => {
            let c = num_timesteps / steps;
            (0..num_timesteps).step_by(c).map(|t| t + 1).collect()
        }
        TimestepSpacing::UniformTrailing => {
            // numpy: flip(round(arange(N, 0, -c))) - 1, round half to even.
            let c = num_timesteps as f64 / steps as f64;
            let start = num_timesteps as f64;
            let len = ((0.0 - start) / -c).ceil() as usize;
            let mut v: Vec<usize> =
                (0..len).map(|i| (start + i as f64 * -c).round_ties_even() as usize - 1).collect();
            v.reverse();
            v
        }
    };
    if let Some(&t) = ts.iter().find(|&&t| t >= num_timesteps) {
        // The reference crashes here (IndexError); say why instead.
        return Err(Error::InvalidInput(format!(
            "{steps} steps with uniform spacing give timestep {t}, outside the {num_timesteps}-step schedule; choose another step count"
        )));
    }
    Ok(ts)
}

/// DDIM coefficients (`make_ddim_sampling_parameters`), indexed by DDIM index.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimSchedule {
    pub timesteps: Vec<usize>,
    pub alphas: Vec<f32>,
    pub alphas_prev: Vec<f64>,
    pub sigmas: Vec<f64>,
    pub sqrt_one_minus_alphas: Vec<f32>,
    pub scale_arr: Option<Vec<f32>>,
    pub scale_arr_prev: Option<Vec<f32>>,
}

impl DdimSchedule {
    pub fn new(schedule: &NoiseSchedule, spacing: TimestepSpacing, steps: usize, eta: f64) -> Result<Self> {
        let ts = ddim_timesteps(spacing, steps, schedule.num_timesteps())?;
        let ac = &schedule.alphas_cumprod;
        let alphas: Vec<f32> = ts.iter().map(|&t| ac[t]).collect();
        let alphas_prev: Vec<f64> = std::iter::once(ac[0] as f64)
            .chain(ts[..ts.len() - 1].iter().map(|&t| ac[t] as f64))
            .collect();
        let sigmas = alphas
            .iter()
            .zip(&alphas_prev)
            .map(|(&a, &ap)| {
                let a = a as f64;
                eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt()
            })
            .collect();
        let sqrt_one_minus_alphas = alphas.iter().map(|&a| (1f32 - a).sqrt()).collect();
        let scale_arr: Option<Vec<f32>> = schedule.scale_arr.as_ref().map(|s| ts.iter().map(|&t| s[t]).collect());
        let scale_arr_prev = scale_arr.as_ref().map(|s| std::iter::once(s[0]).chain(s[..s.len() - 1].iter().copied()).collect());
        Ok(Self { timesteps: ts, alphas, alphas_prev, sigmas, sqrt_one_minus_alphas, scale_arr, scale_arr_prev })
    }

    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }
}

pub(crate) fn mul(xs: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    xs.broadcast_mul(&Tensor::new(s, xs.device())?.to_dtype(xs.dtype())?)
}

fn div(xs: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    xs.broadcast_div(&Tensor::new(s, xs.device())?.to_dtype(xs.dtype())?)
}

/// Result of one DDIM update.
#[derive(Debug, Clone)]
pub struct DdimStep {
    pub e_t: Tensor,
    pub pred_x0: Tensor,
    pub x_prev: Tensor,
}

/// The noise and clean-latent estimates `(eps, x0)` from a model output at a point with VP
/// coefficients `alpha`, `sigma` (`x = alpha·x0 + sigma·eps`), in the reference's order of
/// operations.
pub fn predict(parameterization: Parameterization, x: &Tensor, model_output: &Tensor, alpha: f32, sigma: f32) -> Result<(Tensor, Tensor)> {
    Ok(match parameterization {
        Parameterization::V => {
            let e_t = (mul(model_output, alpha)? + mul(x, sigma)?)?;
            let x0 = (mul(x, alpha)? - mul(model_output, sigma)?)?;
            (e_t, x0)
        }
        Parameterization::Eps => {
            let x0 = div(&(x - mul(model_output, sigma)?)?, alpha)?;
            (model_output.clone(), x0)
        }
    })
}

/// DDIM's move from DDIM `index` to the one before, given the estimates (`pred_x0` already
/// rescaled).
pub fn ddim_update(ddim: &DdimSchedule, index: usize, e_t: &Tensor, pred_x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let a_prev = ddim.alphas_prev[index] as f32;
    let sigma = ddim.sigmas[index] as f32;
    // Zero terminal SNR makes this exactly 0 in theory; never let rounding take it below.
    let dir_coef = (1f32 - a_prev - sigma * sigma).max(0.0).sqrt();
    let dir_xt = mul(e_t, dir_coef)?;
    Ok(((mul(pred_x0, a_prev.sqrt())? + dir_xt)? + mul(noise, sigma)?)?)
}

/// One DDIM update (`p_sample_ddim` after guidance) at DDIM `index`.
pub fn ddim_step(
    schedule: &NoiseSchedule,
    ddim: &DdimSchedule,
    parameterization: Parameterization,
    x: &Tensor,
    model_output: &Tensor,
    index: usize,
    noise: &Tensor,
) -> Result<DdimStep> {
    let point = crate::samplers::ddim_point(schedule, ddim, parameterization, index);
    let (e_t, mut pred_x0) = predict(parameterization, x, model_output, point.alpha, point.sigma)?;
    if let Some(r) = point.rescale {
        pred_x0 = mul(&pred_x0, r)?;
    }
    let x_prev = ddim_update(ddim, index, &e_t, &pred_x0, noise)?;
    Ok(DdimStep { e_t, pred_x0, x_prev })
}

/// Unbiased std over all non-batch dims, per batch element, as f32 `(b, 1, …)`.
fn std_per_sample(xs: &Tensor) -> Result<Vec<f32>> {
    let b = xs.dim(0)?;
    let flat = xs.flatten_from(1)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    Ok((0..b)
        .map(|i| {
            let v = &flat[i];
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
            var.sqrt() as f32
        })
        .collect())
}

/// Guidance rescale (Lin et al. 2023, `rescale_noise_cfg`) towards the conditional output's std.
pub fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    let std_c = std_per_sample(cond)?;
    let std_g = std_per_sample(guided)?;
    let b = guided.dim(0)?;
    let ratio: Vec<f32> = std_c.iter().zip(&std_g).map(|(c, g)| c / g).collect();
    let mut shape = vec![1usize; guided.rank()];
    shape[0] = b;
    let ratio = Tensor::from_vec(ratio, shape, guided.device())?.to_dtype(guided.dtype())?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok((mul(&rescaled, phi as f32)? + mul(guided, (1.0 - phi) as f32)?)?)
}

/// Classifier-free guidance. `uncond_img` (empty text, real image) selects the three-pass
/// multi-condition form with `cfg_img`.
pub struct Guidance<'a> {
    pub cond: &'a Tensor,
    pub uncond: &'a Tensor,
    pub uncond_img: Option<&'a Tensor>,
    pub scale: f64,
    pub cfg_img: f64,
    pub rescale: f64,
}

impl Guidance<'_> {
    pub fn combine(&self) -> Result<Tensor> {
        let s = self.scale as f32;
        let guided = match self.uncond_img {
            None => (self.uncond + mul(&(self.cond - self.uncond)?, s)?)?,
            Some(ui) => {
                let img = mul(&(ui - self.uncond)?, self.cfg_img as f32)?;
                ((self.uncond + img)? + mul(&(self.cond - ui)?, s)?)?
            }
        };
        if self.rescale > 0.0 {
            rescale_guidance(&guided, self.cond, self.rescale)
        } else {
            Ok(guided)
        }
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // spec table values, as printed
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_the_spec() {
        let u = ddim_timesteps(TimestepSpacing::Uniform, 50, 1000).unwrap();
        assert_eq!((u[0], u[1], u[49], u.len()), (1, 21, 981, 50));
        let t = ddim_timesteps(TimestepSpacing::UniformTrailing, 50, 1000).unwrap();
        assert_eq!((t[0], t[1], t[49], t.len()), (19, 39, 999, 50));
        assert_eq!(ddim_timesteps(TimestepSpacing::Uniform, 7, 1000).unwrap().len(), 8);
        assert!(ddim_timesteps(TimestepSpacing::Uniform, 3, 1000).is_err());
        assert!(ddim_timesteps(TimestepSpacing::Uniform, 0, 1000).is_err());
    }

    #[test]
    fn zero_snr_schedule_values() {
        let s = NoiseSchedule::new(&crate::config::presets::Preset::Dc1024.config().diffusion);
        assert_eq!(s.alphas_cumprod[999], 0.0);
        assert!((s.betas[999] - 1.0).abs() < 1e-12);
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-6);
        let d = DdimSchedule::new(&s, TimestepSpacing::UniformTrailing, 50, 1.0).unwrap();
        // The spec tabulates the f32 value.
        assert!(((d.sigmas[49] as f32) - 0.999957085f32).abs() < 1e-7, "{}", d.sigmas[49]);
        assert!((d.sigmas[0] - 0.0285072532).abs() < 1e-8);
        let sc = d.scale_arr.unwrap();
        let scp = d.scale_arr_prev.unwrap();
        assert!((scp[10] / sc[10] - 1.05698001).abs() < 1e-6);
    }

    #[test]
    fn linear_schedule_values() {
        let s = NoiseSchedule::new(&crate::config::presets::Preset::Dc256.config().diffusion);
        assert!((s.alphas_cumprod_f64[999] - 0.0046600985).abs() < 1e-9);
        let d = DdimSchedule::new(&s, TimestepSpacing::Uniform, 50, 1.0).unwrap();
        assert!((d.sigmas[49] - 0.454463273).abs() < 1e-8);
        assert!((d.alphas[0] - 0.998296022).abs() < 1e-8);
    }
}
