//! [`F32Conv`] as Winograd F(2×2, 3×3): each 2×2 block of outputs ("tile") from its 4×4 input
//! patch with 16 products per channel pair instead of 36, so 2.25× fewer multiply-adds than
//! the direct kernel. Per tile, with `d` the patch and `g` the 3×3 kernel (a correlation):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, where
//! `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`,
//! `Aᵀ = [1 1 1 0; 0 1 -1 -1]`. The transforms add and subtract only (G's halves are exact), so
//! results stay at f32 rounding level, as the tests check against f64.
//!
//! The sum over input channels is, for each of the 16 transform points `e`, a GEMM
//! `M[e] = V[e] · U[e]` (tiles × c by c × co), run by the direct kernel's microkernel.

use super::super::matrix::{Bf16Pairs, Format, Start};
use super::{conv_tile, transpose16, F32Conv, Lanes};
use crate::common::{bf16_bits, output_buffer, PaddedGrid, SendPtr};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Tiles per task: the transformed weights (16·c·co values, read once per task) serve this
/// many tiles, and each point's weights (c·64 values per panel, in L2) this many tiles in
/// groups of 6 (microkernel rows). A multiple of 6 and of 8 (tiles per transposed store).
const TILES: usize = 192;
// The grid's channel blocks are what `input_tile` transforms: one 16-lane vector per position.
const _: () = assert!(F32Conv::KC == 16);
/// Input channels per microkernel call, summed in registers: longer sums round worse (the
/// tests hold each form to f32 rounding level against f64 up to 2560 channels), and one call
/// over all channels gains little (docs/PERFORMANCE.md).
const DEPTH: usize = 128;

impl F32Conv {
    /// Whether the Winograd form pays for transforming the weights on every call (16·c·co
    /// values, written to memory): it saves 10·c·co multiply-adds per output pixel, which on
    /// small images with many channels the transform eats (docs/PERFORMANCE.md).
    pub(super) fn winograd_pays(pixels: usize) -> bool {
        pixels >= 2048
    }

    /// `x` holds `(n, c, h, w)` f32; returns `(n, co, h, w)`.
    pub(super) fn forward_winograd(&self, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let u = self.winograd_weights(self.c.next_multiple_of(F32Conv::KC));
        winograd(x, Shape { n, c: self.c, co: self.co, h, w }, &self.bias, Points::F32(&u))
    }

    /// `U = G g Gᵀ` of every (output, input) channel pair, from the packed kernel:
    /// `[panel][e][c_pad][64]`, the layout the direct kernel's weights have per tap.
    fn winograd_weights(&self, c_pad: usize) -> Vec<Lanes> {
        const LANES: usize = F32Conv::PANEL / 16;
        let mut u = output_buffer::<Lanes>(self.co * c_pad);
        u.spare_capacity_mut().par_chunks_mut(16 * c_pad * LANES).enumerate().for_each(|(p, panel)| {
            for ci in 0..c_pad {
                for l in 0..LANES {
                    let g = |tap: usize| &self.packed[((p * 9 + tap) * c_pad + ci) * LANES + l].0;
                    // G along the kernel's columns (points [dx][a]), then along its rows.
                    let columns: [[[f32; 16]; 4]; 3] = std::array::from_fn(|dx| kernel_points([g(dx), g(3 + dx), g(6 + dx)]));
                    for a in 0..4 {
                        for (b, lanes) in kernel_points([&columns[0][a], &columns[1][a], &columns[2][a]]).into_iter().enumerate() {
                            panel[((a * 4 + b) * c_pad + ci) * LANES + l].write(Lanes(lanes));
                        }
                    }
                }
            }
        });
        // SAFETY: every panel's every (point, channel, lane group) was written above.
        unsafe { u.set_len(self.co * c_pad) };
        u
    }
}

/// The extents of one Winograd run.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    c: usize,
    co: usize,
    h: usize,
    w: usize,
}

