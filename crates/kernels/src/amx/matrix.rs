//! Linear layers on AMX: [`Bf16Matrix`].

use super::{a_tiles, as_u16, as_u16_mut, available, b_tiles, configure_tiles, lines, product_block, Line, BLOCK};
use crate::common::{bias_f32, gelu_erf, output_buffer, Epilogue, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output rows per task for an input row of `k` values: the task's bf16 copy of its rows stays
/// within half of a 2 MB L2 (what CPUs with AMX have), since every column block reads it all
/// again; at most 512 (a fixed 512 overflows L2 for deep inputs: docs/PERFORMANCE.md).
fn rows_per_task(k: usize) -> usize {
    ((1 << 20) / (2 * k.max(1)) / BLOCK * BLOCK).clamp(BLOCK, 512)
}

/// A weight `[n, k]` (a linear layer's `[out, in]`) packed for `tdpbf16ps`, and the layer's
/// bias in f32. Packed as whole tiles: per 16 outputs and 32 inputs, one 1 KB tile of 16 input
/// pairs × 16 outputs × 2 (`tile[k%32/2][j%16][k%2] = w[j][k]`), so every tile load reads
/// contiguous memory.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    packed: Vec<Line>,
    /// The bias, zeros for a layer without one.
    bias: Vec<f32>,
    n: usize,
    k: usize,
}

impl Bf16Matrix {
    /// Packs `w [n, k]` (n and k multiples of 32) and keeps `bias [n]` in f32.
    pub fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !n.is_multiple_of(BLOCK) || !k.is_multiple_of(BLOCK) {
            candle_core::bail!("bf16 AMX matrix: [{n}, {k}] is not a multiple of {BLOCK} on both sides");
        }
        let bias = bias_f32(bias, n, "bf16 AMX matrix")?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = lines(n * k);
        b_tiles(&w, k, n, k, as_u16_mut(&mut packed));
        Ok(Self { packed, bias, n, k })
    }

    /// `x · wᵀ (+ bias)` for f32 `x (…, k)` on the CPU: `(…, n)` in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, Epilogue::Bias)
    }

    /// The GEGLU gate of a feed-forward, fused into its input projection: with
    /// `[a, g] = x · wᵀ + bias` (halves of n), `a · GELU_erf(g)`, `(…, n/2)` in f32. The n-wide
    /// product never goes to memory.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        if !(self.n / 2).is_multiple_of(BLOCK) {
            return crate::portable::geglu(&self.forward(x)?);
        }
        self.product(x, Epilogue::Geglu)
    }

    /// Each task rounds its own rows of `x` to bf16 into tile order (zero rows pad the last
    /// block), multiplies, and finishes each 32×32 result block (bias, gate) in cache.
    fn product(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        if !available() {
            candle_core::bail!("bf16 AMX matrix: this CPU or OS offers no AMX");
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("bf16 AMX matrix: input {dims:?} {:?} on {:?}, expected f32 (…, {}) on the CPU", x.dtype(), x.device(), self.k);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("bf16 AMX matrix: input not on the CPU") };
        let start = layout.start_offset();
        let m = x.elem_count() / k;
        let src = &cpu.as_slice::<f32>()?[start..start + m * k];
        let n = self.n;
        let n_out = if epilogue == Epilogue::Geglu { n / 2 } else { n };
        // Every element is written exactly once below (rows ≥ m of the last block are dropped).
        let mut out: Vec<f32> = output_buffer(m * n_out);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        let task_rows = rows_per_task(k);
        let tasks = m.div_ceil(task_rows);
        let kblocks = k / BLOCK;
        let bias = &self.bias;
        (0..tasks).into_par_iter().for_each_init(
            || (lines(task_rows * k), vec![0f32; 2 * BLOCK * BLOCK]),
            |(a, scratch), task| {
                let first = task * task_rows;
                let rows = task_rows.min(m - first);
                let padded_rows = rows.next_multiple_of(BLOCK);
                let a = as_u16_mut(a);
                a_tiles(&src[first * k..], k, rows, k, &mut a[..padded_rows * k]);
                let b = as_u16(&self.packed);
                let (block_a, block_g) = scratch.split_at_mut(BLOCK * BLOCK);
                // SAFETY: AMX is available (checked above).
                unsafe { configure_tiles() };
                for nb in 0..n_out / BLOCK {
                    for m0 in (0..padded_rows).step_by(BLOCK) {
                        let valid = BLOCK.min(rows - m0);
                        // SAFETY: `a` holds padded_rows × k in tile order, `packed` n × k; the
                        // column blocks asked for are below n; each scratch block is 32×32.
                        // Output rows first+m0.. (below m) belong to this task alone.
                        unsafe {
                            product_block(a.as_ptr(), b.as_ptr(), kblocks, m0 / 16, nb * 2, block_a.as_mut_ptr());
                            let dst = std::slice::from_raw_parts_mut(out_ptr.get().add((first + m0) * n_out), valid * n_out);
                            let c0 = nb * BLOCK;
                            match epilogue {
                                Epilogue::Bias => finish_bias(block_a, &bias[c0..c0 + BLOCK], dst, n_out, c0),
                                Epilogue::Geglu => {
                                    let half = n / 2;
                                    product_block(a.as_ptr(), b.as_ptr(), kblocks, m0 / 16, (half + c0) / 16, block_g.as_mut_ptr());
                                    let (ba, bg) = (&bias[c0..c0 + BLOCK], &bias[half + c0..half + c0 + BLOCK]);
                                    finish_geglu(block_a, block_g, ba, bg, dst, n_out, c0);
                                }
                            }
                        }
                    }
                }
            },
        );
        drop(storage);
        // SAFETY: the tasks initialised all m rows × n_out outputs.
        unsafe { out.set_len(m * n_out) };
        let mut shape = dims;
        *shape.last_mut().expect("rank ≥ 1") = n_out;
        Tensor::from_vec(out, shape, x.device())
    }
}

