//! Convolutions as GEMMs over shifted views of the input: the temporal (3,1,1) conv and the
//! 3×3 stride-1 conv.

use super::f32_matrix::Lanes;
use super::{contiguous_f32, gemm_f32, SendPtr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

mod winograd;

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
        super::cuda::temporal_conv(x, &taps_first(w)?, bias)
    } else {
        temporal_conv_reference(x, w, bias)
    }
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
        let mut padded = super::output_buffer::<f32>(c * len);
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

        let mut y = super::output_buffer::<f32>(n * co * h * wd);
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

/// The zero-padded input of a convolution with three taps along its rows (and three or one
/// along its columns) for all `n` frames of one channel as one row: grid rows of `w + 1`
/// (`pad_x`: the one zero column between two image rows pads both) or `w`, and one zero row
/// after each frame (padding the frame above and the one below). Output pixel `(f, y, x)` sits
/// at grid position `(f·(h+1) + y)·pitch + x`, and tap `(dy, dx)` reads the row at that
/// position plus `dy·pitch + dx`; positions with `x = w` or `y = h` are junk. The temporal conv
/// is the case `pad_x = false` with frames = samples, rows = time steps, columns = pixels.
/// (`amx::Bf16Conv` lays the same positions out channels last, 32 channels per position.)
#[derive(Clone, Copy)]
pub(crate) struct PaddedGrid {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub pad_x: bool,
}

impl PaddedGrid {
    pub fn pitch(&self) -> usize {
        self.w + self.pad_x as usize
    }

    /// Zeros before the first pixel: a zero grid row (and one zero column).
    fn lead(&self) -> usize {
        self.pitch() + self.pad_x as usize
    }

    /// Grid positions of the outputs: every frame's rows and its zero row, except the last
    /// zero row.
    pub fn outputs(&self) -> usize {
        (self.n * (self.h + 1) - 1) * self.pitch()
    }

    /// Row length: the last output position plus the furthest tap stays inside.
    pub fn len(&self) -> usize {
        self.outputs() + self.shift(self.taps() - 1)
    }

    pub fn taps(&self) -> usize {
        if self.pad_x {
            9
        } else {
            3
        }
    }

    pub fn shift(&self, tap: usize) -> usize {
        let kw = if self.pad_x { 3 } else { 1 };
        (tap / kw) * self.pitch() + tap % kw
    }

    /// The grid position of output pixel `v = (f·h + y)·w + x`.
    pub fn position(&self, v: usize) -> usize {
        let hw = self.h * self.w;
        ((v / hw) * (self.h + 1) + v % hw / self.w) * self.pitch() + v % self.w
    }

    /// Visits the first `len` positions once each, in order, a segment at a time: `(range,
    /// None)` for padding, `(range, Some((frame, offset)))` for an image row of `w` pixels
    /// (`offset`: its first pixel's in the frame).
    pub(crate) fn segments(&self, len: usize, mut visit: impl FnMut(std::ops::Range<usize>, Option<(usize, usize)>)) {
        let mut at = 0;
        for f in 0..self.n {
            for y in 0..self.h {
                let start = self.lead() + (f * (self.h + 1) + y) * self.pitch();
                visit(at..start, None);
                visit(start..start + self.w, Some((f, y * self.w)));
                at = start + self.w;
            }
        }
        visit(at..len, None);
    }

    /// Writes one channel's row (`len` values): `x` holds frame f's pixels at `f·frame_stride`.
    fn fill(&self, x: &[f32], frame_stride: usize, row: &mut [std::mem::MaybeUninit<f32>]) {
        self.segments(row.len(), |range, image| match image {
            None => row[range].fill(std::mem::MaybeUninit::new(0.0)),
            Some((f, offset)) => {
                for (d, &s) in row[range].iter_mut().zip(&x[f * frame_stride + offset..]) {
                    d.write(s);
                }
            }
        });
    }
}

