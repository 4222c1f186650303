//! Convolutions as GEMMs over shifted views of the input (no im2col matrix), in f32 on any CPU:
//! the temporal (3,1,1) conv and the 3×3 stride-1 conv.

use crate::common::{contiguous_f32, gemm_f32, output_buffer, PaddedGrid, SendPtr};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
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

/// Conv3d (3,1,1), padding (1,0,0), of f32 `x (b, c, t, s)` with `w (co, c, 3, 1, 1)`.
pub(crate) fn temporal_conv(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &TemporalConv)
}

/// 3×3 convolution, stride 1, padding 1, of f32 `x (n, c, h, w)` with `w_taps (9, co, c)`.
pub(crate) fn conv3x3_taps(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w_taps.contiguous()?, &bias.contiguous()?, &Conv3x3)
}

struct Conv3x3;

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "dc-conv3x3"
    }

    /// x `(n, c, h, w)`, w `(9, co, c)` (taps first), bias `(co)`, stride 1, padding 1.
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
        let co = lw.dims()[1];
        let grid = PaddedGrid { n, h, w: wd, pad_x: true };
        let len = grid.len();
        // Every frame of every channel in one zero-padded row, so a tap is one shifted view
        // across all frames: GEMMs as wide as the whole batch even where frames are 4×4.
        let mut padded = output_buffer::<f32>(c * len);
        padded.spare_capacity_mut().par_chunks_mut(len).enumerate().for_each(|(ci, row)| {
            grid.fill(&x[ci * h * wd..], c * h * wd, row);
        });
        // SAFETY: `fill` wrote every element of every row.
        unsafe { padded.set_len(c * len) };

        let cols = grid.outputs();
        let row = grid.pitch();
        let threads = rayon::current_num_threads().max(1);
        // Column chunks of whole grid rows, 256–1024 wide; output channels split only when the
        // chunks alone would leave a thread idle (the small levels of the UNet).
        let chunk = cols.div_ceil(4 * threads).clamp(256, 1024).div_ceil(row).max(1) * row;
        let chunks = cols.div_ceil(chunk);
        let co_blocks = (2 * threads).div_ceil(chunks).min(co.div_ceil(64)).max(1);
        let co_block = co.div_ceil(co_blocks).next_multiple_of(16).min(co);
        let co_blocks = co.div_ceil(co_block);

        let mut y = output_buffer::<f32>(n * co * h * wd);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..chunks * co_blocks).into_par_iter().for_each_init(
            || vec![0f32; co_block * chunk],
            |acc, task| {
                let (q0, o0) = ((task / co_blocks) * chunk, (task % co_blocks) * co_block);
                let (width, rows) = (chunk.min(cols - q0), co_block.min(co - o0));
                // SAFETY: every read within `padded` (the grid keeps the slack the last taps
                // read) and `w`; each task writes the output pixels of its own grid rows and
                // channels, which no other task writes.
                unsafe {
                    for tap in 0..9 {
                        gemm_f32(
                            rows, width, c,
                            acc.as_mut_ptr(), width, tap > 0,
                            w.as_ptr().add((tap * co + o0) * c), c, 1,
                            padded.as_ptr().add(q0 + grid.shift(tap)), len,
                        );
                    }
                    for r in (q0 / row)..(q0 + width) / row {
                        let (f, yy) = (r / (h + 1), r % (h + 1));
                        if yy == h {
                            continue;
                        }
                        for o in 0..rows {
                            let src = &acc[o * width + r * row - q0..][..wd];
                            let dst = y_ptr.get().add(((f * co + o0 + o) * h + yy) * wd);
                            let bv = bias[o0 + o];
                            for (x, &s) in src.iter().enumerate() {
                                dst.add(x).write(s + bv);
                            }
                        }
                    }
                }
            },
        );
        // SAFETY: the tasks together wrote every output pixel (every valid grid position).
        unsafe { y.set_len(n * co * h * wd) };
        Ok((CpuStorage::F32(y), Shape::from((n, co, h, wd))))
    }
}