/// The transformed weights `U` a Winograd run multiplies by, per panel of 64 outputs and point.
enum Points<'a> {
    /// f32, `[panel][e][c_pad][64]`, every panel: the direct kernel's microkernel.
    F32(&'a [Lanes]),
    /// bf16 pairs of input channels, `[panel][e][c_pad/2][64]`, made from the bf16 taps of
    /// `conv` a group of panels at a time (at most the given bytes of `U`): `V` is rounded to
    /// pairs too and the pair microkernel of the matrices (`vdpbf16ps`) runs.
    Bf16Pairs(&'a Bf16DotConv, usize),
}

/// The most bytes of bf16-pair `U` made at once. A layer's whole `U` is 16·c·co bf16 values
/// (105 MB for the UNet's 2560→1280 convolutions); made per call, it is made and used a group
/// of panels at a time, in blocks the heap reuses (below the 32 MB from which glibc maps
/// fresh pages to fault in, `compute::keep_freed_memory`) that add little to the peak. The
/// input transform is repeated per group: 1–2 % of those layers' work.
const POINTS_BYTES: usize = 30 << 20;

/// `x` holds `(n, c, h, w)` f32; returns `(n, co, h, w)`: the 3×3 convolution of `u`'s weights
/// plus `bias`.
fn winograd(x: &[f32], Shape { n, c, co, h, w }: Shape, bias: &[f32], points: Points) -> Vec<f32> {
    let c_pad = c.next_multiple_of(F32Conv::KC);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // The direct form's zero-padded grid, channels last: tile (f, ty, tx)'s 4×4 patch starts
    // at the position of output pixel (f, 2ty, 2tx), its rows a pitch apart. With an odd
    // height, the last tile row's patch reaches one grid row past the last zero row (for
    // junk outputs): one more row of zeros.
    let grid = PaddedGrid { n, h, w, pad_x: true };
    let len = grid.len() + grid.pitch();
    let padded = F32Conv::channels_last(x, c, &grid, len);
    let tile = |t: usize| (t / (th * tw), t % (th * tw) / tw, t % tw);
    let panels = co / F32Conv::PANEL;
    // Input channel pairs (steps of the pair microkernel).
    let steps = c_pad / 2;

    let tiles = n * th * tw;
    let threads = rayon::current_num_threads().max(1);
    let chunk = tiles.div_ceil(2 * threads).clamp(24, TILES).next_multiple_of(24);
    // Each point's rows of V and M, a cache line more than the tiles need: point strides
    // that are multiples of 4 KB would put a tile's 16 points in one L1 set.
    let (v_stride, m_stride) = (chunk * c_pad + 16, chunk * F32Conv::PANEL + 16);
    let pairs_len = if matches!(points, Points::Bf16Pairs(..)) { 16 * chunk * steps } else { 0 };
    // Panels per group: all of them for f32 (its U exists whole).
    let group = match points {
        Points::F32(_) => panels,
        Points::Bf16Pairs(_, bytes) => (bytes / (16 * steps * F32Conv::PANEL * 4)).clamp(1, panels.max(1)),
    };
    let mut y = output_buffer::<f32>(n * co * h * w);
    let y_ptr = SendPtr(y.as_mut_ptr());
    for g0 in (0..panels).step_by(group) {
        let g1 = (g0 + group).min(panels);
        let made;
        let u = match points {
            Points::F32(u) => u,
            Points::Bf16Pairs(conv, _) => {
                made = conv.winograd_points(g0..g1);
                &made[..]
            }
        };
        (0..tiles.div_ceil(chunk)).into_par_iter().for_each_init(
            // Scratch for V and M, written before it is read (rayon may call this once per
            // split, so no zeroing); whole cache lines per row of 16 channels. V in pairs, row after
            // row, for the pair microkernel.
            || (Vec::<Lanes>::with_capacity(v_stride), Vec::<Lanes>::with_capacity(m_stride), vec![0u32; pairs_len]),
            |(v, m, pairs), task| {
                let (v, m) = (v.as_mut_ptr() as *mut f32, m.as_mut_ptr() as *mut f32);
                let t0 = task * chunk;
                let count = chunk.min(tiles - t0);
                // SAFETY: reads stay inside `padded` (a tile's patch lies within `len`), `u`,
                // `v`, `m` and `pairs`; AVX-512F is available, and AVX512-BF16 for bf16 pairs
                // (`Bf16DotConv::supports`). The task writes the outputs of its own tiles, which no
                // other task writes.
                unsafe {
                    // V[e][tile][channel].
                    for t in 0..count {
                        let (f, ty, tx) = tile(t0 + t);
                        let at = grid.position((f * h + 2 * ty) * w + 2 * tx);
                        debug_assert!(at + 3 * grid.pitch() + 4 <= len, "tile {:?}: patch past the grid", (f, ty, tx));
                        for b in 0..c_pad / 16 {
                            input_tile(padded.as_ptr().add((b * len + at) * 16), grid.pitch() * 16, v.add(t * c_pad + b * 16), v_stride);
                        }
                    }
                    if let Points::Bf16Pairs(..) = points {
                        for e in 0..16 {
                            let rows = std::slice::from_raw_parts(v.add(e * v_stride), count * c_pad);
                            Bf16Pairs::pack_rows(rows, c_pad, &mut pairs[e * chunk * steps..(e + 1) * chunk * steps]);
                        }
                    }
                    for p in g0..g1 {
                        // M[e][tile][64 outputs of the panel], summed over DEPTH input channels
                        // at a time in registers.
                        for e in 0..16 {
                            let out = m.add(e * m_stride);
                            match points {
                                Points::F32(_) => {
                                    for k0 in (0..c_pad).step_by(DEPTH) {
                                        let wt = (u.as_ptr() as *const f32).add(((p * 16 + e) * c_pad + k0) * F32Conv::PANEL);
                                        for g in (0..count).step_by(F32Conv::POS) {
                                            let rows = F32Conv::POS.min(count - g);
                                            let offsets = std::array::from_fn(|r| r.min(rows - 1) * c_pad);
                                            let a = v.add(e * v_stride + g * c_pad + k0);
                                            conv_tile(rows, a, &offsets, 1, &[0], wt, 0, DEPTH.min(c_pad - k0), out.add(g * F32Conv::PANEL), F32Conv::PANEL, k0 == 0);
                                        }
                                    }
                                }
                                Points::Bf16Pairs(..) => {
                                    let x = pairs.as_ptr().add(e * chunk * steps);
                                    for s0 in (0..steps).step_by(DEPTH / 2) {
                                        let wt = (u.as_ptr() as *const u32).add((((p - g0) * 16 + e) * steps + s0) * F32Conv::PANEL);
                                        let start = if s0 == 0 { Start::Init(ZEROS.as_ptr()) } else { Start::Load };
                                        for g in (0..count).step_by(F32Conv::POS) {
                                            let rows = F32Conv::POS.min(count - g);
                                            let b = x.add(g * steps + s0);
                                            Bf16Pairs::tile(rows, wt, b, steps, (DEPTH / 2).min(steps - s0), out.add(g * F32Conv::PANEL), F32Conv::PANEL, start);
                                        }
                                    }
                                }
                            }
                        }
                        let o0 = p * F32Conv::PANEL;
                        let mut t = 0;
                        while t < count {
                            let (f, ty, tx) = tile(t0 + t);
                            let dst = y_ptr.get().add((f * co + o0) * h * w + 2 * ty * w + 2 * tx);
                            let src = m.add(t * F32Conv::PANEL);
                            let bias = &bias[o0..o0 + F32Conv::PANEL];
                            // Eight tiles side by side: two rows of 16 whole outputs.
                            if t + 8 <= count && tx + 8 <= tw && 2 * tx + 16 <= w && 2 * ty + 2 <= h {
                                output_tiles8(src, m_stride, bias, dst, w, h * w);
                                t += 8;
                            } else {
                                output_tile(src, m_stride, bias, dst, w, h * w, (h - 2 * ty).min(2), (w - 2 * tx).min(2));
                                t += 1;
                            }
                        }
                    }
                }
            },
        );
    }
    // SAFETY: the tasks together wrote every output (every tile's valid pixels, every channel).
    unsafe { y.set_len(n * co * h * w) };
    y
}

/// The start of a pair product's first slice: zeros, one panel wide.
static ZEROS: [f32; F32Conv::PANEL] = [0.0; F32Conv::PANEL];

/// A 3×3 convolution (stride 1, padding 1) with bf16 products on AVX512-BF16 (`vdpbf16ps`), f32
/// in and out: always the Winograd form. The kernel is kept as bf16 taps (9·c·co values, half
/// the f32 kernel's memory, as a bf16 model's weights are); each call transforms them to `U`
/// in f32 and rounds `U` to bf16 pairs, a group of output panels at a time ([`POINTS_BYTES`]),
/// so small images gain from the form as large ones do. `V` is rounded to bf16 after its transform, the output
/// transform runs in f32.
#[derive(Clone)]
pub struct Bf16DotConv {
    /// bf16 bits, `[panel][tap][c_pad][64]` (the f32 kernel's packing).
    taps: Vec<u16>,
    bias: Vec<f32>,
    co: usize,
    c: usize,
}

impl std::fmt::Debug for Bf16DotConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16DotConv[{}, {}, 3, 3]", self.co, self.c)
    }
}

