//! int8 weights in ggml's `q8_0` format: blocks of 32 consecutive weights of a row sharing one
//! f16 scale (34 bytes per block, 8.5 bits per weight).
//!
//! File format: an ordinary safetensors file. A quantized tensor `X` is stored instead as
//! `X.q8_0`, dtype U8, shape `[rows, cols / 32 * 34]`, where `rows` is the first dimension of
//! `X` and `cols` the product of the others; the bytes are the row-major ggml blocks. The
//! header metadata says `"dynamicrafter.quantization": "q8_0"`. Every other tensor is stored as
//! it was. Linear layers read `X.q8_0` straight into an int8 product; anything else that asks
//! for `X` (convolutions) gets it dequantized to float when it loads (see [`super::Checkpoint`]).

use crate::models::keeps_float;
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 34;

/// The name under which a quantized tensor is stored.
pub const SUFFIX: &str = ".q8_0";

/// Header metadata key of a quantized file.
pub const METADATA_KEY: &str = "dynamicrafter.quantization";

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
pub(crate) fn qtensor(stored: &Tensor, rows: usize, cols: usize, dev: &Device) -> Result<QTensor> {
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

/// A stored quantized tensor back to float, in `shape`.
pub fn dequantize(stored: &Tensor, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let (rows, cols) = as_matrix(shape);
    Ok(qtensor(stored, rows, cols, dev)?.dequantize(dev)?.reshape(shape)?)
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
}
