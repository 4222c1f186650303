//! GroupNorm (+ SiLU) in f32 on any CPU: per (sample, group), one pass for the statistics and
//! one to normalise.

use crate::common::{contiguous_f32, fast_exp, output_buffer};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per block of the statistics pass: summed in f32 lanes (BLOCK/16 terms each), then
/// added to f64 totals, so the rounding error does not grow with the group's size.
const BLOCK: usize = 512;

/// Mean and variance of `x`, in one pass: sums of `x − k` and `(x − k)²` for `k = x[0]`, so the
/// variance `E[(x−k)²] − E[x−k]²` does not cancel when the mean is far from zero.
#[inline(always)]
fn moments(x: &[f32]) -> (f64, f64) {
    let Some(&k) = x.first() else { return (0.0, 0.0) };
    let (mut s1, mut s2) = (0f64, 0f64);
    for block in x.chunks(BLOCK) {
        // Two loops over the block (in L1) rather than one: LLVM vectorises these.
        let (mut a1, mut a2) = ([0f32; 16], [0f32; 16]);
        let lanes = block.chunks_exact(16);
        for c in lanes.clone() {
            for (a, &v) in a1.iter_mut().zip(c) {
                *a += v - k;
            }
        }
        for c in lanes.clone() {
            for (a, &v) in a2.iter_mut().zip(c) {
                *a += (v - k) * (v - k);
            }
        }
        for &v in lanes.remainder() {
            let d = (v - k) as f64;
            (s1, s2) = (s1 + d, s2 + d * d);
        }
        s1 += a1.iter().map(|&v| v as f64).sum::<f64>();
        s2 += a2.iter().map(|&v| v as f64).sum::<f64>();
    }
    let n = x.len() as f64;
    let shifted_mean = s1 / n;
    (k as f64 + shifted_mean, (s2 / n - shifted_mean * shifted_mean).max(0.0))
}

dispatch!(norm_group, fn(x: &[f32], y: &mut [std::mem::MaybeUninit<f32>], spatial: usize, w: &[f32], b: &[f32], eps: f32, silu: bool) {
    let (mean, var) = moments(x);
    let rstd = 1.0 / (var + eps as f64).sqrt();
    // `(x − mean)·scale + b`, not `x·scale + shift`: with a mean far from zero the latter's two
    // large terms cancel in f32.
    let mean = mean as f32;
    for (c, (xc, yc)) in x.chunks_exact(spatial).zip(y.chunks_exact_mut(spatial)).enumerate() {
        let (scale, shift) = ((w[c] as f64 * rstd) as f32, b[c]);
        if silu {
            for (o, &i) in yc.iter_mut().zip(xc) {
                let t = (i - mean) * scale + shift;
                o.write(t / (1.0 + fast_exp(-t)));
            }
        } else {
            for (o, &i) in yc.iter_mut().zip(xc) {
                o.write((i - mean) * scale + shift);
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
        let mut y = output_buffer::<f32>(x.len());
        y.spare_capacity_mut().par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (yg, xg))| {
            let g = i % self.groups;
            norm_group(xg, yg, spatial, &w[g * cg..(g + 1) * cg], &b[g * cg..(g + 1) * cg], self.eps, self.silu);
        });
        // SAFETY: every group wrote all its outputs.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }
}

/// GroupNorm over CPU f32 `(n, c, …)` with affine weight/bias, optionally followed by SiLU.
pub(crate) fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(w, b, &GroupNorm { groups, eps: eps as f32, silu })
}
