//! bf16 products on Intel AMX (`tdpbf16ps`) for the CPU's bf16 mode: f32 activations rounded to
//! bf16, weights packed at load as whole bf16 tiles, f32 accumulation and f32 results.
//! [`Bf16Matrix`] serves the linear layers (the feed-forward's GEGLU gate fused in),
//! [`Bf16Conv`] the UNet's 3×3 and temporal convolutions; `amx_attention` builds on the same
//! tile helpers.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. Linux hands
//! out the AMX register state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once.

#[cfg(target_arch = "x86_64")]
use super::conv::{pixels_channels_last, transpose16};
use super::conv::PaddedGrid;
use super::SendPtr;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows and columns of the output blocks (2×2 tiles of 16×16 f32) and the k step of one tile.
pub(crate) const BLOCK: usize = 32;
/// Output rows per task for an input row of `k` values: the task's bf16 copy of its rows stays
/// within half of a 2 MB L2 (what CPUs with AMX have), since every column block reads it all
/// again; at most 512. A fixed 512 rows put k = 5120 at 5 MB: 1024×5120×1280 took 12.8–13.3 ms
/// instead of 7.9–8.6.
fn rows_per_task(k: usize) -> usize {
    ((1 << 20) / (2 * k.max(1)) / BLOCK * BLOCK).clamp(BLOCK, 512)
}

/// Whether this CPU and OS run [`Bf16Matrix`]: AMX-TILE and AMX-BF16 present and the tile state
/// granted to this process.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && request_tile_state()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: 0 when the kernel grants it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call; it only changes which register state this process may use.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
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

/// What a product does with each block of its result while the block is in cache (here and in
/// [`super::f32_matrix`]).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Epilogue {
    /// `y = x·wᵀ + bias`.
    Bias,
    /// `[a, g] = x·wᵀ + bias` split in halves; `y = a · GELU_erf(g)` (n/2 columns).
    Geglu,
}

impl Bf16Matrix {
    /// Packs `w [n, k]` (n and k multiples of 32) and keeps `bias [n]` in f32.
    pub fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !n.is_multiple_of(BLOCK) || !k.is_multiple_of(BLOCK) {
            candle_core::bail!("bf16 AMX matrix: [{n}, {k}] is not a multiple of {BLOCK} on both sides");
        }
        let bias = super::bias_f32(bias, n, "bf16 AMX matrix")?;
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
            return crate::kernels::geglu(&self.forward(x)?);
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
        let mut out: Vec<f32> = super::output_buffer(m * n_out);
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

/// The A operand: `rows` rows of k f32 (`stride` apart) → bf16 tiles of 16 rows × 32 values,
/// `dst[(r/16·k/32 + kb)·512 + r%16·32 + k%32]`; the rows of `dst` past `rows` are zero.
pub(crate) fn a_tiles(src: &[f32], stride: usize, rows: usize, k: usize, dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if bf16_conversion() {
        // SAFETY: the features were just detected.
        return unsafe { a_tiles_bf16(src, stride, rows, k, dst) };
    }
    a_tiles_rounded(src, stride, rows, k, dst)
}

/// Whether this CPU converts f32 to bf16 in one instruction (AVX512-BF16, with the AVX-512
/// subsets its users need). Every CPU with AMX has it.
pub(crate) fn bf16_conversion() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`a_tiles`] with AVX512-BF16's conversion (round to nearest even, as [`bf16_bits`]): 32 values
/// per instruction. LLVM vectorised the plain loop across rows instead, into gathers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn a_tiles_bf16(src: &[f32], stride: usize, rows: usize, k: usize, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    a_tiles_with(src, stride, rows, k, dst, |s, d| {
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s.as_ptr().add(16)), _mm512_loadu_ps(s.as_ptr()));
        _mm512_storeu_si512(d.as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(v));
    })
}

dispatch!(a_tiles_rounded, fn(src: &[f32], stride: usize, rows: usize, k: usize, dst: &mut [u16]) {
    a_tiles_with(src, stride, rows, k, dst, |s, d| {
        for (o, &v) in d.iter_mut().zip(s) {
            *o = bf16_bits(v);
        }
    })
});

