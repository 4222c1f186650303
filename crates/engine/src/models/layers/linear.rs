//! Linear layers, `y = x·Wᵀ + b`, on whichever kernel the backend picks.

use crate::compute::{Backend, Kernel};
use crate::weights::q8;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use dynamicrafter_kernels::{Bf16DotMatrix, Bf16Matrix, F32Matrix, Q8Matrix};
use std::sync::Arc;

/// A linear layer with its weight prepared for its kernel.
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's `Linear` (any device and dtype).
    Float(candle_nn::Linear),
    /// int8 (`q8_0`) weights.
    Int8 { weight: Int8Matmul, bias: Option<Tensor> },
    /// bf16 products on AMX tiles, f32 in and out, bias included.
    Bf16(Arc<Bf16Matrix>),
    /// bf16 pair products on AVX512-BF16, f32 in and out, bias included.
    Bf16Pairs(Arc<Bf16DotMatrix>),
    /// f32 on AVX-512, the weight packed at load, the bias added in the product.
    F32(Arc<F32Matrix>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Float(candle_nn::Linear::new(weight, bias))
    }

    /// Reads weight `name` of an `[out, in]` layer (stored as `shape`) for the kernel `backend`
    /// picks.
    pub(crate) fn load(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize, shape: &[usize], bias: Option<Tensor>, backend: &Backend) -> Result<Self> {
        let matrix = |w: Tensor| w.reshape((out_dim, in_dim));
        match backend.linear(vb, name, out_dim, in_dim) {
            kernel @ (Kernel::VnniQ8 | Kernel::CandleQ8) => {
                let stored = format!("{name}{}", q8::SUFFIX);
                let raw = match q8::stored_shape(&[out_dim, in_dim]) {
                    Some(stored_shape) if vb.contains_tensor(&stored) => {
                        vb.get_with_hints_dtype(stored_shape.to_vec(), &stored, candle_nn::Init::Const(0.), DType::U8)?
                    }
                    _ => q8::quantize(&vb.get(shape.to_vec(), name)?).map_err(|e| candle_core::Error::Msg(format!("{}.{name}: {e}", vb.prefix())))?,
                };
                let weight = Int8Matmul::new(&raw, out_dim, in_dim, vb.device(), kernel == Kernel::VnniQ8)?;
                Ok(Self::Int8 { weight, bias })
            }
            Kernel::AmxBf16 => {
                let w = matrix(vb.get_with_hints_dtype(shape.to_vec(), name, candle_nn::Init::Const(0.), DType::F32)?)?;
                Ok(Self::Bf16(Arc::new(Bf16Matrix::new(&w, bias.as_ref())?)))
            }
            Kernel::Avx512Bf16 => {
                let w = matrix(vb.get_with_hints_dtype(shape.to_vec(), name, candle_nn::Init::Const(0.), DType::F32)?)?;
                Ok(Self::Bf16Pairs(Arc::new(Bf16DotMatrix::new(&w, bias.as_ref())?)))
            }
            Kernel::Avx512F32 => {
                let w = backend.float_weight(vb, name, matrix(vb.get(shape.to_vec(), name)?)?)?;
                Ok(Self::F32(Arc::new(F32Matrix::new(&w, bias.as_ref())?)))
            }
            _ => Ok(Self::new(backend.float_weight(vb, name, matrix(vb.get(shape.to_vec(), name)?)?)?, bias)),
        }
    }

    /// The kernel this layer runs.
    pub fn kernel(&self) -> Kernel {
        match self {
            Self::Float(_) => Kernel::Candle,
            Self::Int8 { weight: Int8Matmul::Vnni(_), .. } => Kernel::VnniQ8,
            Self::Int8 { weight: Int8Matmul::Candle(_), .. } => Kernel::CandleQ8,
            Self::Bf16(_) => Kernel::AmxBf16,
            Self::Bf16Pairs(_) => Kernel::Avx512Bf16,
            Self::F32(_) => Kernel::Avx512F32,
        }
    }

    /// `a · GELU(g)` where `[a, g] = self(x)`: the gate runs on each block of the product while
    /// it is in cache, where the kernel can.
    pub fn forward_geglu(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Bf16(matrix) => matrix.forward_geglu(xs),
            Self::Bf16Pairs(matrix) => matrix.forward_geglu(xs),
            Self::F32(matrix) => matrix.forward_geglu(xs),
            Self::Float(l) => dynamicrafter_kernels::linear_geglu(xs, l.weight(), l.bias()),
            Self::Int8 { .. } => dynamicrafter_kernels::geglu(&self.forward(xs)?),
        }
    }

    /// `self(x) + residual`, the residual added with the bias where the kernel can (CUDA).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(l) => dynamicrafter_kernels::linear(xs, l.weight(), l.bias(), Some(residual)),
            _ => self.forward(xs)? + residual,
        }
    }
}

