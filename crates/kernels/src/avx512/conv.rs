//! The f32 3×3 convolution on AVX-512 (direct form; the Winograd form is `winograd.rs`).

use super::{pixels_channels_last, transpose16, Lanes};
use crate::common::{output_buffer, PaddedGrid, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

mod temporal;
mod winograd;

pub use temporal::Bf16DotTemporalConv;
pub use winograd::Bf16DotConv;

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
        super::available() && co.is_multiple_of(Self::PANEL)
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
        let padded = Self::channels_last(x, self.c, &grid, len);

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

        let mut y = output_buffer::<f32>(n * co * hw);
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
    fn channels_last(x: &[f32], c: usize, grid: &PaddedGrid, len: usize) -> Vec<f32> {
        let hw = grid.h * grid.w;
        let c_pad = c.next_multiple_of(Self::KC);
        let mut padded = output_buffer::<f32>(c_pad * len);
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

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_transposed(_: *const f32, _: usize, _: &[f32], _: *mut f32, _: usize) {
    unreachable!("F32Conv::supports() is false off x86-64")
}


#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile_n<const R: usize>(_: *const f32, _: &[usize; F32Conv::POS], _: usize, _: &[usize], _: *const f32, _: usize, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::{assert_f32_level, f64, CONV3X3_SHAPES};
    use crate::avx512::available;
    use crate::conv3x3_reference;
    use candle_core::Device;

    /// Both forms (direct and Winograd, whichever `forward` would pick) at f32 rounding level.
    #[test]
    fn f32_conv_matches_reference() {
        if !available() {
            eprintln!("no AVX-512 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in CONV3X3_SHAPES.iter().filter(|s| F32Conv::supports(s.2)) {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let want = conv3x3_reference(&f64(&x), &f64(&wt), &f64(&bias)).unwrap();
            let candle = conv3x3_reference(&x, &wt, &bias).unwrap();
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

    /// bf16 pairs (Winograd, weights kept as bf16 taps and transformed per call, in one group of
    /// output panels and in groups of one panel): against the f64 convolution, the error of
    /// bf16 operands. Relative RMS error per output ≈ the rounding of V and U
    /// (2^-9 relative each) through sums of random signs: ~3e-3; a wrong index or lane is ~1.
    #[test]
    fn bf16_pair_conv_matches_reference_at_bf16_level() {
        if !Bf16DotConv::supports(64) {
            eprintln!("no AVX512-BF16 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in CONV3X3_SHAPES.iter().filter(|s| Bf16DotConv::supports(s.2)) {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let want = conv3x3_reference(&f64(&x), &f64(&wt), &f64(&bias)).unwrap();
            let conv = Bf16DotConv::spatial_3x3(&wt, &bias).unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            // A panel at a time: the same products, grouped differently.
            let one_panel = conv.forward_in_groups(&x, 1).unwrap();
            assert_eq!(one_panel.flatten_all().unwrap().to_vec1::<f32>().unwrap(), got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{:?}", (n, c, co, h, w));
            let err = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
            let rms = want.sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
            eprintln!("{:?}: relative RMS error {:.2e}", (n, c, co, h, w), err / rms);
            assert!(err <= 1e-2 * rms, "{:?}: relative RMS error {:.2e}", (n, c, co, h, w), err / rms);
        }
    }
}
