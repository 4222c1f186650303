//! Our own CPU kernels for the ops where candle's generic ones are slow, with the candle
//! composition kept as the reference path (other devices, other dtypes, and the tests).
//!
//! * [`group_norm`]: one pass for the statistics and one fused normalise + affine (+ SiLU) pass
//!   per (sample, group), groups spread over threads.
//! * [`attention`]: `softmax(q·kᵀ·scale)·v` over blocks of queries — scores for one block at a
//!   time (never the whole matrix), the softmax fused in between two GEMMs.
//!
//! Loops are written so LLVM vectorises them; they are compiled a second time with AVX-512 /
//! AVX2+FMA enabled and picked at run time.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Runs `f` compiled for the best instruction set this CPU has.
macro_rules! dispatch {
    ($name:ident, fn($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
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

/// `e^x`, branch-free so it vectorises: `x = n·ln2 + r` (Cody–Waite split of ln 2, so large
/// |x| loses no precision), `e^r` by a degree-6 polynomial on |r| ≤ ln2/2, `2^n` through the
/// exponent bits. Relative error ≈ 2e-7; inputs below the normal range give 0.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.3, 88.0);
    // Round to nearest by the 1.5·2^23 trick: a plain add/sub pair, which vectorises everywhere.
    const MAGIC: f32 = 12_582_912.0;
    let n = (xc * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = p * f32::from_bits(((n as i32 + 127).max(1) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        e
    }
}

/// Lanes of the partial max/sum accumulators: lets LLVM vectorise the reductions (f32 adds are
/// not reassociated otherwise) and keeps the sum's rounding error small.
const LANES: usize = 16;

/// The softmax numerators of one row, in place, with `scale` applied to the logits; returns
/// their sum.
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in m.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let max = chunks.remainder().iter().fold(m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b)) * scale;
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = fast_exp(*v * scale - max);
            *a += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = fast_exp(*v * scale - max);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

dispatch!(softmax_rows, fn(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]) {
    for (row, s) in rows.chunks_exact_mut(width).zip(sums.iter_mut()) {
        *s = softmax_row(row, scale);
    }
});

dispatch!(scale_rows, fn(rows: &mut [f32], width: usize, sums: &[f32]) {
    for (row, &s) in rows.chunks_exact_mut(width).zip(sums) {
        let inv = 1.0 / s;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
});

/// The f32 data of a contiguous CPU input, from its start offset to its end.
fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: contiguous inputs only")
    }
    Ok(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// Query rows per block: scores of one block stay in cache.
const QUERY_BLOCK: usize = 256;

struct Attention {
    scale: f32,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "dc-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (q, k, v) = (contiguous_f32(name, q, lq)?, contiguous_f32(name, k, lk)?, contiguous_f32(name, v, lv)?);
        if [lq, lk, lv].iter().any(|l| l.dims().len() != 3) {
            candle_core::bail!("{name}: (batch, len, dim) inputs only")
        }
        let (dq, dk, dv) = (lq.dims(), lk.dims(), lv.dims());
        let (b, m, d) = (dq[0], dq[1], dq[2]);
        let (n, dvw) = (dk[1], dv[2]);
        let mut out = vec![0f32; b * m * dvw];
        let blocks_per_batch = m.div_ceil(QUERY_BLOCK);
        let scale = self.scale;
        // Blocks never straddle batch elements: iterate per (batch, block).
        let tasks: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..blocks_per_batch).map(move |blk| (bi, blk))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        tasks.par_iter().for_each_init(
            || (vec![0f32; QUERY_BLOCK * n], vec![0f32; QUERY_BLOCK]),
            |(scores, sums), &(bi, blk)| {
                let r0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(m - r0);
                let qb = &q[(bi * m + r0) * d..];
                let kb = &k[bi * n * d..];
                let vb = &v[bi * n * dvw..];
                let s = &mut scores[..rows * n];
                // SAFETY: the pointers cover rows×d, n×d, n×dvw and rows×n elements with the
                // given strides; gemm only reads lhs/rhs and writes dst.
                unsafe {
                    gemm::gemm(
                        rows, n, d,
                        s.as_mut_ptr(), 1, n as isize, false,
                        qb.as_ptr(), 1, d as isize,
                        kb.as_ptr(), d as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
                softmax_rows(s, n, scale, &mut sums[..rows]);
                // SAFETY: each task writes its own disjoint rows of `out`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((bi * m + r0) * dvw), rows * dvw) };
                unsafe {
                    gemm::gemm(
                        rows, dvw, n,
                        dst.as_mut_ptr(), 1, dvw as isize, false,
                        s.as_ptr(), 1, n as isize,
                        vb.as_ptr(), 1, dvw as isize,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
                scale_rows(dst, dvw, &sums[..rows]);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, m, dvw))))
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output rows to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dc-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, l)?;
        let width = *l.dims().last().unwrap_or(&1);
        let mut y = x.to_vec();
        const ROWS: usize = 16;
        y.par_chunks_mut(ROWS * width).for_each(|rows| {
            let mut sums = [0f32; ROWS];
            let n = rows.len() / width;
            softmax_rows(rows, width, 1.0, &mut sums[..n]);
            scale_rows(rows, width, &sums[..n]);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// Softmax over the last dimension (our kernel on CPU f32, candle's elsewhere).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// The reference composition (candle ops): what every other device and dtype uses.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}

/// `softmax(q·kᵀ·scale)·v` for `(batch, len, dim)` tensors, never materialising more than a
/// block of scores per thread on CPU.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
        q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale: scale as f32 })
    } else {
        attention_reference(q, k, v, scale)
    }
}

dispatch!(norm_group, fn(x: &[f32], y: &mut [f32], spatial: usize, w: &[f32], b: &[f32], eps: f32, silu: bool) {
    // Statistics in f64: two passes over the group (mean, then squared deviations).
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| { let d = v as f64 - mean; d * d }).sum::<f64>() / n;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    for (c, (xc, yc)) in x.chunks_exact(spatial).zip(y.chunks_exact_mut(spatial)).enumerate() {
        let scale = (w[c] as f64 * rstd) as f32;
        let shift = (b[c] as f64 - mean * w[c] as f64 * rstd) as f32;
        if silu {
            for (o, &i) in yc.iter_mut().zip(xc) {
                let t = i * scale + shift;
                *o = t / (1.0 + fast_exp(-t));
            }
        } else {
            for (o, &i) in yc.iter_mut().zip(xc) {
                *o = i * scale + shift;
            }
        }
    }
});

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "dc-group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, b) = (contiguous_f32(name, x, lx)?, contiguous_f32(name, w, lw)?, contiguous_f32(name, b, lb)?);
        let dims = lx.dims();
        let (c, spatial) = (dims[1], dims[2..].iter().product::<usize>());
        let cg = c / self.groups;
        let group_len = cg * spatial;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(group_len).zip(x.par_chunks(group_len)).enumerate().for_each(|(i, (yg, xg))| {
            let g = i % self.groups;
            norm_group(xg, yg, spatial, &w[g * cg..(g + 1) * cg], &b[g * cg..(g + 1) * cg], self.eps, self.silu);
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }
}

/// The reference composition: candle's group norm, then SiLU.
pub fn group_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&gn, x)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// GroupNorm over `(n, c, …)` with affine weight/bias, optionally followed by SiLU, fused.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("group norm: {c} channels are not divisible into {groups} groups")
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && b.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(w, b, &GroupNorm { groups, eps: eps as f32, silu })
    } else {
        group_norm_reference(x, w, b, groups, eps, silu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Max error relative to max(1, max|want|), in f64.
    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
        d / m
    }

    fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }

    /// Our kernel must stay at f32 rounding level: against the exact (f64) result it may err at
    /// most twice as much as candle's own f32 composition, plus 1e-6 of slack for inputs where
    /// candle happens to be exact.
    fn assert_f32_level(ours: &Tensor, candle: &Tensor, exact: &Tensor, what: &str) {
        let (e_ours, e_candle) = (max_rel(ours, exact), max_rel(candle, exact));
        assert!(e_ours <= 2.0 * e_candle + 1e-6, "{what}: ours {e_ours:e}, candle f32 {e_candle:e}");
    }

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

    #[test]
    fn attention_matches_reference_on_many_shapes() {
        let dev = Device::Cpu;
        for &(b, m, n, d, dv) in &[(1, 1, 1, 1, 1), (2, 5, 7, 3, 4), (3, 64, 64, 16, 16), (2, 130, 77, 64, 64), (10, 16, 16, 64, 64), (1, 257, 513, 8, 8)] {
            let q = Tensor::randn(0f32, 2.0, (b, m, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (b, n, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, dv), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            // Against the reference composition computed in f64: our error must stay at f32
            // rounding level (candle's own f32 composition is shown for scale).
            let got = attention(&q, &k, &v, scale).unwrap();
            let want = attention_reference(&f64(&q), &f64(&k), &f64(&v), scale).unwrap();
            let candle = attention_reference(&q, &k, &v, scale).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, m, n, d, dv)));
        }
    }

    #[test]
    fn softmax_matches_reference() {
        let dev = Device::Cpu;
        for shape in [&[1usize, 1][..], &[3, 17][..], &[2, 5, 77][..], &[40, 1024][..]] {
            let x = (Tensor::randn(0f32, 4.0, shape, &dev).unwrap() + 2.0).unwrap();
            let got = softmax_last_dim(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&f64(&x)).unwrap();
            let candle = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{shape:?}"));
        }
    }

    #[test]
    fn group_norm_matches_reference_on_many_shapes() {
        let dev = Device::Cpu;
        for &(shape, groups) in &[(&[2usize, 32, 4, 4][..], 32), (&[1, 64, 3, 5, 7][..], 32), (&[3, 96, 1][..], 32), (&[2, 320, 16, 16][..], 32), (&[1, 8, 9][..], 4)] {
            let x = (Tensor::randn(0f32, 3.0, shape, &dev).unwrap() + 1.5).unwrap();
            let c = shape[1];
            let w = Tensor::randn(1f32, 0.2, c, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, c, &dev).unwrap();
            for silu in [false, true] {
                let got = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                let want = group_norm_reference(&f64(&x), &f64(&w), &f64(&b), groups, 1e-5, silu).unwrap();
                let candle = group_norm_reference(&x, &w, &b, groups, 1e-5, silu).unwrap();
                assert_f32_level(&got, &candle, &want, &format!("{shape:?} silu {silu}"));
            }
        }
    }
}

