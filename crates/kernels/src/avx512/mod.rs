//! Hand-written AVX-512 kernels (F, BW, VL): the linear layers in f32 ([`F32Matrix`]) and in
//! bf16 pairs on AVX512-BF16 ([`Bf16DotMatrix`]) and the f32 3×3 convolutions ([`F32Conv`]),
//! with weights packed at load, attention with its products in bf16 pairs ([`attention`]), and
//! the register-level helpers the AMX kernels share (the 16×16 transpose, the channels-last
//! pixel load, the softmax row).

pub mod attention;
mod conv;
mod matrix;

pub use conv::{Bf16DotConv, Bf16DotTemporalConv, F32Conv};
pub use matrix::{Bf16DotMatrix, F32Matrix};

use crate::common::{EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, MAGIC};

/// Whether the process may run these kernels ([`crate::cpu::features`]).
pub fn available() -> bool {
    crate::cpu::features().avx512
}

/// 16 f32, 64-byte aligned: packed weights are vectors of these so every panel row is one
/// aligned cache line per vector.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Lanes(pub(crate) [f32; 16]);

/// Packed lanes as the 32-bit values the microkernels read.
pub(crate) fn lanes(l: &[Lanes]) -> &[u32] {
    // SAFETY: `Lanes` is 16 plain 32-bit values (`repr(C)`, no padding).
    unsafe { std::slice::from_raw_parts(l.as_ptr().cast(), l.len() * 16) }
}

/// [`lanes`], to pack into.
pub(crate) fn lanes_mut(l: &mut [Lanes]) -> &mut [u32] {
    // SAFETY: as in `lanes`; any bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr().cast(), l.len() * 16) }
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

/// [`fast_exp`] of 16 lanes with fused multiply-adds (Rust never fuses `a·b + c` itself, and
/// `mul_add` is a library call on CPUs without FMA, so the portable loop cannot use them). Called
/// from code without AVX-512F, it needs `unsafe` and the feature detected.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn fast_exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let xc = _mm512_max_ps(_mm512_min_ps(x, c(EXP_MAX)), c(EXP_MIN));
    let t = _mm512_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(MAGIC));
    let n = _mm512_sub_ps(t, c(MAGIC));
    let r = _mm512_fnmadd_ps(n, c(LN2_LO), _mm512_fnmadd_ps(n, c(LN2_HI), xc));
    let p = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0].into_iter().fold(c(1.0 / 720.0), |p, k| _mm512_fmadd_ps(p, r, c(k)));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(MAGIC.to_bits() as i32)), _mm512_set1_epi32(127)));
    let e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, c(EXP_MIN)), _mm512_setzero_ps())
}

/// Each row (`width` values) replaced by its softmax numerators, with `scale` applied to the
/// logits; their sums into `sums` (what the portable loop does, faster).
///
/// # Safety
/// AVX-512F must be available ([`available`]).
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn softmax_rows(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]) {
    for (row, s) in rows.chunks_exact_mut(width).zip(sums.iter_mut()) {
        *s = softmax_row(row, scale);
    }
}

/// One row of [`softmax_rows`]: masked loads for the row's tail and fused multiply-adds in the
/// exponential ([`fast_exp16`]), where the portable loop needs separate multiplies and adds.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let (p, full, rest) = (row.as_mut_ptr(), row.len() / 16 * 16, row.len() % 16);
    let tail: __mmask16 = ((1u32 << rest) - 1) as u16;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
    }
    m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, p.add(full)));
    let (scale, max) = (_mm512_set1_ps(scale), _mm512_set1_ps(_mm512_reduce_max_ps(m) * scale));
    let mut sum = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = fast_exp16(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), scale, max));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if rest > 0 {
        let e = fast_exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), scale, max));
        _mm512_mask_storeu_ps(p.add(full), tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    _mm512_reduce_add_ps(sum)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp16_is_accurate() {
        if !available() {
            eprintln!("no AVX-512 on this machine (or capped): nothing to check");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            for i in (-1760..=1776).step_by(16) {
                let x: [f32; 16] = std::array::from_fn(|j| (i + j as i32) as f32 * 0.05);
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F was just detected.
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), fast_exp16(_mm512_loadu_ps(x.as_ptr()))) };
                for (&x, got) in x.iter().zip(got) {
                    let want = if x < EXP_MIN { 0.0 } else { x.min(EXP_MAX).exp() };
                    assert!((got - want).abs() <= 5e-7 * want, "{x}: {got} vs {want}");
                }
            }
        }
    }
}
