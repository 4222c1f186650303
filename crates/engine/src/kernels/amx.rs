//! bf16 matrix products on Intel AMX (`tdpbf16ps`): f32 activations rounded to bf16, weights
//! stored as bf16 pairs, f32 accumulation. 2–5× our f32 GEMM on this project's CPU; the
//! building block of a CPU bf16 mode (issue #4), not yet wired into the networks.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. Linux hands
//! out the AMX register state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once.

use candle_core::{DType, Result, Tensor};

/// Rows and columns of the output blocks (2×2 tiles of 16×16 f32) and the k step of one tile.
const BLOCK: usize = 32;
/// Output rows per task.
const ROWS_PER_TASK: usize = 512;

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

/// A weight `[n, k]` (a linear layer's `[out, in]`) packed for `tdpbf16ps`: k/2 rows of n bf16
/// pairs (`packed[k/2][j][k%2] = w[j][k]`), and the layer's bias in f32.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    packed: Vec<u16>,
    bias: Option<Vec<f32>>,
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
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!("bf16 AMX matrix: bias of the wrong length for {n} outputs");
        }
        let w = w.to_dtype(DType::BF16)?.to_vec2::<half::bf16>()?;
        let mut packed = vec![0u16; n * k];
        for (j, row) in w.iter().enumerate() {
            for (kk, v) in row.iter().enumerate() {
                packed[(kk / 2) * n * 2 + j * 2 + kk % 2] = v.to_bits();
            }
        }
        Ok(Self { packed, bias, n, k })
    }

    /// `x · wᵀ (+ bias)` for f32 `x (…, k)` on the CPU: `(…, n)` in f32. Each task rounds its
    /// own rows of `x` to bf16 (zero rows pad the last block), multiplies, and adds the bias
    /// while the rows are in cache.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
        let (n, rows) = (self.n, m.div_ceil(BLOCK) * BLOCK);
        let mut out = vec![0f32; rows * n];
        use rayon::prelude::*;
        out.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, c)| {
            let task_rows = c.len() / n;
            let first = task * ROWS_PER_TASK;
            let mut a = vec![0u16; task_rows * k];
            let have = m.saturating_sub(first).min(task_rows) * k;
            for (d, s) in a[..have].iter_mut().zip(&src[first * k..first * k + have]) {
                *d = half::bf16::from_f32(*s).to_bits();
            }
            // SAFETY: `a` holds `task_rows` rows of k, `packed` k/2 rows of n pairs, `c`
            // `task_rows` rows of n; every dimension is a multiple of 32 (checked in `new`,
            // rows padded to whole blocks).
            unsafe { gemm(a.as_ptr(), self.packed.as_ptr(), c.as_mut_ptr(), task_rows, n, k) };
            if let Some(b) = &self.bias {
                for row in c.chunks_mut(n) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
        });
        drop(storage);
        out.truncate(m * n);
        let mut shape = dims;
        *shape.last_mut().expect("rank ≥ 1") = n;
        Tensor::from_vec(out, shape, x.device())
    }
}

/// Tile configuration: palette 1, tiles 0–7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// `c (rows × n f32) = a (rows × k bf16) · b (packed)`, all dimensions multiples of 32. Tiles:
/// tmm0–3 the 2×2 output block, tmm4–5 two 16-row slices of `a`, tmm6–7 two 16-column slices of
/// `b`. Column blocks outermost, so a 32-column slice of `b` stays in L1 across the rows.
///
/// # Safety
/// AMX must be [`available`]; the pointers must cover the sizes above.
#[cfg(target_arch = "x86_64")]
unsafe fn gemm(a: *const u16, b: *const u16, c: *mut f32, rows: usize, n: usize, k: usize) {
    use std::arch::asm;
    let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack));
    let (stride_a, stride_b, stride_c) = (k * 2, n * 4, n * 4);
    for n0 in (0..n).step_by(BLOCK) {
        for m0 in (0..rows).step_by(BLOCK) {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
            for k0 in (0..k).step_by(BLOCK) {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(m0 * k + k0),
                    a1 = in(reg) a.add((m0 + 16) * k + k0),
                    b0 = in(reg) b.add(k0 * n + n0 * 2),
                    b1 = in(reg) b.add(k0 * n + (n0 + 16) * 2),
                    sa = in(reg) stride_a,
                    sb = in(reg) stride_b,
                    options(nostack)
                );
            }
            asm!(
                "tilestored [{c00} + {sc}*1], tmm0",
                "tilestored [{c01} + {sc}*1], tmm1",
                "tilestored [{c10} + {sc}*1], tmm2",
                "tilestored [{c11} + {sc}*1], tmm3",
                c00 = in(reg) c.add(m0 * n + n0),
                c01 = in(reg) c.add(m0 * n + n0 + 16),
                c10 = in(reg) c.add((m0 + 16) * n + n0),
                c11 = in(reg) c.add((m0 + 16) * n + n0 + 16),
                sc = in(reg) stride_c,
                options(nostack)
            );
        }
    }
    asm!("tilerelease", options(nostack));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gemm(_: *const u16, _: *const u16, _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("available() is false off x86-64")
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
        // A 3-D input keeps its leading dimensions.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (32, 64), &dev).unwrap();
        assert_eq!(Bf16Matrix::new(&w, None).unwrap().forward(&x).unwrap().dims(), &[2, 3, 32]);
        assert!(Bf16Matrix::new(&Tensor::zeros((30, 64), DType::F32, &dev).unwrap(), None).is_err());
    }
}