/// The loop of [`a_tiles`], each run of 32 values rounded by `convert(src32, dst32)`.
#[inline(always)]
fn a_tiles_with(src: &[f32], stride: usize, rows: usize, k: usize, dst: &mut [u16], convert: impl Fn(&[f32], &mut [u16])) {
    let kblocks = k / 32;
    for r in 0..dst.len() / k {
        for kb in 0..kblocks {
            let at = ((r / 16) * kblocks + kb) * 512 + (r % 16) * 32;
            let d32 = &mut dst[at..at + 32];
            if r < rows {
                convert(&src[r * stride + kb * 32..r * stride + kb * 32 + 32], d32);
            } else {
                d32.fill(0);
            }
        }
    }
}

dispatch!(pub(crate) b_tiles, fn(w: &[f32], stride: usize, n: usize, k: usize, dst: &mut [u16]) {
    // The B operand of `x · wᵀ`: rows j < n of w (k f32, `stride` apart) → per 16 rows and 32 of
    // k one tile `[k pair][j][2]`; rows from n up to the next multiple of 32 are zero.
    let kblocks = k / 32;
    for j in 0..n.next_multiple_of(32) {
        for kk in 0..k {
            let v = if j < n { bf16_bits(w[j * stride + kk]) } else { 0 };
            dst[((j / 16) * kblocks + kk / 32) * 512 + (kk % 32) / 2 * 32 + (j % 16) * 2 + kk % 2] = v;
        }
    }
});

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
            d.write((a[j] + bias_a[j]) * crate::kernels::gelu_erf(g[j] + bias_g[j]));
        }
    }
});

/// One 32×32 block of `a · b` into `c` (32 rows of 32 f32): rows from tile row `m16` of `a`
/// (tile order, `kblocks` tiles per 16 rows), columns from tile column `j16` of `packed`.
///
/// # Safety
/// The tiles must be configured ([`configure_tiles`]) on this thread; `a` must hold tile rows
/// m16, m16+1 and `packed` tile columns j16, j16+1 of `kblocks` tiles each.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
pub(crate) unsafe fn product_block(a: *const u16, packed: *const u16, kblocks: usize, m16: usize, j16: usize, c: *mut f32) {
    use std::arch::asm;
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
    let (a0, a1) = (a.add(m16 * kblocks * 512), a.add((m16 + 1) * kblocks * 512));
    let (b0, b1) = (packed.add(j16 * kblocks * 512), packed.add((j16 + 1) * kblocks * 512));
    for kb in 0..kblocks {
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(kb * 512),
            a1 = in(reg) a1.add(kb * 512),
            b0 = in(reg) b0.add(kb * 512),
            b1 = in(reg) b1.add(kb * 512),
            s = in(reg) 64usize,
            options(nostack)
        );
    }
    store_block(c, BLOCK, BLOCK * 4);
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn configure_tiles() {
    unreachable!("available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn product_block(_: *const u16, _: *const u16, _: usize, _: usize, _: usize, _: *mut f32) {
    unreachable!("available() is false off x86-64")
}

/// f32 → bf16 bits, rounded to nearest even (as `half::bf16::from_f32` for finite values), in
/// a form LLVM vectorises.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// 64 bytes, 64-byte aligned: buffers of these keep every tile row on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u16; 32]);

/// A zeroed, 64-byte aligned buffer of at least `len` bf16 values, zeroed by all threads: one
/// thread first-touching every page of a many-megabyte buffer (the AMX convolution's input grid
/// was one) cost a quarter of that op's time.
pub(crate) fn lines(len: usize) -> Vec<Line> {
    let mut buffer = Vec::with_capacity(len.div_ceil(32));
    buffer.spare_capacity_mut().par_chunks_mut(1024).for_each(|part| part.fill(std::mem::MaybeUninit::new(Line([0; 32]))));
    // SAFETY: every element was just written.
    unsafe { buffer.set_len(buffer.capacity()) };
    buffer
}

/// A convolution whose taps are shifts along a padded image's rows: the UNet's 3×3 convolution
/// (stride 1, padding 1) and its temporal (3,1,1) one, bf16 products on AMX, f32 in and out.
///
/// The input goes into the [`PaddedGrid`](super::conv::PaddedGrid) (all frames in one
/// zero-padded run of positions) channels last in blocks of 32 channels (`[c/32][position][32]`
/// bf16), so a tile of 16 positions × 32 channels is 1 KB of contiguous, aligned memory, and tap
/// `(dy, dx)` is the same tile shifted by whole 64-byte rows. (Channel-major planes made every
/// shifted tile row straddle two cache lines in 16 different pages: a quarter of the op's time.)
/// The weights are the other operand (32 input × 16 output channels per tile); each 32 × 32
/// result block is transposed in registers to the channel-major output, plus the bias.
#[derive(Debug, Clone)]
pub struct Bf16Conv {
    /// Per 16 output channels, tap and 32 input channels: one tile of 16 input pairs × 16
    /// output channels × 2 (1 KB).
    packed: Vec<Line>,
    bias: Vec<f32>,
    co: usize,
    c: usize,
    /// Taps along the image's columns: 3, or 1 for the temporal conv (three along rows in both).
    kw: usize,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Line")
    }
}

