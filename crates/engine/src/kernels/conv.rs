//! Convolutions as GEMMs over shifted views of the input: the temporal (3,1,1) conv and the
//! 3×3 stride-1 conv.

use super::{contiguous_f32, gemm_f32, SendPtr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct TemporalConv;

impl CustomOp3 for TemporalConv {
    fn name(&self) -> &'static str {
        "dc-temporal-conv"
    }

    /// x `(b, c, t, s)`, w `(co, c, 3, 1, 1)`, bias `(co)` → `(b, co, t, s)`; zero padding in time.
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, bias) = (contiguous_f32(name, x, lx)?, contiguous_f32(name, w, lw)?, contiguous_f32(name, bias, lb)?);
        let (b, c, t, s) = lx.shape().dims4()?;
        let co = lw.dims()[0];
        let ts = t * s;
        let mut y = vec![0f32; b * co * ts];
        // Work items: (sample, run of frames) with every output channel, so each GEMM's packed
        // input serves all co rows; enough runs that both threads stay busy at b = 1.
        let threads = rayon::current_num_threads().max(1);
        let runs = (2 * threads).div_ceil(b).clamp(1, t);
        let frames = t.div_ceil(runs);
        let runs = t.div_ceil(frames);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..b * runs).into_par_iter().for_each(|task| {
            let (bi, run) = (task / runs, task % runs);
            let (t0, t1) = (run * frames, ((run + 1) * frames).min(t));
            let xb = x[bi * c * ts..].as_ptr();
            // SAFETY: each task writes the columns of its own frames; all extents within the buffers.
            unsafe {
                let yb = y_ptr.get().add(bi * co * ts);
                let wk = |k: usize| w.as_ptr().add(k);
                // Centre tap over the run's frames, then the previous / next frame taps where
                // those frames exist (zero padding in time).
                gemm_f32(co, (t1 - t0) * s, c, yb.add(t0 * s), ts, false, wk(1), c * 3, 3, xb.add(t0 * s), ts);
                let first = t0.max(1);
                if t1 > first {
                    gemm_f32(co, (t1 - first) * s, c, yb.add(first * s), ts, true, wk(0), c * 3, 3, xb.add((first - 1) * s), ts);
                }
                let last = t1.min(t - 1);
                if last > t0 {
                    gemm_f32(co, (last - t0) * s, c, yb.add(t0 * s), ts, true, wk(2), c * 3, 3, xb.add((t0 + 1) * s), ts);
                }
                for (r, &bv) in bias.iter().enumerate().take(co) {
                    for v in std::slice::from_raw_parts_mut(yb.add(r * ts + t0 * s), (t1 - t0) * s) {
                        *v += bv;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, co, t, s))))
    }
}

/// Reference: the (3,1,1) Conv3d as a 2-D conv over `(t, h·w)` with explicit time padding.
pub fn temporal_conv_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (co, c) = (w.dim(0)?, w.dim(1)?);
    let w = w.reshape((co, c, 3, 1))?;
    x.pad_with_zeros(2, 1, 1)?.conv2d(&w, 0, 1, 1, 1)?.broadcast_add(&bias.reshape((1, co, 1, 1))?)
}

/// Conv3d with kernel (3,1,1), padding (1,0,0) on `x (b, c, t, s)` (s = h·w): three GEMMs over
/// shifted views of the input, no im2col copy.
pub fn temporal_conv(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &TemporalConv)
    } else if x.device().is_cpu() {
        // candle has no bf16/f16 CPU convolution: compute in f32 (as GPUs accumulate), round back.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        temporal_conv(&f32(x)?, &f32(w)?, &f32(bias)?)?.to_dtype(x.dtype())
    } else if super::cuda::usable(x) && w.dtype() == x.dtype() {
        super::cuda::temporal_conv(x, &super::cuda::taps_first(w)?, bias)
    } else {
        temporal_conv_reference(x, w, bias)
    }
}

