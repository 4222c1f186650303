//! Linear layers on AVX-512 with the weight packed at load: in f32 ([`F32Matrix`], the CPU's
//! f32 mode) and in bf16 pairs ([`Bf16DotMatrix`], the bf16 mode of CPUs with AVX512-BF16 but
//! no AMX). One blocking for both; only the packing and the microkernel's multiply differ
//! ([`Format`]).
//!
//! candle's `Linear` asks `gemm` for `x·Wᵀ` into a zeroed output, then adds the bias in a second
//! pass over it; `gemm` packs the weight again on every call. Here the weight is packed once
//! into panels of 64 outputs (`[panel][step][64]` 32-bit lanes, 64-byte aligned), the bias (or
//! the whole GEGLU gate) is applied while a block of the result is in registers or L1, and every
//! output element is written once. A step of the depth is one input value (f32) or two (a bf16
//! pair, which `vdpbf16ps` multiplies and adds into one f32 lane).
//!
//! Blocking: a task owns a block of up to [`ROWS`] rows of `x`, in lanes row after row. It makes
//! its outputs a pass of panels at a time (the pass's results, ≤ [`C_BLOCK`] bytes, stay in L2)
//! and walks the depth in slices of [`KC`] steps: each panel's KC × 64 weight lanes (32 KB) stay
//! in L1 while the microkernel runs over the rows, 6 rows × 4 vectors = 24 accumulators, each
//! weight vector loaded once per 6 multiply-adds.

use super::Lanes;
use crate::common::{bf16_bits, bias_f32, output_buffer, Epilogue, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::marker::PhantomData;

/// Outputs per packed panel: four 16-lane vectors.
pub(crate) const PANEL: usize = 64;
/// Rows of `x` per microkernel call.
const MR: usize = 6;
/// Steps of the depth in one pass over the panels.
const KC: usize = 128;
/// Rows of `x` per task at most.
const ROWS: usize = 192;
/// Bytes of results a task accumulates over the whole depth at once (kept in L2).
const C_BLOCK: usize = 512 << 10;

/// How a [`PackedMatrix`] holds its operands in 32-bit lanes and multiplies them.
pub trait Format: Send + Sync + 'static {
    /// Input values per lane (per step of the depth).
    const PER_LANE: usize;
    /// For errors: what the matrix is.
    const NAME: &'static str;
    /// Whether the process may run this format's microkernel ([`crate::cpu::features`]).
    fn available() -> bool;
    /// The lane of step `s` of `row` (past its end: zeros).
    fn lane(row: &[f32], s: usize) -> u32;
    /// Rows of `x` (k values each) in lanes, row after row (`steps` = k / PER_LANE lanes per
    /// row: lane s of row r at `r·steps + s`). Contiguous stores; the microkernel's broadcasts
    /// read six streams. (A `[step][6]` tile layout, one stream, cost a scattered store per
    /// lane, which showed in the bf16 products' profile: docs/PERFORMANCE.md.)
    fn pack_rows(x: &[f32], k: usize, dst: &mut [u32]);
    /// The microkernel: `c[r][0..64] = start + Σ_s a[s][0..64] ⊙ b[r][s]` for `rows` ≤ 6 rows
    /// of `steps` lanes (`b` at the first row's first step).
    ///
    /// # Safety
    /// [`available`](Self::available) must hold; `a` must hold depth × 64 lanes, `b` depth steps
    /// of each row, `c` rows rows of 64 values `c_rs` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(rows: usize, a: *const u32, b: *const u32, steps: usize, depth: usize, c: *mut f32, c_rs: usize, start: Start);
}

/// f32 values, one per lane, multiplied by `vfmadd`.
pub struct F32;

/// Pairs of bf16 values (rounded to nearest even), two per lane, multiplied by `vdpbf16ps`
/// (exact products, f32 sums).
pub struct Bf16Pairs;

/// A weight `[n, k]` (a linear layer's `[out, in]`, n a multiple of 64) packed in panels of 64
/// outputs, `packed[(panel·steps + s)·64 + j] = lane s of w[panel·64 + j]`, and the bias in f32.
pub struct PackedMatrix<F: Format> {
    packed: Vec<Lanes>,
    /// The bias, zeros for a layer without one.
    bias: Vec<f32>,
    n: usize,
    k: usize,
    format: PhantomData<F>,
}

/// f32 products on AVX-512.
pub type F32Matrix = PackedMatrix<F32>;
/// bf16 products on AVX512-BF16, f32 in and out.
pub type Bf16DotMatrix = PackedMatrix<Bf16Pairs>;

impl<F: Format> Clone for PackedMatrix<F> {
    fn clone(&self) -> Self {
        Self { packed: self.packed.clone(), bias: self.bias.clone(), n: self.n, k: self.k, format: PhantomData }
    }
}

