//! `y = x · Wᵀ` for `q8_0` weights with AVX-512 VNNI, with ggml's arithmetic: each row of `x` is
//! quantized to int8 per block of 32 (scale `max|x|/127`, rounded to f16), every block's
//! int8·int8 dot product is exact in i32 and scaled by both blocks' scales. candle's CPU
//! `QMatMul` computes the same sum with one dot product at a time; here `vpdpbusd` does 64
//! multiply-adds per instruction on a register tile of 8 rows × 16 output features.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so weights are stored plus 128 (unsigned)
//! and `128 · Σ x_q` of each block is subtracted again.

use crate::common::contiguous_f32;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Output features per register tile (one zmm of i32 lanes).
const LANES: usize = 16;
/// Rows per register tile.
const ROWS: usize = 8;
/// Bytes of one packed block of a panel: 32 weights × 16 features.
const PANEL_BLOCK: usize = BLOCK * LANES;

/// Whether the process may run [`Q8Matrix`] and [`Q8Conv`] ([`crate::cpu::features`]).
pub fn available() -> bool {
    crate::cpu::features().avx512_vnni
}

/// A `q8_0` weight `[rows, cols]` repacked for the VNNI kernel.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Per panel of 16 rows, per block, per group of 4 columns: 16 lanes × 4 bytes (weight + 128).
    packed: Vec<u8>,
    /// Per panel, per block: the 16 rows' scales (0 for padding rows).
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Repacks a `q8_0` `QTensor` of shape `[rows, cols]`.
    pub fn new(w: &QTensor) -> Result<Self> {
        if !available() {
            candle_core::bail!("q8 matrix: this CPU offers no AVX-512 VNNI (or it is capped)")
        }
        let &[rows, cols] = w.shape().dims() else { candle_core::bail!("q8 matrix: 2-D weights only") };
        if w.dtype() != GgmlDType::Q8_0 {
            candle_core::bail!("q8 matrix: q8_0 weights only, got {:?}", w.dtype())
        }
        let data = w.data()?;
        let blocks = cols / BLOCK;
        let panels = rows.div_ceil(LANES);
        // Padding rows: weight 0 (stored 128) and scale 0.
        let mut packed = vec![128u8; panels * blocks * PANEL_BLOCK];
        let mut scales = vec![0f32; panels * blocks * LANES];
        for row in 0..rows {
            let (panel, lane) = (row / LANES, row % LANES);
            for b in 0..blocks {
                let block = &data[(row * blocks + b) * 34..][..34];
                scales[(panel * blocks + b) * LANES + lane] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let dst = &mut packed[(panel * blocks + b) * PANEL_BLOCK..][..PANEL_BLOCK];
                for (i, &q) in block[2..].iter().enumerate() {
                    let (group, j) = (i / 4, i % 4);
                    dst[group * LANES * 4 + lane * 4 + j] = (q as i8 as i16 + 128) as u8;
                }
            }
        }
        Ok(Self { rows, cols, packed, scales })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for f32 `x` of shape `(…, cols)` on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims().last() != Some(&self.cols) {
            candle_core::bail!("q8 matmul: input {:?}, weight [{}, {}]", x.dims(), self.rows, self.cols)
        }
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.cols, self.rows);
        let blocks = k / BLOCK;
        let x_off: Vec<usize> = (0..blocks).map(|b| b * BLOCK).collect();
        let s_off: Vec<usize> = (0..blocks).collect();
        // Enough chunks of rows to keep both threads busy, each a whole number of tiles.
        let chunk = (m.div_ceil(4 * rayon::current_num_threads()).div_ceil(ROWS) * ROWS).clamp(ROWS, 256);
        out.par_chunks_mut(chunk * n).zip(x.par_chunks(chunk * k)).for_each(|(out, x)| {
            let rows = x.len() / k;
            let mut q = QuantizedRows::new(rows, k);
            q.quantize(x);
            let g = Gather { x: &q.x, x_rs: k, x_off: &x_off, d: &q.d, corr: &q.corr, s_rs: blocks, s_off: &s_off };
            // SAFETY: `out` holds `rows` rows of `n`; the offsets stay inside `q`.
            unsafe { self.product(&g, 0, rows, out.as_mut_ptr(), n) };
        });
    }

    /// `out[p][·] = Σ_b` block `b` of input row `p` (as `g` places it) · panel blocks, for rows
    /// `row0..row0 + rows`; `out` points at row `row0`'s output, rows `out_rs` apart.
    ///
    /// # Safety
    /// `g`'s offsets must stay inside its buffers for these rows, `out` must hold the rows, and
    /// the CPU must have the features of [`available`].
    unsafe fn product(&self, g: &Gather, row0: usize, rows: usize, out: *mut f32, out_rs: usize) {
        let blocks = self.cols / BLOCK;
        for panel in 0..self.rows.div_ceil(LANES) {
            let lanes = LANES.min(self.rows - panel * LANES);
            let w = &self.packed[panel * blocks * PANEL_BLOCK..][..blocks * PANEL_BLOCK];
            let s = &self.scales[panel * blocks * LANES..][..blocks * LANES];
            let panel_out = out.add(panel * LANES);
            let mut r = 0;
            while r < rows {
                let tile = ROWS.min(rows - r);
                #[cfg(target_arch = "x86_64")]
                if tile == ROWS {
                    tile_vnni::<ROWS>(w, s, g, row0 + r, panel_out.add(r * out_rs), out_rs, lanes)
                } else {
                    for i in 0..tile {
                        tile_vnni::<1>(w, s, g, row0 + r + i, panel_out.add((r + i) * out_rs), out_rs, lanes)
                    }
                }
                r += tile;
            }
        }
    }
}

