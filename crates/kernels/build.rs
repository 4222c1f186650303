//! With the `cuda` feature: compiles our CUDA kernels to PTX with nvcc (candle's own kernels are
//! built the same way by candle-kernels). Without it: nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for kernel in KERNELS {
        println!("cargo::rerun-if-changed=src/cuda/{kernel}.cu");
    }
    for header in HEADERS {
        println!("cargo::rerun-if-changed=src/cuda/{header}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| std::path::Path::new(&h).join("bin/nvcc")))
        .unwrap_or_else(|| "nvcc".into());
    for kernel in KERNELS {
        // PTX for compute 8.0 (bf16 tensor cores), compiled for the card by the driver at load.
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
            .arg(out_dir.join(format!("{kernel}.ptx")))
            .arg(format!("src/cuda/{kernel}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {} (nvcc is needed for the cuda feature): {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on src/cuda/{kernel}.cu");
    }
}

/// The `.cu` files of `src/cuda`, each compiled to `$OUT_DIR/<name>.ptx`.
const KERNELS: [&str; 6] = ["conv_igemm", "epilogue", "flash_attention", "flash_attention2", "group_norm", "permute"];

/// What the kernels include.
const HEADERS: [&str; 5] = ["attention.cuh", "conv_igemm.cuh", "group_norm.cuh", "permute.cuh", "ptx.cuh"];