/// `dst (m×n) (+)= lhs (m×k) · rhs (k×n)` on raw strided f32 buffers, single-threaded (callers
/// parallelise over independent work).
///
/// # Safety
/// The pointers must cover the given extents with the given row/column strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
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
        // Work items: (sample, block of output channels), so both threads stay busy at b = 1.
        const CO_BLOCK: usize = 64;
        let blocks = co.div_ceil(CO_BLOCK);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..b * blocks).into_par_iter().for_each(|task| {
            let (bi, blk) = (task / blocks, task % blocks);
            let o0 = blk * CO_BLOCK;
            let rows = CO_BLOCK.min(co - o0);
            let xb = x[bi * c * ts..].as_ptr();
            // SAFETY: disjoint output rows per task; all extents within the buffers.
            unsafe {
                let yb = y_ptr.get().add((bi * co + o0) * ts);
                let wk = |k: usize| w.as_ptr().add(o0 * c * 3 + k);
                // Centre tap over every frame, then the previous / next frame taps.
                gemm_f32(rows, ts, c, yb, ts, false, wk(1), c * 3, 3, xb, ts);
                if t > 1 {
                    gemm_f32(rows, (t - 1) * s, c, yb.add(s), ts, true, wk(0), c * 3, 3, xb, ts);
                    gemm_f32(rows, (t - 1) * s, c, yb, ts, true, wk(2), c * 3, 3, xb.add(s), ts);
                }
                for r in 0..rows {
                    let bv = bias[o0 + r];
                    for v in std::slice::from_raw_parts_mut(yb.add(r * ts), ts) {
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
    } else {
        temporal_conv_reference(x, w, bias)
    }
}

struct Conv3x3;

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "dc-conv3x3"
    }

    /// x `(n, c, h, w)`, w `(co, c, 3, 3)`, bias `(co)`, stride 1, padding 1.
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
        let co = lw.dims()[0];
        // Output computed on the padded width (w+2): every tap is then one shifted view of the
        // padded input, and the two extra columns per row are dropped at the end.
        let (hp, wp) = (h + 2, wd + 2);
        let cols = h * wp;
        let mut y = vec![0f32; n * co * h * wd];
        // Output-channel blocks: up to 128 rows (GEMM efficiency), but small enough that a
        // single image (the per-frame VAE) still gives every thread work; at least 64 rows.
        let threads = rayon::current_num_threads().max(1);
        let co_block = (co * n).div_ceil(2 * threads).next_multiple_of(16).clamp(64, 128);
        let blocks = co.div_ceil(co_block);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..n * blocks).into_par_iter().for_each_init(
            || (vec![0f32; c * hp * wp + 2], vec![0f32; co_block * cols], usize::MAX),
            |(padded, acc, padded_for), task| {
                let (ni, blk) = (task / blocks, task % blocks);
                if *padded_for != ni {
                    // Zero-padded copy of this sample (plus slack: the last tap reads 2 past the end).
                    padded.fill(0.0);
                    let xs = &x[ni * c * h * wd..(ni + 1) * c * h * wd];
                    for ci in 0..c {
                        for yy in 0..h {
                            let src = &xs[(ci * h + yy) * wd..(ci * h + yy + 1) * wd];
                            let dst = (ci * hp + yy + 1) * wp + 1;
                            padded[dst..dst + wd].copy_from_slice(src);
                        }
                    }
                    *padded_for = ni;
                }
                let o0 = blk * co_block;
                let rows = co_block.min(co - o0);
                // SAFETY: extents checked by construction; disjoint output rows per task.
                unsafe {
                    for tap in 0..9 {
                        let (dy, dx) = (tap / 3, tap % 3);
                        gemm_f32(
                            rows, cols, c,
                            acc.as_mut_ptr(), cols, tap > 0,
                            w.as_ptr().add(o0 * c * 9 + tap), c * 9, 9,
                            padded.as_ptr().add(dy * wp + dx), hp * wp,
                        );
                    }
                    let yb = y_ptr.get().add((ni * co + o0) * h * wd);
                    for r in 0..rows {
                        let bv = bias[o0 + r];
                        for yy in 0..h {
                            let src = &acc[r * cols + yy * wp..r * cols + yy * wp + wd];
                            let dst = std::slice::from_raw_parts_mut(yb.add((r * h + yy) * wd), wd);
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d = s + bv;
                            }
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((n, co, h, wd))))
    }
}

/// 3×3 convolution, stride 1, padding 1, with bias: nine GEMMs over shifted views of the padded
/// input on CPU f32 (no im2col matrix), candle's conv elsewhere.
pub fn conv3x3(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &Conv3x3)
    } else {
        conv3x3_reference(x, w, bias)
    }
}

