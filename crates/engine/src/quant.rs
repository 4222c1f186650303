//! int8 weights in ggml's `q8_0` format: blocks of 32 consecutive weights of a row sharing one
//! f16 scale (34 bytes per block, 8.5 bits per weight).
//!
//! File format: an ordinary safetensors file. A quantized tensor `X` is stored instead as
//! `X.q8_0`, dtype U8, shape `[rows, cols / 32 * 34]`, where `rows` is the first dimension of
//! `X` and `cols` the product of the others; the bytes are the row-major ggml blocks. The
//! header metadata says `"dynamicrafter.quantization": "q8_0"`. Every other tensor is stored as
//! it was. Linear layers read `X.q8_0` straight into an int8 matmul ([`Int8Matmul`]); anything
//! else that asks for `X` (convolutions) gets it dequantized to float when it loads, so those
//! save file size, not memory or time.

use crate::kernels;
use crate::models::{UNET_PREFIX, VAE_PREFIX};
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::sync::Arc;

const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 34;

/// The name under which a quantized tensor is stored.
pub const SUFFIX: &str = ".q8_0";

/// Header metadata key of a quantized file.
pub const METADATA_KEY: &str = "dynamicrafter.quantization";

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

/// `[rows, cols]` of a tensor seen as a matrix of rows.
fn as_matrix(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    (rows, shape.iter().skip(1).product())
}

/// The stored shape of a quantized `[rows, cols]` matrix, if its rows split into whole blocks.
pub fn stored_shape(shape: &[usize]) -> Option<[usize; 2]> {
    let (rows, cols) = as_matrix(shape);
    (shape.len() >= 2 && cols.is_multiple_of(BLOCK)).then_some([rows, cols / BLOCK * BLOCK_BYTES])
}

/// Weights that stay in float: the whole VAE (its decode is the picture), embedding tables and
/// positional/learned-query tensors, the time and fs embedding MLPs, the UNet's first and last
/// convolutions and the CLIP patch embedding. Everything else with whole blocks is quantized.
pub fn keeps_float(name: &str) -> bool {
    const FLOAT: [&str; 8] = [
        "time_embed.",
        "fps_embedding.",
        "token_embedding",
        "positional_embedding",
        "class_embedding",
        "latents",
        "visual.conv1.",
        "visual.proj",
    ];
    name.starts_with(VAE_PREFIX)
        || name.starts_with(&format!("{UNET_PREFIX}.input_blocks.0.0."))
        || name.starts_with(&format!("{UNET_PREFIX}.out."))
        || FLOAT.iter().any(|f| name.contains(f))
}

/// Whether `convert --quantize` stores this tensor quantized.
pub fn stores_quantized(name: &str, shape: &[usize]) -> bool {
    !keeps_float(name) && stored_shape(shape).is_some() && name.ends_with("weight")
}

/// Quantizes a float tensor to its stored form (U8 blocks, `[rows, cols / 32 * 34]`).
pub fn quantize(w: &Tensor) -> Result<Tensor> {
    let [rows, bytes] = stored_shape(w.dims())
        .ok_or_else(|| Error::InvalidInput(format!("shape {:?} does not split into blocks of {BLOCK}", w.dims())))?;
    let (r, cols) = as_matrix(w.dims());
    let m = w.to_dtype(DType::F32)?.reshape((r, cols))?.to_device(&Device::Cpu)?;
    let q = QTensor::quantize(&m, GgmlDType::Q8_0)?;
    Ok(Tensor::from_vec(q.data()?.into_owned(), (rows, bytes), &Device::Cpu)?)
}

/// The `QTensor` of a stored quantized `[rows, cols]` matrix.
fn qtensor(stored: &Tensor, rows: usize, cols: usize, dev: &Device) -> Result<QTensor> {
    if stored.dims() != [rows, cols / BLOCK * BLOCK_BYTES] || stored.dtype() != DType::U8 {
        return Err(Error::InvalidInput(format!(
            "quantized weight has shape {:?} {:?}; expected U8 [{rows}, {}]",
            stored.dims(),
            stored.dtype(),
            cols / BLOCK * BLOCK_BYTES
        )));
    }
    let bytes = stored.flatten_all()?.to_vec1::<u8>()?;
    // ggml blocks start with an f16: hand them over 2-byte aligned.
    let mut aligned = vec![0u16; bytes.len().div_ceil(2)];
    for (dst, src) in aligned.iter_mut().zip(bytes.chunks(2)) {
        *dst = u16::from_ne_bytes([src[0], src.get(1).copied().unwrap_or(0)]);
    }
    // SAFETY: a u16 buffer viewed as the bytes it holds.
    let raw = unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), bytes.len()) };
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, raw, vec![rows, cols], dev)?)
}

/// An int8 weight ready to multiply (`y = x · Wᵀ`): our AVX-512 VNNI kernel on CPUs that have
/// it, candle's quantized matmul elsewhere (same arithmetic, see [`kernels::Q8Matrix`]).
#[derive(Debug, Clone)]
pub enum Int8Matmul {
    Vnni(Arc<kernels::Q8Matrix>),
    Candle(QMatMul),
}

