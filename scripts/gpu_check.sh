#!/usr/bin/env bash
# The CUDA checks and timings, in one run on a machine with an NVIDIA GPU (issue #7):
# the fused-attention kernel test, parity and reduced-precision tests on CUDA, the UNet and
# whole-pipeline benchmarks at 256, 320×512 and 576×1024, the fused-vs-chunked attention A/B,
# and PyTorch's timing of the same UNet forward (scripts/torch_unet.py) where PyTorch is there.
#
#   scripts/gpu_check.sh BIN_DIR [FIXTURES_DIR]
#
# BIN_DIR holds `dynamicrafter-bench` (`cargo build --release --features cuda -p
# dynamicrafter-bench`), the kernels' test binary as `kernels` and the engine's `parity` and
# `pipeline` of a `--features cuda` build (`cargo test --release --features cuda -p
# dynamicrafter-kernels -p dynamicrafter-engine --no-run` lists them); the tests find the
# tiny-v fixture where they were built, so run this
# from a checkout at the same path or point FIXTURES_DIR (default: fixtures) at the folders to
# check. Logs go to $OUT (default /tmp/gpu-check); the last lines printed are the summary.
# STEPS="name …" runs only the steps named (to fit a time budget); the default runs them all.
set -u
BIN=${1:?usage: gpu_check.sh BIN_DIR [FIXTURES_DIR]}
FIX=${2:-fixtures}
OUT=${OUT:-/tmp/gpu-check}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
summary=()
step() { # name timeout command...
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-28s rc %-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
    grep -E "median|peak GPU|stages:|relative error|: [0-9.e+-]+$|dB vs fp32|test result|FAIL|panicked" "$LOGS/$name.log" | cut -c1-170
    tar czf "$OUT/logs.tgz" -C "$LOGS" .  # one file back, even if a later step is cut off
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
export DYNAMICRAFTER_TEST_DEVICE=cuda DYNAMICRAFTER_FIXTURES=$FIX RUST_BACKTRACE=1

step kernel-tests 60 "$BIN/kernels" --nocapture --test-threads 1 flash_attention kernels_match_candle_on_gpu
step ops-1024 60 "$BIN/dynamicrafter-bench" --device cuda ops-1024 --runs 3
step bench-unet-bf16 90 "$BIN/dynamicrafter-bench" --device cuda unet-256 unet-512 unet-1024 --runs 3
step parity-cuda 60 "$BIN/parity" --nocapture --test-threads 1
step pipeline-tests-cuda 60 "$BIN/pipeline" --nocapture --test-threads 1
step bench-pipeline-1024 200 "$BIN/dynamicrafter-bench" --device cuda pipeline-1024 --runs 1
step bench-pipeline-512-256 150 "$BIN/dynamicrafter-bench" --device cuda pipeline-512 pipeline-256 --runs 1
step bench-unet-chunked 60 env DYNAMICRAFTER_FLASH_ATTENTION=0 "$BIN/dynamicrafter-bench" --device cuda unet-1024 --runs 2
step bench-unet-fp16-fp32 90 bash -c "'$BIN/dynamicrafter-bench' --device cuda --precision f16 unet-1024 --runs 2; '$BIN/dynamicrafter-bench' --device cuda --precision fp32 unet-1024 unet-256 --runs 2"
if [ -z "${SKIP_TORCH:-}" ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step torch-unet 200 python3 scripts/torch_unet.py 256 512 1024 --runs 5
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
