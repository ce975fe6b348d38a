#!/usr/bin/env python
"""JAX vs PyTorch, side by side in one run: one UNet forward pass and a full DDIM sampling run with
classifier-free guidance, for the shipped (embedded) UNet and for the SD 1.5 UNet (random weights).

    python bench/bench_unet.py            # CPU, fp32: embedded (batch 32, 16x16) and SD 1.5 (batch 2, 32x32)
    python bench/bench_unet.py --quick    # the embedded UNet only, fewer repeats
    python bench/bench_unet.py --models sd15 --size 64 --dtype bfloat16 --device cuda   # GPU

Both sides run the same computation: the same weights (copied across), the same latents and
text embeddings, CFG over a batch of [uncond; cond], DDIM steps. JAX and PyTorch calls alternate
(A, B, A, B, ...: a shared machine's load falls on both alike); medians. Compile time is reported
apart. The last line is one JSON object: per model, pytorch_over_jax for the forward and for the
sampler (PyTorch's time over ours: > 1 means we are faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: makes bench.* importable

from bench.common import SD15_UNET, build_torch_unet  # noqa: E402


def alternate(fns: dict, repeats: int) -> dict:
    """{name: blocking callable} -> {name: median wall seconds}; one warm-up each, then ``repeats``
    rounds of one call each, the order reversed every other round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def compile_forward(unet, params, sample, context, timestep: int = 500):
    """One UNet forward, jitted and compiled as the samplers compile theirs (their XLA options), for
    ``forward(params, sample, timestep, context)``."""
    import jax

    from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS

    return jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(
        params, sample, timestep, context).compile(compiler_options=dict(XLA_CPU_OPTIONS))