impl Int8Matmul {
    /// From a stored quantized `[rows, cols]` matrix.
    pub fn new(stored: &Tensor, rows: usize, cols: usize, dev: &Device) -> Result<Self> {
        let q = qtensor(stored, rows, cols, dev)?;
        if dev.is_cpu() && kernels::q8_available() {
            Ok(Self::Vnni(Arc::new(kernels::Q8Matrix::new(&q)?)))
        } else {
            Ok(Self::Candle(QMatMul::from_qtensor(q)?))
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Vnni(m) => m.forward(x),
            // candle's quantized matmul reads its input as one dense block.
            Self::Candle(m) => candle_core::Module::forward(m, &x.contiguous()?),
        }
    }
}

/// A stored quantized tensor back to float, in `shape`.
pub fn dequantize(stored: &Tensor, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let (rows, cols) = as_matrix(shape);
    Ok(qtensor(stored, rows, cols, dev)?.dequantize(dev)?.reshape(shape)?)
}

/// Serves `X.q8_0` for the float weights of another backend, quantizing them as they are read
/// (`--quantize q8_0` with a float checkpoint). Only linear layers ask for `X.q8_0`.
pub struct QuantizeOnLoad<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
}

impl<'a> QuantizeOnLoad<'a> {
    pub fn new(inner: Box<dyn SimpleBackend + 'a>) -> Self {
        Self { inner }
    }
}

impl SimpleBackend for QuantizeOnLoad<'_> {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(base) = name.strip_suffix(SUFFIX) else {
            return self.inner.get(s, name, h, dtype, dev);
        };
        let &[rows, bytes] = s.dims() else { candle_core::bail!("{name}: quantized weights are 2-D") };
        let cols = bytes / BLOCK_BYTES * BLOCK;
        // The file's own shape where the backend has one (a 1×1 conv is [out, in, 1]), else the matrix.
        let w = match self.inner.get_unchecked(base, DType::F32, &Device::Cpu) {
            Ok(w) if w.elem_count() == rows * cols => w,
            _ => self.inner.get((rows, cols).into(), base, h, DType::F32, &Device::Cpu)?,
        };
        quantize(&w).map_err(|e| candle_core::Error::Msg(format!("{base}: {e}")))?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        serves(self.inner.as_ref(), name, SUFFIX)
    }
}

/// Whether a backend that serves `X<suffix>` for the weights it would store differently has
/// `name`: the suffixed name of a weight `inner` holds and that does not stay float, or any name
/// `inner` holds.
fn serves(inner: &dyn SimpleBackend, name: &str, suffix: &str) -> bool {
    match name.strip_suffix(suffix) {
        Some(base) => !keeps_float(base) && inner.contains_tensor(base),
        None => inner.contains_tensor(name),
    }
}

/// Suffix under which [`Bf16OnLoad`] serves a weight for the CPU's bf16 (AMX) products.
pub const BF16_SUFFIX: &str = ".bf16";

/// A backend that also answers `X.bf16` for every weight `X` that would be quantized, with `X`
/// in f32: the layers that find it pack it for [`crate::kernels::amx::Bf16Matrix`] (the CPU's
/// `--precision bf16`), everything else reads `X` as stored.
pub struct Bf16OnLoad<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
}

impl<'a> Bf16OnLoad<'a> {
    pub fn new(inner: Box<dyn SimpleBackend + 'a>) -> Self {
        Self { inner }
    }
}

impl SimpleBackend for Bf16OnLoad<'_> {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let base = name.strip_suffix(BF16_SUFFIX).unwrap_or(name);
        self.inner.get(s, base, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        serves(self.inner.as_ref(), name, BF16_SUFFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_roundtrip_is_within_half_a_step_per_block() {
        let w = Tensor::randn(0f32, 1.0, (6, 64, 1, 1), &Device::Cpu).unwrap();
        let stored = quantize(&w).unwrap();
        assert_eq!(stored.dims(), [6, 2 * 34]);
        let back = dequantize(&stored, w.dims(), &Device::Cpu).unwrap();
        assert_eq!(back.dims(), w.dims());
        let (a, b) = (w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), back.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for (block_a, block_b) in a.chunks(32).zip(b.chunks(32)) {
            let amax = block_a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let step = amax / 127.0;
            for (x, y) in block_a.iter().zip(block_b) {
                // half a quantization step, plus the f16 rounding of the scale
                assert!((x - y).abs() <= step * 0.5 + amax * 1e-3, "{x} vs {y} (step {step})");
            }
        }
        assert!(stored_shape(&[6, 33]).is_none());
        assert!(stores_quantized("model.diffusion_model.input_blocks.1.1.proj_in.weight", &[320, 320]));
        assert!(!stores_quantized("model.diffusion_model.time_embed.0.weight", &[1280, 320]));
        assert!(!stores_quantized("first_stage_model.decoder.up.0.block.0.conv1.weight", &[128, 128, 3, 3]));
        assert!(!stores_quantized("model.diffusion_model.input_blocks.1.1.proj_in.bias", &[320]));
    }

    #[test]
    fn qmatmul_matches_the_float_product_of_the_dequantized_weight() {
        let w = Tensor::randn(0f32, 0.1, (48, 96), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 96), &Device::Cpu).unwrap();
        let stored = quantize(&w).unwrap();
        let q = Int8Matmul::new(&stored, 48, 96, &Device::Cpu).unwrap();
        let y = q.forward(&x).unwrap();
        let wd = dequantize(&stored, &[48, 96], &Device::Cpu).unwrap();
        let y_ref = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        // candle's kernel also rounds the activations to 8 bits per block of 32.
        let err = (y - &y_ref).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = y_ref.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 0.02 * scale, "max error {err} of {scale}");
    }
}
