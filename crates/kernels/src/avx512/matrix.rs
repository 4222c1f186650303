//! f32 linear layers on AVX-512 with the weight packed at load, for the CPU's f32 mode.
//!
//! candle's `Linear` asks `gemm` for `x·Wᵀ` into a zeroed output, then adds the bias in a second
//! pass over it; `gemm` packs the weight again on every call. Here the weight is packed once
//! into panels of 64 outputs (`[panel][k][64]`, 64-byte aligned), the bias (or the whole GEGLU
//! gate) is applied while a block of the result is in registers or L1, and every output element
//! is written once.
//!
//! Blocking: a task owns a block of up to [`ROWS`] rows of `x`, packed in tiles of [`MR`] rows
//! (`[k][6]`, so the microkernel's broadcasts read one stream). It makes its outputs a pass of
//! panels at a time (the pass's results, ≤ [`C_BLOCK`] bytes, stay in L2) and walks the depth in
//! slices of [`KC`]: each panel's KC × 64 weights (32 KB) stay in L1 while the microkernel runs
//! over the rows, 6 rows × 4 vectors = 24 accumulators, each weight vector loaded once per 6 FMAs.

use super::{available, Lanes};
use crate::common::{bias_f32, output_buffer, Epilogue, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Outputs per packed panel: four 16-lane vectors.
const PANEL: usize = 64;
/// Rows of `x` per microkernel call.
const MR: usize = 6;
/// Depth of one pass over the panels.
const KC: usize = 128;
/// Rows of `x` per task at most.
const ROWS: usize = 192;
/// Bytes of results a task accumulates over the whole depth at once (kept in L2).
const C_BLOCK: usize = 512 << 10;

/// A weight `[n, k]` (a linear layer's `[out, in]`, n a multiple of 64) packed in panels of 64
/// outputs, `packed[(panel·k + kk)·64 + j] = w[panel·64 + j][kk]`, and the bias in f32.
#[derive(Clone)]
pub struct F32Matrix {
    packed: Vec<Lanes>,
    /// The bias, zeros for a layer without one.
    bias: Vec<f32>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for F32Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F32Matrix[{}, {}]", self.n, self.k)
    }
}

impl F32Matrix {
    /// Whether a layer with `n` outputs can be packed.
    pub fn supports(n: usize, k: usize) -> bool {
        available() && n.is_multiple_of(PANEL) && n > 0 && k > 0
    }

