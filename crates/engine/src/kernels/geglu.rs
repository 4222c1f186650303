//! The GEGLU gate `a · GELU_erf(g)` with a vectorised erf.

use super::{contiguous_f32, fast_exp};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), branch-free.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

/// `GELU_erf(g) = g/2 · (1 + erf(g/√2))`.
#[inline(always)]
pub(crate) fn gelu_erf(g: f32) -> f32 {
    0.5 * g * (1.0 + fast_erf(g * std::f32::consts::FRAC_1_SQRT_2))
}

dispatch!(pub(crate) geglu_rows, fn(p: &[f32], out: &mut [f32], hidden: usize) {
    for (row, o) in p.chunks_exact(2 * hidden).zip(out.chunks_exact_mut(hidden)) {
        let (a, g) = row.split_at(hidden);
        for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
            *o = a * gelu_erf(g);
        }
    }
});

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "dc-geglu"
    }

    fn cpu_fwd(&self, p: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(self.name(), p, l)?;
        let dims = l.dims();
        let hidden = dims[dims.len() - 1] / 2;
        let mut out = vec![0f32; p.len() / 2];
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * hidden)
            .zip(p.par_chunks(ROWS * 2 * hidden))
            .for_each(|(o, p)| geglu_rows(p, o, hidden));
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = hidden;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Reference: `a · GELU_erf(g)` for `[a, g]` = the two halves of the last dimension.
pub fn geglu_reference(p: &Tensor) -> Result<Tensor> {
    let half = p.dim(candle_core::D::Minus1)? / 2;
    let a = p.narrow(candle_core::D::Minus1, 0, half)?;
    let g = p.narrow(candle_core::D::Minus1, half, half)?;
    a * g.gelu_erf()?
}

/// GEGLU activation of the UNet feed-forwards, fused (one pass, vectorised erf) on CPU f32.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    if p.device().is_cpu() && p.dtype() == DType::F32 && p.dim(candle_core::D::Minus1)? % 2 == 0 {
        p.contiguous()?.apply_op1_no_bwd(&Geglu)
    } else {
        geglu_reference(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_f32_level, f64};
    use candle_core::Device;

    #[test]
    fn geglu_matches_reference() {
        for shape in [&[1usize, 2][..], &[3, 5, 18][..], &[2, 100, 640][..]] {
            let p = Tensor::randn(0f32, 3.0, shape, &Device::Cpu).unwrap();
            let got = geglu(&p).unwrap();
            let want = geglu_reference(&f64(&p)).unwrap();
            let candle = geglu_reference(&p).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{shape:?}"));
        }
    }
}
