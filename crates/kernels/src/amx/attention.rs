//! Multi-head attention with both products in bf16 on AMX and the softmax in f32 (the CPU's
//! `--precision bf16`), reading the heads straight out of `(batch, len, heads·d)` and writing
//! them back merged: no split/merge copies, and no score matrix beyond 32 query rows.

use super::{a_tiles, as_u16, as_u16_mut, available, b_tiles, bf16_bits, configure_tiles, lines, product_block, Line, BLOCK};
use crate::common::{fast_exp, output_buffer, store_normalized, with_heads, HeadsShape, SendPtr};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Query rows per task (in blocks of 32).
const QUERY_ROWS: usize = 256;

/// Whether [`attention`] takes these shapes: AMX present, f32 on the CPU, head widths in
/// whole 32-blocks, and enough keys for the tiles to pay (short sequences, such as the
/// temporal attention's 16 frames, stay on the f32 kernel).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let dims_ok = |t: &Tensor| t.rank() == 3 && t.dims()[2].is_multiple_of(heads) && (t.dims()[2] / heads).is_multiple_of(BLOCK);
    available()
        && [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && dims_ok(t))
        && k.dim(1).is_ok_and(|n| n >= 64)
}

/// `softmax(q·kᵀ·scale)·v` per head, for `q (b, m, heads·d)`, `k (b, n, heads·d)`,
/// `v (b, n, heads·dv)`: `(b, m, heads·dv)`. Check [`supports`] first.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if !supports(q, k, v, heads) {
        candle_core::bail!("AMX attention: unsupported inputs {:?} {:?} {:?} with {heads} heads", q.dims(), k.dims(), v.dims());
    }
    with_heads("AMX attention", (q, k, v), heads, |shape, qx, kx, vx| {
        let HeadsShape { b, m, n, qw, vw, d, dv } = shape;
        // Keys and values of every (batch, head) packed once as B tiles, keys padded to 32.
        let n_pad = n.next_multiple_of(BLOCK);
        let (k_len, v_len) = (n_pad * d, n_pad * dv);
        let mut keys = lines(b * heads * k_len);
        let mut values = lines(b * heads * v_len);
        let (kp, vp) = (SendPtr(as_u16_mut(&mut keys).as_mut_ptr()), SendPtr(as_u16_mut(&mut values).as_mut_ptr()));
        (0..b * heads).into_par_iter().for_each(|bh| {
            let (bi, h) = (bh / heads, bh % heads);
            // SAFETY: each (batch, head) packs its own k_len / v_len values.
            let (kd, vd) = unsafe { (std::slice::from_raw_parts_mut(kp.get().add(bh * k_len), k_len), std::slice::from_raw_parts_mut(vp.get().add(bh * v_len), v_len)) };
            b_tiles(&kx[bi * n * qw + h * d..], qw, n, d, kd);
            pack_values(&vx[bi * n * vw + h * dv..], vw, n, dv, vd);
        });

        let mut out: Vec<f32> = output_buffer(b * m * vw);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        let blocks = m.div_ceil(QUERY_ROWS);
        let (keys, values) = (as_u16(&keys), as_u16(&values));
        let scale = scale as f32;
        (0..b * heads * blocks).into_par_iter().for_each_init(
            || Scratch::new(n_pad, d),
            |s, task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, h) = (bh / heads, bh % heads);
                let (kt, vt) = (&keys[bh * k_len..(bh + 1) * k_len], &values[bh * v_len..(bh + 1) * v_len]);
                // SAFETY: AMX is available (checked in `supports`).
                unsafe { configure_tiles() };
                for r0 in (blk * QUERY_ROWS..m.min((blk + 1) * QUERY_ROWS)).step_by(BLOCK) {
                    let rows = BLOCK.min(m - r0);
                    a_tiles(&qx[(bi * m + r0) * qw + h * d..], qw, rows, d, as_u16_mut(&mut s.query));
                    // Scores of 32 query rows against every key, and each row's maximum (in lanes).
                    s.maxes.fill(f32::NEG_INFINITY);
                    for jb in 0..n_pad / BLOCK {
                        // SAFETY: the query tiles hold 2 tile rows of d/32 tiles, the keys n_pad/16
                        // tile columns of d/32 tiles; the block is 32×32.
                        unsafe { product_block(as_u16(&s.query).as_ptr(), kt.as_ptr(), d / BLOCK, 0, jb * 2, s.block.as_mut_ptr()) };
                        collect_scores(&s.block, jb * BLOCK, n, n_pad, &mut s.scores, &mut s.maxes);
                    }
                    // The numerators straight into bf16 tiles, their sums in f32.
                    probability_tiles(&s.scores, n_pad, n, rows, scale, &s.maxes, &mut s.sums, as_u16_mut(&mut s.probs));
                    for jb in 0..dv / BLOCK {
                        // SAFETY: the probability tiles hold 2 tile rows of n_pad/32 tiles, the
                        // values dv/16 tile columns of n_pad/32 tiles.
                        unsafe { product_block(as_u16(&s.probs).as_ptr(), vt.as_ptr(), n_pad / BLOCK, 0, jb * 2, s.block.as_mut_ptr()) };
                        // SAFETY: rows r0.., columns of head h: written by this task only.
                        unsafe { store_normalized(out_ptr, (bi * m + r0) * vw + h * dv + jb * BLOCK, vw, BLOCK, &s.block, BLOCK, &s.sums[..rows]) };
                    }
                }
            },
        );
        // SAFETY: the tasks initialised every (row, head, column block).
        unsafe { out.set_len(b * m * vw) };
        Tensor::from_vec(out, (b, m, vw), &Device::Cpu)
    })
}

