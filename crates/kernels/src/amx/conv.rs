//! The UNet's 3×3 and temporal convolutions on AMX: [`Bf16Conv`].

use super::{as_u16, as_u16_mut, available, bf16_bits, bf16_conversion, configure_tiles, lines, store_block, Line, BLOCK};
#[cfg(target_arch = "x86_64")]
use crate::avx512::{pixels_channels_last, transpose16};
use crate::common::{output_buffer, PaddedGrid, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A convolution whose taps are shifts along a padded image's rows: the UNet's 3×3 convolution
/// (stride 1, padding 1) and its temporal (3,1,1) one, bf16 products on AMX, f32 in and out.
///
/// The input goes into the [`PaddedGrid`] (all frames in one
/// zero-padded run of positions) channels last in blocks of 32 channels (`[c/32][position][32]`
/// bf16), so a tile of 16 positions × 32 channels is 1 KB of contiguous, aligned memory, and tap
/// `(dy, dx)` is the same tile shifted by whole 64-byte rows. (Channel-major planes would make
/// every shifted tile row straddle two cache lines in 16 different pages.)
/// The weights are the other operand (32 input × 16 output channels per tile); each 32 × 32
/// result block is transposed in registers to the channel-major output, plus the bias.
#[derive(Debug, Clone)]
pub struct Bf16Conv {
    /// Per 16 output channels, tap and 32 input channels: one tile of 16 input pairs × 16
    /// output channels × 2 (1 KB).
    packed: Vec<Line>,
    bias: Vec<f32>,
    co: usize,
    c: usize,
    /// Taps along the image's columns: 3, or 1 for the temporal conv (three along rows in both).
    kw: usize,
}

impl Bf16Conv {
    /// `w [co, c, 3, 3]`, `bias [co]`: the 3×3 convolution of `(n, c, h, w)` images.
    pub fn spatial_3x3(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, 3, 3)
    }

    /// `w [co, c, 3, 1, 1]`, `bias [co]`: Conv3d (3,1,1) with padding (1,0,0) over `(b, c, t, h·w)`.
    pub fn temporal(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, 3, 1)
    }

    fn new(w: &Tensor, bias: &Tensor, kh: usize, kw: usize) -> Result<Self> {
        let (co, c) = (w.dim(0)?, w.dim(1)?);
        let taps = kh * kw;
        if w.elem_count() != co * c * taps || bias.dims() != [co] {
            candle_core::bail!("bf16 AMX conv: weight {:?} / bias {:?} are not a {kh}×{kw} conv", w.dims(), bias.dims());
        }
        if !co.is_multiple_of(BLOCK) || !c.is_multiple_of(BLOCK) {
            candle_core::bail!("bf16 AMX conv: {c} → {co} channels is not a multiple of {BLOCK} on both sides");
        }
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let kblocks = c / BLOCK;
        let mut packed = lines(co * c * taps);
        let flat = as_u16_mut(&mut packed);
        for o in 0..co {
            for ci in 0..c {
                for tap in 0..taps {
                    let tile = ((o / 16) * taps + tap) * kblocks + ci / 32;
                    flat[tile * 512 + (ci % 32) / 2 * 32 + (o % 16) * 2 + ci % 2] = bf16_bits(w[(o * c + ci) * taps + tap]);
                }
            }
        }
        Ok(Self { packed, bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?, co, c, kw })
    }

    /// `x (n, c, h, w)` f32 on the CPU (for the temporal conv: `(b, c, t, h·w)`) → `(n, co, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !available() || !bf16_conversion() {
            candle_core::bail!("bf16 AMX conv: this CPU or OS offers no AMX (or no AVX512-BF16)");
        }
        let (n, c, h, w) = x.dims4()?;
        if c != self.c || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("bf16 AMX conv: input {:?} {:?} on {:?}, expected f32 with {} channels on the CPU", x.dims(), x.dtype(), x.device(), self.c);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("bf16 AMX conv: input not on the CPU") };
        let src = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * c * h * w];
        let co = self.co;
        let grid = PaddedGrid { n, h, w, pad_x: self.kw == 3 };
        // Output positions in whole 32-position blocks; each channel block's plane covers the
        // taps of the last block.
        let cols = grid.outputs().next_multiple_of(BLOCK);
        let shifts: Vec<usize> = (0..grid.taps()).map(|tap| grid.shift(tap)).collect();
        let plane = cols + shifts[shifts.len() - 1];
        let kblocks = c / BLOCK;
        // One line (32 bf16 channels) per position; `fill_channels_last` writes every line.
        let mut grid_lines = output_buffer::<Line>(kblocks * plane);
        grid_lines.spare_capacity_mut().par_chunks_mut(plane).enumerate().for_each(|(kb, lines)| {
            // SAFETY: AVX-512F, BW and BF16 are available (checked above).
            unsafe { fill_channels_last(&grid, &src[kb * BLOCK * h * w..], h * w, c * h * w, lines) };
        });
        // SAFETY: every plane was written in full above.
        unsafe { grid_lines.set_len(kblocks * plane) };
        drop(storage);

        let mut out: Vec<f32> = output_buffer(n * co * h * w);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        // Positions per task: the span of positions whose weight reads one pass serves.
        let chunk = (512 * 1024 / 4 / co / BLOCK * BLOCK).clamp(BLOCK, 512);
        let chunks = cols.div_ceil(chunk);
        let grid_bf16 = as_u16(&grid_lines);
        (0..chunks).into_par_iter().for_each(|task| {
            let q0 = task * chunk;
            let rows = chunk.min(cols - q0);
            let finish = |ob: usize, m0: usize, block: &[f32]| {
                // SAFETY: AVX-512F is available (checked above); the block's valid positions
                // are output pixels of this task alone.
                unsafe { store_block_channel_major(&grid, q0 + m0, block, &self.bias[ob * BLOCK..(ob + 1) * BLOCK], out_ptr.get().add(ob * BLOCK * h * w), co) };
            };
            // SAFETY: every plane holds `plane` ≥ q0 + rows + the last shift positions;
            // `packed` holds co/16 × taps × c/32 tiles.
            unsafe { conv_tiles(grid_bf16.as_ptr().add(q0 * 32), plane, kblocks, &shifts, as_u16(&self.packed).as_ptr(), co, rows, finish) };
        });
        // SAFETY: the tasks initialised every output pixel of every channel.
        unsafe { out.set_len(n * co * h * w) };
        Tensor::from_vec(out, (n, co, h, w), x.device())
    }
}