impl Linear {
    /// `(sum, norm(sum))` with `sum = self(x) + residual`: the residual stream and its next
    /// LayerNorm, on CUDA in one kernel after the product.
    pub fn forward_add_norm(&self, xs: &Tensor, residual: &Tensor, norm: &candle_nn::LayerNorm) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Float(l) => dynamicrafter_kernels::linear_add_layer_norm(xs, l.weight(), l.bias(), residual, norm),
            _ => {
                let sum = self.forward_add(xs, residual)?;
                let normed = norm.forward(&sum)?;
                Ok((sum, normed))
            }
        }
    }

    /// `self(x).reshape(view).permute(dims) + addend`: a transformer's exit, its output projection
    /// back to the block's layout and the block's input added; on CUDA with the bias in one pass
    /// after the product.
    pub fn forward_permute_add(&self, xs: &Tensor, view: &[usize], dims: &[usize], addend: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(l) => dynamicrafter_kernels::linear_permute_add(xs, l.weight(), l.bias(), view, dims, addend),
            _ => dynamicrafter_kernels::permute(&self.forward(xs)?.reshape(view)?, dims)? + addend,
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(l) => dynamicrafter_kernels::linear(xs, l.weight(), l.bias(), None),
            Self::Int8 { weight, bias } => {
                let y = weight.forward(xs)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Self::Bf16(matrix) => matrix.forward(xs),
            Self::Bf16Pairs(matrix) => matrix.forward(xs),
            Self::F32(matrix) => matrix.forward(xs),
        }
    }
}

/// An int8 weight ready to multiply (`y = x · Wᵀ`): our AVX-512 VNNI kernel, or candle's
/// quantized matmul (same arithmetic).
#[derive(Debug, Clone)]
pub enum Int8Matmul {
    Vnni(Arc<Q8Matrix>),
    Candle(QMatMul),
}

impl Int8Matmul {
    /// From a stored quantized `[rows, cols]` matrix.
    pub fn new(stored: &Tensor, rows: usize, cols: usize, dev: &Device, vnni: bool) -> Result<Self> {
        let q = q8::qtensor(stored, rows, cols, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if vnni {
            Ok(Self::Vnni(Arc::new(Q8Matrix::new(&q)?)))
        } else {
            Ok(Self::Candle(QMatMul::from_qtensor(q)?))
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vnni(m) => m.forward(x),
            // candle's quantized matmul reads its input as one dense block.
            Self::Candle(m) => candle_core::Module::forward(m, &x.contiguous()?),
        }
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder, backend: &Backend) -> Result<Linear> {
    let bias = vb.get(out_dim, "bias")?;
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim], Some(bias), backend)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder, backend: &Backend) -> Result<Linear> {
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim], None, backend)
}

/// A `Conv1d(k=1)` stored as `[out, in, 1]`, applied as the linear layer it is.
pub fn conv1x1_as_linear(in_dim: usize, out_dim: usize, vb: VarBuilder, backend: &Backend) -> Result<Linear> {
    let bias = vb.get(out_dim, "bias")?;
    Linear::load(&vb, "weight", out_dim, in_dim, &[out_dim, in_dim, 1], Some(bias), backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmatmul_matches_the_float_product_of_the_dequantized_weight() {
        let w = Tensor::randn(0f32, 0.1, (48, 96), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 96), &Device::Cpu).unwrap();
        let stored = q8::quantize(&w).unwrap();
        let vnni = dynamicrafter_kernels::cpu::features().avx512_vnni;
        let q = Int8Matmul::new(&stored, 48, 96, &Device::Cpu, vnni).unwrap();
        let y = q.forward(&x).unwrap();
        let wd = q8::dequantize(&stored, &[48, 96], &Device::Cpu).unwrap();
        let y_ref = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        // candle's kernel also rounds the activations to 8 bits per block of 32.
        let err = (y - &y_ref).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = y_ref.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= 0.02 * scale, "max error {err} of {scale}");
    }
}
