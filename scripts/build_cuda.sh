#!/usr/bin/env bash
# Builds the CUDA binaries on a machine without a GPU or a CUDA toolkit, for a device session to
# carry (issue #18): nvcc and the CUDA libraries from PyPI's wheels, unpacked into one CUDA_HOME,
# and a stub libcuda.so (soname libcuda.so.1: the driver's own is loaded at run time) to link.
#
#   scripts/build_cuda.sh [OUT_DIR]       # default .gpu-bin (git-ignored: add it to .git/info/exclude)
#
# OUT_DIR receives dynamicrafter-bench, dynamicrafter-bench-cudnn (the `cudnn` build) and the
# test executables gpu_check.sh runs (kernels, parity, pipeline), packed as OUT_DIR.txz: each binary is ~60 MB, mostly candle's kernels, which
# xz's 64 MiB window stores once (~20 MB in all; a device call carries 64 MiB):
#
#   run: tar xJf .gpu-bin.txz && COMMIT=<sha> scripts/gpu_check.sh .gpu-bin      (carry .gpu-bin.txz)
#
# CUDA_VERSION (default 13.0; a 13.x: the wheels' folder is nvidia/cu13) must not be newer than
# the card's driver (580 → 13.0): an older driver refuses the PTX of a newer nvcc (check with
# `grep -a '^\.version' OUT_DIR/kernels`: PTX 9.0 for 13.0). CUDA_COMPUTE_CAP (default 90: H100/H200) picks
# candle's kernels' target. CUDA_ROOT (default /tmp/cuda-$CUDA_VERSION) holds the toolkit.
set -euo pipefail
OUT=${1:-.gpu-bin}
VERSION=${CUDA_VERSION:-13.0}
ROOT=${CUDA_ROOT:-/tmp/cuda-$VERSION}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Apart from the CPU build's target folder, whose binaries it would replace.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}

if [ ! -x "$ROOT/nvidia/cu13/bin/nvcc" ]; then
    mkdir -p "$ROOT/wheels"
    python3 -m pip download -q --no-deps -d "$ROOT/wheels" \
        "nvidia-cuda-nvcc==$VERSION.*" "nvidia-nvvm==$VERSION.*" "nvidia-cuda-crt==$VERSION.*" \
        "nvidia-cuda-runtime==$VERSION.*" "nvidia-cuda-cccl==$VERSION.*" "nvidia-cuda-nvrtc==$VERSION.*" \
        "nvidia-cublas==13.*" "nvidia-curand"
    for w in "$ROOT"/wheels/*.whl; do python3 -m zipfile -e "$w" "$ROOT"; done
    chmod +x "$ROOT"/nvidia/cu13/bin/* "$ROOT"/nvidia/cu13/nvvm/bin/*
fi
export CUDA_HOME=$ROOT/nvidia/cu13
export PATH=$CUDA_HOME/bin:$PATH
lib=$CUDA_HOME/lib
for so in "$lib"/lib{cudart,cublas,cublasLt,curand,nvrtc}.so.*; do
    case $so in *.so.*.*) continue ;; esac  # the versioned files only, not nvrtc-builtins.so.13.x
    ln -sf "$(basename "$so")" "${so%%.so*}.so"
done

# Stubs to link against: every function cudarc declares for the driver (and cuDNN), as an
# empty symbol, under the soname of the real library the machine with the GPU loads instead.
cudarc=$(cargo metadata --format-version 1 --features cudnn | python3 -c 'import json, os, sys
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
stub() { # library soname bindings prefix
    grep -ohE "fn $4[A-Za-z0-9_]+\(" "$cudarc/src/$3/sys/mod.rs" | sed 's/fn //; s/(//' | sort -u | sed 's/.*/void &(void) {}/' >"$ROOT/$1_stub.c"
    cc -shared -fPIC -o "$lib/$1.so" -Wl,-soname,"$2" "$ROOT/$1_stub.c"
}
stub libcuda libcuda.so.1 driver cu
stub libcudnn libcudnn.so.9 cudnn cudnn

target=$CARGO_TARGET_DIR
# cuDNN's convolutions (`cudnn` feature) in a binary of their own: it needs libcudnn to start.
cargo build --release --features cudnn -p dynamicrafter-bench
cp "$target/release/dynamicrafter-bench" "$ROOT/dynamicrafter-bench-cudnn"
cargo build --release --features cuda -p dynamicrafter-bench
cargo test --release --features cuda -p dynamicrafter-kernels -p dynamicrafter-engine --no-run
tests=$(cargo test --release --features cuda -p dynamicrafter-kernels -p dynamicrafter-engine --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        print(("kernels" if t["kind"] == ["lib"] and t["name"] == "dynamicrafter_kernels" else t["name"]) + " " + m["executable"])')
rm -rf "$OUT"
mkdir -p "$OUT"
cp "$target/release/dynamicrafter-bench" "$ROOT/dynamicrafter-bench-cudnn" "$OUT/"
while read -r name exe; do
    case $name in kernels | parity | pipeline) cp "$exe" "$OUT/$name" ;; esac
done <<<"$tests"
XZ_OPT=-9 tar cJf "$OUT.txz" "$OUT"
ls -la "$OUT" "$OUT.txz"