/// Writes one plane of the channels-last grid: `lines[g]` = the 32 channels of `x` (channel
/// `i` at `x[i·channel_stride ..]`, frame f at `f·frame_stride`) at grid position `g` as bf16,
/// zero lines for the padding.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `x` must hold 32 channels of every frame.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn fill_channels_last(grid: &PaddedGrid, x: &[f32], channel_stride: usize, frame_stride: usize, lines: &mut [MaybeUninit<Line>]) {
    use std::arch::x86_64::*;
    grid.segments(lines.len(), |range, image| match image {
        None => lines[range].fill(MaybeUninit::new(Line([0; 32]))),
        Some((f, offset)) => {
            for x0 in (0..grid.w).step_by(16) {
                let count = 16.min(grid.w - x0);
                let base = x.as_ptr().add(f * frame_stride + offset + x0);
                let low = pixels_channels_last(base, channel_stride, count, 16);
                let high = pixels_channels_last(base.add(16 * channel_stride), channel_stride, count, 16);
                for p in 0..count {
                    let line = _mm512_cvtne2ps_pbh(high[p], low[p]);
                    _mm512_storeu_si512(lines[range.start + x0 + p].as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(line));
                }
            }
        }
    });
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill_channels_last(_: &PaddedGrid, _: &[f32], _: usize, _: usize, _: &mut [MaybeUninit<Line>]) {
    unreachable!("available() is false off x86-64")
}