pub fn conv3x3_reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

#[cfg(test)]
mod conv_tests {
    use super::*;
    use candle_core::Device;

    fn err(got: &Tensor, want64: &Tensor) -> f64 {
        let d = (got.to_dtype(DType::F64).unwrap() - want64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let m = want64.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
        d / m
    }

    /// At most twice candle's own f32 error against the exact result (see kernels::tests).
    fn check(got: &Tensor, candle: &Tensor, want64: &Tensor, what: &str) {
        let (e, c) = (err(got, want64), err(candle, want64));
        assert!(e <= 2.0 * c + 1e-6, "{what}: ours {e:e}, candle f32 {c:e}");
    }

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
            check(&got, &candle, &want, &format!("{:?}", (b, c, co, t, s)));
        }
    }

    #[test]
    fn conv3x3_matches_reference() {
        let dev = Device::Cpu;
        for &(n, c, co, h, w) in &[(1, 1, 1, 1, 1), (2, 3, 5, 4, 7), (3, 16, 140, 9, 5), (1, 64, 32, 16, 16), (1, 8, 200, 6, 6)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.2, co, &dev).unwrap();
            let got = conv3x3(&x, &wt, &bias).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = conv3x3_reference(&f(&x), &f(&wt), &f(&bias)).unwrap();
            let candle = conv3x3_reference(&x, &wt, &bias).unwrap();
            check(&got, &candle, &want, &format!("{:?}", (n, c, co, h, w)));
        }
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