impl Bf16DotConv {
    /// Whether this CPU runs it (AVX512-BF16) and the layer has whole panels of outputs.
    pub fn supports(co: usize) -> bool {
        Bf16Pairs::available() && F32Conv::supports(co)
    }

    /// Packs `w (co, c, 3, 3)` as bf16 taps; `bias (co)`.
    pub fn spatial_3x3(w: &Tensor, bias: &Tensor) -> Result<Self> {
        if !Self::supports(w.dim(0)?) {
            candle_core::bail!("bf16 pair conv: weight {:?}: needs a multiple of 64 outputs on a CPU with AVX512-BF16", w.dims());
        }
        let f32 = F32Conv::spatial_3x3(w, bias)?;
        let taps = lane_values(&f32.packed).par_iter().map(|&v| bf16_bits(v)).collect();
        Ok(Self { taps, bias: f32.bias, co: f32.co, c: f32.c })
    }

    /// `U = G g Gᵀ` of every (output, input) channel pair of output `panels`, rounded to bf16
    /// pairs of input channels: `[panel][e][c_pad/2][64]`, channels 2s and 2s+1 in one lane.
    fn winograd_points(&self, panels: std::ops::Range<usize>) -> Vec<Lanes> {
        const LANES: usize = F32Conv::PANEL / 16;
        let c_pad = self.c.next_multiple_of(F32Conv::KC);
        let steps = c_pad / 2;
        let len = panels.len() * F32Conv::PANEL * steps;
        let mut u = output_buffer::<Lanes>(len);
        u.spare_capacity_mut().par_chunks_mut(16 * steps * LANES).enumerate().for_each(|(i, panel)| {
            let p = panels.start + i;
            for s in 0..steps {
                for l in 0..LANES {
                    let taps = self.taps[((p * 9) * c_pad + 2 * s) * F32Conv::PANEL + 16 * l..].as_ptr();
                    // SAFETY: the nine taps of channels 2s and 2s+1 (16 lanes each, c_pad·64
                    // values apart) lie in `taps`; the 16 points (`steps·64` values apart) in
                    // this panel's part of `u`; AVX512-BF16 is available (`supports`).
                    unsafe { pair_points(taps, c_pad * F32Conv::PANEL, F32Conv::PANEL, panel.as_mut_ptr().add(s * LANES + l).cast(), steps * F32Conv::PANEL) };
                }
            }
        });
        // SAFETY: every panel's every (point, step, lane group) was written above.
        unsafe { u.set_len(len) };
        u
    }

