#!/usr/bin/env python3
"""Writes crates/engine/tests/data/samplers.{json,safetensors}: every step of diffusers' schedulers
(the oracle for `dynamicrafter_engine::samplers`), driven by a fixed random "model".

    pip install torch diffusers safetensors   # oracle only; nothing at run time needs them
    python3 scripts/sampler_fixtures.py

diffusers' scheduler code runs in float64 here (`float64_module`), and the model too.
The model is a fixed linear map of its input latent over channels plus a timestep term,
`out = W·x + b·t/1000`, so the tests can run the same function in Rust. Each run stores the
initial latent, the noise each stochastic step drew, and the latent after every step in VP form
(x / sqrt(σ²+1) for the Euler schedulers, which keep x in σ-space), stored as float32.

Schedules: the two families of the project (`configs.md`): betas scaled_linear 0.00085..0.012
over 1000 steps, ᾱ in float64 as the reference computes it (set on each scheduler); the v family with zero terminal SNR and trailing spacing, the eps family with
DynamiCrafter's "uniform" spacing (1, 1+c, …), passed as custom timesteps where diffusers takes
them (Euler, DPM-Solver) and set on the scheduler where it does not (UniPC). Karras runs take
their sigmas from diffusers' DPM-Solver (`use_karras_sigmas`: σ(0)..σ(999), ρ = 7) and round the
timesteps, as diffusers' DPM-Solver and UniPC do; the Euler schedulers get those sigmas as
custom `sigmas`, and the model gets the rounded timestep (the engine's rule for every sampler).
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file


def float64_module(name):
    """diffusers' scheduler module `name` with its float32 casts made float64: the same code,
    so the fixture holds the algorithm's steps without float32 rounding (diffusers' Euler
    steps in x/alpha, which at sigma = 4096 loses ~1e-5 to cancellation in float32). The noise
    levels stay float32: `set_timesteps` rounds them with numpy first."""
    import importlib.util
    import inspect

    original = importlib.import_module(f"diffusers.schedulers.{name}")
    source = inspect.getsource(original).replace("torch.float32", "torch.float64")
    spec = importlib.util.spec_from_loader(f"diffusers.schedulers.{name}_f64", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "diffusers.schedulers"
    exec(compile(source, original.__file__, "exec"), module.__dict__)
    return module


euler_module = float64_module("scheduling_euler_discrete")
euler_a_module = float64_module("scheduling_euler_ancestral_discrete")
dpm_module = float64_module("scheduling_dpmsolver_multistep")
unipc_module = float64_module("scheduling_unipc_multistep")
EulerDiscreteScheduler = euler_module.EulerDiscreteScheduler
EulerAncestralDiscreteScheduler = euler_a_module.EulerAncestralDiscreteScheduler
DPMSolverMultistepScheduler = dpm_module.DPMSolverMultistepScheduler
UniPCMultistepScheduler = unipc_module.UniPCMultistepScheduler

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "engine", "tests", "data")
SHAPE = (1, 4, 3, 4, 4)
STEPS = 10
N = 1000

FAMILIES = {
    # name: (prediction_type, zero_snr, spacing)
    "v": ("v_prediction", True, "trailing"),
    "eps": ("epsilon", False, "uniform"),
}

SAMPLERS = {
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "dpmpp-2m-sde": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def timesteps_for(spacing, steps):
    """DynamiCrafter's DDIM timesteps (`make_ddim_timesteps`), descending."""
    if spacing == "trailing":
        c = N / steps
        return (np.round(np.arange(N, 0, -c)) - 1).astype(np.int64).tolist()
    c = N // steps
    return (np.arange(0, N, c) + 1)[::-1].astype(np.int64).tolist()