dispatch!(geglu_rows, fn(p: &[f32], out: &mut [f32], hidden: usize) {
    for (row, o) in p.chunks_exact(2 * hidden).zip(out.chunks_exact_mut(hidden)) {
        let (a, g) = row.split_at(hidden);
        for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
            *o = a * (0.5 * g * (1.0 + fast_erf(g * std::f32::consts::FRAC_1_SQRT_2)));
        }
    }
});

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "dc-geglu"
    }

    fn cpu_fwd(&self, p: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(self.name(), p, l)?;
        let dims = l.dims();
        let hidden = dims[dims.len() - 1] / 2;
        let mut out = vec![0f32; p.len() / 2];
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS * hidden)
            .zip(p.par_chunks(ROWS * 2 * hidden))
            .for_each(|(o, p)| geglu_rows(p, o, hidden));
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = hidden;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Reference: `a · GELU_erf(g)` for `[a, g]` = the two halves of the last dimension.
pub fn geglu_reference(p: &Tensor) -> Result<Tensor> {
    let half = p.dim(candle_core::D::Minus1)? / 2;
    let a = p.narrow(candle_core::D::Minus1, 0, half)?;
    let g = p.narrow(candle_core::D::Minus1, half, half)?;
    a * g.gelu_erf()?
}

/// GEGLU activation of the UNet feed-forwards, fused (one pass, vectorised erf) on CPU f32.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    if p.device().is_cpu() && p.dtype() == DType::F32 && p.dim(candle_core::D::Minus1)? % 2 == 0 {
        p.contiguous()?.apply_op1_no_bwd(&Geglu)
    } else {
        geglu_reference(p)
    }
}

#[cfg(test)]
mod geglu_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn geglu_matches_reference() {
        for shape in [&[1usize, 2][..], &[3, 5, 18][..], &[2, 100, 640][..]] {
            let p = Tensor::randn(0f32, 3.0, shape, &Device::Cpu).unwrap();
            let got = geglu(&p).unwrap().to_dtype(DType::F64).unwrap();
            let want = geglu_reference(&p.to_dtype(DType::F64).unwrap()).unwrap();
            let candle = geglu_reference(&p).unwrap().to_dtype(DType::F64).unwrap();
            let err = |t: &Tensor| {
                let d = (t - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                d / want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0)
            };
            assert!(err(&got) <= 2.0 * err(&candle) + 1e-6, "{shape:?}: ours {:e}, candle {:e}", err(&got), err(&candle));
        }
    }
}