    /// `x (n, c, h, w)` f32 on the CPU → `(n, co, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in_groups(x, POINTS_BYTES)
    }

    /// [`Self::forward`] making at most `points_bytes` of `U` at a time.
    pub(super) fn forward_in_groups(&self, x: &Tensor, points_bytes: usize) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.c || x.dtype() != DType::F32 || !x.device().is_cpu() || !Self::supports(self.co) {
            candle_core::bail!("bf16 pair conv: input {:?} {:?} on {:?}, expected f32 (n, {}, h, w) on a CPU with AVX512-BF16", x.dims(), x.dtype(), x.device(), self.c);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("bf16 pair conv: input not on the CPU") };
        let start = layout.start_offset();
        let xs = &cpu.as_slice::<f32>()?[start..start + n * c * h * w];
        let y = winograd(xs, Shape { n, c, co: self.co, h, w }, &self.bias, Points::Bf16Pairs(self, points_bytes));
        drop(storage);
        Tensor::from_vec(y, (n, self.co, h, w), &candle_core::Device::Cpu)
    }
}

/// The values of a buffer of lanes, in order.
fn lane_values(lanes: &[Lanes]) -> &[f32] {
    // SAFETY: `Lanes` is `repr(C)` 16 f32 with no padding (64 bytes, align 64).
    unsafe { std::slice::from_raw_parts(lanes.as_ptr() as *const f32, lanes.len() * 16) }
}

