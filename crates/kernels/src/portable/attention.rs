//! Attention with the softmax fused between two GEMMs over blocks of queries, and softmax, in
//! f32 on any CPU. The softmax rows are the one instruction-set-specific part: the op API hands
//! in the row kernel it picked ([`SoftmaxRows`]).

use crate::common::{contiguous_f32, fast_exp, output_buffer, SendPtr};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
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

/// Each row (`width` values) replaced by its softmax numerators, with `scale` applied to the
/// logits; their sums into `sums`.
pub(crate) type SoftmaxRows = fn(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]);

dispatch!(pub(crate) softmax_rows, fn(rows: &mut [f32], width: usize, scale: f32, sums: &mut [f32]) {
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

/// `heads` attentions side by side in the last dimension of each input (1: plain attention).
struct Attention {
    scale: f32,
    heads: usize,
    softmax_rows: SoftmaxRows,
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
                (self.softmax_rows)(s, n, scale, &mut sums[..rows]);
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

struct Softmax {
    softmax_rows: SoftmaxRows,
}

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dc-softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), x, l)?;
        let width = *l.dims().last().unwrap_or(&1);
        // Row by row: each is copied, exponentiated and scaled while it is in L1.
        let mut y = output_buffer(x.len());
        y.spare_capacity_mut()[..x.len()].par_chunks_mut(width.max(1)).zip(x.par_chunks(width.max(1))).for_each(|(row, src)| {
            let row = row.write_copy_of_slice(src);
            let mut sum = [0f32];
            (self.softmax_rows)(row, width, 1.0, &mut sum);
            scale_rows(row, width, &sum);
        });
        // SAFETY: every row was written above.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// Softmax over the last dimension of a CPU f32 tensor.
pub(crate) fn softmax_last_dim(x: &Tensor, softmax_rows: SoftmaxRows) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax { softmax_rows })
}

/// `softmax(q·kᵀ·scale)·v` per head for CPU f32 `(batch, len, heads·dim)` tensors, heads side by
/// side in the last dimension, read and written in place; never more than a block of scores per
/// thread.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, softmax_rows: SoftmaxRows) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attention { scale: scale as f32, heads, softmax_rows })
}
