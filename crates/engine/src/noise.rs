//! Where every random draw of a run comes from: a seeded generator, or tensors the caller gives
//! (the parity tests feed the reference's stored noise).

use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// The three kinds of draws the reference makes, in its order.
pub trait NoiseSource {
    /// Posterior noise for VAE-encoding video frame `frame`, shape `(1, c, h, w)`.
    fn vae(&mut self, frame: usize, shape: &[usize]) -> Result<Tensor>;
    /// The initial latent `x_T`, shape `(1, c, t, h, w)`.
    fn initial(&mut self, shape: &[usize]) -> Result<Tensor>;
    /// DDIM noise of denoising step `step` (0 = the first, noisiest), shape of `x_T`.
    fn step(&mut self, step: usize, shape: &[usize]) -> Result<Tensor>;
}

/// SplitMix64 feeding Box–Muller: small, fast and reproducible on every platform.
#[derive(Debug, Clone)]
pub(crate) struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    pub(crate) fn tensor(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.sample()).collect();
        Ok(Tensor::from_vec(v, shape, dev)?)
    }
}

/// Standard-normal draws from a seed. Like the reference, the VAE posterior noise and the
/// sampler noise are separate streams, so the same seed gives the same `x_T` whatever the mode.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    vae: Normal,
    sampler: Normal,
    device: Device,
}

impl SeededNoise {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            vae: Normal::new(seed ^ 0x5641_455F_4E4F_4953),
            sampler: Normal::new(seed),
            device: device.clone(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn vae(&mut self, _frame: usize, shape: &[usize]) -> Result<Tensor> {
        self.vae.tensor(shape, &self.device)
    }

    fn initial(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.sampler.tensor(shape, &self.device)
    }

    fn step(&mut self, _step: usize, shape: &[usize]) -> Result<Tensor> {
        self.sampler.tensor(shape, &self.device)
    }
}

/// Noise given as tensors: `vae` `(t, c, h, w)` (row i for frame i), `x_t`, and `ddim`
/// `(steps, 1, c, t, h, w)`.
#[derive(Debug, Clone)]
pub struct GivenNoise {
    pub vae: Tensor,
    pub x_t: Tensor,
    pub ddim: Tensor,
}

fn check(t: &Tensor, shape: &[usize], what: &str) -> Result<Tensor> {
    if t.dims() != shape {
        return Err(Error::InvalidInput(format!("{what} noise has shape {:?}, expected {shape:?}", t.dims())));
    }
    Ok(t.clone())
}

impl NoiseSource for GivenNoise {
    fn vae(&mut self, frame: usize, shape: &[usize]) -> Result<Tensor> {
        check(&self.vae.narrow(0, frame, 1)?, shape, "VAE")
    }

    fn initial(&mut self, shape: &[usize]) -> Result<Tensor> {
        check(&self.x_t, shape, "initial")
    }

    fn step(&mut self, step: usize, shape: &[usize]) -> Result<Tensor> {
        check(&self.ddim.get(step)?, shape, "DDIM step")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_normal() {
        let dev = Device::Cpu;
        let a = SeededNoise::new(7, &dev).initial(&[1000]).unwrap().to_vec1::<f32>().unwrap();
        let b = SeededNoise::new(7, &dev).initial(&[1000]).unwrap().to_vec1::<f32>().unwrap();
        let c = SeededNoise::new(8, &dev).initial(&[1000]).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 1000.0;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 999.0;
        assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
    }
}