dispatch!(finish_bias, fn(block: &[f32], bias: &[f32], dst: &mut [MaybeUninit<f32>], row_len: usize, col: usize) {
    for (r, row) in dst.chunks_mut(row_len).enumerate() {
        for ((d, &v), &b) in row[col..col + 32].iter_mut().zip(&block[r * 32..r * 32 + 32]).zip(bias) {
            d.write(v + b);
        }
    }
});

dispatch!(finish_geglu, fn(a: &[f32], g: &[f32], bias_a: &[f32], bias_g: &[f32], dst: &mut [MaybeUninit<f32>], row_len: usize, col: usize) {
    for (r, row) in dst.chunks_mut(row_len).enumerate() {
        let (a, g) = (&a[r * 32..r * 32 + 32], &g[r * 32..r * 32 + 32]);
        for (j, d) in row[col..col + 32].iter_mut().enumerate() {
            d.write((a[j] + bias_a[j]) * gelu_erf(g[j] + bias_g[j]));
        }
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against an f64 product of the same bf16-rounded operands: equal up to f32 summation.
    #[test]
    fn amx_product_matches_f64_on_rounded_inputs() {
        if !available() {
            eprintln!("no AMX on this machine: nothing to check");
            return;
        }
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 32, 32), (37, 64, 96), (100, 320, 320), (513, 96, 64), (2, 1280, 32)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let got = Bf16Matrix::new(&w, Some(&b)).unwrap().forward(&x).unwrap();
            let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
            let want = round(&x).matmul(&round(&w).t().unwrap()).unwrap().broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap();
            let diff = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "{m}x{k}x{n}: max error {diff:.2e} (scale {scale:.2e})");
        }
        // The fused gate equals the gate of the product (both halves' biases included).
        for (m, k, n) in [(5, 64, 64), (600, 96, 128)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let matrix = Bf16Matrix::new(&w, Some(&b)).unwrap();
            let got = matrix.forward_geglu(&x).unwrap();
            let want = crate::geglu_reference(&matrix.forward(&x).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
            let diff = (got.to_dtype(DType::F64).unwrap() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5, "geglu {m}x{k}x{n}: max error {diff:.2e}");
            assert_eq!(got.dims(), &[m, n / 2]);
        }
        // A 3-D input keeps its leading dimensions.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (32, 64), &dev).unwrap();
        assert_eq!(Bf16Matrix::new(&w, None).unwrap().forward(&x).unwrap().dims(), &[2, 3, 32]);
        assert!(Bf16Matrix::new(&Tensor::zeros((30, 64), DType::F32, &dev).unwrap(), None).is_err());
    }
}
