#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/corpus/<target>/ (run once; the seeds are
committed). Needs PyPI torch, safetensors and Pillow: oracles that write inputs, never run by the
project itself. Each seed is small and valid, so the fuzzer starts from the real formats.

    python3 scripts/fuzz_seeds.py
"""
import base64
import io
import json
import pathlib

import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / ("seed-" + name)).write_bytes(data)


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def image_bytes(fmt, size=(6, 4)):
    img = Image.new("RGB", size)
    img.putdata([(x * 40 % 256, y * 60 % 256, (x + y) * 20 % 256) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# checkpoint: torch.save zips (plain, Lightning-style, a permuted layout, bf16) and safetensors.
tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2, dtype=torch.bfloat16)}
put("checkpoint", "plain.ckpt", torch_bytes(tensors))
put("checkpoint", "lightning.ckpt", torch_bytes({"state_dict": tensors, "epoch": 3}))
put("checkpoint", "permuted.ckpt", torch_bytes({"t": torch.arange(6.0).reshape(2, 3).t()}))
put("checkpoint", "half.ckpt", torch_bytes({"h": torch.zeros(3, dtype=torch.float16)}))
put("checkpoint", "plain.safetensors", save_safetensors({k: v.contiguous() for k, v in tensors.items()}))

# config: the fixtures' configs.
for name in ["tiny-v", "tiny-eps"]:
    put("config", f"{name}.json", (ROOT / "fixtures" / name / "config.json").read_bytes())

# image: each accepted format.
for fmt, ext in [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")]:
    put("image", f"small.{ext}", image_bytes(fmt))
put("image", "wide.png", image_bytes("PNG", (40, 2)))

# submission: first byte 0 = JSON, 1 = multipart with boundary X.
png = image_bytes("PNG")
b64 = base64.b64encode(png).decode()
put("submission", "i2v.json", b"\0" + json.dumps({"image": b64, "prompt": "a fox", "steps": 2, "sampler": "unipc"}).encode())
put("submission", "interp.json", b"\0" + json.dumps({"image": "data:image/png;base64," + b64, "image2": b64, "mode": "interpolate", "karras": True}).encode())
put("submission", "loop.json", b"\0" + json.dumps({"image": b64, "mode": "loop", "frames": 12, "cfg_scale": 7.5, "seed": 3}).encode())
parts = [(b'name="prompt"', b"waves"), (b'name="steps"', b"3"), (b'name="image"; filename="a.png"\r\nContent-Type: image/png', png)]
body = b"".join(b"--X\r\nContent-Disposition: form-data; " + h + b"\r\n\r\n" + v + b"\r\n" for h, v in parts) + b"--X--\r\n"
put("submission", "i2v.multipart", b"\1" + body)

# tokenizer: the fixture prompts and a few odd texts.
prompts = json.loads((ROOT / "fixtures" / "prompts.json").read_text())
for case in prompts["cases"]:
    put("tokenizer", f"{case['name']}.txt", case["text"].encode())
put("tokenizer", "odd.txt", "Ünïcödé &amp; emoji 🎆 \u200b\ttabs  ".encode())
