#!/usr/bin/env python
"""JAX vs PyTorch, side by side in one run: the SD 1.5 UNet (random weights), one forward pass
and a full DDIM sampling run with classifier-free guidance.

    python bench/bench_unet.py                      # CPU: batch 2, 32x32 latents, fp32
    python bench/bench_unet.py --size 64 --dtype bfloat16 --device cuda   # GPU

Both sides run the same computation: the same weights (copied across), the same latents and
text embeddings, CFG over a batch of [uncond; cond], DDIM steps. Compile time is reported apart.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (fn must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="prompts per batch (the UNet sees 2x with CFG)")
    parser.add_argument("--size", type=int, default=32, help="latent height/width")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its default backend")
    parser.add_argument("--repeats", type=int, default=3, help="timed UNet forward calls (median)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed sampling runs (median)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    import jax
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

    jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else "default")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]

    torch.manual_seed(0)
    torch_unet = TorchUNet(**SD15_UNET).eval()
    unet = build_module("unet", UNetConfig.from_dict(dict(torch_unet.config)), dtype=jax_dtype, param_dtype=jax_dtype)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jax_dtype)
    torch_unet = torch_unet.to(args.device, torch_dtype)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    latents = rng.standard_normal((b, s, s, 4), dtype=np.float32)
    cond = rng.standard_normal((b, 77, 768), dtype=np.float32)
    uncond = rng.standard_normal((b, 77, 768), dtype=np.float32)
    t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(args.device, torch_dtype)
    t_ctx = torch.from_numpy(np.concatenate([uncond, cond])).to(args.device, torch_dtype)
    j_latents, j_cond, j_uncond = (jnp.asarray(x, jax_dtype) for x in (latents, cond, uncond))
    scheduler_cfg = SchedulerConfig()
    guidance = jnp.full((b,), 7.5, jnp.float32)
    seeds = jnp.arange(b, dtype=jnp.uint32)

    j_x2, j_ctx = jnp.concatenate([j_latents, j_latents]), jnp.concatenate([j_uncond, j_cond])
    t0 = time.perf_counter()
    forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(params, j_x2, 500, j_ctx).compile()
    compile_forward = time.perf_counter() - t0
    forward(params, j_x2, 500, j_ctx).block_until_ready()  # warm-up, as on the torch side
    jax_forward = timed(lambda: forward(params, j_x2, 500, j_ctx).block_until_ready(), args.repeats)

    def torch_sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def torch_forward_once():
        with torch.inference_mode():
            torch_unet(torch.cat([t_latents, t_latents]), 500, t_ctx)
        torch_sync()

    torch_forward_once()
    torch_forward = timed(torch_forward_once, args.repeats)

    sample_args = (unet, scheduler_cfg, args.steps, 0.0, params, j_cond, j_uncond, j_latents, guidance, seeds)
    t0 = time.perf_counter()
    compiled_sampler = sample_latents.lower(*sample_args).compile()
    compile_sample = time.perf_counter() - t0
    run = lambda: compiled_sampler(*sample_args[4:]).block_until_ready()  # noqa: E731
    jax_sample = timed(run, args.sample_repeats)

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

    torch_sample_time = timed(torch_sample, args.sample_repeats)

    results = dict(
        device=str(jax.devices()[0].device_kind), torch_device=args.device, dtype=args.dtype, batch=b, latent_size=s,
        steps=args.steps, jax_forward_s=jax_forward, torch_forward_s=torch_forward, jax_sample_s=jax_sample,
        torch_sample_s=torch_sample_time, jax_compile_forward_s=compile_forward, jax_compile_sample_s=compile_sample,
        forward_speedup=torch_forward / jax_forward, sample_speedup=torch_sample_time / jax_sample,
    )
    print(f"SD1.5 UNet, random weights, {args.dtype}, batch {b} (x2 for CFG), {s}x{s} latents, "
          f"JAX on {results['device']}, torch on {args.device}")
    print(f"{'':24}{'JAX (s)':>10}{'PyTorch (s)':>13}{'PyTorch/JAX':>13}")
    print(f"{'UNet forward':24}{jax_forward:10.3f}{torch_forward:13.3f}{results['forward_speedup']:13.2f}")
    print(f"{f'{args.steps}-step DDIM + CFG':24}{jax_sample:10.3f}{torch_sample_time:13.3f}{results['sample_speedup']:13.2f}")
    print(f"(JAX compile, not in the figures: forward {compile_forward:.1f}s, sampler {compile_sample:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