/// `G t` for one kernel column or row `t` (16 lanes each): its four points.
fn kernel_points([t0, t1, t2]: [&[f32; 16]; 3]) -> [[f32; 16]; 4] {
    let mut points = [[0f32; 16]; 4];
    for i in 0..16 {
        points[0][i] = t0[i];
        points[1][i] = 0.5 * (t0[i] + t1[i] + t2[i]);
        points[2][i] = 0.5 * (t0[i] - t1[i] + t2[i]);
        points[3][i] = t2[i];
    }
    points
}

/// `U = G g Gᵀ` for 16 lanes of two input channels (`g` at tap 0 of the even one, taps
/// `tap_stride` apart, the odd channel `odd` values after the even), rounded to bf16 pairs
/// (even channel low): point e goes to `u + e·e_stride` (in u32 lanes).
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; the 18 loads and 16 stores must lie inside their
/// buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_points(g: *const u16, tap_stride: usize, odd: usize, u: *mut u32, e_stride: usize) {
    use std::arch::x86_64::*;
    let half = _mm512_set1_ps(0.5);
    // G on one kernel column or row: its four points.
    let kernel_points = |t0: __m512, t1: __m512, t2: __m512| -> [__m512; 4] {
        [t0, _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(t0, t1), t2)), _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(t0, t1), t2)), t2]
    };
    let points = |g: *const u16| -> [__m512; 16] {
        let tap = |t: usize| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(g.add(t * tap_stride).cast()))));
        // Along the kernel's columns (points [dx][a]), then along its rows, as `kernel_points`.
        let columns: [[__m512; 4]; 3] = std::array::from_fn(|dx| kernel_points(tap(dx), tap(3 + dx), tap(6 + dx)));
        let rows: [[__m512; 4]; 4] = std::array::from_fn(|a| kernel_points(columns[0][a], columns[1][a], columns[2][a]));
        std::array::from_fn(|e| rows[e / 4][e % 4])
    };
    let (even, odd) = (points(g), points(g.add(odd)));
    for e in 0..16 {
        let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(even[e])));
        let hi = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(odd[e]))));
        _mm512_storeu_si512(u.add(e * e_stride).cast(), _mm512_or_si512(lo, hi));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pair_points(_: *const u16, _: usize, _: usize, _: *mut u32, _: usize) {
    unreachable!("Bf16DotConv::supports() is false off x86-64")
}

/// `V = Bᵀ d B` of one 4×4 patch for 16 channels: `patch` at its first position (16 values
/// each, rows `row` floats apart); point e goes to `v + e·e_stride`.
///
/// # Safety
/// AVX-512F must be available; the patch must be inside its buffer and `v` hold the 16 points.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_tile(patch: *const f32, row: usize, v: *mut f32, e_stride: usize) {
    use std::arch::x86_64::*;
    let d: [[__m512; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| _mm512_loadu_ps(patch.add(i * row + 16 * j))));
    // Bᵀ along the rows (s[a][j]), then along the columns.
    let s: [[__m512; 4]; 4] = [
        std::array::from_fn(|j| _mm512_sub_ps(d[0][j], d[2][j])),
        std::array::from_fn(|j| _mm512_add_ps(d[1][j], d[2][j])),
        std::array::from_fn(|j| _mm512_sub_ps(d[2][j], d[1][j])),
        std::array::from_fn(|j| _mm512_sub_ps(d[1][j], d[3][j])),
    ];
    for (a, [s0, s1, s2, s3]) in s.into_iter().enumerate() {
        let points = [_mm512_sub_ps(s0, s2), _mm512_add_ps(s1, s2), _mm512_sub_ps(s2, s1), _mm512_sub_ps(s1, s3)];
        for (b, point) in points.into_iter().enumerate() {
            _mm512_storeu_ps(v.add((a * 4 + b) * e_stride), point);
        }
    }
}

