//! GroupNorm (+ SiLU) in one pass per (sample, group).

use super::{contiguous_f32, fast_exp};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Lanes of the f64 accumulators: four AVX-512 registers of independent sums.
const LANES: usize = 32;

/// `Σ f(x)` in f64 over LANES interleaved partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f64>() + acc.iter().sum::<f64>()
}

dispatch!(norm_group, fn(x: &[f32], y: &mut [f32], spatial: usize, w: &[f32], b: &[f32], eps: f32, silu: bool) {
    // Statistics in f64: two passes over the group (mean, then squared deviations), each
    // summed in LANES independent lanes so that LLVM vectorises it (f64 adds are not
    // reassociated otherwise: one add per element, each waiting for the last).
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v as f64) / n;
    let var = lane_sum(x, |v| { let d = v as f64 - mean; d * d }) / n;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    for (c, (xc, yc)) in x.chunks_exact(spatial).zip(y.chunks_exact_mut(spatial)).enumerate() {
        let scale = (w[c] as f64 * rstd) as f32;
        let shift = (b[c] as f64 - mean * w[c] as f64 * rstd) as f32;
        if silu {
            for (o, &i) in yc.iter_mut().zip(xc) {
                let t = i * scale + shift;
                *o = t / (1.0 + fast_exp(-t));
            }
        } else {
            for (o, &i) in yc.iter_mut().zip(xc) {
                *o = i * scale + shift;
            }
        }
    }
});

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "dc-group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, b) = (contiguous_f32(name, x, lx)?, contiguous_f32(name, w, lw)?, contiguous_f32(name, b, lb)?);
        let dims = lx.dims();
        let (c, spatial) = (dims[1], dims[2..].iter().product::<usize>());
        let cg = c / self.groups;
        let group_len = cg * spatial;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (yg, xg))| {
            let g = i % self.groups;
            norm_group(xg, yg, spatial, &w[g * cg..(g + 1) * cg], &b[g * cg..(g + 1) * cg], self.eps, self.silu);
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }
}

/// The reference composition: candle's group norm, then SiLU.
pub fn group_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&gn, x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// GroupNorm over `(n, c, …)` with affine weight/bias, optionally followed by SiLU, fused.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("group norm: {c} channels are not divisible into {groups} groups")
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && b.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(w, b, &GroupNorm { groups, eps: eps as f32, silu })
    } else if super::cuda::usable(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() {
        super::cuda::group_norm(x, w, b, groups, eps, silu)
    } else {
        group_norm_reference(x, w, b, groups, eps, silu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_f32_level, f64};
    use candle_core::Device;

    #[test]
    fn group_norm_matches_reference_on_many_shapes() {
        let dev = Device::Cpu;
        for &(shape, groups) in &[(&[2usize, 32, 4, 4][..], 32), (&[1, 64, 3, 5, 7][..], 32), (&[3, 96, 1][..], 32), (&[2, 320, 16, 16][..], 32), (&[1, 8, 9][..], 4)] {
            let x = (Tensor::randn(0f32, 3.0, shape, &dev).unwrap() + 1.5).unwrap();
            let c = shape[1];
            let w = Tensor::randn(1f32, 0.2, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, c, &dev).unwrap();
            for silu in [false, true] {
                let got = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                let want = group_norm_reference(&f64(&x), &f64(&w), &f64(&b), groups, 1e-5, silu).unwrap();
                let candle = group_norm_reference(&x, &w, &b, groups, 1e-5, silu).unwrap();
                assert_f32_level(&got, &candle, &want, &format!("{shape:?} silu {silu}"));
            }
        }
    }
}
