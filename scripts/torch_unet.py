"""PyTorch timing of DynamiCrafter's UNet forward at the real shapes, for a side-by-side ratio with
`dynamicrafter bench unet-256|unet-512|unet-1024 --device cuda`.

Our own compact re-statement of the network (same layers, channels, heads, token counts and
operation order as crates/engine/src/models/unet.rs), random weights; not upstream's code. What it
times is the work, not the checkpoint: a forward of 16 frames with context 77 + 16·16 tokens.

    python3 scripts/torch_unet.py [256 512 1024] [--device cuda] [--runs 5] [--modes fp32,fp16,bf16,bf16-weights]
        [--json out.json]   # also {size: {mode: median ms}}

fp32 runs with PyTorch's defaults (no TF32 matmuls); fp16/bf16 under autocast, as upstream's
scripts do; bf16-weights is the whole model and its inputs cast to bf16 (no autocast: PyTorch's
fastest CPU mode without AMX); attention through F.scaled_dot_product_attention.
"""
import argparse, copy, json, math, time
import torch
import torch.nn as nn
import torch.nn.functional as F

MC, MULT, RES, ATTN, HEAD, CTX, T = 320, (1, 2, 4, 4), 2, (4, 2, 1), 64, 1024, 16
LATENT = {"256": (32, 32), "512": (40, 64), "1024": (72, 128)}


def gn(c, eps=1e-5):
    return nn.GroupNorm(32, c, eps=eps)


class TemporalConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norms = nn.ModuleList(gn(c) for _ in range(4))
        self.convs = nn.ModuleList(nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)) for _ in range(4))

    def forward(self, x):  # (b, c, t, h, w)
        h = x
        for n, c in zip(self.norms, self.convs):
            h = c(F.silu(n(h)))
        return x + h


class ResBlock(nn.Module):
    def __init__(self, ci, co, emb):
        super().__init__()
        self.n1, self.c1, self.e = gn(ci), nn.Conv2d(ci, co, 3, padding=1), nn.Linear(emb, co)
        self.n2, self.c2 = gn(co), nn.Conv2d(co, co, 3, padding=1)
        self.skip = nn.Conv2d(ci, co, 1) if ci != co else nn.Identity()
        self.tc = TemporalConv(co)

    def forward(self, x, emb, b):
        h = self.c1(F.silu(self.n1(x))) + self.e(F.silu(emb))[:, :, None, None]
        h = self.skip(x) + self.c2(F.silu(self.n2(h)))
        bt, c, hh, ww = h.shape
        v = h.view(b, bt // b, c, hh, ww).permute(0, 2, 1, 3, 4)
        v = self.tc(v)
        return v.permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)


def mha(q, k, v, heads):
    b, n, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return o.transpose(1, 2).reshape(b, n, d)


class Attention(nn.Module):
    def __init__(self, dim, ctx, heads, image):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim, bias=False), nn.Linear(ctx, dim, bias=False), nn.Linear(ctx, dim, bias=False)
        self.image = image
        if image:
            self.k_ip, self.v_ip = nn.Linear(ctx, dim, bias=False), nn.Linear(ctx, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        q = self.q(x)
        if self.image:
            txt, img = ctx[:, :77], ctx[:, 77:]
            o = mha(q, self.k(txt), self.v(txt), self.heads) + mha(q, self.k_ip(img), self.v_ip(img), self.heads)
        else:
            c = x if ctx is None else ctx
            o = mha(q, self.k(c), self.v(c), self.heads)
        return self.out(o)


class Block(nn.Module):
    def __init__(self, dim, heads, ctx):
        super().__init__()
        self.a1 = Attention(dim, dim, heads, False)
        self.a2 = Attention(dim, ctx or dim, heads, ctx is not None)
        self.ff1, self.ff2 = nn.Linear(dim, dim * 8), nn.Linear(dim * 4, dim)
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, ctx=None):
        x = self.a1(self.n1(x)) + x
        x = self.a2(self.n2(x), ctx) + x
        a, g = self.ff1(self.n3(x)).chunk(2, dim=-1)
        return self.ff2(a * F.gelu(g)) + x


