#!/usr/bin/env bash
# The CUDA checks and timings, in one run on a machine with an NVIDIA GPU (issues #7, #18): the
# kernel tests (both fused attention kernels, group norm, convolutions (shifted and implicit
# GEMMs), GEMM epilogues, permutes), parity and
# reduced-precision tests on CUDA, the UNet forward, the CFG step (two passes against one batch),
# the forward replayed as a CUDA graph
# and whole-pipeline benchmarks at 256, 320×512 and 576×1024 (and 576×1024 with --offload),
# the fused-vs-chunked attention A/B, and PyTorch's timing of the same UNet forward: our
# re-statement (scripts/torch_unet.py) and, where `.upstream/` holds upstream's lvdm/ and
# configs/, upstream's own UNet (scripts/upstream_unet.py). It ends by writing $OUT/gpu.json
# (docs/bench/gpu.json's format, scripts/gpu_json.py) from the JSON of those runs.
#
#   scripts/gpu_check.sh BIN_DIR [FIXTURES_DIR]
#
# BIN_DIR holds `dynamicrafter-bench`, the kernels' test binary as `kernels` and the engine's
# `parity` and `pipeline` of a `--features cuda` build: scripts/build_cuda.sh makes them on a
# machine without a GPU and packs them as .gpu-bin.txz. A device call carries that and
# `.upstream` (both git-ignored) and runs
#   tar xJf .gpu-bin.txz && COMMIT=<sha> scripts/gpu_check.sh .gpu-bin
# The tests read the fixtures from FIXTURES_DIR (default: fixtures). Logs go to $OUT (default
# /tmp/gpu-check) as logs.tgz (every step's log and JSON); the last lines printed are the
# summary. COMMIT names the commit in gpu.json (default: git's HEAD).
# STEPS="name …" runs only the steps named; gpu.json is rewritten after every step from what the
# call has run; the steps run in the script's order, which is their priority. The whole list
# takes longer than one call (600 s) and than a session's device time (15 min, starts
# included), so split it, e.g.
#   call 1: STEPS="kernel-tests parity-cuda pipeline-tests-cuda bench-unet-bf16 bench-unet-levers bench-graph torch-unet"
#   call 2: STEPS="bench-pipeline-1024 bench-pipeline-1024-passes bench-pipeline-offload bench-pipeline-512 bench-pipeline-256 ops-1024 bench-unet-variants pipeline-tests-graph bench-pipeline-graph torch-upstream-unet bench-guided-1024 bench-cudnn"
# with the second call's timeout set to the time left (a step cut off loses only itself: the
# JSON and logs of those before it come back), and merge the two calls' json/ folders (in
# logs.tgz) with scripts/gpu_json.py afterwards. cuda-kernels-off (candle's ops only: where
# parity-cuda or pipeline-tests-cuda fails, put it first in call 2 to tell our kernels' fault from
# the engine's), bench-unet-chunked (fused against chunked attention) and bench-unet-fp16-fp32
# are in neither list: for a session with time to spare.
set -u
BIN=${1:?usage: gpu_check.sh BIN_DIR [FIXTURES_DIR]}
FIX=${2:-fixtures}
OUT=${OUT:-/tmp/gpu-check}
LOGS=$(mktemp -d)
JSON=$LOGS/json
mkdir -p "$OUT" "$JSON"
summary=()
step() { # name timeout command...
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-28s rc %-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
    grep -E "median|peak GPU|stages:|kernels:|relative error|: [0-9.e+-]+$|dB vs fp32|test result|FAIL|panicked" "$LOGS/$name.log" | cut -c1-170
    # gpu.json from what has run so far, and one file of logs back, even if a later step is cut off.
    python3 scripts/gpu_json.py "$JSON" --card "$card" --commit "$commit" >"$OUT/gpu.json" 2>>"$LOGS/gpu_json.log"
    tar czf "$OUT/logs.tgz" -C "$LOGS" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
commit=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# The CUDA libraries (cuBLAS, cuRAND, NVRTC, cuDNN) of PyTorch's wheels, where the machine has no toolkit's.
nvlibs=$(python3 -c 'import glob, nvidia, os; print(":".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))))' 2>/dev/null)
export LD_LIBRARY_PATH=${nvlibs:+$nvlibs:}${LD_LIBRARY_PATH:-}
export DYNAMICRAFTER_TEST_DEVICE=cuda DYNAMICRAFTER_FIXTURES=$FIX RUST_BACKTRACE=1

# In priority order (STEPS picks, this order runs): correctness, the forward against PyTorch and
# what each lever does to it, then whole runs, then the rest.
step kernel-tests 90 "$BIN/kernels" --nocapture --test-threads 1 flash_attention kernels_match_candle_on_gpu epilogues_match_candle_on_gpu permute_bias_add_matches add_layer_norm_matches conv1x1_matches implicit_gemm_convolutions permutes_match_candle_on_gpu
step parity-cuda 60 "$BIN/parity" --nocapture --test-threads 1
step pipeline-tests-cuda 60 "$BIN/pipeline" --nocapture --test-threads 1
step bench-unet-bf16 90 "$BIN/dynamicrafter-bench" --device cuda unet-256 unet-512 unet-1024 --runs 3 --json "$JSON/unet.json"
# Each kernel lever's effect on the forward: the staged attention kernel only, the shifted-GEMM
# convolutions instead of the implicit GEMM, heads split by copies around the attention with
# three q/k/v products, candle's elementwise ops and permutes instead of ours (ops-1024 times
# each op both ways; the group norm against candle's composition and November's 0.54 ms).
step bench-unet-levers 240 bash -c "DYNAMICRAFTER_FLASH_ATTENTION=1 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2 && DYNAMICRAFTER_CONV_IGEMM=0 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2 && DYNAMICRAFTER_FLASH_ATTENTION=split DYNAMICRAFTER_FUSED_QKV=0 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2 && DYNAMICRAFTER_CUDA_EPILOGUES=0 DYNAMICRAFTER_CUDA_PERMUTE=0 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2"
# Launch overhead: one forward replayed as a CUDA graph (does it capture at all; how much of a
# forward is launches), at each size.
step bench-graph 120 "$BIN/dynamicrafter-bench" --device cuda graph-256 graph-512 graph-1024 --runs 3
TORCH=
if [ -z "${SKIP_TORCH:-}" ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then TORCH=1; fi
[ -n "$TORCH" ] && step torch-unet 200 python3 scripts/torch_unet.py 256 512 1024 --runs 5 --modes bf16,fp16 --json "$JSON/torch.json"
# Whole runs, one step per size (1024 first, the headline), each with its own JSON: a call cut
# off keeps the sizes done before it.
step bench-pipeline-1024 150 "$BIN/dynamicrafter-bench" --device cuda pipeline-1024 --runs 1 --json "$JSON/pipeline-1024.json"
# The same run with the guidance passes one by one and the feed-forwards whole (as in November):
# what the batch (and its feed-forwards in pieces) does to the time and the peak.
step bench-pipeline-1024-passes 150 env DYNAMICRAFTER_CFG_BATCH=0 DYNAMICRAFTER_FF_CHUNK=0 "$BIN/dynamicrafter-bench" --device cuda pipeline-1024 --runs 1
step bench-pipeline-offload 200 "$BIN/dynamicrafter-bench" --device cuda --offload pipeline-1024 --runs 1 --json "$JSON/pipeline-offload.json"
for size in 512 256; do
    step bench-pipeline-$size 150 "$BIN/dynamicrafter-bench" --device cuda pipeline-$size --runs 1 --json "$JSON/pipeline-$size.json"
done
step ops-1024 120 "$BIN/dynamicrafter-bench" --device cuda ops-1024 --runs 3
# The kernels' other shapes on the whole forward (ops-1024 times each on its own): the implicit
# GEMM's tiles and pipeline depths (by default 128x128s4, 64x256s3 at 320 channels; each here
# for every convolution), the attention shapes before the
# short and wide kernels, the group norms as passes of their own instead of in the convolutions'
# input copies, the temporal blocks and temporal transformers' entries between permutes instead
# of on frames.
step bench-unet-variants 240 bash -c "for tile in 128x128s4 128x128s2 128x256s3 64x256s3; do DYNAMICRAFTER_CONV_IGEMM_TILE=\$tile '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2; done; DYNAMICRAFTER_FLASH_ATTENTION=2 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2; DYNAMICRAFTER_CONV_NORM=0 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2; DYNAMICRAFTER_CUDA_FRAMES=0 '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2"
# Graphs in the pipeline (DYNAMICRAFTER_CUDA_GRAPH=1, off by default): its tests on the
# fixtures, then whole runs to hold against bench-pipeline-256/512.
step pipeline-tests-graph 60 env DYNAMICRAFTER_CUDA_GRAPH=1 "$BIN/pipeline" --nocapture --test-threads 1
step bench-pipeline-graph 150 env DYNAMICRAFTER_CUDA_GRAPH=1 "$BIN/dynamicrafter-bench" --device cuda pipeline-256 pipeline-512 --runs 1
[ -n "$TORCH" ] && [ -d .upstream/lvdm ] && step torch-upstream-unet 200 python3 scripts/upstream_unet.py --src .upstream 256 512 1024 --runs 5 --modes bf16,fp16 --json "$JSON/upstream.json"
step bench-guided-1024 90 "$BIN/dynamicrafter-bench" --device cuda guided-1024 --runs 3
if [ -x "$BIN/dynamicrafter-bench-cudnn" ]; then
    step bench-cudnn 120 bash -c "'$BIN/dynamicrafter-bench-cudnn' --device cuda unet-1024 --runs 3 && DYNAMICRAFTER_CUDNN=0 '$BIN/dynamicrafter-bench-cudnn' --device cuda unet-1024 --runs 3 && '$BIN/dynamicrafter-bench-cudnn' --device cuda ops-1024 --runs 3"
fi
# Every kernel of ours off (DYNAMICRAFTER_CUDA_KERNELS=0, candle's ops only): the way around them
# the README offers works (the tests pass), and the forward it costs.
step cuda-kernels-off 150 env DYNAMICRAFTER_CUDA_KERNELS=0 bash -c "'$BIN/parity' --nocapture --test-threads 1 && '$BIN/pipeline' --nocapture --test-threads 1 && '$BIN/dynamicrafter-bench' --device cuda unet-1024 --runs 2"
step bench-unet-chunked 60 env DYNAMICRAFTER_FLASH_ATTENTION=0 "$BIN/dynamicrafter-bench" --device cuda unet-1024 --runs 2
step bench-unet-fp16-fp32 90 bash -c "'$BIN/dynamicrafter-bench' --device cuda --precision f16 unet-1024 --runs 2; '$BIN/dynamicrafter-bench' --device cuda --precision fp32 unet-1024 unet-256 --runs 2"
cat "$OUT/gpu.json"

echo "== summary"
printf '%s\n' "${summary[@]}"