/// A 3×3 convolution (stride 1, padding 1) in f32 on AVX-512, the weight packed at load in
/// panels of 64 output channels, `[panel][tap][ci][64]`. The input goes into the
/// [`PaddedGrid`]'s positions (all frames in one zero-padded run) channels last in blocks of
/// [`F32Conv::KC`] channels; a microkernel multiplies 6 output pixels (broadcast from the grid
/// at each tap's shift; any 6, so only valid pixels are computed) by 64 output channels (4
/// aligned vectors of the panel) over all nine taps and one block of input channels, so the 24
/// accumulators stay in registers through 9·KC steps.
///
/// From a few thousand output pixels, the same microkernel runs the Winograd F(2×2, 3×3) form
/// instead (`winograd.rs`): 2.25× fewer multiply-adds, for weights transformed on each call.
#[derive(Clone)]
pub struct F32Conv {
    packed: Vec<Lanes>,
    bias: Vec<f32>,
    co: usize,
    c: usize,
}

impl std::fmt::Debug for F32Conv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F32Conv[{}, {}, 3, 3]", self.co, self.c)
    }
}

impl F32Conv {
    /// Output channels per panel (4 vectors).
    const PANEL: usize = 64;
    /// Grid positions per microkernel call.
    const POS: usize = 6;
    /// Input channels per pass and per block of the channels-last grid (one cache line per
    /// position): a panel's weights for them (9 taps × KC × 64 f32 = 36 KB) stay in L1 while
    /// the microkernel walks the task's positions.
    const KC: usize = 16;
    /// Results a task accumulates through all passes (kept in L2), in f32 values.
    const TASK_RESULTS: usize = 256 << 10;

    /// Whether this CPU runs it (AVX-512F) and the layer has whole panels of outputs.
    pub fn supports(co: usize) -> bool {
        super::f32_matrix::available() && co.is_multiple_of(Self::PANEL)
    }

    /// Packs `w (co, c, 3, 3)`; `bias (co)`.
    pub fn spatial_3x3(w: &Tensor, bias: &Tensor) -> Result<Self> {
        let (co, c, kh, kw) = w.dims4()?;
        if (kh, kw) != (3, 3) || bias.dims1()? != co || !Self::supports(co) {
            candle_core::bail!("f32 conv: weight {:?} / bias {:?}: needs a 3×3 conv with a multiple of 64 outputs on an AVX-512 CPU", w.dims(), bias.dims());
        }
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // Input channels padded to whole blocks of KC (zero weights), as the input grid is.
        let c_pad = c.next_multiple_of(Self::KC);
        let mut packed = vec![Lanes([0.0; 16]); co * c_pad * 9 / 16];
        packed.par_chunks_mut(9 * c_pad * Self::PANEL / 16).enumerate().for_each(|(p, panel)| {
            for (tc, lanes) in panel.chunks_exact_mut(Self::PANEL / 16).enumerate() {
                let (tap, ci) = (tc / c_pad, tc % c_pad);
                for (j, v) in lanes.iter_mut().flat_map(|l| l.0.iter_mut()).enumerate() {
                    *v = if ci < c { w[((p * Self::PANEL + j) * c + ci) * 9 + tap] } else { 0.0 };
                }
            }
        });
        Ok(Self { packed, bias: bias.to_dtype(DType::F32)?.to_vec1()?, co, c })
    }

