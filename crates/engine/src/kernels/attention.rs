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

struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dc-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, l)?;
        let width = *l.dims().last().unwrap_or(&1);
        // Zeroed by the OS on first touch; each task copies its rows while they are in cache.
        let mut y = vec![0f32; x.len()];
        const ROWS: usize = 16;
        y.par_chunks_mut(ROWS * width).zip(x.par_chunks(ROWS * width)).for_each(|(rows, src)| {
            rows.copy_from_slice(src);
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
    if q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
        q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale: scale as f32 })
    } else if super::flash_attention::supported(q, k, v) {
        super::flash_attention::flash_attention(q, k, v, scale)
    } else {
        attention_chunked(q, k, v, scale, MAX_SCORES)
    }
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
}
