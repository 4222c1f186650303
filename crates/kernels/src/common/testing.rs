//! Helpers of the kernel tests.

use candle_core::{DType, Tensor};

/// Max error relative to max(1, max|want|), in f64.
pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
    d / m
}

/// ‖got − want‖₂ / ‖want‖₂, in f32 (the GPU kernels' tests: bf16/f16 against f32).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn rel_l2(got: &Tensor, want: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let d = (f(got) - f(want)).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / f(want).sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
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

/// `(n, l, heads·d) → (n·heads, l, d)`, head-major channels.
pub(crate) fn split_heads(xs: &Tensor, heads: usize) -> Tensor {
    let (n, l, c) = xs.dims3().unwrap();
    xs.reshape((n, l, heads, c / heads)).unwrap().transpose(1, 2).unwrap().reshape((n * heads, l, c / heads)).unwrap()
}

/// Inverse of [`split_heads`].
pub(crate) fn merge_heads(xs: &Tensor, heads: usize) -> Tensor {
    let (nh, l, d) = xs.dims3().unwrap();
    xs.reshape((nh / heads, heads, l, d)).unwrap().transpose(1, 2).unwrap().reshape((nh / heads, l, heads * d)).unwrap()
}

/// `(n, c, co, h, w)` of the 3×3 convolution tests: single pixels, odd sizes, channel counts
/// off every block size, long channel sums.
pub(crate) const CONV3X3_SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1),
    (2, 3, 5, 4, 7),
    (3, 16, 140, 9, 5),
    (1, 64, 32, 16, 16),
    (1, 8, 200, 6, 6),
    (16, 40, 256, 4, 4),
    (2, 70, 64, 33, 31),
    (3, 20, 128, 9, 5),
    (2, 300, 128, 20, 18),
    (1, 16, 64, 64, 48),
    (1, 1000, 64, 12, 10),
    (2, 2560, 64, 8, 8),
];
