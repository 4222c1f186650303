//! The precision policy: the one place that decides, per network, the dtype its weights are
//! stored in and the dtype it computes in, from the device and the user's `--precision` and
//! `--quantize`. The pipeline takes dtypes from here only, so every front end runs the same
//! arithmetic.
//!
//! Whatever the compute dtype, these stay in f32: group/layer norm statistics, softmax, the
//! timestep/fs sinusoids, the DDIM schedule and guidance arithmetic, and the latent between steps.

use crate::{Error, Result};
use candle_core::{DType, Device};
use serde::Serialize;

/// What the user asks for with `--precision`. The policy decides per device what that means
/// (one policy for every front end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "fp32" | "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Ok(Self::F16),
            _ => Err(Error::InvalidInput(format!("precision '{s}' (expected auto, fp32, bf16 or f16)"))),
        }
    }
}

impl Precision {
    /// The precision a run actually uses on `device`. On CPU, bf16 exists where the CPU has AMX
    /// (bf16 products of linear layers, convolutions and attention, the rest in f32) or
    /// AVX512-BF16 (bf16 pair products of linear layers and convolutions); `auto` takes it
    /// there: it is faster and keeps quality (≥ 35 dB of decoded frames against fp32, tested;
    /// docs/PERFORMANCE.md); elsewhere `auto` is fp32. What the CPU lacks is refused rather than
    /// silently ignored.
    pub fn resolve(self, device: &Device) -> Result<Self> {
        let features = dynamicrafter_kernels::cpu::features();
        let bf16 = features.amx || features.avx512_bf16;
        match (self, device.is_cpu()) {
            (Self::Auto, true) if bf16 => Ok(Self::Bf16),
            // Without bf16 products the bf16 mode is slower than fp32 (it only rounds): `auto`
            // keeps fp32, `bf16` still runs.
            (Self::Auto, true) | (Self::F32, _) => Ok(Self::F32),
            (Self::Bf16, true) => Ok(Self::Bf16),
            (Self::Auto, false) => Ok(Self::Bf16),
            (p, true) => Err(Error::InvalidInput(format!(
                "precision {} is not available on a CPU (it runs fp32 or bf16); use fp32, bf16 or auto",
                p.name()
            ))),
            (p, false) => Ok(p),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "fp32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// int8 weights (`--quantize`); the on-disk format is [`crate::weights::q8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    Q8_0,
}

impl std::str::FromStr for Quantization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8_0" => Ok(Self::Q8_0),
            _ => Err(Error::InvalidInput(format!("quantization '{s}' (expected q8_0)"))),
        }
    }
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
        }
    }
}

/// The networks of a DynamiCrafter model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
    ImageEncoder,
    Resampler,
}