    /// Packs `w [n, k]` and keeps `bias [n]` in f32.
    pub fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !Self::supports(n, k) {
            candle_core::bail!("f32 matrix: [{n}, {k}] needs AVX-512 and a multiple of {PANEL} outputs");
        }
        let bias = bias_f32(bias, n, "f32 matrix")?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = vec![Lanes([0.0; 16]); n * k / 16];
        packed.par_chunks_mut(k * PANEL / 16).enumerate().for_each(|(p, panel)| {
            for (kk, lanes) in panel.chunks_exact_mut(PANEL / 16).enumerate() {
                for (j, v) in lanes.iter_mut().flat_map(|l| l.0.iter_mut()).enumerate() {
                    *v = w[(p * PANEL + j) * k + kk];
                }
            }
        });
        Ok(Self { packed, bias, n, k })
    }

    /// `x · wᵀ + bias` for f32 `x (…, k)` on the CPU: `(…, n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.product(x, Epilogue::Bias)
    }

    /// The feed-forward's GEGLU gate fused into its input projection: with `[a, g] = x · wᵀ +
    /// bias` (halves of n), `a · GELU_erf(g)`, `(…, n/2)`. The n-wide product stays in a
    /// per-task block.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        if !(self.n / 2).is_multiple_of(PANEL) {
            return crate::portable::geglu(&self.forward(x)?);
        }
        self.product(x, Epilogue::Geglu)
    }

    fn product(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("f32 matrix: input {dims:?} {:?} on {:?}, expected f32 (…, {}) on the CPU", x.dtype(), x.device(), self.k);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("f32 matrix: input not on the CPU") };
        let start = layout.start_offset();
        let m = x.elem_count() / k;
        let src = &cpu.as_slice::<f32>()?[start..start + m * k];
        let n = self.n;
        let n_out = if epilogue == Epilogue::Geglu { n / 2 } else { n };

        // Tasks: blocks of rows, and when those are too few to keep every thread busy (short
        // inputs: text tokens, the smallest UNet level), groups of panels as well. A GEGLU
        // group holds whole (a, g) panel pairs.
        let threads = rayon::current_num_threads().max(1);
        let row_tasks = m.div_ceil(ROWS).next_multiple_of(threads);
        let rows_per_task = m.div_ceil(row_tasks).next_multiple_of(MR);
        let row_tasks = m.div_ceil(rows_per_task);
        let units = n_out / PANEL; // panels, or (a, g) pairs
        let groups = (2 * threads).div_ceil(row_tasks).min(units);
        let per_group = units.div_ceil(groups);
        let groups = units.div_ceil(per_group);

        let mut out: Vec<f32> = output_buffer(m * n_out);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        // Units per pass over the depth: the block of results they make (rows × their columns)
        // stays in L2 while each slice of the depth adds to it.
        let panels_per_unit = if epilogue == Epilogue::Geglu { 2 } else { 1 };
        let per_pass = (C_BLOCK / (rows_per_task.min(m) * panels_per_unit * PANEL * 4)).max(1);
        let scratch_rs = 2 * PANEL * per_pass;
        let scratch_len = if epilogue == Epilogue::Geglu { rows_per_task * scratch_rs } else { 0 };
        (0..row_tasks * groups).into_par_iter().for_each_init(
            || (vec![0f32; rows_per_task * k], vec![0f32; scratch_len]),
            |(xp, scratch), task| {
                let (rt, group) = (task / groups, task % groups);
                let r0 = rt * rows_per_task;
                let rows = rows_per_task.min(m - r0);
                pack_rows(&src[r0 * k..(r0 + rows) * k], k, xp);
                let (u0, u1) = (group * per_group, ((group + 1) * per_group).min(units));
                // SAFETY: rows r0..r0+rows and the group's output columns belong to this task
                // alone; all pointers stay within `src`, `packed`, `bias`, `out` and `scratch`.
                unsafe {
                    let x = xp.as_ptr();
                    let out = out_ptr.get().add(r0 * n_out) as *mut f32;
                    let geglu = (epilogue == Epilogue::Geglu).then_some(Geglu { scratch: scratch.as_mut_ptr(), scratch_rs });
                    self.block(x, rows, u0..u1, per_pass, out, n_out, geglu);
                }
            },
        );
        drop(storage);
        // SAFETY: the tasks together wrote all m rows × n_out outputs.
        unsafe { out.set_len(m * n_out) };
        let mut shape = dims;
        *shape.last_mut().expect("rank ≥ 1") = n_out;
        Tensor::from_vec(out, shape, x.device())
    }

    /// `rows` rows of `x` (packed by [`pack_rows`]) times the panels of `units`, `per_pass` units per pass
    /// over the depth, into `out` (row stride `out_rs`, the columns of unit u at u·64); with
    /// `geglu`, a unit is the pair of panels (a = u, g = n/2/64 + u), made in the scratch (room
    /// for `per_pass` pairs) and gated into `out`.
    ///
    /// # Safety
    /// `x` must hold rows (rounded up to 6) × k values, `out` rows × out_rs; the units must be
    /// panels (pairs).
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(&self, x: *const f32, rows: usize, units: std::ops::Range<usize>, per_pass: usize, out: *mut f32, out_rs: usize, geglu: Option<Geglu>) {
        let k = self.k;
        let half = self.n / 2 / PANEL;
        let packed = self.packed.as_ptr() as *const f32;
        for u0 in units.clone().step_by(per_pass) {
            let pass = u0..(u0 + per_pass).min(units.end);
            for k0 in (0..k).step_by(KC) {
                let depth = KC.min(k - k0);
                for u in pass.clone() {
                    // (panel, its column in `out` or in the scratch block)
                    let (panels, count) = match &geglu {
                        Some(_) => ([(u, 2 * (u - u0) * PANEL), (half + u, (2 * (u - u0) + 1) * PANEL)], 2),
                        None => ([(u, u * PANEL), (0, 0)], 1),
                    };
                    for &(p, col) in &panels[..count] {
                        let a = packed.add((p * k + k0) * PANEL);
                        let bias = self.bias.as_ptr().add(p * PANEL);
                        let (c, c_rs) = match &geglu {
                            Some(g) => (g.scratch.add(col), g.scratch_rs),
                            None => (out.add(col), out_rs),
                        };
                        let start = if k0 == 0 { Start::Init(bias) } else { Start::Load };
                        for t0 in (0..rows).step_by(MR) {
                            tile(MR.min(rows - t0), a, x.add(t0 * k + k0 * MR), depth, c.add(t0 * c_rs), c_rs, start);
                        }
                    }
                }
            }
            if let Some(g) = &geglu {
                for u in pass {
                    let col = 2 * (u - u0) * PANEL;
                    for t in 0..rows {
                        // The pair (a, g) side by side is one row of the projection, 64 wide.
                        let pair = std::slice::from_raw_parts(g.scratch.add(t * g.scratch_rs + col), 2 * PANEL);
                        let dst = std::slice::from_raw_parts_mut(out.add(t * out_rs + u * PANEL), PANEL);
                        crate::portable::geglu_rows(pair, dst, PANEL);
                    }
                }
            }
        }
    }
}

/// Where a GEGLU task keeps the (a, g) panel pairs of one pass: side by side per pair, rows
/// `scratch_rs` apart.
struct Geglu {
    scratch: *mut f32,
    scratch_rs: usize,
}