/// Rows of input quantized per block of 32: int8 values, scales, and `128 · Σ q` per block.
struct QuantizedRows {
    x: Vec<i8>,
    d: Vec<f32>,
    corr: Vec<i32>,
}

impl QuantizedRows {
    fn new(rows: usize, k: usize) -> Self {
        Self { x: vec![0; rows * k], d: vec![0.0; rows * k / BLOCK], corr: vec![0; rows * k / BLOCK] }
    }

    fn quantize(&mut self, x: &[f32]) {
        // SAFETY: only built where `available()` holds (f16c comes with avx512f).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            quantize_rows(x, &mut self.x, &mut self.d, &mut self.corr)
        }
    }
}

/// Where block `b` of row `p` reads its quantized input: bytes from `x[p·x_rs + x_off[b]]`,
/// scale and correction at `p·s_rs + s_off[b]`. A linear layer reads its rows in place; a
/// convolution reads neighbouring rows (pixels) for each tap.
struct Gather<'a> {
    x: &'a [i8],
    x_rs: usize,
    x_off: &'a [usize],
    d: &'a [f32],
    corr: &'a [i32],
    s_rs: usize,
    s_off: &'a [usize],
}

impl CustomOp1 for Q8Matrix {
    fn name(&self) -> &'static str {
        "dc-q8-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, layout)?;
        let m = x.len() / self.cols;
        let mut out = vec![0f32; m * self.rows];
        self.matmul(x, m, &mut out);
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("checked in forward") = self.rows;
        Ok((CpuStorage::F32(out), dims.into()))
    }
}

/// ggml's `q8_0` quantization of each row, per block: `d = max|x|/127`, `q = round(x/d)` (half
/// away from zero, as `roundf`), `d` kept as f16; also `128 · Σ q` per block for the
/// unsigned-weight correction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn quantize_rows(x: &[f32], xq: &mut [i8], xd: &mut [f32], corr: &mut [i32]) {
    use std::arch::x86_64::*;
    let half = _mm512_set1_ps(0.5);
    let sign_bit = _mm512_set1_ps(-0.0);
    for (i, (d, c)) in xd.iter_mut().zip(corr.iter_mut()).enumerate() {
        let src = x.as_ptr().add(i * BLOCK);
        let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let round = |v: __m512| {
            let t = _mm512_mul_ps(v, inv);
            let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let frac = _mm512_abs_ps(_mm512_sub_ps(t, whole));
            // ±1 where the dropped fraction is at least a half.
            let step = _mm512_or_ps(_mm512_and_ps(t, sign_bit), _mm512_set1_ps(1.0));
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            _mm512_cvtps_epi32(_mm512_mask_add_ps(whole, up, whole, step))
        };
        let (qlo, qhi) = (round(lo), round(hi));
        let dst = xq.as_mut_ptr().add(i * BLOCK);
        _mm_storeu_si128(dst.cast(), _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128(dst.add(16).cast(), _mm512_cvtepi32_epi8(qhi));
        *c = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        *d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(scale))));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_vnni<const R: usize>(w: &[u8], s: &[f32], g: &Gather, row0: usize, out: *mut f32, out_rs: usize, lanes: usize) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, (&x_off, &s_off)) in g.x_off.iter().zip(g.s_off).enumerate() {
        let wb = w.as_ptr().add(b * PANEL_BLOCK);
        let wv: [__m512i; 8] = std::array::from_fn(|i| _mm512_loadu_si512(wb.add(i * 64).cast()));
        let ws = _mm512_loadu_ps(s.as_ptr().add(b * LANES));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = g.x.as_ptr().add((row0 + r) * g.x_rs + x_off);
            let si = (row0 + r) * g.s_rs + s_off;
            let mut dot = _mm512_set1_epi32(-*g.corr.get_unchecked(si));
            for (i, wv) in wv.iter().enumerate() {
                let xg = _mm512_set1_epi32(x.add(i * 4).cast::<i32>().read_unaligned());
                dot = _mm512_dpbusd_epi32(dot, *wv, xg);
            }
            let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*g.d.get_unchecked(si)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
        }
    }
    let mask: __mmask16 = if lanes == LANES { 0xffff } else { (1u16 << lanes) - 1 };
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(r * out_rs), mask, *acc);
    }
}