impl Bf16Conv {
    /// `w [co, c, 3, 3]`, `bias [co]`: the 3×3 convolution of `(n, c, h, w)` images.
    pub fn spatial_3x3(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, 3, 3)
    }

    /// `w [co, c, 3, 1, 1]`, `bias [co]`: Conv3d (3,1,1) with padding (1,0,0) over `(b, c, t, h·w)`.
    pub fn temporal(w: &Tensor, bias: &Tensor) -> Result<Self> {
        Self::new(w, bias, 3, 1)
    }

    fn new(w: &Tensor, bias: &Tensor, kh: usize, kw: usize) -> Result<Self> {
        let (co, c) = (w.dim(0)?, w.dim(1)?);
        let taps = kh * kw;
        if w.elem_count() != co * c * taps || bias.dims() != [co] {
            candle_core::bail!("bf16 AMX conv: weight {:?} / bias {:?} are not a {kh}×{kw} conv", w.dims(), bias.dims());
        }
        if !co.is_multiple_of(BLOCK) || !c.is_multiple_of(BLOCK) {
            candle_core::bail!("bf16 AMX conv: {c} → {co} channels is not a multiple of {BLOCK} on both sides");
        }
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let kblocks = c / BLOCK;
        let mut packed = lines(co * c * taps);
        let flat = as_u16_mut(&mut packed);
        for o in 0..co {
            for ci in 0..c {
                for tap in 0..taps {
                    let tile = ((o / 16) * taps + tap) * kblocks + ci / 32;
                    flat[tile * 512 + (ci % 32) / 2 * 32 + (o % 16) * 2 + ci % 2] = bf16_bits(w[(o * c + ci) * taps + tap]);
                }
            }
        }
        Ok(Self { packed, bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?, co, c, kw })
    }

    /// `x (n, c, h, w)` f32 on the CPU (for the temporal conv: `(b, c, t, h·w)`) → `(n, co, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !available() || !bf16_conversion() {
            candle_core::bail!("bf16 AMX conv: this CPU or OS offers no AMX (or no AVX512-BF16)");
        }
        let (n, c, h, w) = x.dims4()?;
        if c != self.c || !x.device().is_cpu() || x.dtype() != DType::F32 {
            candle_core::bail!("bf16 AMX conv: input {:?} {:?} on {:?}, expected f32 with {} channels on the CPU", x.dims(), x.dtype(), x.device(), self.c);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("bf16 AMX conv: input not on the CPU") };
        let src = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * c * h * w];
        let co = self.co;
        let grid = PaddedGrid { n, h, w, pad_x: self.kw == 3 };
        // Output positions in whole 32-position blocks; each channel block's plane covers the
        // taps of the last block.
        let cols = grid.outputs().next_multiple_of(BLOCK);
        let shifts: Vec<usize> = (0..grid.taps()).map(|tap| grid.shift(tap)).collect();
        let plane = cols + shifts[shifts.len() - 1];
        let kblocks = c / BLOCK;
        // One line (32 bf16 channels) per position; `fill_channels_last` writes every line.
        let mut grid_lines = super::output_buffer::<Line>(kblocks * plane);
        grid_lines.spare_capacity_mut().par_chunks_mut(plane).enumerate().for_each(|(kb, lines)| {
            // SAFETY: AVX-512F, BW and BF16 are available (checked above).
            unsafe { fill_channels_last(&grid, &src[kb * BLOCK * h * w..], h * w, c * h * w, lines) };
        });
        // SAFETY: every plane was written in full above.
        unsafe { grid_lines.set_len(kblocks * plane) };
        drop(storage);

        let mut out: Vec<f32> = super::output_buffer(n * co * h * w);
        let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr());
        // Positions per task: the span of positions whose weight reads one pass serves.
        let chunk = (512 * 1024 / 4 / co / BLOCK * BLOCK).clamp(BLOCK, 512);
        let chunks = cols.div_ceil(chunk);
        let grid_bf16 = as_u16(&grid_lines);
        (0..chunks).into_par_iter().for_each(|task| {
            let q0 = task * chunk;
            let rows = chunk.min(cols - q0);
            let finish = |ob: usize, m0: usize, block: &[f32]| {
                // SAFETY: AVX-512F is available (checked above); the block's valid positions
                // are output pixels of this task alone.
                unsafe { store_block_channel_major(&grid, q0 + m0, block, &self.bias[ob * BLOCK..(ob + 1) * BLOCK], out_ptr.get().add(ob * BLOCK * h * w), co) };
            };
            // SAFETY: every plane holds `plane` ≥ q0 + rows + the last shift positions;
            // `packed` holds co/16 × taps × c/32 tiles.
            unsafe { conv_tiles(grid_bf16.as_ptr().add(q0 * 32), plane, kblocks, &shifts, as_u16(&self.packed).as_ptr(), co, rows, finish) };
        });
        // SAFETY: the tasks initialised every output pixel of every channel.
        unsafe { out.set_len(n * co * h * w) };
        Tensor::from_vec(out, (n, co, h, w), x.device())
    }
}

