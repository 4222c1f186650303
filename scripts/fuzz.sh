#!/usr/bin/env bash
# Coverage-guided fuzzing of everything that reads untrusted input (issue #22): each target in
# fuzz/fuzz_targets/ for SECONDS (default 600) under cargo fuzz (nightly toolchain, AddressSanitizer,
# at most 2 GiB per process: an allocation past it is a finding). New corpus entries stay in
# fuzz/corpus/<target>/ (not committed); a crash lands in fuzz/artifacts/<target>/: fix it, then
# copy the input to fuzz/regressions/<target>/ so `cargo test` replays it on stable.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(checkpoint config image submission tokenizer)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cd fuzz
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    echo "== $t: ${seconds} s"
    cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=20 -print_final_stats=1 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|stat::|==[0-9]+==|SUMMARY|Test unit written|INFO: Running with)" || true
    if ls "artifacts/$t"/* >/dev/null 2>&1; then
        echo "!! $t: findings in fuzz/artifacts/$t/"
    fi
done