dispatch!(pack_rows, fn(x: &[f32], k: usize, dst: &mut [f32]) {
    // Rows of x in tiles of 6, each tile `[kk][6]` (a short last tile fills only its rows), so
    // the microkernel's broadcasts read one contiguous stream.
    for (t, rows) in x.chunks(MR * k).enumerate() {
        let tile = &mut dst[t * MR * k..][..MR * k];
        for (i, row) in rows.chunks_exact(k).enumerate() {
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * MR + i] = v;
            }
        }
    }
});

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
enum Start {
    /// From 64 values (the bias of the panel) in every row.
    Init(*const f32),
    /// From the tile's current values in `c` (a later slice of the depth).
    Load,
}

/// `c[r][0..64] = start + Σ_kk a[kk][0..64] · b[kk][r]` for `rows` ≤ 6 rows, `b` a tile
/// packed by [`pack_rows`] (6 values per step of the depth).
///
/// # Safety
/// AVX-512F must be available; `a` must hold depth × 64 values, `b` depth × 6, `c` rows rows of
/// 64 values `c_rs` apart.
unsafe fn tile(rows: usize, a: *const f32, b: *const f32, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
    match rows {
        6 => tile_n::<6>(a, b, depth, c, c_rs, start),
        5 => tile_n::<5>(a, b, depth, c, c_rs, start),
        4 => tile_n::<4>(a, b, depth, c, c_rs, start),
        3 => tile_n::<3>(a, b, depth, c, c_rs, start),
        2 => tile_n::<2>(a, b, depth, c, c_rs, start),
        _ => tile_n::<1>(a, b, depth, c, c_rs, start),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_n<const R: usize>(a: *const f32, b: *const f32, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = match start {
                Start::Init(init) => _mm512_loadu_ps(init.add(16 * j)),
                Start::Load => _mm512_loadu_ps(c.add(r * c_rs + 16 * j)),
            };
        }
    }
    /// One step of the depth: 64 weights times R rows. (Unrolled by 4 below: the loop's own
    /// instructions would otherwise take issue slots from the FMAs.)
    #[inline(always)]
    unsafe fn step<const R: usize>(acc: &mut [[__m512; 4]; R], a: *const f32, b: *const f32) {
        let w = [_mm512_load_ps(a), _mm512_load_ps(a.add(16)), _mm512_load_ps(a.add(32)), _mm512_load_ps(a.add(48))];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*b.add(r));
            for (v, &w) in row.iter_mut().zip(&w) {
                *v = _mm512_fmadd_ps(w, x, *v);
            }
        }
    }
    let mut kk = 0;
    while kk + 4 <= depth {
        for u in 0..4 {
            step(&mut acc, a.add((kk + u) * PANEL), b.add((kk + u) * MR));
        }
        kk += 4;
    }
    while kk < depth {
        step(&mut acc, a.add(kk * PANEL), b.add(kk * MR));
        kk += 1;
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_rs + 16 * j), *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_n<const R: usize>(_: *const f32, _: *const f32, _: usize, _: *mut f32, _: usize, _: Start) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::{assert_f32_level, f64};
    use candle_core::{Device, Module};

    #[test]
    fn matches_linear_reference() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        // Rows around the tile and task sizes; depths around the slice size.
        for &(m, k, n) in &[(1, 3, 64), (7, 128, 128), (13, 129, 192), (200, 320, 640), (385, 300, 64), (77, 1024, 1024)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, n, &dev).unwrap();
            let got = F32Matrix::new(&w, Some(&b)).unwrap().forward(&x).unwrap();
            let want = candle_nn::Linear::new(f64(&w), Some(f64(&b))).forward(&f64(&x)).unwrap();
            let candle = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (m, k, n)));
            let got = F32Matrix::new(&w, None).unwrap().forward(&x.reshape((1, m, k)).unwrap()).unwrap();
            let want = f64(&x).matmul(&f64(&w).t().unwrap()).unwrap().reshape((1, m, n)).unwrap();
            let candle = x.matmul(&w.t().unwrap()).unwrap().reshape((1, m, n)).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("no bias {:?}", (m, k, n)));
        }
    }

    #[test]
    fn geglu_matches_reference() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        for &(m, k, n) in &[(5, 64, 128), (100, 130, 256), (400, 320, 1280)] {
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, n, &dev).unwrap();
            let got = F32Matrix::new(&w, Some(&b)).unwrap().forward_geglu(&x).unwrap();
            let exact = candle_nn::Linear::new(f64(&w), Some(f64(&b))).forward(&f64(&x)).unwrap();
            let want = crate::geglu_reference(&exact).unwrap();
            let candle = crate::geglu_reference(&candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap()).unwrap();
            assert_f32_level(&got, &candle, &want, &format!("{:?}", (m, k, n)));
        }
    }
}
