//! The temporal (3, 1, 1) convolution in bf16 pairs on AVX512-BF16 ([`Bf16DotTemporalConv`]):
//! per output frame t, `y[:, t] = bias + Σ_tap W_tap · x[:, t + tap − 1]` (a tap whose frame
//! lies outside the clip reads zeros, so it is skipped), a product of the weights (rows, packed
//! at load in the pair microkernel's row tiles) and the frames' pixels (columns, packed on each
//! call in panels of 64 pixels), run by the matrices' pair microkernel. With one tap it is the
//! 1×1 convolution of `(n, c, h, w)` images (the UNet's skip connections).

use super::super::matrix::{Bf16Pairs, Format, Start};
use super::super::{lanes_mut, Lanes};
use crate::common::{bf16_bits, output_buffer, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Pixels per panel (the microkernel's four vectors).
const PANEL: usize = 64;
/// Output channels per microkernel call.
const MR: usize = 6;
/// Channel pairs per slice of the depth: a slice of a panel (KC × 64 lanes, 32 KB) stays in L1
/// while the microkernel walks every output channel.
const KC: usize = 128;

/// A temporal convolution `(co, c, 3, 1, 1)` (or, [`pointwise`](Self::pointwise), a 1×1 one)
/// with its weights in bf16 pairs, for `(b, c, t, h·w)` f32 inputs.
#[derive(Clone)]
pub struct Bf16DotTemporalConv {
    /// Per tap, the weights `W_tap (co × c)` as the pair microkernel reads rows
    /// (`Bf16Pairs::pack_rows`), rounded up to whole tiles of 6 output channels.
    taps: Vec<u32>,
    bias: Vec<f32>,
    co: usize,
    c: usize,
    /// Taps along t: 3, or 1 for a pointwise convolution.
    kt: usize,
}

impl std::fmt::Debug for Bf16DotTemporalConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16DotTemporalConv[{}, {}, {}, 1, 1]", self.co, self.c, self.kt)
    }
}

impl Bf16DotTemporalConv {
    /// Whether this CPU runs it (AVX512-BF16 with AVX-512).
    pub fn supports() -> bool {
        Bf16Pairs::available()
    }

    fn steps(&self) -> usize {
        self.c.div_ceil(2)
    }

    fn tap_len(&self) -> usize {
        self.co.div_ceil(MR) * MR * self.steps()
    }

    /// Packs `w (co, c, 3, 1, 1)`; `bias (co)`.
    pub fn new(w: &Tensor, bias: &Tensor) -> Result<Self> {
        let (co, c, kt, kh, kw) = w.dims5()?;
        if (kt, kh, kw) != (3, 1, 1) {
            candle_core::bail!("bf16 pair temporal conv: weight {:?}: needs a (3, 1, 1) conv", w.dims());
        }
        Self::with_taps(w, bias, co, c, 3)
    }

    /// Packs the 1×1 convolution `w (co, c, 1, 1)`, `bias (co)`, for [`forward_2d`](Self::forward_2d).
    pub fn pointwise(w: &Tensor, bias: &Tensor) -> Result<Self> {
        let (co, c, kh, kw) = w.dims4()?;
        if (kh, kw) != (1, 1) {
            candle_core::bail!("bf16 pair pointwise conv: weight {:?}: needs a 1×1 conv", w.dims());
        }
        Self::with_taps(w, bias, co, c, 1)
    }

    fn with_taps(w: &Tensor, bias: &Tensor, co: usize, c: usize, kt: usize) -> Result<Self> {
        if bias.dims1()? != co || !Self::supports() {
            candle_core::bail!("bf16 pair conv: weight {:?} / bias {:?}: needs {co} biases and a CPU with AVX512-BF16", w.dims(), bias.dims());
        }
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut conv = Self { taps: Vec::new(), bias: bias.to_dtype(DType::F32)?.to_vec1()?, co, c, kt };
        let tap_len = conv.tap_len();
        conv.taps = vec![0u32; kt * tap_len];
        for (tap, packed) in conv.taps.chunks_exact_mut(tap_len).enumerate() {
            let rows: Vec<f32> = (0..co * c).map(|i| w[i * kt + tap]).collect();
            Bf16Pairs::pack_rows(&rows, c, packed);
        }
        Ok(conv)
    }