    /// `x (n, c, h, w)` f32 on the CPU → `(n, co, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, wd) = x.dims4()?;
        if c != self.c || x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!("f32 conv: input {:?} {:?} on {:?}, expected f32 (n, {}, h, w) on the CPU", x.dims(), x.dtype(), x.device(), self.c);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("f32 conv: input not on the CPU") };
        let start = layout.start_offset();
        let x = &cpu.as_slice::<f32>()?[start..start + n * c * h * wd];
        let y = if Self::winograd_pays(n * h * wd) { self.forward_winograd(x, n, h, wd) } else { self.forward_direct(x, n, h, wd) };
        drop(storage);
        Tensor::from_vec(y, (n, self.co, h, wd), &candle_core::Device::Cpu)
    }

    /// The direct form: `x` holds `(n, c, h, w)` f32; returns `(n, co, h, w)`.
    fn forward_direct(&self, x: &[f32], n: usize, h: usize, wd: usize) -> Vec<f32> {
        let c = self.c;
        let grid = PaddedGrid { n, h, w: wd, pad_x: true };
        let len = grid.len();
        let c_pad = c.next_multiple_of(Self::KC);
        let padded = self.channels_last(x, &grid, len);

        // Tasks: (run of output pixels, block of panels), as many as keep both threads busy and
        // each task's results within TASK_RESULTS.
        let co = self.co;
        let panels = co / Self::PANEL;
        let (hw, pixels) = (h * wd, n * h * wd);
        let threads = rayon::current_num_threads().max(1);
        let chunk = pixels.div_ceil(2 * threads).clamp(Self::POS, 1024).next_multiple_of(Self::POS);
        let chunks = pixels.div_ceil(chunk);
        let panels_per_task = (Self::TASK_RESULTS / (chunk * Self::PANEL)).clamp(1, panels.div_ceil((2 * threads).div_ceil(chunks)));
        let blocks = panels.div_ceil(panels_per_task);
        // In floats of the channels-last grid.
        let shifts: [usize; 9] = std::array::from_fn(|tap| grid.shift(tap) * Self::KC);

        let mut y = super::output_buffer::<f32>(n * co * hw);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..chunks * blocks).into_par_iter().for_each_init(
            || vec![0f32; chunk * panels_per_task * Self::PANEL],
            |acc, task| {
                let (v0, p0) = ((task / blocks) * chunk, (task % blocks) * panels_per_task);
                let count = chunk.min(pixels - v0);
                let p1 = (p0 + panels_per_task).min(panels);
                // Results as [pixel][channel of the block].
                let acc_rs = (p1 - p0) * Self::PANEL;
                // Each tile's pixels: grid position of the first, offsets of all (the last one
                // repeated in a short tile), found once for every pass below.
                let tiles: Vec<(usize, usize, [usize; Self::POS])> = (0..count)
                    .step_by(Self::POS)
                    .map(|t| {
                        let (rows, first) = (Self::POS.min(count - t), grid.position(v0 + t));
                        (rows, first, std::array::from_fn(|r| (grid.position(v0 + t + r.min(rows - 1)) - first) * Self::KC))
                    })
                    .collect();
                // SAFETY: reads stay within `padded` (every tap of every pixel reads inside its
                // grid row) and `packed`; AVX-512F is available (`supports`). The task writes the
                // outputs of its own pixels and channels, which no other task writes.
                unsafe {
                    for c0 in (0..c_pad).step_by(Self::KC) {
                        for p in p0..p1 {
                            let w = (self.packed.as_ptr() as *const f32).add((p * 9 * c_pad + c0) * Self::PANEL);
                            let out = acc.as_mut_ptr().add((p - p0) * Self::PANEL);
                            for (i, (rows, first, offsets)) in tiles.iter().enumerate() {
                                // Consecutive input channels are consecutive floats.
                                let a = padded.as_ptr().add(c0 * len + first * Self::KC);
                                conv_tile(*rows, a, offsets, 1, &shifts, w, c_pad * Self::PANEL, Self::KC, out.add(i * Self::POS * acc_rs), acc_rs, c0 == 0);
                            }
                        }
                    }
                    // To the output, channel-major, plus the bias: 16 channels at a time,
                    // transposed in registers 16 pixels of a frame at a time, so every store
                    // fills a cache line of one channel.
                    let o0 = p0 * Self::PANEL;
                    for ob in (0..acc_rs).step_by(16) {
                        let bias = &self.bias[o0 + ob..o0 + ob + 16];
                        let mut v = v0;
                        while v < v0 + count {
                            let dst = y_ptr.get().add(((v / hw) * co + o0 + ob) * hw + v % hw);
                            let src = acc.as_ptr().add((v - v0) * acc_rs + ob);
                            if v % hw + 16 <= hw && v + 16 <= v0 + count {
                                store_transposed(src, acc_rs, bias, dst, hw);
                                v += 16;
                            } else {
                                for (i, &b) in bias.iter().enumerate() {
                                    dst.add(i * hw).write(*src.add(i) + b);
                                }
                                v += 1;
                            }
                        }
                    }
                }
            },
        );
        // SAFETY: the tasks together wrote every output (every pixel, every channel).
        unsafe { y.set_len(n * co * hw) };
        y
    }
}