/// Which convolution a [`Q8Conv`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvKind {
    /// 3×3, stride 1, padding 1 over `(n, c, h, w)`.
    Spatial3x3,
    /// Kernel (3, 1, 1), padding (1, 0, 0) over `(b, c, t, h·w)`: three taps over time.
    Temporal3,
}

/// How a convolution's taps read the quantized input. Input rows: the zero-padded input's
/// pixels; output rows: the pixels each tap's shift lands on.
struct RowGeometry {
    in_rows: usize,
    out_rows: usize,
    /// Row offset of each tap.
    shifts: Vec<usize>,
    /// The input pixel an input row holds (`None`: padding).
    pixel_of_in_row: Box<dyn Fn(usize) -> Option<usize> + Sync>,
    /// The output row an output pixel is computed in.
    out_row: Box<dyn Fn(usize) -> usize + Sync>,
}

impl ConvKind {
    /// For an `h × w` input: 3×3 reads the padded image (+2 slack rows the last taps read) and
    /// computes outputs on the padded-width grid, two extra columns per row dropped at the end;
    /// temporal (`h` frames of `w` pixels) has one zero frame before and after.
    fn geometry(self, h: usize, wd: usize) -> RowGeometry {
        match self {
            ConvKind::Spatial3x3 => {
                let wp = wd + 2;
                RowGeometry {
                    in_rows: (h + 2) * wp + 2,
                    out_rows: h * wp,
                    shifts: (0..9).map(|t| (t / 3) * wp + t % 3).collect(),
                    pixel_of_in_row: Box::new(move |r| {
                        let (yy, xx) = ((r / wp).checked_sub(1)?, (r % wp).checked_sub(1)?);
                        (yy < h && xx < wd).then_some(yy * wd + xx)
                    }),
                    out_row: Box::new(move |p| (p / wd) * wp + p % wd),
                }
            }
            ConvKind::Temporal3 => RowGeometry {
                in_rows: (h + 2) * wd,
                out_rows: h * wd,
                shifts: vec![0, wd, 2 * wd],
                pixel_of_in_row: Box::new(move |r| r.checked_sub(wd).filter(|&p| p < h * wd)),
                out_row: Box::new(|p| p),
            },
        }
    }
}

/// A convolution with int8 weights: its taps are one product over `taps·c` with blocks
/// ordered (tap, channel block), each tap reading the quantized input rows (pixels, channels
/// last) shifted by the tap's offset in the zero-padded input.
#[derive(Debug, Clone)]
pub struct Q8Conv {
    weight: Q8Matrix,
    bias: Vec<f32>,
    channels: usize,
    kind: ConvKind,
}

