"""PyTorch timing of DynamiCrafter's other networks, beside `dynamicrafter-bench vae-decode-256 |
clip-image | clip-text`: the SD KL-VAE decoder (16 frames of 32×32 latents → 256×256) and the
OpenCLIP ViT-H/14 image and text towers, with random weights.

The networks are the libraries users run (a test oracle only, never a dependency of ours):
diffusers' `AutoencoderKL` with Stable Diffusion's config (the same layers as upstream's
`first_stage_model`), open_clip's `ViT-H-14` built without pretrained weights. The text tower
runs its first 23 of 24 blocks, as DynamiCrafter's `layer="penultimate"` does.

    pip install torch diffusers open_clip_torch
    python3 scripts/torch_networks.py [vae-decode-256 clip-image clip-text] [--runs 3] [--modes fp32,bf16,bf16-weights]

The VAE decode is timed both frame by frame (as ours and upstream's `perframe_ae` run it) and as
one batch of 16; the report gives both and the faster is PyTorch's figure. Modes as in
scripts/torch_unet.py: fp32 (PyTorch's defaults), bf16 autocast, bf16-weights (the whole network
and its input cast to bf16).
"""
import argparse, copy, time
import torch


def vae_decoder():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )
    return vae.eval()


def clip_model():
    import open_clip

    return open_clip.create_model("ViT-H-14", pretrained=None).eval()


def cases(names):
    z = torch.randn(16, 4, 32, 32)
    if "vae-decode-256" in names:
        vae = vae_decoder()
        yield "vae-decode-256 (16 frames 256×256, frame by frame)", vae, lambda m, dt: [m.decode(z[i : i + 1].to(dt)).sample for i in range(16)]
        yield "vae-decode-256 (16 frames 256×256, one batch)", vae, lambda m, dt: m.decode(z.to(dt)).sample
    if "clip-image" in names or "clip-text" in names:
        clip = clip_model()
        if "clip-image" in names:
            x = torch.randn(1, 3, 224, 224)
            yield "clip-image (ViT-H/14, one image)", clip.visual, lambda m, dt: m(x.to(dt))
        if "clip-text" in names:
            ids = torch.tensor([[(i * 97) % 49408 for i in range(77)]])
            text = copy.deepcopy(clip)
            text.visual = None
            text.transformer.resblocks = text.transformer.resblocks[:-1]

            def run_text(m, dt):
                x = m.token_embedding(ids).to(dt) + m.positional_embedding.to(dt)
                return m.transformer(x, attn_mask=m.attn_mask.to(dt))

            yield "clip-text (77 tokens, 23 blocks)", text, run_text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=["vae-decode-256", "clip-image", "clip-text"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="fp32,bf16,bf16-weights")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | cpu | {torch.get_num_threads()} threads")
    for name, net, run in cases(a.cases):
        for mode in a.modes.split(","):
            autocast = mode == "bf16"
            model, dt = net, torch.float32
            if mode == "bf16-weights":
                model, dt = copy.deepcopy(net).to(torch.bfloat16), torch.bfloat16
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                run(model, dt)
                ms = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    run(model, dt)
                    ms.append((time.perf_counter() - t0) * 1e3)
            ms.sort()
            label = "bf16 autocast" if autocast else mode
            print(f"torch {name} {label:<13} median {ms[len(ms) // 2]:10.1f} ms (min {ms[0]:.1f}, max {ms[-1]:.1f}, n={len(ms)})", flush=True)


if __name__ == "__main__":
    main()
