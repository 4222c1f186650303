//! Multi-head attention with both products in bf16 pairs on AVX512-BF16 (`vdpbf16ps`: exact
//! products, f32 sums) and the softmax in f32: the CPU's `--precision bf16` without AMX. The
//! same plan as the AMX kernel: heads read straight out of `(batch, len, heads·d)` and written
//! back merged, keys and values packed once per (batch, head), and no score matrix beyond a
//! task's [`QUERY_ROWS`] rows. Both products are the linear layers' microkernel
//! ([`Bf16Pairs::tile`]): the keys are a "weight" `[n, d]`, the values one `[dv, n]`.

use super::matrix::{Bf16Pairs, Format, Start, PANEL};
use super::{lanes, lanes_mut, Lanes};
use crate::common::{bf16_bits, output_buffer, store_normalized, with_heads, HeadsShape, SendPtr};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Query rows per task: their scores (rows × keys in f32) stay in L2.
const QUERY_ROWS: usize = 96;
/// Rows per microkernel call.
const MR: usize = 6;
/// Steps of the second product's depth (key pairs) per pass: a 64-column slice of the packed
/// values (32 KB) stays in L1 while the rows run over it.
const KC: usize = 128;

/// Whether [`attention`] takes these inputs: AVX512-BF16, CPU f32 `(batch, len, heads·d)`
/// tensors, and enough keys for 64-key panels to pay (short sequences, such as the temporal
/// attention's 16 frames, stay on the f32 kernel).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    let dims_ok = |t: &Tensor| t.rank() == 3 && heads > 0 && t.dims()[2].is_multiple_of(heads) && t.dims()[2] > 0;
    Bf16Pairs::available()
        && [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && dims_ok(t))
        && k.dim(1).is_ok_and(|n| n >= PANEL)
}

/// `softmax(q·kᵀ·scale)·v` per head, for `q (b, m, heads·d)`, `k (b, n, heads·d)`,
/// `v (b, n, heads·dv)`: `(b, m, heads·dv)`. Check [`supports`] first.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if !supports(q, k, v, heads) {
        candle_core::bail!("bf16 pair attention: unsupported inputs {:?} {:?} {:?} with {heads} heads", q.dims(), k.dims(), v.dims());
    }
    with_heads("bf16 pair attention", (q, k, v), heads, |shape, qx, kx, vx| {
        let HeadsShape { b, m, n, qw, vw, d, dv } = shape;
        // Depths in lanes (pairs), and the padded widths of the two products' outputs.
        let (steps_d, steps_n) = (d.div_ceil(2), n.div_ceil(2));
        let (n_pad, dv_pad) = (n.next_multiple_of(PANEL), dv.next_multiple_of(PANEL));
        // Keys and values of every (batch, head) packed once, in panels of 64 outputs.
        let (k_len, v_len) = (n_pad * steps_d, dv_pad * steps_n);
        let mut keys = vec![Lanes([0.0; 16]); b * heads * k_len / 16];
        let mut values = vec![Lanes([0.0; 16]); b * heads * v_len / 16];
        keys.par_chunks_mut(k_len / 16).zip(values.par_chunks_mut(v_len / 16)).enumerate().for_each(|(bh, (kd, vd))| {
            let (bi, h) = (bh / heads, bh % heads);
            pack_keys(&kx[bi * n * qw + h * d..], qw, n, d, lanes_mut(kd));
            pack_values(&vx[bi * n * vw + h * dv..], vw, n, dv, lanes_mut(vd));
        });

        let mut out: Vec<f32> = output_buffer(b * m * vw);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        let blocks = m.div_ceil(QUERY_ROWS);
        let (keys, values) = (lanes(&keys), lanes(&values));
        let scale = scale as f32;
        let zeros = [0f32; PANEL];
        (0..b * heads * blocks).into_par_iter().for_each_init(
            || Scratch::new(n_pad, steps_d, steps_n),
            |s, task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, h) = (bh / heads, bh % heads);
                let r0 = blk * QUERY_ROWS;
                let rows = QUERY_ROWS.min(m - r0);
                let (kt, vt) = (&keys[bh * k_len..(bh + 1) * k_len], &values[bh * v_len..(bh + 1) * v_len]);
                for r in 0..rows {
                    let row = &qx[(bi * m + r0 + r) * qw + h * d..][..d];
                    Bf16Pairs::pack_rows(row, d, &mut s.query[r * steps_d..(r + 1) * steps_d]);
                }
                // Scores: a panel of 64 keys (steps_d × 64 lanes, in L1) against every row.
                for p in 0..n_pad / PANEL {
                    for t0 in (0..rows).step_by(MR) {
                        // SAFETY: the panel holds steps_d × 64 lanes, the packed rows steps_d lanes
                        // each, the scores rows × n_pad values; the format is available (`supports`).
                        unsafe {
                            let c = s.scores.as_mut_ptr().add(t0 * n_pad + p * PANEL);
                            let a = kt.as_ptr().add(p * steps_d * PANEL);
                            Bf16Pairs::tile(MR.min(rows - t0), a, s.query.as_ptr().add(t0 * steps_d), steps_d, steps_d, c, n_pad, Start::Init(zeros.as_ptr()));
                        }
                    }
                }
                // Softmax numerators over the real keys, in f32, then as bf16 pairs.
                for r in 0..rows {
                    let row = &mut s.scores[r * n_pad..r * n_pad + n];
                    // SAFETY: AVX512-BF16 (checked in `supports`) comes with AVX-512F.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        super::softmax_rows(row, n, scale, &mut s.sums[r..r + 1])
                    };
                    Bf16Pairs::pack_rows(row, n, &mut s.probs[r * steps_n..(r + 1) * steps_n]);
                }
                // Numerators × values, a 64-column panel at a time over slices of the keys, then
                // divided by the sums on the way out.
                for p in 0..dv_pad / PANEL {
                    for k0 in (0..steps_n).step_by(KC) {
                        let depth = KC.min(steps_n - k0);
                        let start = if k0 == 0 { Start::Init(zeros.as_ptr()) } else { Start::Load };
                        for t0 in (0..rows).step_by(MR) {
                            // SAFETY: as above: the panel's slice holds depth × 64 lanes, the
                            // numerators steps_n lanes per row, the block rows × 64 values.
                            unsafe {
                                let a = vt.as_ptr().add((p * steps_n + k0) * PANEL);
                                let c = s.block.as_mut_ptr().add(t0 * PANEL);
                                Bf16Pairs::tile(MR.min(rows - t0), a, s.probs.as_ptr().add(t0 * steps_n + k0), steps_n, depth, c, PANEL, start);
                            }
                        }
                    }
                    let cols = PANEL.min(dv - p * PANEL);
                    // SAFETY: rows r0.., columns of head h: written by this task only.
                    unsafe { store_normalized(out_ptr, (bi * m + r0) * vw + h * dv + p * PANEL, vw, cols, &s.block, PANEL, &s.sums[..rows]) };
                }
            },
        );
        // SAFETY: the tasks initialised every (row, head, column).
        unsafe { out.set_len(b * m * vw) };
        Tensor::from_vec(out, (b, m, vw), &Device::Cpu)
    })
}