impl Q8Conv {
    /// A 3×3 conv from float weights `(co, c, 3, 3)` (quantized here) and bias `(co)`.
    pub fn spatial_3x3(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, ConvKind::Spatial3x3)
    }

    /// The temporal conv from float weights `(co, c, 3, 1, 1)` and bias `(co)`. Slower than the
    /// f32 kernel at the UNet's shapes (the channels-last gather and the transpose back
    /// cost more than the int8 product saves), so the UNet does not use it; `bench ops` times it.
    pub fn temporal(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, ConvKind::Temporal3)
    }

    fn new(w: &Tensor, bias: &Tensor, kind: ConvKind) -> Result<Self> {
        let (co, c) = (w.dim(0)?, w.dim(1)?);
        let taps = w.elem_count() / (co * c);
        let expected = match kind {
            ConvKind::Spatial3x3 => vec![co, c, 3, 3],
            ConvKind::Temporal3 => vec![co, c, 3, 1, 1],
        };
        if w.dims() != expected.as_slice() || c % BLOCK != 0 {
            candle_core::bail!("int8 conv: weights {:?}, expected {expected:?} with a multiple of {BLOCK} channels", w.dims())
        }
        let taps_last = w.to_dtype(candle_core::DType::F32)?.reshape((co, c, taps))?.transpose(1, 2)?.contiguous()?.reshape((co, taps * c))?;
        let weight = Q8Matrix::new(&QTensor::quantize(&taps_last, GgmlDType::Q8_0)?)?;
        Ok(Self { weight, bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1()?, channels: c, kind })
    }

    /// `x`: `(n, c, h, w)` for a 3×3 conv, `(b, c, t, s)` for the temporal one; f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != self.channels {
            candle_core::bail!("int8 conv: input {:?}, {} channels expected", x.dims(), self.channels)
        }
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Q8Conv {
    fn name(&self) -> &'static str {
        "dc-q8-conv"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, layout)?;
        let (n, c, h, wd) = layout.shape().dims4()?;
        let co = self.weight.rows;
        let pixels = h * wd;
        let RowGeometry { in_rows, out_rows, shifts, pixel_of_in_row, out_row } = self.kind.geometry(h, wd);
        let cb = c / BLOCK;
        let blocks = shifts.len() * cb;
        let x_off: Vec<usize> = (0..blocks).map(|b| shifts[b / cb] * c + (b % cb) * BLOCK).collect();
        let s_off: Vec<usize> = (0..blocks).map(|b| shifts[b / cb] * cb + b % cb).collect();

        // Channels-last quantized input of every sample, built in chunks of rows on all threads.
        const GATHER: usize = 64;
        let mut q = QuantizedRows::new(n * in_rows, c);
        q.x.par_chunks_mut(in_rows * c)
            .zip(q.d.par_chunks_mut(in_rows * cb))
            .zip(q.corr.par_chunks_mut(in_rows * cb))
            .enumerate()
            .for_each(|(ni, ((xq, d), corr))| {
                let planes = &x[ni * c * pixels..][..c * pixels];
                xq.par_chunks_mut(GATHER * c)
                    .zip(d.par_chunks_mut(GATHER * cb))
                    .zip(corr.par_chunks_mut(GATHER * cb))
                    .enumerate()
                    .for_each(|(chunk, ((xq, d), corr))| {
                        let r0 = chunk * GATHER;
                        let rows = xq.len() / c;
                        let mut buf = vec![0f32; rows * c];
                        let pix: Vec<Option<usize>> = (r0..r0 + rows).map(&pixel_of_in_row).collect();
                        for (ci, plane) in planes.chunks_exact(pixels).enumerate() {
                            for (i, p) in pix.iter().enumerate() {
                                if let Some(p) = *p {
                                    buf[i * c + ci] = plane[p];
                                }
                            }
                        }
                        // SAFETY: only built where `available()` holds (f16c comes with avx512f).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            quantize_rows(&buf, xq, d, corr)
                        }
                    });
            });

        const CHUNK: usize = 64;
        let chunks = out_rows.div_ceil(CHUNK);
        let mut grid = vec![0f32; n * out_rows * co];
        let grid_ptr = crate::common::SendPtr(grid.as_mut_ptr());
        (0..n * chunks).into_par_iter().for_each(|task| {
            let (ni, chunk) = (task / chunks, task % chunks);
            let (xs, ss) = (ni * in_rows * c, ni * in_rows * cb);
            let g = Gather { x: &q.x[xs..], x_rs: c, x_off: &x_off, d: &q.d[ss..], corr: &q.corr[ss..], s_rs: cb, s_off: &s_off };
            let row0 = chunk * CHUNK;
            let rows = CHUNK.min(out_rows - row0);
            // SAFETY: disjoint output rows per task; the largest shift stays inside the input rows.
            unsafe {
                let out = grid_ptr.get().add((ni * out_rows + row0) * co);
                self.weight.product(&g, row0, rows, out, co)
            }
        });

        let mut y = vec![0f32; n * co * pixels];
        y.par_chunks_mut(pixels).enumerate().for_each(|(plane, out)| {
            let (ni, o) = (plane / co, plane % co);
            let bias = self.bias[o];
            let src = &grid[ni * out_rows * co..];
            for (p, v) in out.iter_mut().enumerate() {
                *v = src[out_row(p) * co + o] + bias;
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((n, co, h, wd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    #[test]
    fn equals_candles_q8_0_matmul() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 32, 1), (7, 64, 15), (8, 96, 16), (77, 320, 33), (130, 1280, 40), (9, 32, 320)] {
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let ours = Q8Matrix::new(&q).unwrap().forward(&x).unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
            assert_eq!(ours.dims(), [1, m, n]);
            let err = (&ours - &candle).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = candle.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            // The same integer dot products and scales; only the f32 summation order differs.
            assert!(err <= 1e-5 * scale * (k as f32 / 32.0).sqrt(), "{m}×{k}×{n}: {err} of {scale}");
        }
    }

    /// The int8 conv equals the f32 conv of its own dequantized weights and of the input rounded
    /// to int8 per (pixel, block of 32 channels) — i.e. only the int8 rounding differs.
    #[test]
    fn conv3x3_equals_the_float_conv_of_the_int8_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in &[(1, 32, 16, 1, 1), (2, 32, 20, 5, 7), (3, 64, 33, 9, 4), (1, 96, 48, 16, 16)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.1, co, &dev).unwrap();
            let got = Q8Conv::spatial_3x3(&wt, &bias).unwrap().forward(&x).unwrap();
            // The int8 values as floats: weights in (tap, channel) blocks, input per pixel.
            let taps_last = wt.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((co, 9 * c)).unwrap();
            let wq = QTensor::quantize(&taps_last, GgmlDType::Q8_0).unwrap().dequantize(&dev).unwrap();
            let wq = wq.reshape((co, 3, 3, c)).unwrap().permute((0, 3, 1, 2)).unwrap();
            let pixels = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((n * h * w, c)).unwrap();
            let xq = QTensor::quantize(&pixels, GgmlDType::Q8_0).unwrap().dequantize(&dev).unwrap();
            let xq = xq.reshape((n, h, w, c)).unwrap().permute((0, 3, 1, 2)).unwrap();
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            let want = f(&xq).conv2d(&f(&wq), 1, 1, 1, 1).unwrap().broadcast_add(&f(&bias).reshape((1, co, 1, 1)).unwrap()).unwrap();
            let err = crate::common::testing::max_rel(&got, &want);
            assert!(err < 1e-5, "{:?}: {err:e}", (n, c, co, h, w));
        }
    }

    #[test]
    fn temporal_conv_equals_the_float_conv_of_the_int8_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let dev = Device::Cpu;
        for &(b, c, co, t, s) in &[(1, 32, 16, 1, 1), (2, 32, 20, 4, 6), (1, 64, 40, 16, 9)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, s), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.1, co, &dev).unwrap();
            let got = Q8Conv::temporal(&wt, &bias).unwrap().forward(&x).unwrap();
            let taps_last = wt.reshape((co, c, 3)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((co, 3 * c)).unwrap();
            let wq = QTensor::quantize(&taps_last, GgmlDType::Q8_0).unwrap().dequantize(&dev).unwrap();
            let wq = wq.reshape((co, 3, c)).unwrap().transpose(1, 2).unwrap().reshape((co, c, 3, 1, 1)).unwrap();
            let rows = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((b * t * s, c)).unwrap();
            let xq = QTensor::quantize(&rows, GgmlDType::Q8_0).unwrap().dequantize(&dev).unwrap();
            let xq = xq.reshape((b, t, s, c)).unwrap().permute((0, 3, 1, 2)).unwrap();
            let f = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            let want = crate::temporal_conv_reference(&f(&xq), &f(&wq), &f(&bias)).unwrap();
            let err = crate::common::testing::max_rel(&got, &want);
            assert!(err < 1e-5, "{:?}: {err:e}", (b, c, co, t, s));
        }
    }
}
