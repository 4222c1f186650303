#!/usr/bin/env bash
# Schemathesis against a live `serve` on the tiny fixture model (issue #22): every check
# (`--checks all`) over every operation of /openapi.json, with stateful runs following the
# document's links. Hooks (scripts/schemathesis_hooks.py) supply what JSON Schema cannot say (a
# decodable image, a prompt within 75 tokens).
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]     (default 30 per operation and phase)
#
# The seed alone decides the examples: no example database is read or kept (one left by earlier,
# longer runs replayed their cases, so a run differed between machines).
# DYNAMICRAFTER_BIN names the binary to serve (the test suite passes its own); else it is built.
# Without a `schemathesis` on PATH, one is installed into target/schemathesis-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-30}"
st=schemathesis
if ! command -v "$st" >/dev/null 2>&1; then
    venv=target/schemathesis-venv
    if [ ! -x "$venv/bin/schemathesis" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet "schemathesis==4.32.5"
    fi
    st="$venv/bin/schemathesis"
fi
bin="${DYNAMICRAFTER_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --quiet
    bin=target/debug/dynamicrafter
fi
data="$(mktemp -d)"
log="$(mktemp)"
"$bin" serve --model fixtures/tiny-v --port 0 --data-dir "$data" --max-queue 64 >"$log" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data" "$log"' EXIT
for _ in $(seq 600); do
    url="$(sed -n 's/^listening on //p' "$log")"
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not start" >&2; exit 1; }
SCHEMATHESIS_HOOKS=scripts.schemathesis_hooks PYTHONPATH=. "$st" run "$url/openapi.json" \
    --checks all --max-examples "$examples" --workers 1 --seed 1 --generation-database none --no-color