    /// A [`pointwise`](Self::pointwise) convolution of `x (n, c, h, w)` f32 on the CPU →
    /// `(n, co, h, w)`.
    pub fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if self.kt != 1 {
            candle_core::bail!("bf16 pair conv: forward_2d is for 1×1 convolutions, this one has {} taps", self.kt);
        }
        self.forward(&x.reshape((n, c, 1, h * w))?)?.reshape((n, self.co, h, w))
    }

    /// `x (b, c, t, h·w)` f32 on the CPU → `(b, co, t, h·w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, hw) = x.dims4()?;
        if c != self.c || x.dtype() != DType::F32 || !x.device().is_cpu() || !Self::supports() {
            candle_core::bail!("bf16 pair temporal conv: input {:?} {:?} on {:?}, expected f32 (b, {}, t, h·w) on a CPU with AVX512-BF16", x.dims(), x.dtype(), x.device(), self.c);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("bf16 pair temporal conv: input not on the CPU") };
        let start = layout.start_offset();
        let xs = &cpu.as_slice::<f32>()?[start..start + b * c * t * hw];
        let (co, steps) = (self.co, self.steps());
        let panels = hw.div_ceil(PANEL);

        // Every frame's pixels in pair panels, `[b][t][panel][step][64]`, zeros past the frame's
        // pixels and (odd c) the last channel.
        let frame_len = panels * steps * PANEL;
        // 64-byte aligned, as the microkernel's loads of a panel need.
        let mut lanes = vec![Lanes([0.0; 16]); b * t * frame_len / 16];
        let packed = lanes_mut(&mut lanes);
        packed.par_chunks_mut(frame_len).enumerate().for_each(|(bt, frame)| {
            let (bi, ti) = (bt / t, bt % t);
            let channel = |ci: usize| &xs[((bi * c + ci) * t + ti) * hw..][..hw];
            for s in 0..steps {
                let (even, odd) = (channel(2 * s), (2 * s + 1 < c).then(|| channel(2 * s + 1)));
                for p in 0..panels {
                    let (p0, p1) = (p * PANEL, ((p + 1) * PANEL).min(hw));
                    let dst = &mut frame[(p * steps + s) * PANEL..][..p1 - p0];
                    pair_lanes(&even[p0..p1], odd.map(|o| &o[p0..p1]), dst);
                }
            }
        });

        // Tasks: (clip, output frame, panel); each makes its block of all output channels × 64
        // pixels in a scratch (rows 64 apart) and copies the frame's pixels out.
        let tap_len = self.tap_len();
        let mut y = output_buffer::<f32>(b * co * t * hw);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..b * t * panels).into_par_iter().for_each_init(
            || vec![0f32; co.div_ceil(MR) * MR * PANEL],
            |block, task| {
                let (bt, p) = (task / panels, task % panels);
                let (bi, ti) = (bt / t, bt % t);
                let mut first = true;
                for tap in 0..self.kt {
                    let Some(frame) = (ti + tap).checked_sub(self.kt / 2).filter(|&f| f < t) else { continue };
                    let a: &[u32] = &packed[((bi * t + frame) * panels + p) * steps * PANEL..][..steps * PANEL];
                    let w = &self.taps[tap * tap_len..][..tap_len];
                    for s0 in (0..steps).step_by(KC) {
                        let depth = KC.min(steps - s0);
                        for r0 in (0..co).step_by(MR) {
                            let start = if first && s0 == 0 { Start::Rows(self.bias[r0..].as_ptr()) } else { Start::Load };
                            // SAFETY: AVX512-BF16 is available (checked above); `a` holds
                            // steps × 64 lanes, `w` the row tiles (6 rows × steps each), and
                            // `block` rows r0..r0+6 of 64 values.
                            unsafe {
                                let b = w[r0 * steps + s0..].as_ptr();
                                Bf16Pairs::tile(MR.min(co - r0), a[s0 * PANEL..].as_ptr(), b, steps, depth, block[r0 * PANEL..].as_mut_ptr(), PANEL, start)
                            };
                        }
                    }
                    first = false;
                }
                let (p0, p1) = (p * PANEL, ((p + 1) * PANEL).min(hw));
                for o in 0..co {
                    // SAFETY: the task alone writes pixels p0..p1 of frame ti of clip bi.
                    unsafe {
                        let dst = y_ptr.get().add(((bi * co + o) * t + ti) * hw + p0);
                        std::ptr::copy_nonoverlapping(block[o * PANEL..].as_ptr(), dst, p1 - p0);
                    }
                }
            },
        );
        drop(storage);
        drop(lanes);
        // SAFETY: the tasks together wrote every output (every frame, panel and channel).
        unsafe { y.set_len(b * co * t * hw) };
        Tensor::from_vec(y, (b, co, t, hw), &candle_core::Device::Cpu)
    }
}

