//! The instruction sets of this CPU, detected once for the whole process. Every CPU kernel
//! asks [`features`] (never `is_x86_feature_detected!` itself), so the environment variable
//! [`CAP_VAR`] (`DYNAMICRAFTER_CPU_ISA=avx2`, say) caps what runs: a machine with AMX can run
//! and test the paths of CPUs without it.

use std::sync::OnceLock;

/// Instruction-set levels, each including the ones before it. The order is the dispatch order
/// (best last): a cap at one level turns off everything after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust (still vectorised with SSE2 by the compiler).
    Scalar,
    /// AVX2 + FMA: the portable loops compiled for 256-bit vectors.
    Avx2,
    /// AVX-512 F/BW/VL: our f32 matrix and convolution kernels.
    Avx512,
    /// AVX-512 VNNI: int8 products (`q8_0` weights).
    Avx512Vnni,
    /// AVX512-BF16: f32 → bf16 conversion (and `vdpbf16ps`).
    Avx512Bf16,
    /// AMX-TILE + AMX-BF16, with the tile state granted by the OS: bf16 tile products.
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 6] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Avx512Bf16, Isa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Amx => "amx",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }
}

/// What this CPU offers our kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub avx512: bool,
    pub avx512_vnni: bool,
    pub avx512_bf16: bool,
    pub amx: bool,
}

impl CpuFeatures {
    /// The hardware's features (AMX only once the OS has granted its register state).
    pub fn detect() -> Self {
        Self::detect_up_to(Isa::Amx)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect_up_to(cap: Isa) -> Self {
        use std::arch::is_x86_feature_detected as has;
        let allowed = |isa: Isa| isa <= cap;
        let avx2 = allowed(Isa::Avx2) && has!("avx2") && has!("fma");
        let avx512 = allowed(Isa::Avx512) && avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        Self {
            avx2,
            avx512,
            avx512_vnni: allowed(Isa::Avx512Vnni) && avx512 && has!("avx512vnni"),
            avx512_bf16: allowed(Isa::Avx512Bf16) && avx512 && has!("avx512bf16"),
            // Asked of the OS only when it may be used.
            amx: allowed(Isa::Amx) && amx_present() && request_tile_state(),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect_up_to(_: Isa) -> Self {
        Self::default()
    }

    /// These features without those above `cap`.
    pub fn capped(self, cap: Isa) -> Self {
        let allowed = |isa: Isa| isa <= cap;
        Self {
            avx2: self.avx2 && allowed(Isa::Avx2),
            avx512: self.avx512 && allowed(Isa::Avx512),
            avx512_vnni: self.avx512_vnni && allowed(Isa::Avx512Vnni),
            avx512_bf16: self.avx512_bf16 && allowed(Isa::Avx512Bf16),
            amx: self.amx && allowed(Isa::Amx),
        }
    }

    /// The highest level present.
    pub fn best(self) -> Isa {
        match self {
            Self { amx: true, .. } => Isa::Amx,
            Self { avx512_bf16: true, .. } => Isa::Avx512Bf16,
            Self { avx512_vnni: true, .. } => Isa::Avx512Vnni,
            Self { avx512: true, .. } => Isa::Avx512,
            Self { avx2: true, .. } => Isa::Avx2,
            _ => Isa::Scalar,
        }
    }
}

/// The environment variable that caps the instruction sets the kernels use.
pub const CAP_VAR: &str = "DYNAMICRAFTER_CPU_ISA";

/// The cap [`CAP_VAR`] asks for: `None` when unset or empty, an error naming the accepted
/// values when it is not one of them.
pub fn cap_from_env() -> Result<Option<Isa>, String> {
    match std::env::var(CAP_VAR) {
        Err(_) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => Isa::from_name(&v).map(Some).ok_or_else(|| {
            let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
            format!("{CAP_VAR}={v}: expected one of {}", names.join(", "))
        }),
    }
}

/// The features every kernel of this process uses: the CPU's, capped by [`CAP_VAR`] (an
/// unknown value caps nothing here; front ends check [`cap_from_env`] and refuse it).
pub fn features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| CpuFeatures::detect_up_to(cap_from_env().ok().flatten().unwrap_or(Isa::Amx)))
}

/// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
#[cfg(target_arch = "x86_64")]
fn amx_present() -> bool {
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux hands out the AMX register
/// state only on request; true when it is granted.
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

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_turn_off_the_levels_above() {
        let all = CpuFeatures { avx2: true, avx512: true, avx512_vnni: true, avx512_bf16: true, amx: true };
        for cap in Isa::ALL {
            let capped = all.capped(cap);
            assert_eq!(capped.best(), cap, "{}", cap.name());
            assert_eq!(capped.capped(cap), capped);
        }
        assert_eq!(all.capped(Isa::Avx512Vnni), CpuFeatures { avx512_bf16: false, amx: false, ..all });
        assert_eq!(CpuFeatures::default().best(), Isa::Scalar);
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("sse9"), None);
        // Whatever this machine has, the process-wide set never exceeds it.
        let detected = CpuFeatures::detect();
        assert_eq!(features().capped(detected.best()), features());
    }

    /// Every instruction-set path below this machine's best runs the whole kernel suite: this
    /// test binary again, once per cap (`DYNAMICRAFTER_CPU_ISA`), so a CPU with AVX-512 also
    /// tests the AVX2 and baseline paths, one with AMX the AVX512-BF16 ones, and so on.
    #[test]
    fn every_lower_isa_passes_the_kernel_tests() {
        const INNER: &str = "DYNAMICRAFTER_ISA_SWEEP";
        if std::env::var_os(INNER).is_some() {
            return;
        }
        let exe = std::env::current_exe().expect("the test binary");
        let best = features().best();
        for cap in Isa::ALL.into_iter().filter(|&isa| isa < best) {
            let out = std::process::Command::new(&exe)
                .env(CAP_VAR, cap.name())
                .env(INNER, "1")
                .args(["--skip", "every_lower_isa_passes_the_kernel_tests"])
                .output()
                .expect("running the kernel tests again");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "kernel tests capped at {}:\n{stdout}\n{}", cap.name(), String::from_utf8_lossy(&out.stderr));
            let passed = stdout.lines().find(|l| l.starts_with("test result:")).unwrap_or_default().to_string();
            eprintln!("capped at {}: {passed}", cap.name());
        }
    }
}