/// Writes one plane of the channels-last grid: `lines[g]` = the 32 channels of `x` (channel
/// `i` at `x[i·channel_stride ..]`, frame f at `f·frame_stride`) at grid position `g` as bf16,
/// zero lines for the padding.
///
/// # Safety
/// AVX-512F and AVX512-BF16 must be available; `x` must hold 32 channels of every frame.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn fill_channels_last(grid: &PaddedGrid, x: &[f32], channel_stride: usize, frame_stride: usize, lines: &mut [MaybeUninit<Line>]) {
    use std::arch::x86_64::*;
    grid.segments(lines.len(), |range, image| match image {
        None => lines[range].fill(MaybeUninit::new(Line([0; 32]))),
        Some((f, offset)) => {
            for x0 in (0..grid.w).step_by(16) {
                let count = 16.min(grid.w - x0);
                let base = x.as_ptr().add(f * frame_stride + offset + x0);
                let low = pixels_channels_last(base, channel_stride, count, 16);
                let high = pixels_channels_last(base.add(16 * channel_stride), channel_stride, count, 16);
                for p in 0..count {
                    let line = _mm512_cvtne2ps_pbh(high[p], low[p]);
                    _mm512_storeu_si512(lines[range.start + x0 + p].as_mut_ptr().cast(), std::mem::transmute::<__m512bh, __m512i>(line));
                }
            }
        }
    });
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill_channels_last(_: &PaddedGrid, _: &[f32], _: usize, _: usize, _: &mut [MaybeUninit<Line>]) {
    unreachable!("available() is false off x86-64")
}