def make(name, family, karras):
    prediction, zero_snr, _ = FAMILIES[family]
    kw = dict(
        num_train_timesteps=N,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing",
    )
    if name == "dpmpp-2m":
        kw.update(algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpmpp-2m-sde":
        kw.update(algorithm_type="sde-dpmsolver++", solver_order=2)
    if name == "unipc":
        kw.update(solver_order=2, solver_type="bh2", predict_x0=True)
    if karras and name in ("dpmpp-2m", "dpmpp-2m-sde", "unipc"):
        kw.update(use_karras_sigmas=True)
    s = SAMPLERS[name](**kw)
    # The reference's ᾱ is float64 (`register_schedule` in numpy), diffusers' a float32
    # cumulative product; give diffusers the reference's, so the fixture measures the samplers.
    s.alphas_cumprod = torch.from_numpy(alphas_cumprod(zero_snr))
    return s


def alphas_cumprod(zero_snr):
    """DynamiCrafter's ᾱ in float64 (`docs/spec/sampling.md` §3.1), with ᾱ_T = 2⁻²⁴ where the
    zero-SNR rescale makes it 0, as diffusers does."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N, dtype=np.float64) ** 2
    if zero_snr:
        s = np.sqrt(np.cumprod(1.0 - betas))
        s0, st = s[0], s[-1]
        s = (s - st) * s0 / (s0 - st)
        ab = s**2
        betas = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    ac = np.cumprod(1.0 - betas)
    if zero_snr:
        ac[-1] = 2.0**-24
    return ac


def karras_schedule(family):
    """diffusers' Karras sigmas over the whole schedule and their rounded timesteps."""
    s = make("dpmpp-2m", family, True)
    s.set_timesteps(STEPS)
    return s.sigmas.numpy().tolist(), s.timesteps.numpy().tolist()


def override(s, ts, sigmas):
    """Sets a schedule on a scheduler whose `set_timesteps` cannot take it (the Euler-ancestral
    and UniPC ones): the same two arrays their own `set_timesteps` fills."""
    s.set_timesteps(STEPS)
    dtype = torch.float32 if isinstance(s, EulerAncestralDiscreteScheduler) else torch.int64
    s.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    s.timesteps = torch.tensor(ts, dtype=dtype)
    s.num_inference_steps = len(ts)


def set_schedule(s, name, family, karras):
    spacing = FAMILIES[family][2]
    custom = name in ("euler-ancestral", "unipc")
    if karras:
        sigmas, ts = karras_schedule(family)
        ts = [int(round(t)) for t in ts]
        if custom:
            override(s, ts, sigmas)
        elif name == "euler":
            s.set_timesteps(sigmas=sigmas)
        else:
            s.set_timesteps(STEPS)
        return ts, [float(v) for v in s.sigmas]
    ts = timesteps_for(spacing, STEPS)
    if custom:
        full = np.array(((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)
        sig = np.interp(np.array(ts, dtype=np.float64), np.arange(0, len(full)), full)
        override(s, ts, np.concatenate([sig, [0.0]]).astype(np.float32).tolist())
    else:
        s.set_timesteps(timesteps=ts)
    return ts, [float(v) for v in s.sigmas]


def run(name, family, karras, gen, tensors, index):
    s = make(name, family, karras)
    ts, sigmas = set_schedule(s, name, family, karras)
    prefix = f"{family}.{name}{'.karras' if karras else ''}"
    w = torch.eye(4, dtype=torch.float64) * 0.8 + torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.1
    b = torch.randn(4, generator=gen, dtype=torch.float64) * 0.3

    def model(x, t):
        return torch.einsum("cd,bd...->bc...", w, x.double()) + b.view(1, 4, 1, 1, 1) * (t / 1000.0)

    euler_space = name.startswith("euler")
    x_vp0 = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    x = x_vp0.double() * ((sigmas[0] ** 2 + 1) ** 0.5) if euler_space else x_vp0.double()
    noises, states = [], []

    drawn = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
        drawn.append(z)
        return z.double()

    euler_a_module.randn_tensor = fake_randn
    for i, t in enumerate(s.timesteps):
        t_model = ts[i]
        x_in = s.scale_model_input(x, t)
        out = model(x_in, t_model)
        if name == "dpmpp-2m-sde":
            z = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
            noises.append(z)
            x = s.step(out, t, x, variance_noise=z.double()).prev_sample
        else:
            drawn.clear()
            x = s.step(out, t, x).prev_sample
            if name == "euler-ancestral":
                noises.append(drawn[0])
        sn = sigmas[i + 1]
        vp = x.double() / ((sn**2 + 1) ** 0.5) if euler_space else x.double()
        states.append(vp.float())
    tensors[f"{prefix}.w"] = w.float()
    tensors[f"{prefix}.b"] = b.float()
    tensors[f"{prefix}.x_t"] = x_vp0
    tensors[f"{prefix}.x"] = torch.stack(states)
    if noises:
        tensors[f"{prefix}.noise"] = torch.stack(noises)
    index.append(
        {
            "name": prefix,
            "sampler": name,
            "karras": karras,
            "prediction": FAMILIES[family][0],
            "zero_snr": FAMILIES[family][1],
            "spacing": FAMILIES[family][2],
            "steps": STEPS,
            "timesteps": [int(v) for v in ts],
            "sigmas": sigmas,
        }
    )


def main():
    gen = torch.Generator().manual_seed(20261204)
    tensors, index = {}, []
    for family in FAMILIES:
        for name in SAMPLERS:
            for karras in (False, True):
                run(name, family, karras, gen, tensors, index)
    import diffusers

    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "shape": list(SHAPE), "runs": index}
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "samplers.safetensors"))
    with open(os.path.join(OUT, "samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"{len(index)} runs, {sum(v.numel() for v in tensors.values())} values")


if __name__ == "__main__":
    main()
