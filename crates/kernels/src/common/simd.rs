//! Plain loops written so LLVM vectorises them, compiled once more per instruction set by
//! [`dispatch!`], and the branch-free math they call.

/// Defines `fn $name` running `$body` compiled for the best instruction set the process may use
/// ([`crate::cpu::features`], so `DYNAMICRAFTER_CPU_ISA` caps it): AVX-512, AVX2 + FMA, or the
/// baseline.
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
                let features = $crate::cpu::features();
                if features.avx512 {
                    // SAFETY: the features were detected.
                    return unsafe { avx512($($arg),*) };
                }
                if features.avx2 {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// ln 2 split in two (Cody–Waite): `n·LN2_HI` is exact for the `n` of an f32 exponent.
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2^23: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
pub(crate) const MAGIC: f32 = 12_582_912.0;
/// The argument range of [`fast_exp`]: below it the result is 0, above it clamped.
pub(crate) const EXP_MIN: f32 = -87.3;
pub(crate) const EXP_MAX: f32 = 88.0;

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

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), branch-free.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

/// `GELU_erf(g) = g/2 · (1 + erf(g/√2))`.
#[inline(always)]
pub(crate) fn gelu_erf(g: f32) -> f32 {
    0.5 * g * (1.0 + fast_erf(g * std::f32::consts::FRAC_1_SQRT_2))
}

/// f32 → bf16 bits, rounded to nearest even (as `half::bf16::from_f32` for finite values), in
/// a form LLVM vectorises.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
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
    }
}