/// Writes a result block (`block[q·32 + o]`: 32 positions from grid position `first` × 32
/// output channels) to the channel-major output `out` (channel o at `out + o·h·w`, frames
/// `co·h·w` apart) plus `bias`, 16 × 16 at a time through a transpose in registers; each image
/// row's run of valid positions is one masked store per channel.
///
/// # Safety
/// AVX-512F must be available; `out` must hold the 32 channels of every frame.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_block_channel_major(grid: &PaddedGrid, first: usize, block: &[f32], bias: &[f32], out: *mut MaybeUninit<f32>, co: usize) {
    use std::arch::x86_64::*;
    let (pitch, hw, outputs) = (grid.pitch(), grid.h * grid.w, grid.outputs());
    for half in 0..2 {
        let q0 = first + 16 * half;
        // Runs of valid positions among these 16: (first index, mask, output offset of index 0).
        let mut runs = [(0usize, 0u16, 0usize); 16];
        let mut count = 0;
        let mut i = 0;
        while i < 16 && q0 + i < outputs {
            let q = q0 + i;
            let (r, x) = (q / pitch, q % pitch);
            let (f, y) = (r / (grid.h + 1), r % (grid.h + 1));
            if y == grid.h || x >= grid.w {
                i += 1;
                continue;
            }
            let len = (grid.w - x).min(16 - i).min(outputs - q);
            let mask = (((1u32 << len) - 1) << i) as u16;
            // Index i lands on pixel (f, y, x): index 0 sits i floats before it.
            runs[count] = (i, mask, f * co * hw + y * grid.w + x);
            count += 1;
            i += len;
        }
        if count == 0 {
            continue;
        }
        for part in 0..2 {
            let rows = transpose16(&std::array::from_fn(|p| _mm512_loadu_ps(block.as_ptr().add((16 * half + p) * BLOCK + 16 * part))));
            for (j, row) in rows.into_iter().enumerate() {
                let o = 16 * part + j;
                let v = _mm512_add_ps(row, _mm512_set1_ps(bias[o]));
                for &(i, mask, offset) in &runs[..count] {
                    // Masked: only lanes i.. of the run are written, each to its own pixel.
                    let base = out.add(o * hw + offset).cast::<f32>().wrapping_sub(i);
                    _mm512_mask_storeu_ps(base, mask, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_block_channel_major(_: &PaddedGrid, _: usize, _: &[f32], _: &[f32], _: *mut MaybeUninit<f32>, _: usize) {
    unreachable!("available() is false off x86-64")
}

pub(crate) fn as_u16(l: &[Line]) -> &[u16] {
    // SAFETY: `Line` is 32 u16 without padding.
    unsafe { std::slice::from_raw_parts(l.as_ptr().cast::<u16>(), l.len() * 32) }
}

pub(crate) fn as_u16_mut(l: &mut [Line]) -> &mut [u16] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr().cast::<u16>(), l.len() * 32) }
}

/// The products of [`Bf16Conv`] for `rows` output positions (a multiple of 32) from `x`, the
/// channels-last grid at the task's first position (`kblocks` planes of `plane` lines): each
/// block of 32 output channels (`ob`) × 32 positions (from `m0`) goes to `finish(ob, m0,
/// block)` as `block[q % 32 · 32 + o % 32]` while it is in L1.
///
/// # Safety
/// AMX must be [`available`]; every plane must hold rows + the last shift positions from `x`;
/// `packed` co/16 × taps × kblocks tiles.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tiles(x: *const u16, plane: usize, kblocks: usize, shifts: &[usize], packed: *const u16, co: usize, rows: usize, mut finish: impl FnMut(usize, usize, &[f32])) {
    use std::arch::asm;
    configure_tiles();
    let taps = shifts.len();
    #[repr(C, align(64))]
    struct Block([f32; BLOCK * BLOCK]);
    let mut block = Block([0.0; BLOCK * BLOCK]);
    for ob in 0..co / BLOCK {
        let (w0, w1) = (packed.add(2 * ob * taps * kblocks * 512), packed.add((2 * ob + 1) * taps * kblocks * 512));
        for m0 in (0..rows).step_by(BLOCK) {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
            for kb in 0..kblocks {
                // The taps of one channel block read overlapping runs: they stay in L1.
                let xk = x.add((kb * plane + m0) * 32);
                for (tap, &shift) in shifts.iter().enumerate() {
                    let wt = (tap * kblocks + kb) * 512;
                    let a0 = xk.add(shift * 32);
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.add(16 * 32),
                        b0 = in(reg) w0.add(wt),
                        b1 = in(reg) w1.add(wt),
                        s = in(reg) 64usize,
                        options(nostack)
                    );
                }
            }
            // Rows of the result block are positions, columns output channels.
            store_block(block.0.as_mut_ptr(), BLOCK, BLOCK * 4);
            finish(ob, m0, &block.0);
        }
    }
    asm!("tilerelease", options(nostack));
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tiles(_: *const u16, _: usize, _: usize, _: &[usize], _: *const u16, _: usize, _: usize, _: impl FnMut(usize, usize, &[f32])) {
    unreachable!("available() is false off x86-64")
}

/// Stores the 2×2 output tiles tmm0–3 at `c` (row length `n` f32, stride in bytes).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_block(c: *mut f32, n: usize, stride: usize) {
    std::arch::asm!(
        "tilestored [{c00} + {sc}*1], tmm0",
        "tilestored [{c01} + {sc}*1], tmm1",
        "tilestored [{c10} + {sc}*1], tmm2",
        "tilestored [{c11} + {sc}*1], tmm3",
        c00 = in(reg) c,
        c01 = in(reg) c.add(16),
        c10 = in(reg) c.add(16 * n),
        c11 = in(reg) c.add(16 * n + 16),
        sc = in(reg) stride,
        options(nostack)
    );
}

