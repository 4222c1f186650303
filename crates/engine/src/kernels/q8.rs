//! `y = x · Wᵀ` for `q8_0` weights with AVX-512 VNNI, with ggml's arithmetic: each row of `x` is
//! quantized to int8 per block of 32 (scale `max|x|/127`, rounded to f16), every block's
//! int8·int8 dot product is exact in i32 and scaled by both blocks' scales. candle's CPU
//! `QMatMul` computes the same sum with one dot product at a time; here `vpdpbusd` does 64
//! multiply-adds per instruction on a register tile of 8 rows × 16 output features.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so weights are stored plus 128 (unsigned)
//! and `128 · Σ x_q` of each block is subtracted again.

use super::contiguous_f32;
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

/// Whether this CPU runs [`Q8Matrix`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
        // Enough chunks of rows to keep both threads busy, each a whole number of tiles.
        let chunk = (m.div_ceil(4 * rayon::current_num_threads()).div_ceil(ROWS) * ROWS).clamp(ROWS, 256);
        out.par_chunks_mut(chunk * n).zip(x.par_chunks(chunk * k)).for_each(|(out, x)| {
            let rows = x.len() / k;
            let blocks = k / BLOCK;
            let mut xq = vec![0i8; rows * k];
            let mut xd = vec![0f32; rows * blocks];
            let mut corr = vec![0i32; rows * blocks];
            // SAFETY: `available()` was checked when this matrix was chosen (f16c comes with avx512f).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                quantize_rows(x, &mut xq, &mut xd, &mut corr)
            };
            for panel in 0..n.div_ceil(LANES) {
                let lanes = LANES.min(n - panel * LANES);
                let w = &self.packed[panel * blocks * PANEL_BLOCK..][..blocks * PANEL_BLOCK];
                let s = &self.scales[panel * blocks * LANES..][..blocks * LANES];
                let mut r = 0;
                while r < rows {
                    let tile = ROWS.min(rows - r);
                    let args = Tile {
                        blocks,
                        w,
                        s,
                        xq: &xq[r * k..],
                        xd: &xd[r * blocks..],
                        corr: &corr[r * blocks..],
                        k,
                        out: out[r * n + panel * LANES..].as_mut_ptr(),
                        n,
                        lanes,
                    };
                    // SAFETY: `available()` was checked when this matrix was chosen.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        if tile == ROWS {
                            tile_vnni::<ROWS>(args)
                        } else {
                            for i in 0..tile {
                                tile_vnni::<1>(args.offset_rows(i))
                            }
                        }
                    }
                    r += tile;
                }
            }
        });
    }
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

/// One register tile's operands: `ROWS` (or fewer) rows of quantized input against one panel.
#[derive(Clone, Copy)]
struct Tile<'a> {
    blocks: usize,
    w: &'a [u8],
    s: &'a [f32],
    xq: &'a [i8],
    xd: &'a [f32],
    corr: &'a [i32],
    k: usize,
    out: *mut f32,
    n: usize,
    lanes: usize,
}

impl Tile<'_> {
    fn offset_rows(self, i: usize) -> Self {
        Self {
            xq: &self.xq[i * self.k..],
            xd: &self.xd[i * self.blocks..],
            corr: &self.corr[i * self.blocks..],
            // SAFETY: row `i` of the tile is inside the output chunk.
            out: unsafe { self.out.add(i * self.n) },
            ..self
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..t.blocks {
        let wb = t.w.as_ptr().add(b * PANEL_BLOCK);
        let w: [__m512i; 8] = std::array::from_fn(|g| _mm512_loadu_si512(wb.add(g * 64).cast()));
        let ws = _mm512_loadu_ps(t.s.as_ptr().add(b * LANES));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = t.xq.as_ptr().add(r * t.k + b * BLOCK);
            let mut dot = _mm512_set1_epi32(-*t.corr.get_unchecked(r * t.blocks + b));
            for (g, w) in w.iter().enumerate() {
                let xg = _mm512_set1_epi32(x.add(g * 4).cast::<i32>().read_unaligned());
                dot = _mm512_dpbusd_epi32(dot, *w, xg);
            }
            let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*t.xd.get_unchecked(r * t.blocks + b)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
        }
    }
    let mask: __mmask16 = if t.lanes == LANES { 0xffff } else { (1u16 << t.lanes) - 1 };
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(t.out.add(r * t.n), mask, *acc);
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
}