impl<F: Format> std::fmt::Debug for PackedMatrix<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}, {}]", F::NAME, self.n, self.k)
    }
}

impl<F: Format> PackedMatrix<F> {
    /// Whether a layer with `n` outputs can be packed.
    pub fn supports(n: usize, k: usize) -> bool {
        F::available() && n.is_multiple_of(PANEL) && n > 0 && k > 0
    }

    /// Steps of the depth: k values in lanes.
    fn steps(&self) -> usize {
        self.k.div_ceil(F::PER_LANE)
    }

    /// Packs `w [n, k]` and keeps `bias [n]` in f32.
    pub fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !Self::supports(n, k) {
            candle_core::bail!("{}: [{n}, {k}] needs this CPU's instruction set and a multiple of {PANEL} outputs", F::NAME);
        }
        let bias = bias_f32(bias, n, F::NAME)?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let steps = k.div_ceil(F::PER_LANE);
        let mut packed = vec![Lanes([0.0; 16]); n * steps / 16];
        packed.par_chunks_mut(steps * PANEL / 16).enumerate().for_each(|(p, panel)| {
            for (s, lanes) in panel.chunks_exact_mut(PANEL / 16).enumerate() {
                for (j, v) in lanes.iter_mut().flat_map(|l| l.0.iter_mut()).enumerate() {
                    let row = p * PANEL + j;
                    *v = f32::from_bits(F::lane(&w[row * k..(row + 1) * k], s));
                }
            }
        });
        Ok(Self { packed, bias, n, k, format: PhantomData })
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
        if !F::available() {
            candle_core::bail!("{}: this CPU (or the instruction-set cap) does not offer it", F::NAME);
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("{}: input {dims:?} {:?} on {:?}, expected f32 (…, {}) on the CPU", F::NAME, x.dtype(), x.device(), self.k);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("{}: input not on the CPU", F::NAME) };
        let start = layout.start_offset();
        let m = x.elem_count() / k;
        let src = &cpu.as_slice::<f32>()?[start..start + m * k];
        let n = self.n;
        let n_out = if epilogue == Epilogue::Geglu { n / 2 } else { n };
        let steps = self.steps();

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
            || (vec![0u32; rows_per_task * steps], vec![0f32; scratch_len]),
            |(xp, scratch), task| {
                let (rt, group) = (task / groups, task % groups);
                let r0 = rt * rows_per_task;
                let rows = rows_per_task.min(m - r0);
                F::pack_rows(&src[r0 * k..(r0 + rows) * k], k, xp);
                let (u0, u1) = (group * per_group, ((group + 1) * per_group).min(units));
                // SAFETY: rows r0..r0+rows and the group's output columns belong to this task
                // alone; all pointers stay within `src`, `packed`, `bias`, `out` and `scratch`;
                // the format is available (checked above).
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

    /// `rows` rows of `x` (packed by [`Format::pack_rows`]) times the panels of `units`,
    /// `per_pass` units per pass over the depth, into `out` (row stride `out_rs`, the columns of
    /// unit u at u·64); with `geglu`, a unit is the pair of panels (a = u, g = n/2/64 + u), made
    /// in the scratch (room for `per_pass` pairs) and gated into `out`.
    ///
    /// # Safety
    /// The format must be available; `x` must hold rows (rounded up to 6) × steps lanes, `out`
    /// rows × out_rs; the units must be panels (pairs).
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(&self, x: *const u32, rows: usize, units: std::ops::Range<usize>, per_pass: usize, out: *mut f32, out_rs: usize, geglu: Option<Geglu>) {
        let steps = self.steps();
        let half = self.n / 2 / PANEL;
        let packed = self.packed.as_ptr() as *const u32;
        for u0 in units.clone().step_by(per_pass) {
            let pass = u0..(u0 + per_pass).min(units.end);
            for s0 in (0..steps).step_by(KC) {
                let depth = KC.min(steps - s0);
                for u in pass.clone() {
                    // (panel, its column in `out` or in the scratch block)
                    let (panels, count) = match &geglu {
                        Some(_) => ([(u, 2 * (u - u0) * PANEL), (half + u, (2 * (u - u0) + 1) * PANEL)], 2),
                        None => ([(u, u * PANEL), (0, 0)], 1),
                    };
                    for &(p, col) in &panels[..count] {
                        let a = packed.add((p * steps + s0) * PANEL);
                        let bias = self.bias.as_ptr().add(p * PANEL);
                        let (c, c_rs) = match &geglu {
                            Some(g) => (g.scratch.add(col), g.scratch_rs),
                            None => (out.add(col), out_rs),
                        };
                        let start = if s0 == 0 { Start::Init(bias) } else { Start::Load };
                        for t0 in (0..rows).step_by(MR) {
                            F::tile(MR.min(rows - t0), a, x.add(t0 * steps + s0), steps, depth, c.add(t0 * c_rs), c_rs, start);
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

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
pub enum Start {
    /// From 64 values (the bias of the panel) in every row.
    Init(*const f32),
    /// From one value per row (`init[r]` in all 64 lanes of row r: a bias per row).
    Rows(*const f32),
    /// From the tile's current values in `c` (a later slice of the depth).
    Load,
}

impl Format for F32 {
    const PER_LANE: usize = 1;
    const NAME: &'static str = "f32 matrix";

    fn available() -> bool {
        super::available()
    }

    fn lane(row: &[f32], s: usize) -> u32 {
        row[s].to_bits()
    }

    fn pack_rows(x: &[f32], _: usize, dst: &mut [u32]) {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d = v.to_bits();
        }
    }

    unsafe fn tile(rows: usize, a: *const u32, b: *const u32, steps: usize, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
        match rows {
            6 => tile_f32::<6>(a, b, steps, depth, c, c_rs, start),
            5 => tile_f32::<5>(a, b, steps, depth, c, c_rs, start),
            4 => tile_f32::<4>(a, b, steps, depth, c, c_rs, start),
            3 => tile_f32::<3>(a, b, steps, depth, c, c_rs, start),
            2 => tile_f32::<2>(a, b, steps, depth, c, c_rs, start),
            _ => tile_f32::<1>(a, b, steps, depth, c, c_rs, start),
        }
    }
}

impl Format for Bf16Pairs {
    const PER_LANE: usize = 2;
    const NAME: &'static str = "bf16 pair matrix";

    fn available() -> bool {
        let features = crate::cpu::features();
        features.avx512 && features.avx512_bf16
    }

    fn lane(row: &[f32], s: usize) -> u32 {
        let at = |i: usize| row.get(i).map_or(0, |&v| bf16_bits(v)) as u32;
        at(2 * s) | at(2 * s + 1) << 16
    }

    fn pack_rows(x: &[f32], k: usize, dst: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `tile` runs only where the format is available, and so does this.
        unsafe {
            pack_rows_bf16(x, k, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{x:?} {k} {dst:?}: not available off x86-64")
    }

    unsafe fn tile(rows: usize, a: *const u32, b: *const u32, steps: usize, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
        match rows {
            6 => tile_bf16::<6>(a, b, steps, depth, c, c_rs, start),
            5 => tile_bf16::<5>(a, b, steps, depth, c, c_rs, start),
            4 => tile_bf16::<4>(a, b, steps, depth, c, c_rs, start),
            3 => tile_bf16::<3>(a, b, steps, depth, c, c_rs, start),
            2 => tile_bf16::<2>(a, b, steps, depth, c, c_rs, start),
            _ => tile_bf16::<1>(a, b, steps, depth, c, c_rs, start),
        }
    }
}

/// [`Format::pack_rows`] for bf16 pairs: each row rounded 32 values per conversion instruction
/// (round to nearest even, as [`bf16_bits`]) into 16 lanes, stored in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_rows_bf16(x: &[f32], k: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let steps = k.div_ceil(2);
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as u16 };
    for (row, out) in x.chunks_exact(k).zip(dst.chunks_exact_mut(steps)) {
        let mut chunks = row.chunks_exact(32);
        // Whole chunks without masks: masked stores are slow on some CPUs (AMD Zen 4/5).
        for (i, chunk) in (&mut chunks).enumerate() {
            let p = chunk.as_ptr();
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p)));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * i).cast(), pairs);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let p = rest.as_ptr();
            let lo = _mm512_maskz_loadu_ps(mask(rest.len()), p);
            let hi = _mm512_maskz_loadu_ps(mask(rest.len().saturating_sub(16)), p.add(16.min(rest.len())));
            let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(16 * (k / 32)).cast(), mask(rest.len().div_ceil(2)), pairs);
        }
    }
}

/// The microkernel's shared body: accumulators from `start`, `depth` steps of `step` (unrolled
/// by 4: the loop's own instructions would otherwise take issue slots from the multiplies),
/// stored to `c`. Inlined into each format's `#[target_feature]` function.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_body<const R: usize>(
    a: *const u32,
    depth: usize,
    c: *mut f32,
    c_rs: usize,
    start: Start,
    step: impl Fn(&mut [[std::arch::x86_64::__m512; 4]; R], *const u32, usize),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = match start {
                Start::Init(init) => _mm512_loadu_ps(init.add(16 * j)),
                Start::Rows(init) => _mm512_set1_ps(*init.add(r)),
                Start::Load => _mm512_loadu_ps(c.add(r * c_rs + 16 * j)),
            };
        }
    }
    let mut s = 0;
    while s + 4 <= depth {
        for u in 0..4 {
            step(&mut acc, a.add((s + u) * PANEL), s + u);
        }
        s += 4;
    }
    while s < depth {
        step(&mut acc, a.add(s * PANEL), s);
        s += 1;
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_rs + 16 * j), *v);
        }
    }
}