impl F32Conv {
    /// `x (n, c, h, w)` in the first `len` positions of `grid`, channels last in blocks of KC
    /// (`[c_pad/KC][position][KC]`, zeros for the padding and the channels from c on), so a
    /// pixel's KC values of one pass share a cache line (channel-major rows spread them over KC
    /// pages).
    fn channels_last(&self, x: &[f32], grid: &PaddedGrid, len: usize) -> Vec<f32> {
        let (c, hw) = (self.c, grid.h * grid.w);
        let c_pad = c.next_multiple_of(Self::KC);
        let mut padded = super::output_buffer::<f32>(c_pad * len);
        padded.spare_capacity_mut().par_chunks_mut(Self::KC * len).enumerate().for_each(|(b, block)| {
            // SAFETY: AVX-512F is available (`supports`); channels from b·KC exist below c.
            unsafe { fill_channels_last(grid, &x[b * Self::KC * hw..], (c - b * Self::KC).min(Self::KC), hw, c * hw, block) };
        });
        // SAFETY: `fill_channels_last` wrote every element of every block.
        unsafe { padded.set_len(c_pad * len) };
        padded
    }
}

/// Writes one block of the f32 grid channels last: `block[g·16 + i]` = channel i of `x`
/// (`channels` ≤ 16 of them, `channel_stride` apart, frame f at `f·frame_stride`) at grid
/// position g, zeros for the padding and for channels from `channels` on.
///
/// # Safety
/// AVX-512F must be available; `x` must hold `channels` channels of every frame.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_channels_last(grid: &PaddedGrid, x: &[f32], channels: usize, channel_stride: usize, frame_stride: usize, block: &mut [std::mem::MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    grid.segments(block.len() / 16, |range, image| match image {
        None => block[16 * range.start..16 * range.end].fill(std::mem::MaybeUninit::new(0.0)),
        Some((f, offset)) => {
            for x0 in (0..grid.w).step_by(16) {
                let count = 16.min(grid.w - x0);
                let pixels = pixels_channels_last(x.as_ptr().add(f * frame_stride + offset + x0), channel_stride, count, channels);
                for (p, pixel) in pixels.iter().take(count).enumerate() {
                    _mm512_storeu_ps(block.as_mut_ptr().add(16 * (range.start + x0 + p)).cast(), *pixel);
                }
            }
        }
    });
}

/// `count` ≤ 16 consecutive pixels of `channels` ≤ 16 channels (channel i at
/// `x + i·channel_stride`), transposed: result p holds pixel p's channels, zeros past
/// `channels` (and past `count`).
///
/// # Safety
/// AVX-512F must be available; `x` must hold `count` values of each of the channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn pixels_channels_last(x: *const f32, channel_stride: usize, count: usize, channels: usize) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mask: __mmask16 = ((1u32 << count) - 1) as u16;
    transpose16(&std::array::from_fn(|ch| if ch < channels { _mm512_maskz_loadu_ps(mask, x.add(ch * channel_stride)) } else { _mm512_setzero_ps() }))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill_channels_last(_: &PaddedGrid, _: &[f32], _: usize, _: usize, _: usize, _: &mut [std::mem::MaybeUninit<f32>]) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

