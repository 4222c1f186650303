//! Our own CPU kernels for the ops where candle's generic ones are slow, with the candle
//! composition kept as the reference path (other devices, other dtypes, and the tests).
//!
//! * [`group_norm`]: one pass for the statistics and one fused normalise + affine (+ SiLU) pass
//!   per (sample, group), groups spread over threads.
//! * [`attention`]: `softmax(q·kᵀ·scale)·v` over blocks of queries — scores for one block at a
//!   time (never the whole matrix), the softmax fused in between two GEMMs. On CUDA in f16/bf16,
//!   [`flash_attention`]: our fused kernel (`flash_attention.cu`).
//! * [`conv3x3`], [`temporal_conv`]: convolutions as GEMMs over shifted views of the input (no
//!   im2col matrix); [`geglu`]: the feed-forward gate with a vectorised erf.
//! * [`f32_matrix`], [`F32Conv`]: the f32 linear layers and 3×3 convolutions on our own AVX-512
//!   microkernels, weights packed at load (bias and GEGLU gate applied in the product); on
//!   large images the conv runs as Winograd F(2×2, 3×3), 2.25× fewer multiply-adds.
//! * [`amx`], [`amx_attention`]: the CPU bf16 mode's products on AMX tiles (linear layers,
//!   convolutions, attention); `q8`: int8 products on AVX-512 VNNI.
//!
//! Loops are written so LLVM vectorises them; they are compiled a second time with AVX-512 /
//! AVX2+FMA enabled and picked at run time. Every kernel has a test against the reference path
//! computed in f64.

use candle_core::{CpuStorage, Layout, Result};

/// Runs `f` compiled for the best instruction set this CPU has.
macro_rules! dispatch {
    ($vis:vis $name:ident, fn($($arg:ident: $ty:ty),*) $body:block) => {
        #[allow(clippy::too_many_arguments)] // a kernel's extents, each named
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the features were just detected.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

pub mod amx;
pub mod amx_attention;
mod attention;
mod conv;
pub mod cuda;
mod flash_attention;
pub mod f32_matrix;
mod geglu;
mod norm;
mod permute;
mod q8;

pub use attention::{attention, attention_chunked, attention_heads, attention_reference, heads_in_place, softmax_last_dim, MAX_SCORES};
pub use flash_attention::flash_attention;
pub use conv::{conv3x3, conv3x3_reference, conv3x3_taps, taps_first, temporal_conv, temporal_conv_reference, F32Conv};
pub use geglu::{geglu, geglu_reference};
pub(crate) use geglu::{gelu_erf, geglu_rows};
pub use permute::{permute, permute_reference};
pub use norm::{group_norm, group_norm_reference};
pub use q8::{Q8Conv, Q8Matrix};
pub use q8::available as q8_available;

/// ln 2 split in two (Cody–Waite): `n·LN2_HI` is exact for the `n` of an f32 exponent.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2^23: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
/// The argument range of [`fast_exp`]: below it the result is 0, above it clamped.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.0;

/// `e^x`, branch-free so it vectorises: `x = n·ln2 + r` (Cody–Waite split of ln 2, so large
/// |x| loses no precision), `e^r` by a degree-6 polynomial on |r| ≤ ln2/2, `2^n` through the
/// exponent bits. Relative error ≈ 2e-7; inputs below the normal range give 0.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    // Round to nearest by the MAGIC add/sub pair, which vectorises everywhere.
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from t's own bits (its low mantissa holds n, in [-126, 127] after the clamp): integer
    // lane arithmetic, where a float → int `as` cast would make LLVM go one element at a time.
    let e = p * f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    if x < EXP_MIN {
        0.0
    } else {
        e
    }
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

/// A layer's bias as f32 values for `n` outputs, zeros for a layer without one (`what` names the
/// kernel in the error).
pub(crate) fn bias_f32(bias: Option<&candle_core::Tensor>, n: usize, what: &str) -> Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; n],
    };
    if bias.len() != n {
        candle_core::bail!("{what}: bias of the wrong length for {n} outputs");
    }
    Ok(bias)
}

/// Room for `len` outputs: an empty `Vec` of that capacity whose pages, for a large buffer,
/// all threads fault in at once ahead of use (Linux's `MADV_POPULATE_WRITE`). A fresh buffer of
/// many megabytes otherwise takes a page fault per 4 KB inside the kernel that writes it; on
/// this project's VM those faults were a quarter of the softmax op's time.
pub(crate) fn output_buffer<T>(len: usize) -> Vec<T> {
    let buffer = Vec::with_capacity(len);
    populate(buffer.as_ptr() as usize, len * std::mem::size_of::<T>());
    buffer
}

/// From this size glibc maps every allocation fresh from the OS (its largest mmap threshold), so
/// all its pages fault; smaller buffers are mostly reused heap memory, already resident, and
/// populating them measured slower (a 21 MB output: +3–10 %).
const POPULATE_MIN_BYTES: usize = 32 << 20;

#[cfg(target_os = "linux")]
fn populate(start: usize, bytes: usize) {
    use rayon::prelude::*;
    const PAGE: usize = 4096;
    if bytes < POPULATE_MIN_BYTES {
        return;
    }
    // Whole pages inside the buffer only.
    let (first, end) = (start.next_multiple_of(PAGE), (start + bytes) / PAGE * PAGE);
    let part = (end - first).div_ceil(4 * rayon::current_num_threads()).next_multiple_of(PAGE);
    (first..end).into_par_iter().step_by(part).for_each(|a| {
        // SAFETY: the range lies inside an allocation this function's caller owns and has not
        // handed out; populating changes no contents. A kernel without MADV_POPULATE_WRITE
        // (before Linux 5.14) answers EINVAL, and the pages fault in on first write as before.
        unsafe { libc::madvise(a as *mut libc::c_void, part.min(end - a), libc::MADV_POPULATE_WRITE) };
    });
}

#[cfg(not(target_os = "linux"))]
fn populate(_: usize, _: usize) {}

/// The f32 data of a contiguous CPU input, from its start offset to its end.
pub(crate) fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: contiguous inputs only")
    }
    Ok(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// `dst (m×n) (+)= lhs (m×k) · rhs (k×n)` on raw strided f32 buffers, single-threaded (callers
/// parallelise over independent work).
///
/// # Safety
/// The pointers must cover the given extents with the given row/column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
) {
    gemm::gemm(
        m, n, k,
        dst, 1, dst_rs as isize, accumulate,
        lhs, lhs_cs as isize, lhs_rs as isize,
        rhs, 1, rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, gemm::Parallelism::None,
    )
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T = f32>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint output rows to rayon tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Tensor};

    /// Max error relative to max(1, max|want|), in f64.
    pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
        d / m
    }

    pub(crate) fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }

    /// Our kernel must stay at f32 rounding level: against the exact (f64) result it may err at
    /// most twice as much as candle's own f32 composition, plus 1e-6 of slack for inputs where
    /// candle happens to be exact.
    pub(crate) fn assert_f32_level(ours: &Tensor, candle: &Tensor, exact: &Tensor, what: &str) {
        let (e_ours, e_candle) = (max_rel(ours, exact), max_rel(candle, exact));
        assert!(e_ours <= 2.0 * e_candle + 1e-6, "{what}: ours {e_ours:e}, candle f32 {e_candle:e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for i in -1740..=1760 {
            let x = i as f32 * 0.05;
            let (got, want) = (fast_exp(x), x.exp());
            assert!(((got - want) / want).abs() < 5e-7, "{x}: {got} vs {want}");
        }
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        #[cfg(target_arch = "x86_64")]
        if f32_matrix::available() {
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