/// One step: 64 weights times R rows' values (rows `steps` lanes apart), by fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32<const R: usize>(a: *const u32, b: *const u32, steps: usize, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
    use std::arch::x86_64::*;
    tile_body::<R>(a, depth, c, c_rs, start, |acc, a, s| {
        let a = a as *const f32;
        let w = [_mm512_load_ps(a), _mm512_load_ps(a.add(16)), _mm512_load_ps(a.add(32)), _mm512_load_ps(a.add(48))];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(f32::from_bits(*b.add(r * steps + s)));
            for (v, &w) in row.iter_mut().zip(&w) {
                *v = _mm512_fmadd_ps(w, x, *v);
            }
        }
    })
}

/// One step: 64 weight pairs times R rows' pairs (rows `steps` lanes apart), by `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const R: usize>(a: *const u32, b: *const u32, steps: usize, depth: usize, c: *mut f32, c_rs: usize, start: Start) {
    use std::arch::x86_64::*;
    tile_body::<R>(a, depth, c, c_rs, start, |acc, a, s| {
        let load = |i: usize| std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(a.add(16 * i).cast()));
        let w = [load(0), load(1), load(2), load(3)];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*b.add(r * steps + s) as i32));
            for (v, &w) in row.iter_mut().zip(&w) {
                *v = _mm512_dpbf16_ps(*v, w, x);
            }
        }
    })
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32<const R: usize>(_: *const u32, _: *const u32, _: usize, _: usize, _: *mut f32, _: usize, _: Start) {
    unreachable!("available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const R: usize>(_: *const u32, _: *const u32, _: usize, _: usize, _: *mut f32, _: usize, _: Start) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::{assert_f32_level, f64};
    use candle_core::{Device, Module};

    #[test]
    fn matches_linear_reference() {
        if !F32::available() {
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
        if !F32::available() {
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

    /// bf16 pairs against an f64 product of the same bf16-rounded operands: `vdpbf16ps`'s
    /// products are exact, so only the f32 sums differ. Odd depths leave half a pair.
    #[test]
    fn bf16_pairs_match_f64_on_rounded_inputs() {
        if !Bf16Pairs::available() {
            eprintln!("no AVX512-BF16 on this machine (or capped): nothing to check");
            return;
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        for &(m, k, n) in &[(1, 3, 64), (7, 31, 128), (13, 257, 192), (200, 320, 640), (385, 301, 64), (77, 1024, 1024)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, n, &dev).unwrap();
            let got = Bf16DotMatrix::new(&w, Some(&b)).unwrap().forward(&x).unwrap();
            let want = round(&x).matmul(&round(&w).t().unwrap()).unwrap().broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap();
            let diff = max_abs(&(got.to_dtype(DType::F64).unwrap() - &want).unwrap());
            let scale = max_abs(&want);
            assert!(diff <= 1e-5 * scale.max(1.0), "{m}x{k}x{n}: max error {diff:.2e} (scale {scale:.2e})");
            // The same product in f32 differs by the rounding of the operands only.
            let exact = f64(&x).matmul(&f64(&w).t().unwrap()).unwrap();
            let rel = max_abs(&(got.to_dtype(DType::F64).unwrap() - exact.broadcast_add(&f64(&b)).unwrap()).unwrap()) / scale;
            assert!(rel <= 0.05, "{m}x{k}x{n}: {rel:.2e} from the f32 product");
        }
        for &(m, k, n) in &[(5, 64, 128), (100, 131, 256)] {
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, n, &dev).unwrap();
            let matrix = Bf16DotMatrix::new(&w, Some(&b)).unwrap();
            let got = matrix.forward_geglu(&x).unwrap();
            let want = crate::geglu_reference(&matrix.forward(&x).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
            let diff = max_abs(&(got.to_dtype(DType::F64).unwrap() - &want).unwrap());
            assert!(diff <= 1e-5, "geglu {m}x{k}x{n}: max error {diff:.2e}");
            assert_eq!(got.dims(), &[2, m, n / 2]);
        }
        assert!(Bf16DotMatrix::new(&Tensor::zeros((32, 64), DType::F32, &dev).unwrap(), None).is_err());
    }
}