/// `c[r][0..64] (+)= Σ_tap Σ_kk a[kk·a_ks + shift[tap] + offsets[r]] · w[tap·w_tap + kk·64..][0..64]`
/// for `rows` ≤ 6 pixels r at grid offsets `offsets[r]`.
///
/// # Safety
/// AVX-512F must be available; every address read or written must be inside its buffer, `w`
/// 64-byte aligned with `w_tap` a multiple of 16.
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile(rows: usize, a: *const f32, offsets: &[usize; F32Conv::POS], a_ks: usize, shifts: &[usize], w: *const f32, w_tap: usize, depth: usize, c: *mut f32, c_rs: usize, first: bool) {
    match rows {
        6 => conv_tile_n::<6>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
        5 => conv_tile_n::<5>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
        4 => conv_tile_n::<4>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
        3 => conv_tile_n::<3>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
        2 => conv_tile_n::<2>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
        _ => conv_tile_n::<1>(a, offsets, a_ks, shifts, w, w_tap, depth, c, c_rs, first),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile_n<const R: usize>(a: *const f32, offsets: &[usize; F32Conv::POS], a_ks: usize, shifts: &[usize], w: *const f32, w_tap: usize, depth: usize, c: *mut f32, c_rs: usize, first: bool) {
    use std::arch::x86_64::*;
    /// One input channel of one tap: 64 weights times the R pixels at `x + offsets[r]`.
    #[inline(always)]
    unsafe fn step<const R: usize>(acc: &mut [[__m512; 4]; R], w: *const f32, x: *const f32, offsets: &[usize; F32Conv::POS]) {
        let v = [_mm512_load_ps(w), _mm512_load_ps(w.add(16)), _mm512_load_ps(w.add(32)), _mm512_load_ps(w.add(48))];
        for (r, row) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*x.add(offsets[r]));
            for (acc, &v) in row.iter_mut().zip(&v) {
                *acc = _mm512_fmadd_ps(v, b, *acc);
            }
        }
    }
    // Summed from zero and added to `c` at the end rather than continued from `c`: each output
    // is then a sum of per-call partial sums, whose rounding error grows with the call's depth
    // rather than with all 9·c terms.
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let offsets = *offsets;
    for (tap, &shift) in shifts.iter().enumerate() {
        let (mut x, mut w) = (a.add(shift), w.add(tap * w_tap));
        // Not unrolled: the six pixel offsets and the two moving pointers fill the registers.
        for _ in 0..depth {
            step(&mut acc, w, x, &offsets);
            (x, w) = (x.add(a_ks), w.add(64));
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let out = c.add(r * c_rs + 16 * j);
            _mm512_storeu_ps(out, if first { *v } else { _mm512_add_ps(_mm512_loadu_ps(out), *v) });
        }
    }
}

/// `dst[i·plane + j] = src[j·src_rs + i] + bias[i]` for 16 pixels j × 16 channels i, through
/// [`transpose16`].
///
/// # Safety
/// AVX-512F must be available; `src` must hold 16 rows of 16 values `src_rs` apart, `dst` 16
/// runs of 16 values `plane` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_transposed(src: *const f32, src_rs: usize, bias: &[f32], dst: *mut f32, plane: usize) {
    use std::arch::x86_64::*;
    let columns = transpose16(&std::array::from_fn(|j| _mm512_loadu_ps(src.add(j * src_rs))));
    for (i, column) in columns.into_iter().enumerate() {
        _mm512_storeu_ps(dst.add(i * plane), _mm512_add_ps(column, _mm512_set1_ps(bias[i])));
    }
}