/// A task's buffers: its query rows as bf16 pairs, their scores (f32, n_pad wide) and sums,
/// the numerators as pairs, and one 64-column block of results.
struct Scratch {
    query: Vec<u32>,
    scores: Vec<f32>,
    sums: Vec<f32>,
    probs: Vec<u32>,
    block: Vec<f32>,
}

impl Scratch {
    fn new(n_pad: usize, steps_d: usize, steps_n: usize) -> Self {
        Self {
            query: vec![0; QUERY_ROWS * steps_d],
            scores: vec![0.0; QUERY_ROWS * n_pad],
            sums: vec![1.0; QUERY_ROWS],
            probs: vec![0; QUERY_ROWS * steps_n],
            block: vec![0.0; QUERY_ROWS * PANEL],
        }
    }
}

dispatch!(pack_keys, fn(k: &[f32], stride: usize, n: usize, d: usize, dst: &mut [u32]) {
    // Panels of 64 keys: lane s of key j (the pair of its values 2s, 2s+1) at
    // (panel·steps + s)·64 + j % 64; keys ≥ n are zero.
    let steps = d.div_ceil(2);
    for j in 0..n {
        let row = &k[j * stride..j * stride + d];
        let base = (j / PANEL) * steps * PANEL + j % PANEL;
        for s in 0..steps {
            let hi = if 2 * s + 1 < d { bf16_bits(row[2 * s + 1]) as u32 } else { 0 };
            dst[base + s * PANEL] = bf16_bits(row[2 * s]) as u32 | hi << 16;
        }
    }
});

dispatch!(pack_values, fn(v: &[f32], stride: usize, n: usize, dv: usize, dst: &mut [u32]) {
    // Panels of 64 value columns: lane s of column c (keys 2s, 2s+1) at
    // (panel·steps + s)·64 + c % 64, steps = n/2 rounded up; past n or dv: zero.
    let steps = n.div_ceil(2);
    for s in 0..steps {
        let (even, odd) = (&v[2 * s * stride..2 * s * stride + dv], (2 * s + 1 < n).then(|| &v[(2 * s + 1) * stride..(2 * s + 1) * stride + dv]));
        for c in 0..dv {
            let hi = odd.map_or(0, |o| bf16_bits(o[c]) as u32);
            dst[((c / PANEL) * steps + s) * PANEL + c % PANEL] = bf16_bits(even[c]) as u32 | hi << 16;
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the f64 reference of the bf16-rounded inputs: the probabilities are rounded to
    /// bf16 too, so the bound is bf16's, not f32's. Odd head widths and key counts leave half
    /// pairs and partial panels; value widths off 64 leave partial output panels.
    #[test]
    fn bf16_pair_attention_matches_reference() {
        if !Bf16Pairs::available() {
            eprintln!("no AVX512-BF16 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        for (b, m, n, heads, d, dv) in [(1, 1, 64, 1, 32, 32), (2, 70, 77, 2, 64, 64), (1, 300, 256, 3, 33, 40), (2, 33, 129, 1, 64, 130), (1, 200, 1024, 5, 64, 64)] {
            let q = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, n, heads * dv), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let got = attention(&q, &k, &v, heads, scale).unwrap();
            let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
            let split = |t: &Tensor| crate::common::testing::split_heads(&round(t), heads);
            let want = crate::attention_reference(&split(&q), &split(&k), &split(&v), scale).unwrap();
            let want = crate::common::testing::merge_heads(&want, heads);
            assert_eq!(got.dims(), want.dims());
            let err = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            // bf16 probabilities err by ≤ 2^-9 each; the bound leaves room for that summed over the keys.
            assert!(err < 5e-3, "{:?}: max error {err:.2e}", (b, m, n, heads, d, dv));
        }
        let short = Tensor::zeros((1, 16, 64), DType::F32, &dev).unwrap();
        assert!(!supports(&short, &short, &short, 1));
    }
}
