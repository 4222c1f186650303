//! Attention with the softmax fused between two GEMMs over blocks of queries, and softmax.

use super::{contiguous_f32, fast_exp, SendPtr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

dispatch!(softmax_rows_portable, fn(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]) {
    for (row, s) in rows.chunks_exact_mut(width).zip(sums.iter_mut()) {
        *s = softmax_row(row, scale);
    }
});

/// Each row (`width` values) replaced by its softmax numerators, with `scale` applied to the
/// logits; their sums into `sums`.
fn softmax_rows(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::f32_matrix::available() {
        for (row, s) in rows.chunks_exact_mut(width).zip(sums.iter_mut()) {
            // SAFETY: AVX-512F was just detected.
            *s = unsafe { softmax_row_avx512(row, scale) };
        }
        return;
    }
    softmax_rows_portable(rows, width, scale, sums)
}

/// [`softmax_row`] with AVX-512's masked loads for the row's tail and fused multiply-adds in the
/// exponential ([`super::fast_exp16`]), where the portable loop needs separate multiplies and adds.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32], scale: f32) -> f32 {
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
        let e = super::fast_exp16(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), scale, max));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
    }
    if rest > 0 {
        let e = super::fast_exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), scale, max));
        _mm512_mask_storeu_ps(p.add(full), tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

dispatch!(scale_rows, fn(rows: &mut [f32], width: usize, sums: &[f32]) {
    for (row, &s) in rows.chunks_exact_mut(width).zip(sums) {
        let inv = 1.0 / s;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
});

/// Query rows per block: scores of one block stay in cache.
const QUERY_BLOCK: usize = 256;

/// `heads` attentions side by side in the last dimension of each input (1: plain attention).
struct Attention {
    scale: f32,
    heads: usize,
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
            candle_core::bail!("{name}: (batch, len, heads·dim) inputs only")
        }
        let (dq, dk, dv) = (lq.dims(), lk.dims(), lv.dims());
        let heads = self.heads;
        // Row widths (all heads) and one head's width.
        let (b, m, qw) = (dq[0], dq[1], dq[2]);
        let (n, vw) = (dk[1], dv[2]);
        let (d, dvw) = (qw / heads, vw / heads);
        let mut out = vec![0f32; b * m * vw];
        let blocks_per_head = m.div_ceil(QUERY_BLOCK);
        let scale = self.scale;
        // Blocks never straddle batch elements or heads: iterate per (batch, head, block).
        let tasks: Vec<(usize, usize, usize)> =
            (0..b * heads).flat_map(|bh| (0..blocks_per_head).map(move |blk| (bh / heads, bh % heads, blk))).collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        tasks.par_iter().for_each_init(
            || (vec![0f32; QUERY_BLOCK * n], vec![0f32; QUERY_BLOCK]),
            |(scores, sums), &(bi, h, blk)| {
                let r0 = blk * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(m - r0);
                let qb = &q[(bi * m + r0) * qw + h * d..];
                let kb = &k[bi * n * qw + h * d..];
                let vb = &v[bi * n * vw + h * dvw..];
                let s = &mut scores[..rows * n];
                // SAFETY: the pointers cover rows×d, n×d, n×dvw (rows strided by the width of
                // all heads) and rows×n elements; gemm only reads lhs/rhs and writes dst.
                unsafe {
                    gemm::gemm(
                        rows, n, d,
                        s.as_mut_ptr(), 1, n as isize, false,
                        qb.as_ptr(), 1, qw as isize,
                        kb.as_ptr(), qw as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
                softmax_rows(s, n, scale, &mut sums[..rows]);
                // SAFETY: each task writes its own rows × dvw block of `out` (row stride vw),
                // which no other task touches.
                unsafe {
                    let dst = out_ptr.get().add((bi * m + r0) * vw + h * dvw);
                    gemm::gemm(
                        rows, dvw, n,
                        dst, 1, vw as isize, false,
                        s.as_ptr(), 1, n as isize,
                        vb.as_ptr(), 1, vw as isize,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                    for r in 0..rows {
                        scale_rows(std::slice::from_raw_parts_mut(dst.add(r * vw), dvw), dvw, &sums[r..r + 1]);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, m, vw))))
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
        // Row by row: each is copied, exponentiated and scaled while it is in L1.
        let mut y = super::output_buffer(x.len());
        y.spare_capacity_mut()[..x.len()].par_chunks_mut(width.max(1)).zip(x.par_chunks(width.max(1))).for_each(|(row, src)| {
            let row = row.write_copy_of_slice(src);
            let mut sum = [0f32];
            softmax_rows(row, width, 1.0, &mut sum);
            scale_rows(row, width, &sum);
        });
        // SAFETY: every row was written above.
        unsafe { y.set_len(x.len()) };
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
    // The precision policy keeps softmax in f32 whatever the compute dtype.
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    probs.matmul(&v.contiguous()?)
}

/// Scores a device-generic attention may hold at once (elements): 2²⁸, 512 MiB in bf16. A
/// 576×1024 spatial attention (80 × 9216 × 9216 scores) would otherwise need 13.6 GB.
pub const MAX_SCORES: usize = 1 << 28;

/// [`attention_reference`] over blocks of queries, so at most `max_scores` scores exist at once.
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_scores: usize) -> Result<Tensor> {
    let (b, m, _) = q.dims3()?;
    let n = k.dim(1)?;
    let rows = (max_scores / (b * n).max(1)).clamp(1, m.max(1));
    if rows >= m {
        return attention_reference(q, k, v, scale);
    }
    let blocks = (0..m)
        .step_by(rows)
        .map(|start| attention_reference(&q.narrow(1, start, rows.min(m - start))?, k, v, scale))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 1)
}

/// `softmax(q·kᵀ·scale)·v` for `(batch, len, dim)` tensors, never materialising more than a
/// block of scores per thread on CPU (f32), no scores at all on CUDA in f16/bf16 (the fused
/// kernel), nor more than [`MAX_SCORES`] elsewhere.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(&[q, k, v]) {
        q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale: scale as f32, heads: 1 })
    } else if super::flash_attention::supported(q, k, v) {
        super::flash_attention::flash_attention(q, k, v, scale)
    } else {
        attention_chunked(q, k, v, scale, MAX_SCORES)
    }
}

fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether [`attention_heads`] takes these inputs: CPU f32 `(batch, len, heads·dim)` tensors.
pub fn heads_in_place(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    cpu_f32(&[q, k, v]) && [q, k, v].iter().all(|t| t.rank() == 3 && t.dims()[2].is_multiple_of(heads))
}

/// [`attention`] per head for `(batch, len, heads·dim)` tensors, heads side by side in the last
/// dimension, read and written in place (no split or merge copies). CPU f32 only: check
/// [`heads_in_place`].
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if !heads_in_place(q, k, v, heads) {
        candle_core::bail!("attention_heads: CPU f32 (batch, len, heads·dim) inputs only");
    }
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale: scale as f32, heads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_f32_level, f64};
    use candle_core::Device;

    /// The path other devices take: chunked over queries, equal to the whole-matrix reference.
    #[test]
    fn chunked_attention_equals_unchunked() {
        let dev = Device::Cpu;
        for &(b, m, n, d, max_scores) in &[(2, 37, 20, 8, 40), (1, 100, 64, 16, 64 * 7), (3, 9, 9, 4, 1), (1, 5, 5, 4, 1 << 20)] {
            let q = Tensor::randn(0f32, 2.0, (b, m, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 2.0, (b, n, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let whole = attention_reference(&q, &k, &v, 0.3).unwrap();
            let chunked = attention_chunked(&q, &k, &v, 0.3, max_scores).unwrap();
            assert_eq!(chunked.dims(), whole.dims());
            let err = crate::kernels::testing::max_rel(&chunked, &whole);
            assert!(err < 1e-6, "{:?}: {err:e}", (b, m, n, d, max_scores));
        }
        // bf16 inputs: softmax runs in f32, the result comes back in bf16.
        let q = Tensor::randn(0f32, 1.0, (2, 33, 8), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let out = attention(&q, &q, &q, 0.35).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let f32_out = attention(&q.to_dtype(DType::F32).unwrap(), &q.to_dtype(DType::F32).unwrap(), &q.to_dtype(DType::F32).unwrap(), 0.35).unwrap();
        let err = crate::kernels::testing::max_rel(&out, &f32_out);
        assert!(err < 2e-2, "bf16 attention off by {err:e}");
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

    /// Heads read and written in place equal splitting them out, attending and merging back.
    #[test]
    fn attention_heads_equals_split_attention_merge() {
        let dev = Device::Cpu;
        for &(b, m, n, heads, d) in &[(1, 5, 7, 1, 8), (2, 300, 77, 5, 16), (1, 33, 260, 3, 64)] {
            let q = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let got = attention_heads(&q, &k, &v, heads, scale).unwrap();
            let split = |t: &Tensor| crate::models::layers::split_heads(t, heads).unwrap();
            let merge = |t: &Tensor| crate::models::layers::merge_heads(t, heads).unwrap();
            let want = merge(&attention_reference(&split(&f64(&q)), &split(&f64(&k)), &split(&f64(&v)), scale).unwrap());
            let candle = merge(&attention_reference(&split(&q), &split(&k), &split(&v), scale).unwrap());
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (b, m, n, heads, d)));
        }
        let bf16 = Tensor::zeros((1, 4, 8), DType::BF16, &dev).unwrap();
        assert!(!heads_in_place(&bf16, &bf16, &bf16, 2));
    }

    #[test]
    fn softmax_matches_reference() {
        let dev = Device::Cpu;
        // The last one's output is over 32 MB: its pages are populated ahead (`output_buffer`).
        for shape in [&[1usize, 1][..], &[3, 17][..], &[2, 5, 77][..], &[40, 1024][..], &[9, 1024, 1031][..]] {
            let x = (Tensor::randn(0f32, 4.0, shape, &dev).unwrap() + 2.0).unwrap();
            let got = softmax_last_dim(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&f64(&x)).unwrap();
            let candle = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{shape:?}"));
        }
    }
}