struct Conv3x3;

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "dc-conv3x3"
    }

    /// x `(n, c, h, w)`, w `(co, c, 3, 3)`, bias `(co)`, stride 1, padding 1.
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, bias) = (contiguous_f32(name, x, lx)?, contiguous_f32(name, w, lw)?, contiguous_f32(name, bias, lb)?);
        let (n, c, h, wd) = lx.shape().dims4()?;
        let co = lw.dims()[0];
        // Output computed on the padded width (w+2): every tap is then one shifted view of the
        // padded input, and the two extra columns per row are dropped at the end.
        let (hp, wp) = (h + 2, wd + 2);
        let cols = h * wp;
        let mut y = vec![0f32; n * co * h * wd];
        // Output-channel blocks: up to 128 rows (GEMM efficiency), but small enough that a
        // single image (the per-frame VAE) still gives every thread work; at least 64 rows.
        let threads = rayon::current_num_threads().max(1);
        let co_block = (co * n).div_ceil(2 * threads).next_multiple_of(16).clamp(64, 512);
        let blocks = co.div_ceil(co_block);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..n * blocks).into_par_iter().for_each_init(
            || (vec![0f32; c * hp * wp + 2], vec![0f32; co_block * cols], usize::MAX),
            |(padded, acc, padded_for), task| {
                let (ni, blk) = (task / blocks, task % blocks);
                if *padded_for != ni {
                    // Zero-padded copy of this sample (plus slack: the last tap reads 2 past the end).
                    padded.fill(0.0);
                    let xs = &x[ni * c * h * wd..(ni + 1) * c * h * wd];
                    for ci in 0..c {
                        for yy in 0..h {
                            let src = &xs[(ci * h + yy) * wd..(ci * h + yy + 1) * wd];
                            let dst = (ci * hp + yy + 1) * wp + 1;
                            padded[dst..dst + wd].copy_from_slice(src);
                        }
                    }
                    *padded_for = ni;
                }
                let o0 = blk * co_block;
                let rows = co_block.min(co - o0);
                // SAFETY: extents checked by construction; disjoint output rows per task.
                unsafe {
                    for tap in 0..9 {
                        let (dy, dx) = (tap / 3, tap % 3);
                        gemm_f32(
                            rows, cols, c,
                            acc.as_mut_ptr(), cols, tap > 0,
                            w.as_ptr().add(o0 * c * 9 + tap), c * 9, 9,
                            padded.as_ptr().add(dy * wp + dx), hp * wp,
                        );
                    }
                    let yb = y_ptr.get().add((ni * co + o0) * h * wd);
                    for r in 0..rows {
                        let bv = bias[o0 + r];
                        for yy in 0..h {
                            let src = &acc[r * cols + yy * wp..r * cols + yy * wp + wd];
                            let dst = std::slice::from_raw_parts_mut(yb.add((r * h + yy) * wd), wd);
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d = s + bv;
                            }
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((n, co, h, wd))))
    }
}

/// 3×3 convolution, stride 1, padding 1, with bias: nine GEMMs over shifted views of the padded
/// input on CPU f32 (no im2col matrix), candle's conv elsewhere.
pub fn conv3x3(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &Conv3x3)
    } else if x.device().is_cpu() {
        // candle has no bf16/f16 CPU convolution: compute in f32 (as GPUs accumulate), round back.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        conv3x3(&f32(x)?, &f32(w)?, &f32(bias)?)?.to_dtype(x.dtype())
    } else if super::cuda::usable(x) && w.dtype() == x.dtype() {
        super::cuda::conv3x3(x, &super::cuda::taps_first(w)?, bias)
    } else {
        conv3x3_reference(x, w, bias)
    }
}

pub fn conv3x3_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::assert_f32_level;
    use candle_core::Device;

    #[test]
    fn temporal_conv_matches_reference() {
        let dev = Device::Cpu;
        for &(b, c, co, t, s) in &[(1, 3, 5, 1, 4), (2, 8, 8, 4, 6), (1, 64, 70, 16, 9), (1, 130, 130, 3, 1)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, s), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = temporal_conv(&x, &w, &bias).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = temporal_conv_reference(&f(&x), &f(&w), &f(&bias)).unwrap();
            let candle = temporal_conv_reference(&x, &w, &bias).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, c, co, t, s)));
        }
    }

    #[test]
    fn conv3x3_matches_reference() {
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in &[(1, 1, 1, 1, 1), (2, 3, 5, 4, 7), (3, 16, 140, 9, 5), (1, 64, 32, 16, 16), (1, 8, 200, 6, 6)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = conv3x3(&x, &wt, &bias).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = conv3x3_reference(&f(&x), &f(&wt), &f(&bias)).unwrap();
            let candle = conv3x3_reference(&x, &wt, &bias).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (n, c, co, h, w)));
        }
    }
}