/// Writes a result block (`block[q·32 + o]`: 32 positions from grid position `first` × 32
/// output channels) to the channel-major output `out` (channel o at `out + o·h·w`, frames
/// `co·h·w` apart) plus `bias`, 16 × 16 at a time through a transpose in registers; each image
/// row's run of valid positions is one masked store per channel.
///
/// # Safety
/// AVX-512F must be available; `out` must hold the 32 channels of every frame.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_block_channel_major(grid: &PaddedGrid, first: usize, block: &[f32], bias: &[f32], out: *mut MaybeUninit<f32>, co: usize) {
    use std::arch::x86_64::*;
    let (pitch, hw, outputs) = (grid.pitch(), grid.h * grid.w, grid.outputs());
    for half in 0..2 {
        let q0 = first + 16 * half;
        // Runs of valid positions among these 16: (first index, mask, output offset of index 0).
        let mut runs = [(0usize, 0u16, 0usize); 16];
        let mut count = 0;
        let mut i = 0;
        while i < 16 && q0 + i < outputs {
            let q = q0 + i;
            let (r, x) = (q / pitch, q % pitch);
            let (f, y) = (r / (grid.h + 1), r % (grid.h + 1));
            if y == grid.h || x >= grid.w {
                i += 1;
                continue;
            }
            let len = (grid.w - x).min(16 - i).min(outputs - q);
            let mask = (((1u32 << len) - 1) << i) as u16;
            // Index i lands on pixel (f, y, x): index 0 sits i floats before it.
            runs[count] = (i, mask, f * co * hw + y * grid.w + x);
            count += 1;
            i += len;
        }
        if count == 0 {
            continue;
        }
        for part in 0..2 {
            let rows = transpose16(&std::array::from_fn(|p| _mm512_loadu_ps(block.as_ptr().add((16 * half + p) * BLOCK + 16 * part))));
            for (j, row) in rows.into_iter().enumerate() {
                let o = 16 * part + j;
                let v = _mm512_add_ps(row, _mm512_set1_ps(bias[o]));
                for &(i, mask, offset) in &runs[..count] {
                    // Masked: only lanes i.. of the run are written, each to its own pixel.
                    let base = out.add(o * hw + offset).cast::<f32>().wrapping_sub(i);
                    _mm512_mask_storeu_ps(base, mask, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_block_channel_major(_: &PaddedGrid, _: usize, _: &[f32], _: &[f32], _: *mut MaybeUninit<f32>, _: usize) {
    unreachable!("available() is false off x86-64")
}

/// The products of [`Bf16Conv`] for `rows` output positions (a multiple of 32) from `x`, the
/// channels-last grid at the task's first position (`kblocks` planes of `plane` lines): each
/// block of 32 output channels (`ob`) × 32 positions (from `m0`) goes to `finish(ob, m0,
/// block)` as `block[q % 32 · 32 + o % 32]` while it is in L1.
///
/// # Safety
/// AMX must be [`available`]; every plane must hold rows + the last shift positions from `x`;
/// `packed` co/16 × taps × kblocks tiles.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tiles(x: *const u16, plane: usize, kblocks: usize, shifts: &[usize], packed: *const u16, co: usize, rows: usize, mut finish: impl FnMut(usize, usize, &[f32])) {
    use std::arch::asm;
    configure_tiles();
    let taps = shifts.len();
    #[repr(C, align(64))]
    struct Block([f32; BLOCK * BLOCK]);
    let mut block = Block([0.0; BLOCK * BLOCK]);
    for ob in 0..co / BLOCK {
        let (w0, w1) = (packed.add(2 * ob * taps * kblocks * 512), packed.add((2 * ob + 1) * taps * kblocks * 512));
        for m0 in (0..rows).step_by(BLOCK) {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
            for kb in 0..kblocks {
                // The taps of one channel block read overlapping runs: they stay in L1.
                let xk = x.add((kb * plane + m0) * 32);
                for (tap, &shift) in shifts.iter().enumerate() {
                    let wt = (tap * kblocks + kb) * 512;
                    let a0 = xk.add(shift * 32);
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.add(16 * 32),
                        b0 = in(reg) w0.add(wt),
                        b1 = in(reg) w1.add(wt),
                        s = in(reg) 64usize,
                        options(nostack)
                    );
                }
            }
            // Rows of the result block are positions, columns output channels.
            store_block(block.0.as_mut_ptr(), BLOCK, BLOCK * 4);
            finish(ob, m0, &block.0);
        }
    }
    asm!("tilerelease", options(nostack));
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tiles(_: *const u16, _: usize, _: usize, _: &[usize], _: *const u16, _: usize, _: usize, _: impl FnMut(usize, usize, &[f32])) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both convolutions against candle's f64 convolution of the same bf16-rounded operands.
    #[test]
    fn amx_convs_match_f64_on_rounded_inputs() {
        if !available() {
            eprintln!("no AMX on this machine: nothing to check");
            return;
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        let check = |got: &Tensor, want: &Tensor, what: String| {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "{what}: max error {diff:.2e} (scale {scale:.2e})");
        };
        for (n, c, co, h, w) in [(1, 32, 32, 1, 1), (2, 64, 96, 5, 7), (3, 32, 64, 9, 16), (1, 96, 32, 16, 16), (2, 32, 32, 4, 40)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let got = Bf16Conv::spatial_3x3(&wt, &b).unwrap().forward(&x).unwrap();
            let want = crate::conv3x3_reference(&round(&x), &round(&wt), &b.to_dtype(DType::F64).unwrap()).unwrap();
            check(&got, &want, format!("3x3 {:?}", (n, c, co, h, w)));
        }
        for (b, c, co, t, s) in [(1, 32, 32, 1, 3), (2, 64, 32, 4, 6), (1, 32, 64, 16, 33)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, s), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let got = Bf16Conv::temporal(&wt, &bias).unwrap().forward(&x).unwrap();
            let want = crate::temporal_conv_reference(&round(&x), &round(&wt), &bias.to_dtype(DType::F64).unwrap()).unwrap();
            check(&got, &want, format!("temporal {:?}", (b, c, co, t, s)));
        }
        let w = Tensor::zeros((32, 16, 3, 3), DType::F32, &dev).unwrap();
        assert!(Bf16Conv::spatial_3x3(&w, &Tensor::zeros(32, DType::F32, &dev).unwrap()).is_err());
    }
}