/// Row `r` (0 or 1) of `Aᵀ m A` of one tile for 16 channels (`m + e·e_stride`, point e), plus
/// the bias: outputs `[y_r0, y_r1]`, channels in lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn output_row(m: *const f32, e_stride: usize, bias: std::arch::x86_64::__m512, r: usize) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    let p = |e: usize| _mm512_loadu_ps(m.add(e * e_stride));
    // Aᵀ's row r over the points' rows, then Aᵀ over the columns.
    let q: [__m512; 4] = std::array::from_fn(|b| {
        if r == 0 {
            _mm512_add_ps(_mm512_add_ps(p(b), p(4 + b)), p(8 + b))
        } else {
            _mm512_sub_ps(_mm512_sub_ps(p(4 + b), p(8 + b)), p(12 + b))
        }
    });
    [_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(q[0], q[1]), q[2]), bias), _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(q[1], q[2]), q[3]), bias)]
}

/// Eight tiles side by side (`m` at the first, points `e_stride` apart, 64 channels), all four
/// outputs valid, to the channel-major output at `dst` (its first pixel; rows `w` apart,
/// channels `plane` apart): per 16 channels and output row, 16 pixels transposed in registers.
///
/// # Safety
/// AVX-512F must be available; the eight tiles' points must be in `m`, their outputs in `dst`'s
/// buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_tiles8(m: *const f32, e_stride: usize, bias: &[f32], dst: *mut f32, w: usize, plane: usize) {
    use std::arch::x86_64::*;
    for j in 0..F32Conv::PANEL / 16 {
        let b = _mm512_loadu_ps(bias.as_ptr().add(16 * j));
        for r in 0..2 {
            let mut pixels = [_mm512_setzero_ps(); 16];
            for k in 0..8 {
                [pixels[2 * k], pixels[2 * k + 1]] = output_row(m.add(k * F32Conv::PANEL + 16 * j), e_stride, b, r);
            }
            for (i, channel) in transpose16(&pixels).into_iter().enumerate() {
                _mm512_storeu_ps(dst.add((16 * j + i) * plane + r * w), channel);
            }
        }
    }
}

/// One tile's `valid_rows × valid_columns` outputs (the rest fall outside the image), 64
/// channels, as [`output_tiles8`] writes eight.
///
/// # Safety
/// As [`output_tiles8`], for one tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_tile(m: *const f32, e_stride: usize, bias: &[f32], dst: *mut f32, w: usize, plane: usize, valid_rows: usize, valid_columns: usize) {
    use std::arch::x86_64::*;
    for j in 0..F32Conv::PANEL / 16 {
        let b = _mm512_loadu_ps(bias.as_ptr().add(16 * j));
        for r in 0..valid_rows {
            for (col, point) in output_row(m.add(16 * j), e_stride, b, r).iter().take(valid_columns).enumerate() {
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), *point);
                for (i, value) in lanes.into_iter().enumerate() {
                    dst.add((16 * j + i) * plane + r * w + col).write(value);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_tile(_: *const f32, _: usize, _: *mut f32, _: usize) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn output_tiles8(_: *const f32, _: usize, _: &[f32], _: *mut f32, _: usize, _: usize) {
    unreachable!("F32Conv::supports() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn output_tile(_: *const f32, _: usize, _: &[f32], _: *mut f32, _: usize, _: usize, _: usize, _: usize) {
    unreachable!("F32Conv::supports() is false off x86-64")
}
