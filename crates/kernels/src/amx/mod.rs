//! bf16 products on Intel AMX (`tdpbf16ps`) for the CPU's bf16 mode: f32 activations rounded to
//! bf16, weights packed at load as whole bf16 tiles, f32 accumulation and f32 results.
//! [`Bf16Matrix`] serves the linear layers (the feed-forward's GEGLU gate fused in),
//! [`Bf16Conv`] the UNet's 3×3 and temporal convolutions, [`attention`] the attention's two
//! products; this file holds the tile helpers they share.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. The OS
//! grants the tile register state once, on request ([`crate::cpu`]).

pub mod attention;
mod conv;
mod matrix;

pub use conv::Bf16Conv;
pub use matrix::Bf16Matrix;

pub(crate) use crate::common::bf16_bits;
use rayon::prelude::*;

/// Rows and columns of the output blocks (2×2 tiles of 16×16 f32) and the k step of one tile.
pub(crate) const BLOCK: usize = 32;

/// Whether the process may run these kernels: AMX-TILE and AMX-BF16 present and the tile state
/// granted ([`crate::cpu::features`]).
pub fn available() -> bool {
    crate::cpu::features().amx
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
    crate::cpu::features().avx512_bf16
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

/// 64 bytes, 64-byte aligned: buffers of these keep every tile row on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u16; 32]);

/// A zeroed, 64-byte aligned buffer of at least `len` bf16 values, zeroed by all threads: one
/// thread first-touching every page of a many-megabyte buffer takes its page faults one at a
/// time (docs/PERFORMANCE.md).
pub(crate) fn lines(len: usize) -> Vec<Line> {
    let mut buffer = Vec::with_capacity(len.div_ceil(32));
    buffer.spare_capacity_mut().par_chunks_mut(1024).for_each(|part| part.fill(std::mem::MaybeUninit::new(Line([0; 32]))));
    // SAFETY: every element was just written.
    unsafe { buffer.set_len(buffer.capacity()) };
    buffer
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Line")
    }
}

pub(crate) fn as_u16(l: &[Line]) -> &[u16] {
    // SAFETY: `Line` is 32 u16 without padding.
    unsafe { std::slice::from_raw_parts(l.as_ptr().cast::<u16>(), l.len() * 32) }
}

pub(crate) fn as_u16_mut(l: &mut [Line]) -> &mut [u16] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr().cast::<u16>(), l.len() * 32) }
}

/// Stores the 2×2 output tiles tmm0–3 at `c` (row length `n` f32, stride in bytes).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_block(c: *mut f32, n: usize, stride: usize) {
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

