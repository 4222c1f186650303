"""PyTorch timing of upstream's own UNet (Doubiiu/DynamiCrafter's `lvdm` code, built from its
inference config with random weights), beside scripts/torch_unet.py: issue #18 takes the faster of
the two as PyTorch's figure.

Upstream's code is not part of this repository. Point --src at a checkout of Doubiiu/DynamiCrafter
(or a folder holding its `lvdm/` and `configs/`), e.g. copied into the git-ignored `.upstream/`:

    python3 scripts/upstream_unet.py --src .upstream [256 512 1024] [--device cuda] [--runs 5]
        [--modes bf16,fp16] [--json out.json]

Upstream runs its spatial attention through xformers when installed (its fastest path); here
`xformers.ops.memory_efficient_attention` is provided by F.scaled_dot_product_attention, so the
same code path runs on PyTorch's fused attention. Temporal attention keeps upstream's own einsum
path (as it does with xformers). fp16/bf16 under autocast, as upstream's scripts do.
"""
import argparse, json, sys, time, types
import torch
import torch.nn.functional as F

LATENT = {"256": (32, 32), "512": (40, 64), "1024": (72, 128)}
FRAMES = 16


def install_shims():
    """`xformers` on SDPA; `utils.utils` without its cv2 import (only instantiate_from_config is used)."""
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = lambda q, k, v, attn_bias=None, op=None: F.scaled_dot_product_attention(q, k, v)
    xformers.ops = ops
    sys.modules["xformers"], sys.modules["xformers.ops"] = xformers, ops
    utils = types.ModuleType("utils")
    utils_utils = types.ModuleType("utils.utils")

    def instantiate_from_config(config):
        import importlib
        module, cls = config["target"].rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)(**config.get("params", {}))

    utils_utils.instantiate_from_config = instantiate_from_config
    utils.utils = utils_utils
    sys.modules["utils"], sys.modules["utils.utils"] = utils, utils_utils


def build(src, size, dev):
    import yaml
    with open(f"{src}/configs/inference_{size}_v1.0.yaml") as f:
        cfg = yaml.safe_load(f)
    params = dict(cfg["model"]["params"]["unet_config"]["params"])
    params["use_checkpoint"] = False  # inference: no activation checkpointing wrapper
    from lvdm.modules.networks.openaimodel3d import UNetModel
    torch.manual_seed(0)
    return UNetModel(**params).to(dev).eval(), params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", default=["256", "512", "1024"])
    ap.add_argument("--src", required=True, help="folder with upstream's lvdm/ and configs/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="bf16,fp16")
    ap.add_argument("--json", help="also write {size: {mode: median ms}} here")
    a = ap.parse_args()
    sys.path.insert(0, a.src)
    install_shims()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = {}
    for size in a.sizes:
        net, params = build(a.src, size, dev)
        h, w = LATENT[size]
        n = sum(p.numel() for p in net.parameters())
        print(f"torch {torch.__version__} | {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} | upstream UNet-{size} {n / 1e9:.3f} B parameters", flush=True)
        x = torch.randn(1, params["in_channels"], FRAMES, h, w, device=dev)
        ctx = torch.randn(1, 77 + 16 * FRAMES, params["context_dim"], device=dev)
        ts = torch.tensor([637], device=dev)
        fs = torch.tensor([10], device=dev)
        for mode in a.modes.split(","):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                net(x, ts, context=ctx, fs=fs)
                sync()
                ms = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    net(x, ts, context=ctx, fs=fs)
                    sync()
                    ms.append((time.perf_counter() - t0) * 1e3)
            ms.sort()
            median = ms[len(ms) // 2]
            results.setdefault(size, {})[mode] = median
            peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if dev.type == "cuda" else ""
            label = mode if dtype is None else f"{mode} autocast"
            print(f"upstream unet-{size} forward {label:<14} (16×{h}×{w}, ctx 333) median {median:9.2f} ms (min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)}){peak}", flush=True)
        del net
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