class Spatial(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.pin, self.block, self.pout = gn(c, 1e-6), nn.Linear(c, c), Block(c, c // HEAD, CTX), nn.Linear(c, c)

    def forward(self, x, ctx):
        n, c, h, w = x.shape
        y = self.pin(self.norm(x).flatten(2).transpose(1, 2))
        y = self.pout(self.block(y, ctx))
        return y.transpose(1, 2).reshape(n, c, h, w) + x


class Temporal(nn.Module):
    def __init__(self, c, heads=None):
        super().__init__()
        heads = heads or c // HEAD
        inner = heads * HEAD
        self.norm, self.pin, self.block, self.pout = gn(c, 1e-6), nn.Linear(c, inner), Block(inner, heads, None), nn.Linear(inner, c)

    def forward(self, x, b):
        bt, c, h, w = x.shape
        t = bt // b
        v = self.norm(x.view(b, t, c, h, w).transpose(1, 2))  # statistics over all frames
        y = v.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        y = self.pout(self.block(self.pin(y)))
        return y.view(b, h, w, t, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w) + x


class Unet(nn.Module):
    def __init__(self):
        super().__init__()
        emb = MC * 4
        self.temb = nn.Sequential(nn.Linear(MC, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.femb = nn.Sequential(nn.Linear(MC, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.ModuleList([nn.ModuleList([nn.Conv2d(8, MC, 3, padding=1)])])
        self.init_attn = Temporal(MC, heads=8)
        skips, ch, ds = [MC], MC, 1
        for lvl, m in enumerate(MULT):
            for _ in range(RES):
                layers = [ResBlock(ch, m * MC, emb)]
                ch = m * MC
                if ds in ATTN:
                    layers += [Spatial(ch), Temporal(ch)]
                self.inp.append(nn.ModuleList(layers))
                skips.append(ch)
            if lvl + 1 != len(MULT):
                self.inp.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb), Spatial(ch), Temporal(ch), ResBlock(ch, ch, emb)])
        self.out_blocks = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(MULT))):
            for i in range(RES + 1):
                layers = [ResBlock(ch + skips.pop(), m * MC, emb)]
                ch = m * MC
                if ds in ATTN:
                    layers += [Spatial(ch), Temporal(ch)]
                if lvl != 0 and i == RES:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                    ds //= 2
                self.out_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(gn(MC), nn.SiLU(), nn.Conv2d(MC, 4, 3, padding=1))

    @staticmethod
    def sinusoid(v, dim, dev):
        half = dim // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, device=dev) / half)
        a = torch.tensor(v, device=dev)[:, None].float() * f[None]
        return torch.cat([a.cos(), a.sin()], dim=-1)

    def run(self, layer, h, emb, ctx, b):
        if isinstance(layer, ResBlock):
            return layer(h, emb, b)
        if isinstance(layer, Spatial):
            return layer(h, ctx)
        if isinstance(layer, Temporal):
            return layer(h, b)
        return layer(h)

    def forward(self, x, t, ctx, fs):
        b, _, f, hh, ww = x.shape
        emb = self.temb(self.sinusoid([t] * b, MC, x.device).to(x.dtype)) + self.femb(self.sinusoid([fs] * b, MC, x.device).to(x.dtype))
        emb = emb.repeat_interleave(f, 0)
        text = ctx[:, :77].repeat_interleave(f, 0)
        img = ctx[:, 77:].reshape(b * f, 16, ctx.shape[-1])
        ctx = torch.cat([text, img], 1)
        h = x.transpose(1, 2).reshape(b * f, -1, hh, ww)
        skips = []
        for i, block in enumerate(self.inp):
            for layer in block:
                h = self.run(layer, h, emb, ctx, b)
            if i == 0:
                h = self.init_attn(h, b)
            skips.append(h)
        for layer in self.mid:
            h = self.run(layer, h, emb, ctx, b)
        for block in self.out_blocks:
            h = torch.cat([h, skips.pop()], 1)
            for layer in block:
                h = self.run(layer, h, emb, ctx, b)
        out = self.out(h)
        return out.view(b, f, 4, hh, ww).transpose(1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", default=["256", "512", "1024"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--modes", default="fp32,fp16,bf16")
    ap.add_argument("--json", help="also write {size: {mode: median ms}} here")
    a = ap.parse_args()
    results = {}
    dev = torch.device(a.device)
    torch.manual_seed(0)
    net = Unet().to(dev).eval()
    params = sum(p.numel() for p in net.parameters())
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} | UNet {params / 1e9:.3f} B parameters")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for size in a.sizes:
        h, w = LATENT[size]
        x = torch.randn(1, 8, T, h, w, device=dev)
        ctx = torch.randn(1, 77 + 16 * T, CTX, device=dev)
        for mode in a.modes.split(","):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
            model, xin, cin = net, x, ctx
            if mode == "bf16-weights":
                model, xin, cin = copy.deepcopy(net).to(torch.bfloat16), x.bfloat16(), ctx.bfloat16()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(xin, 637, cin, 10)
                sync()
                ms = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    model(xin, 637, cin, 10)
                    sync()
                    ms.append((time.perf_counter() - t0) * 1e3)
            ms.sort()
            results.setdefault(size, {})[mode] = ms[len(ms) // 2]
            peak = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if dev.type == "cuda" else ""
            label = mode if dtype is None else f"{mode} autocast"
            print(f"torch unet-{size} forward {label:<14} (16×{h}×{w}, ctx 333) median {ms[len(ms) // 2]:9.2f} ms (min {ms[0]:.2f}, max {ms[-1]:.2f}, n={len(ms)}){peak}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