/// Palette 1, tiles 0–7 of 16 rows × 64 bytes, for this thread.
///
/// # Safety
/// AMX must be [`available`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn configure_tiles() {
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack));
}

/// The operand of `ldtilecfg`.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

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
            let want = crate::kernels::geglu_reference(&matrix.forward(&x).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
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

    /// Both convolutions against candle's f64 convolution of the same bf16-rounded operands.
    #[test]
    fn amx_convs_match_f64_on_rounded_inputs() {
        if !available() {
            eprintln!("no AMX on this machine: nothing to check");
            return;
        }
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        let check = |got: &Tensor, want: &Tensor, what: String| {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff <= 1e-5 * scale.max(1.0), "{what}: max error {diff:.2e} (scale {scale:.2e})");
        };
        for (n, c, co, h, w) in [(1, 32, 32, 1, 1), (2, 64, 96, 5, 7), (3, 32, 64, 9, 16), (1, 96, 32, 16, 16), (2, 32, 32, 4, 40)] {
            let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let got = Bf16Conv::spatial_3x3(&wt, &b).unwrap().forward(&x).unwrap();
            let want = crate::kernels::conv3x3_reference(&round(&x), &round(&wt), &b.to_dtype(DType::F64).unwrap()).unwrap();
            check(&got, &want, format!("3x3 {:?}", (n, c, co, h, w)));
        }
        for (b, c, co, t, s) in [(1, 32, 32, 1, 3), (2, 64, 32, 4, 6), (1, 32, 64, 16, 33)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, t, s), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.1, (co, c, 3, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, co, &dev).unwrap();
            let got = Bf16Conv::temporal(&wt, &bias).unwrap().forward(&x).unwrap();
            let want = crate::kernels::temporal_conv_reference(&round(&x), &round(&wt), &bias.to_dtype(DType::F64).unwrap()).unwrap();
            check(&got, &want, format!("temporal {:?}", (b, c, co, t, s)));
        }
        let w = Tensor::zeros((32, 16, 3, 3), DType::F32, &dev).unwrap();
        assert!(Bf16Conv::spatial_3x3(&w, &Tensor::zeros(32, DType::F32, &dev).unwrap()).is_err());
    }
}
