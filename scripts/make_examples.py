#!/usr/bin/env python3
"""Draws the example images shipped with the web page (CC0, made for this project).
Pure standard library so it runs anywhere: python3 scripts/make_examples.py"""
import math, struct, zlib, pathlib

W = H = 256
OUT = pathlib.Path(__file__).resolve().parent.parent / "examples" / "images"

def png(path, pixels):
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in pixels)
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(data)

def mix(a, b, t):
    t = min(max(t, 0.0), 1.0)
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))

def sunset():
    horizon = 150
    rows = []
    for y in range(H):
        row = []
        for x in range(W):
            if y < horizon:
                c = mix((40, 30, 90), (250, 140, 60), y / horizon)
                d = math.hypot(x - 128, y - 130)
                if d < 28:
                    c = (255, 220, 120)
                elif d < 60:
                    c = mix((255, 200, 110), c, (d - 28) / 32)
            else:
                depth = (y - horizon) / (H - horizon)
                c = mix((200, 110, 70), (20, 40, 80), depth)
                wave = math.sin(x * 0.08 + y * 0.9) * math.sin(y * 0.35)
                if abs(x - 128) < 40 * (1 - depth) + 8 and wave > 0.3:
                    c = mix(c, (255, 210, 130), 0.7)
                elif wave > 0.75:
                    c = mix(c, (230, 230, 240), 0.35)
            row.append(c)
        rows.append(row)
    return rows

def balloon():
    rows = []
    for y in range(H):
        row = []
        for x in range(W):
            c = mix((90, 160, 230), (200, 230, 250), y / H)
            for cx, cy, r in ((60, 60, 22), (80, 55, 18), (200, 90, 26), (222, 84, 18)):
                if (x - cx) ** 2 / 1.8 + (y - cy) ** 2 < r * r:
                    c = (245, 248, 252)
            if y > 220:
                c = mix((70, 130, 60), (40, 90, 40), (y - 220) / 36)
            dx, dy = x - 128, y - 100
            if dx * dx / 45 ** 2 + dy * dy / 52 ** 2 < 1:
                stripe = int((math.atan2(dy, dx * 1.4) + math.pi) / (2 * math.pi) * 8) % 2
                c = (220, 60, 50) if stripe else (250, 200, 60)
                shade = 1 - 0.35 * max(0, dx) / 45
                c = tuple(int(v * shade) for v in c)
            if 150 < y < 158 and abs(dx) < 14 - (y - 150):
                c = (120, 80, 50)
            if 162 <= y < 180 and abs(dx) < 11:
                c = (150, 100, 55)
            row.append(c)
        rows.append(row)
    return rows

OUT.mkdir(parents=True, exist_ok=True)
png(OUT / "sunset.png", sunset())
png(OUT / "balloon.png", balloon())