/// A task's buffers: 32 query rows as A tiles, their scores and softmax numerators, the
/// numerators as A tiles, and one 32×32 result block.
struct Scratch {
    query: Vec<Line>,
    scores: Vec<f32>,
    maxes: Vec<f32>,
    sums: Vec<f32>,
    probs: Vec<Line>,
    block: Vec<f32>,
}

impl Scratch {
    fn new(n_pad: usize, d: usize) -> Self {
        Self {
            query: lines(BLOCK * d),
            scores: vec![0.0; BLOCK * n_pad],
            maxes: vec![0.0; BLOCK * BLOCK],
            sums: vec![1.0; BLOCK],
            probs: lines(BLOCK * n_pad),
            block: vec![0.0; BLOCK * BLOCK],
        }
    }
}

dispatch!(pack_values, fn(v: &[f32], stride: usize, n: usize, dv: usize, dst: &mut [u16]) {
    // B tiles of v: per 16 columns and 32 keys, [key pair][column][2]; keys ≥ n are zero.
    let kblocks = n.div_ceil(32);
    for key in 0..n.next_multiple_of(32) {
        for col in 0..dv {
            let x = if key < n { bf16_bits(v[key * stride + col]) } else { 0 };
            dst[((col / 16) * kblocks + key / 32) * 512 + (key % 32) / 2 * 32 + (col % 16) * 2 + key % 2] = x;
        }
    }
});

dispatch!(collect_scores, fn(block: &[f32], key0: usize, n: usize, n_pad: usize, scores: &mut [f32], maxes: &mut [f32]) {
    // A 32×32 block of scores (keys key0..) into the rows of `scores`, and the running maxima
    // of each row over real keys in 32 lanes (an element-wise max vectorises; a fold does not).
    for r in 0..32 {
        let src = &block[r * 32..r * 32 + 32];
        scores[r * n_pad + key0..r * n_pad + key0 + 32].copy_from_slice(src);
        for (j, (m, &v)) in maxes[r * 32..r * 32 + 32].iter_mut().zip(src).enumerate() {
            let v = if key0 + j < n { v } else { f32::NEG_INFINITY };
            *m = if v > *m { v } else { *m };
        }
    }
});

dispatch!(probability_tiles, fn(scores: &[f32], n_pad: usize, n: usize, rows: usize, scale: f32, maxes: &[f32], sums: &mut [f32], dst: &mut [u16]) {
    // softmax numerators exp(scale·(s − max)) as A tiles [row/16][key/32][16][32] in bf16, and
    // their f32 sums; padded keys and rows are zero.
    let kblocks = n_pad / 32;
    for r in 0..32 {
        let tile_row = |kb: usize| ((r / 16) * kblocks + kb) * 512 + (r % 16) * 32;
        if r >= rows {
            for kb in 0..kblocks {
                dst[tile_row(kb)..tile_row(kb) + 32].fill(0);
            }
            continue;
        }
        let shift = maxes[r * 32..r * 32 + 32].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
        let mut acc = [0f32; 32];
        for kb in 0..kblocks {
            let src = &scores[r * n_pad + kb * 32..r * n_pad + kb * 32 + 32];
            let mut p = [0f32; 32];
            for (p, &v) in p.iter_mut().zip(src) {
                *p = fast_exp(v * scale - shift);
            }
            if (kb + 1) * 32 > n {
                p[n.saturating_sub(kb * 32)..].fill(0.0);
            }
            for ((o, &p), a) in dst[tile_row(kb)..tile_row(kb) + 32].iter_mut().zip(&p).zip(acc.iter_mut()) {
                *a += p;
                *o = bf16_bits(p);
            }
        }
        sums[r] = acc.iter().sum::<f32>();
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the f64 reference of the bf16-rounded inputs: the probabilities are rounded to
    /// bf16 too, so the bound is bf16's, not f32's.
    #[test]
    fn amx_attention_matches_reference() {
        if !available() {
            eprintln!("no AMX on this machine: nothing to check");
            return;
        }
        let dev = Device::Cpu;
        for (b, m, n, heads, d) in [(1, 1, 64, 1, 32), (2, 70, 77, 2, 64), (1, 300, 256, 3, 32), (2, 33, 100, 1, 64)] {
            let q = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let got = attention(&q, &k, &v, heads, scale).unwrap();
            let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
            let split = |t: &Tensor| crate::common::testing::split_heads(&round(t), heads);
            let want = crate::attention_reference(&split(&q), &split(&k), &split(&v), scale).unwrap();
            let want = crate::common::testing::merge_heads(&want, heads);
            let err = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            // bf16 probabilities err by ≤ 2^-9 each; the bound leaves room for that summed over the keys.
            assert!(err < 5e-3, "{:?}: max error {err:.2e}", (b, m, n, heads, d));
        }
        let short = Tensor::zeros((1, 16, 64), DType::F32, &dev).unwrap();
        assert!(!supports(&short, &short, &short, 1));
    }
}