dispatch!(pair_lanes, fn(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
    // Channel 2s in the low half of each lane, 2s + 1 in the high half (`vdpbf16ps`'s order).
    match odd {
        Some(odd) => {
            for ((d, &e), &o) in dst.iter_mut().zip(even).zip(odd) {
                *d = bf16_bits(e) as u32 | (bf16_bits(o) as u32) << 16;
            }
        }
        None => {
            for (d, &e) in dst.iter_mut().zip(even) {
                *d = bf16_bits(e) as u32;
            }
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::f64;
    use candle_core::Device;

    /// Against the f64 temporal conv of the same bf16-rounded operands: equal up to f32 sums.
    /// Odd channel counts, pixels past whole panels, one and two frames.
    #[test]
    fn matches_f64_on_rounded_inputs() {
        if !Bf16DotTemporalConv::supports() {
            eprintln!("no AVX512-BF16 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        for &(b, c, co, t, hw) in &[(1, 3, 5, 1, 7), (2, 7, 13, 2, 64), (1, 64, 64, 16, 100), (2, 320, 320, 5, 16), (1, 33, 40, 3, 130)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, hw), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = Bf16DotTemporalConv::new(&w, &bias).unwrap().forward(&x).unwrap();
            let want = crate::temporal_conv_reference(&round(&x), &round(&w), &f64(&bias)).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "{:?}: max error {diff:.2e} (scale {scale:.2e})", (b, c, co, t, hw));
        }
    }

    /// With one tap: the 1×1 convolution of images, against candle's conv2d in f64 of the
    /// same rounded operands.
    #[test]
    fn pointwise_matches_f64_on_rounded_inputs() {
        if !Bf16DotTemporalConv::supports() {
            eprintln!("no AVX512-BF16 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        for &(n, c, co, h, w) in &[(1, 3, 5, 1, 7), (2, 7, 13, 8, 8), (3, 640, 320, 4, 4), (2, 33, 40, 13, 11)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let conv = Bf16DotTemporalConv::pointwise(&wt, &bias).unwrap();
            let got = conv.forward_2d(&x).unwrap();
            let want = round(&x).conv2d(&round(&wt), 0, 1, 1, 1).unwrap().broadcast_add(&f64(&bias).reshape((1, co, 1, 1)).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "{:?}: max error {diff:.2e} (scale {scale:.2e})", (n, c, co, h, w));
        }
        let temporal = Tensor::zeros((4, 4, 3, 1, 1), DType::F32, &dev).unwrap();
        let conv = Bf16DotTemporalConv::new(&temporal, &Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap();
        assert!(conv.forward_2d(&Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap()).is_err());
    }
}
