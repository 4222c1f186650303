"""Writes docs/bench/gpu.json (issue #18's record) from one scripts/gpu_check.sh run's JSON files.

    python3 scripts/gpu_json.py DIR --card NAME --commit SHA [--date YYYY-MM-DD] > gpu.json

DIR holds what gpu_check.sh wrote: unet.json, pipeline-1024/512/256.json (or one pipeline.json),
pipeline-offload.json (dynamicrafter-bench --json), torch.json (scripts/torch_unet.py --json) and upstream.json (scripts/upstream_unet.py
--json); a missing file leaves its figures out. PyTorch's figure per size is the faster of
torch_unet.py and upstream's UNet, in bf16 autocast (`torch_bf16`); fp16 beside it.
"""
import argparse, datetime, json, os, re, sys


def load(d, name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def by_case(bench, pattern):
    """{size: result} for bench results whose name matches `pattern` (one group: the size)."""
    out = {}
    for r in (bench or {}).get("results", []):
        m = re.match(pattern, r["name"])
        if m:
            out[m.group(1)] = r
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--card", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    a = ap.parse_args()
    unet = by_case(load(a.dir, "unet.json"), r"unet-(\d+) forward")
    # One file for all sizes, or (gpu_check.sh now) one per size.
    pipe = {}
    for name in ("pipeline.json", "pipeline-1024.json", "pipeline-512.json", "pipeline-256.json"):
        pipe.update(by_case(load(a.dir, name), r"pipeline-(\d+) "))
    off = by_case(load(a.dir, "pipeline-offload.json"), r"pipeline-(\d+) ")
    torch_sources = {name: load(a.dir, f"{name}.json") or {} for name in ("torch", "upstream")}

    forward = {}
    for size in ("256", "512", "1024"):
        row = {}
        if size in unet:
            row["ours"] = round(unet[size]["median_ms"], 2)
        for mode in ("bf16", "fp16"):
            figures = {src: t[size][mode] for src, t in torch_sources.items() if mode in t.get(size, {})}
            if figures:
                src = min(figures, key=figures.get)
                row[f"torch_{mode}"] = round(figures[src], 2)
                row[f"torch_{mode}_from"] = src
        if "ours" in row and "torch_bf16" in row:
            row["ratio_to_torch_bf16"] = round(row["ours"] / row["torch_bf16"], 3)
        if row:
            forward[size] = row
    gb = lambda b: None if b is None else round(b / 1e9, 2)
    record = {
        "card": a.card,
        "date": a.date,
        "commit": a.commit,
        "unet_forward_ms": forward,
        "pipeline_s": {s: round(r["median_ms"] / 1e3, 2) for s, r in pipe.items()},
        "peak_gpu_gb": {s: gb(r.get("peak_gpu_bytes")) for s, r in pipe.items()},
    }
    for s, r in off.items():
        record["peak_gpu_gb"][f"{s}_offload"] = gb(r.get("peak_gpu_bytes"))
        record[f"pipeline_{s}_offload_s"] = round(r["median_ms"] / 1e3, 2)
    json.dump(record, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