def bench_model(model: str, args) -> dict:
    import jax.numpy as jnp
    import torch
    from diffusers import DDIMScheduler
    from diffusers import UNet2DConditionModel as TorchUNet

    from unguide_jax.diffusion.sampler import sample_latents
    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models.unet import UNetConfig

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if model == "sd15":
        torch_unet, description = TorchUNet(**SD15_UNET).eval(), "SD 1.5 UNet (860M), random weights"
        b, s = args.batch or 2, args.size or 32
    else:
        torch_unet, description, default_size = build_torch_unet("embedded")
        b, s = args.batch or 32, args.size or default_size
    config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", config, dtype=jax_dtype, param_dtype=jax_dtype)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jax_dtype)
    torch_unet = torch_unet.to(args.device, torch_dtype)

    rng = np.random.default_rng(0)
    channels, width = config.in_channels, config.cross_attention_dim
    latents = rng.standard_normal((b, s, s, channels), dtype=np.float32)
    cond = rng.standard_normal((b, 77, width), dtype=np.float32)
    uncond = rng.standard_normal((b, 77, width), dtype=np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(args.device, torch_dtype)
    t_ctx = torch.from_numpy(np.concatenate([uncond, cond])).to(args.device, torch_dtype)
    j_latents, j_cond, j_uncond = (jnp.asarray(x, jax_dtype) for x in (latents, cond, uncond))
    scheduler_cfg = SchedulerConfig()
    guidance = jnp.full((b,), 7.5, jnp.float32)
    seeds = jnp.arange(b, dtype=jnp.uint32)

    def torch_sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    j_x2, j_ctx = jnp.concatenate([j_latents, j_latents]), jnp.concatenate([j_uncond, j_cond])
    t0 = time.perf_counter()
    forward = compile_forward(unet, params, j_x2, j_ctx)
    compile_forward_s = time.perf_counter() - t0

    def torch_forward():
        with torch.inference_mode():
            torch_unet(torch.cat([t_latents, t_latents]), 500, t_ctx)
        torch_sync()

    fwd = alternate({"jax": lambda: forward(params, j_x2, 500, j_ctx).block_until_ready(), "torch": torch_forward},
                    args.repeats)

    sample_args = (unet, scheduler_cfg, args.steps, 0.0, params, j_cond, j_uncond, j_latents, guidance, seeds)
    t0 = time.perf_counter()
    compiled_sampler = sample_latents.lower(*sample_args).compile()
    compile_sample = time.perf_counter() - t0
    ddim = DDIMScheduler(**{k: v for k, v in vars(scheduler_cfg).items()})

    def torch_sample():
        ddim.set_timesteps(args.steps)
        z = t_latents
        with torch.inference_mode():
            for t in ddim.timesteps:
                out = torch_unet(torch.cat([z, z]), t, t_ctx).sample
                u, c = out.chunk(2)
                z = ddim.step(u + 7.5 * (c - u), t, z).prev_sample
        torch_sync()

    smp = alternate({"jax": lambda: compiled_sampler(*sample_args[4:]).block_until_ready(), "torch": torch_sample},
                    args.sample_repeats)
    return dict(
        description=description, batch=b, latent_size=s, steps=args.steps, jax_forward_s=fwd["jax"],
        torch_forward_s=fwd["torch"], jax_sample_s=smp["jax"], torch_sample_s=smp["torch"],
        jax_compile_forward_s=compile_forward_s, jax_compile_sample_s=compile_sample,
        pytorch_over_jax_forward=fwd["torch"] / fwd["jax"], pytorch_over_jax_sample=smp["torch"] / smp["jax"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="embedded,sd15", help="comma-separated: embedded, sd15")
    parser.add_argument("--quick", action="store_true", help="the embedded UNet only, 3 forward repeats, 10 steps")
    parser.add_argument("--batch", type=int, default=0, help="prompts per batch, x2 with CFG (0: 32 embedded, 2 sd15)")
    parser.add_argument("--size", type=int, default=0, help="latent height/width (0: embedded 16, sd15 32)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its default backend")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet forward calls per side (median)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed sampling runs per side (median)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats, args.steps = "embedded", 3, 10

    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else "default")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Set explicitly (0: every core), and printed. torch's OpenMP threads spin at barriers: on a 2-core machine
    # with other load, 2 threads ran the shipped UNet up to 10x slower than on an idle one, 1 thread far less
    # so (docs/benchmarks.md); pass --torch-threads 1 there.
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    results = dict(device=str(jax.devices()[0].device_kind), torch_device=args.device, dtype=args.dtype,
                   torch_threads=torch.get_num_threads(), models={})
    print(f"{args.dtype}, JAX on {results['device']}, torch on {args.device} ({results['torch_threads']} threads); "
          f"calls alternate, medians of {args.repeats} forwards and {args.sample_repeats} sampling runs")
    print(f"{'':52}{'JAX (s)':>10}{'PyTorch (s)':>13}{'PyTorch/JAX':>13}")
    for model in filter(None, args.models.split(",")):
        r = bench_model(model, args)
        results["models"][model] = r
        label = f"{r['description']}, batch {r['batch']} (x2), {r['latent_size']}x{r['latent_size']}"
        print(label)
        print(f"{'  UNet forward':52}{r['jax_forward_s']:10.3f}{r['torch_forward_s']:13.3f}"
              f"{r['pytorch_over_jax_forward']:13.2f}")
        print(f"{f'  {args.steps}-step DDIM + CFG':52}{r['jax_sample_s']:10.3f}{r['torch_sample_s']:13.3f}"
              f"{r['pytorch_over_jax_sample']:13.2f}")
        print(f"  (JAX compile, not in the figures: forward {r['jax_compile_forward_s']:.1f}s, "
              f"sampler {r['jax_compile_sample_s']:.1f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    summary = {f"{m}_{k}": v for m, r in results["models"].items()
               for k, v in r.items() if k.startswith("pytorch_over_jax") or k.endswith("_s")}
    print(json.dumps(dict(summary, dtype=args.dtype, steps=args.steps)))


if __name__ == "__main__":
    main()