/// The 16×16 transpose of 16 vectors (element i of result j = element j of row i), in registers:
/// unpack pairs, then pairs of pairs, then 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: &[std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (elements 0,1 / 2,3 of each 128-bit lane).
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) }
    });
    // u[4i+k], lane L: column 4L+k of rows 4i..4i+4.
    let u: [__m512; 16] = std::array::from_fn(|n| {
        let (i, k) = (n / 4, n % 4);
        let (a, b) = (t[4 * i + k / 2], t[4 * i + 2 + k / 2]);
        if k % 2 == 0 { _mm512_shuffle_ps::<0x44>(a, b) } else { _mm512_shuffle_ps::<0xEE>(a, b) }
    });
    let mut columns = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        let (even_lo, odd_lo) = (_mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]), _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]));
        let (even_hi, odd_hi) = (_mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]), _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]));
        columns[k] = _mm512_shuffle_f32x4::<0x88>(even_lo, even_hi);
        columns[4 + k] = _mm512_shuffle_f32x4::<0x88>(odd_lo, odd_hi);
        columns[8 + k] = _mm512_shuffle_f32x4::<0xDD>(even_lo, even_hi);
        columns[12 + k] = _mm512_shuffle_f32x4::<0xDD>(odd_lo, odd_hi);
    }
    columns
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_transposed(_: *const f32, _: usize, _: &[f32], _: *mut f32, _: usize) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile_n<const R: usize>(_: *const f32, _: &[usize; F32Conv::POS], _: usize, _: &[usize], _: *const f32, _: usize, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

/// 3×3 convolution, stride 1, padding 1, with bias, its weight `(9, co, c)` taps first (see
/// [`taps_first`]): nine GEMMs over shifted views of the padded input on CPU f32 (no im2col
/// matrix), candle's conv elsewhere.
pub fn conv3x3_taps(x: &Tensor, w_taps: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w_taps.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(&w_taps.contiguous()?, &bias.contiguous()?, &Conv3x3)
    } else if x.device().is_cpu() {
        // candle has no bf16/f16 CPU convolution: compute in f32 (as GPUs accumulate), round back.
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        conv3x3_taps(&f32(x)?, &f32(w_taps)?, &f32(bias)?)?.to_dtype(x.dtype())
    } else if super::cuda::usable(x) && w_taps.dtype() == x.dtype() {
        super::cuda::conv3x3(x, w_taps, bias)
    } else {
        let (co, c) = (w_taps.dim(1)?, w_taps.dim(2)?);
        conv3x3_reference(x, &w_taps.permute((1, 2, 0))?.reshape((co, c, 3, 3))?, bias)
    }
}

/// [`conv3x3_taps`] from a weight in its stored layout `(co, c, 3, 3)`.
pub fn conv3x3(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv3x3_taps(x, &taps_first(w)?, bias)
}

/// A conv weight `(co, ci, k…)` as `(taps, co, ci)`, taps in row-major kernel order: each tap's
/// matrix contiguous, as the shifted GEMMs read it.
pub fn taps_first(w: &Tensor) -> Result<Tensor> {
    let (co, ci) = (w.dim(0)?, w.dim(1)?);
    w.reshape((co, ci, ()))?.permute((2, 0, 1))?.contiguous()
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
        for &(n, c, co, h, w) in &[(1, 1, 1, 1, 1), (2, 3, 5, 4, 7), (3, 16, 140, 9, 5), (1, 64, 32, 16, 16), (1, 8, 200, 6, 6), (16, 40, 256, 4, 4), (2, 70, 64, 33, 31), (3, 20, 128, 9, 5), (2, 300, 128, 20, 18), (1, 16, 64, 64, 48), (1, 1000, 64, 12, 10), (2, 2560, 64, 8, 8)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = conv3x3(&x, &wt, &bias).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = conv3x3_reference(&f(&x), &f(&wt), &f(&bias)).unwrap();
            let candle = conv3x3_reference(&x, &wt, &bias).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (n, c, co, h, w)));
            if F32Conv::supports(co) {
                let conv = F32Conv::spatial_3x3(&wt, &bias).unwrap();
                let got = conv.forward(&x).unwrap();
                assert_f32_level(&got, &candle, &want, &format!("AVX-512 {:?}", (n, c, co, h, w)));
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (form, y) in [("direct", conv.forward_direct(&xs, n, h, w)), ("Winograd", conv.forward_winograd(&xs, n, h, w))] {
                    let got = Tensor::from_vec(y, (n, co, h, w), &dev).unwrap();
                    assert_f32_level(&got, &candle, &want, &format!("{form} {:?}", (n, c, co, h, w)));
                }
            }
        }
    }
}