impl Part {
    pub const ALL: [Part; 5] = [Part::Unet, Part::Vae, Part::TextEncoder, Part::ImageEncoder, Part::Resampler];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPrecision {
    pub weights: DType,
    pub compute: DType,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionPolicy {
    /// What `auto` (or the user's choice) resolved to on this device.
    pub resolved: Precision,
    parts: [PartPrecision; 5],
    /// int8 weights (`--quantize`): linear layers of the UNet, the CLIP encoders and the
    /// Resampler, and the UNet's 3×3 convolutions; [`crate::models::keeps_float`] lists what
    /// stays in float.
    pub quantization: Option<Quantization>,
    /// CPU bf16: weights and activations stay f32, the products run in bf16 on the AMX tiles
    /// or, without AMX, those of linear layers and convolutions in bf16 pairs on AVX512-BF16
    /// (like PyTorch's CPU autocast).
    pub bf16_matmuls: bool,
    /// `--offload`: the networks not in use (text and image encoders, Resampler, VAE) wait in
    /// host memory, in their weight dtype, and are moved to the device when their stage runs;
    /// the UNet stays. Less device memory for a little time; meant for small GPUs.
    pub offload: bool,
    /// Rows (tokens) per piece of the UNet's feed-forwards, run piece by piece so their 8×-wide
    /// hidden activations never exist whole (diffusers' forward chunking); `None`: whole.
    /// `--offload` sets [`OFFLOAD_FF_CHUNK_ROWS`] (and batched guidance on a GPU, without a
    /// setting here, [`BATCHED_FF_CHUNK_ROWS`]).
    pub ff_chunk_rows: Option<usize>,
}

/// The feed-forward piece `--offload` runs: 16384 tokens, 1/9 of a 576×1024 level-1 forward
/// (16 frames of 72×128), so the 2560-wide bf16 product is 84 MB instead of 755 MB.
pub const OFFLOAD_FF_CHUNK_ROWS: usize = 16384;

/// The feed-forward piece when a GPU runs the guidance passes as one batch
/// ([`Backend::batched_guidance`](super::Backend::batched_guidance)): 32768 tokens, so a batch
/// of two 576×1024 passes holds 168 MB of the 2560-wide product at a time instead of 1.5 GB (by
/// the shapes: the feed-forward's temporaries were the largest part of a forward's activations,
/// and a batch of two would double them), while a batch of two 256×256 passes (32768 tokens)
/// stays whole.
pub const BATCHED_FF_CHUNK_ROWS: usize = 32768;

fn dtype(p: Precision) -> DType {
    match p {
        Precision::Bf16 => DType::BF16,
        Precision::F16 => DType::F16,
        Precision::Auto | Precision::F32 => DType::F32,
    }
}

impl PrecisionPolicy {
    /// CPU: fp32 everywhere, or (`bf16`, and `auto` with AMX or AVX512-BF16) products in bf16
    /// with everything else in f32 ([`Precision::resolve`]); f16 is refused there rather than ignored, as bf16 is
    /// without AMX or AVX512-BF16. Other devices: the
    /// requested dtype (`auto` = bf16) for weights and compute of every network, except the VAE,
    /// which stays in f32 under f16 (its activations overflow f16's range).
    pub fn new(requested: Precision, device: &Device) -> Result<Self> {
        let resolved = requested.resolve(device)?;
        if device.is_cpu() && resolved == Precision::Bf16 {
            return Ok(Self { resolved, bf16_matmuls: true, ..Self::f32() });
        }
        Ok(Self::unchecked(resolved))
    }

    /// The dtypes `requested` stands for (`auto`: bf16), without asking whether the device offers
    /// them: [`new`](Self::new) resolves first; tests use this to run the bf16/f16 code paths
    /// of GPUs on the CPU (slowly).
    pub fn unchecked(requested: Precision) -> Self {
        let resolved = if requested == Precision::Auto { Precision::Bf16 } else { requested };
        let all = PartPrecision { weights: dtype(resolved), compute: dtype(resolved) };
        let mut parts = [all; 5];
        if resolved == Precision::F16 {
            parts[1] = PartPrecision { weights: DType::F32, compute: DType::F32 };
        }
        Self { resolved, parts, quantization: None, bf16_matmuls: false, offload: false, ff_chunk_rows: None }
    }

    /// fp32 everywhere, on any device (reference runs and tests).
    pub fn f32() -> Self {
        let all = PartPrecision { weights: DType::F32, compute: DType::F32 };
        Self { resolved: Precision::F32, parts: [all; 5], quantization: None, bf16_matmuls: false, offload: false, ff_chunk_rows: None }
    }

    /// The policy of the `--precision` and `--quantize` flags on `device`: what every front end
    /// runs. Also refuses a `DYNAMICRAFTER_CPU_ISA` the kernels do not know.
    pub fn from_flags(precision: &str, quantize: Option<&str>, device: &Device) -> Result<Self> {
        dynamicrafter_kernels::cpu::cap_from_env().map_err(Error::InvalidInput)?;
        let quantization = quantize.map(str::parse::<Quantization>).transpose()?;
        Ok(Self::new(precision.parse()?, device)?.with_quantization(quantization))
    }

    pub fn with_quantization(mut self, quantization: Option<Quantization>) -> Self {
        self.quantization = quantization;
        self
    }

    /// `--offload`: the idle networks parked in host memory and the feed-forwards in pieces.
    pub fn with_offload(mut self, offload: bool) -> Self {
        self.offload = offload;
        self.ff_chunk_rows = offload.then_some(OFFLOAD_FF_CHUNK_ROWS);
        self
    }

    pub fn part(&self, part: Part) -> PartPrecision {
        self.parts[Part::ALL.iter().position(|&p| p == part).unwrap_or(0)]
    }

    /// How the run report names it, e.g. `fp32`, `f16 (VAE fp32)` or `fp32 + q8_0`.
    pub fn name(&self) -> String {
        let mut name = self.resolved.name().to_string();
        if self.bf16_matmuls {
            let features = dynamicrafter_kernels::cpu::features();
            name.push_str(if features.amx {
                " (AMX products, fp32 rest)"
            } else if features.avx512_bf16 {
                " (AVX512-BF16 products, fp32 rest)"
            } else {
                " (bf16-rounded weights, fp32 products: no bf16 instructions on this CPU)"
            });
        } else if self.part(Part::Vae).compute != dtype(self.resolved) {
            name.push_str(" (VAE fp32)");
        }
        if let Some(q) = self.quantization {
            name = format!("{name} + {}", q.name());
        }
        if self.offload {
            name.push_str(", offload");
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_fp32_or_bf16_products_and_refuses_the_rest() {
        let features = dynamicrafter_kernels::cpu::features();
        let amx = features.amx;
        let p = PrecisionPolicy::new(Precision::Auto, &Device::Cpu).unwrap();
        // Weights and activations stay f32 either way; with AMX or AVX512-BF16 the products run
        // in bf16.
        for part in Part::ALL {
            assert_eq!(p.part(part), PartPrecision { weights: DType::F32, compute: DType::F32 });
        }
        if amx {
            assert_eq!((p.resolved, p.bf16_matmuls), (Precision::Bf16, true));
            assert_eq!(p.name(), "bf16 (AMX products, fp32 rest)");
        } else if features.avx512_bf16 {
            assert_eq!((p.resolved, p.bf16_matmuls), (Precision::Bf16, true));
            assert_eq!(p.name(), "bf16 (AVX512-BF16 products, fp32 rest)");
        } else {
            assert_eq!((p.resolved, p.bf16_matmuls), (Precision::F32, false));
            assert_eq!(p.name(), "fp32");
            assert_eq!(PrecisionPolicy::f32(), p);
        }
        let fp32 = PrecisionPolicy::new(Precision::F32, &Device::Cpu).unwrap();
        assert_eq!(fp32.name(), "fp32");
        // bf16 runs on every CPU: products in bf16 where the CPU has them, else f32 products of
        // bf16-rounded weights.
        let bf16 = PrecisionPolicy::new(Precision::Bf16, &Device::Cpu).unwrap();
        assert!(bf16.bf16_matmuls);
        assert_eq!(bf16.part(Part::Unet), PartPrecision { weights: DType::F32, compute: DType::F32 });
        if !amx && !features.avx512_bf16 {
            assert!(bf16.name().starts_with("bf16 (bf16-rounded weights"), "{}", bf16.name());
        }
        assert!(PrecisionPolicy::new(Precision::F16, &Device::Cpu).is_err());
        assert_eq!(PrecisionPolicy::f32(), fp32);
    }
}
