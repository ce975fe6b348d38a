#!/usr/bin/env python
"""UnGuide sampling cost, side by side in one run: vs plain CFG (JAX), and vs a plain PyTorch reference.

    python bench/bench_unguide.py                                 # the embedded shapes model, CPU
    python bench/bench_unguide.py --model sd15 --size 64 --device cuda --images-per-prompt 8 --batch 8

What one image costs (spec unguide.md §4), probe included:
- plain CFG: our jitted DDIM + CFG sampler, the base model alone (2 UNet rows per step);
- UnGuide, ours: the probe (all prompts and draws in one vmapped call per chunk; D("") once) and the
  UnGuidance sampler with base and LoRA predictions in one UNet call per step (fused, the default:
  4 rows per image), and with two calls (split: base weights, then merged LoRA weights);
- UnGuide, PyTorch reference: the procedure as the authors' code runs it, one prompt at a time:
  the probe's R draws of one prompt as one batch through the base model's CFG steps and both models,
  then the prompt's images with two separate CFG calls per step (adapters off, adapters on), from
  ``unguide_jax/pytorch/reference.py``; the same weights and adapter.
Two settings: object erasure (the probe once per prompt, R = 30, amortised over N images per
prompt) and explicit content (R = 10 per prompt, one image per prompt, as for I2P). Each component
is timed on its own (a batch of images, a chunk of probed prompts) after a warm-up call; per-image
costs are derived from those timings, and every timing is printed. Compile time is reported apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: makes bench.bench_train importable

from bench.bench_train import CONTEXT_LENGTH, Clock, build_torch_unet  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, dict]:
    """(first call's wall seconds: compile + run, timings of ``repeats`` more calls)."""
    import jax

    first = Clock()
    with first:
        jax.block_until_ready(fn())
    clock = Clock()
    for _ in range(repeats):
        with clock:
            jax.block_until_ready(fn())
    return first.wall[0], clock.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["embedded", "sd15"], default="embedded")
    parser.add_argument("--size", type=int, default=0, help="latent height/width (0: the model's own; sd15: 32)")
    parser.add_argument("--prompts", type=int, default=13, help="prompts probed (13: target, 3 synonyms, 9 others)")
    parser.add_argument("--images-per-prompt", type=int, default=32, help="N, object-erasure setting")
    parser.add_argument("--batch", type=int, default=32, help="images per sampler call (JAX and torch)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--draws", type=int, default=30, help="R, object-erasure setting (explicit content: 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per JAX component")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its default backend")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from unguide_jax.diffusion.sampler import sample_latents
    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.lora import LoraConfig, init_lora
    from unguide_jax.erasers.unguide.probe import (
        ProbeConfig,
        probe_distances,
        probe_draws,
    )
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models.unet import UNetConfig
    from unguide_jax.pytorch import reference as tu

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch_unet, description, default_size = build_torch_unet(args.model)
    size = args.size or default_size
    unet_config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", unet_config)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jnp.float32)
    scheduler_config = SchedulerConfig()
    lora = LoraConfig(rank=1, alpha=8.0, targets="object")
    rng = np.random.default_rng(0)
    adapter = {p: {"lora_A": np.asarray(ab["lora_A"]), "lora_B": 0.01 * rng.standard_normal(ab["lora_B"].shape,
                                                                                          dtype=np.float32)}
               for p, ab in init_lora(jax.random.key(0), params, lora).items()}
    edit = lora_edit(adapter, lora.alpha)
    width, channels = unet_config.cross_attention_dim, unet_config.in_channels
    b = args.batch
    cond = jnp.asarray(rng.standard_normal((b, CONTEXT_LENGTH, width), dtype=np.float32))
    uncond = jnp.asarray(np.repeat(rng.standard_normal((1, CONTEXT_LENGTH, width), dtype=np.float32), b, axis=0))
    x_T = jnp.asarray(rng.standard_normal((b, size, size, channels), dtype=np.float32))
    scales, seeds = jnp.full((b,), 7.5), jnp.arange(b)
    ws = jnp.asarray(np.where(np.arange(b) % 2, -1.0, 2.0), jnp.float32)

    def sampler(**kw):
        return lambda: sample_latents(unet, scheduler_config, args.steps, 0.0, params, cond, uncond, x_T, scales, seeds, **kw)

    results = dict(model=args.model, description=description, latent_size=size, steps=args.steps, batch=b,
                   jax_device=str(jax.devices()[0].device_kind), torch_device=args.device)
    compile_s = {}
    compile_s["plain"], plain = timed(sampler(), args.repeats)
    compile_s["fused"], fused = timed(sampler(edit=edit, w=ws, fused=True), args.repeats)
    compile_s["split"], split = timed(sampler(edit=edit, w=ws, fused=False), args.repeats)

    def probe_cost(draws: int, prompts: int) -> tuple[float, dict]:
        config = ProbeConfig(draws=draws, prompt_chunk=prompts)
        xs, ts = probe_draws(config, scheduler_config, (size, size, channels))
        c = cond[:prompts] if prompts <= b else jnp.repeat(cond[:1], prompts, axis=0)
        return timed(lambda: probe_distances(unet, scheduler_config, config, params, edit, c, uncond[:1],
                                             jnp.full((prompts,), 7.5), xs, ts), args.repeats)

    compile_s["probe_object"], probe_object = probe_cost(args.draws, args.prompts)
    compile_s["probe_empty"], probe_empty = probe_cost(args.draws, 1)
    compile_s["probe_i2p"], probe_i2p = probe_cost(10, args.prompts)

    n = args.images_per_prompt
    object_probe_per_image = (probe_object["wall_mean_s"] + probe_empty["wall_mean_s"]) / (args.prompts * n)
    i2p_probe_per_image = probe_i2p["wall_mean_s"] / args.prompts
    per_image = {"plain CFG": plain["wall_mean_s"] / b}
    for name, timing in (("fused", fused), ("split", split)):  # fused: sample.py's default
        per_image[f"UnGuide {name}, sampling only"] = timing["wall_mean_s"] / b
        per_image[f"UnGuide {name} + probe R={args.draws} once per prompt, N={n}"] = (
            timing["wall_mean_s"] / b + object_probe_per_image)
        per_image[f"UnGuide {name} + probe R=10 per image (I2P)"] = timing["wall_mean_s"] / b + i2p_probe_per_image

    # --- PyTorch reference: one prompt, its probe (R draws as one batch) and its images (batch of b).
    device = torch.device(args.device)
    torch_unet = torch_unet.to(device)
    wrappers = tu.add_lora(torch_unet, rank=lora.rank, alpha=lora.alpha)
    tu.set_adapter(wrappers, adapter)
    scheduler = tu.make_scheduler()
    t_cond = torch.from_numpy(np.asarray(cond[:1])).to(device)
    t_uncond = torch.from_numpy(np.asarray(uncond[:1])).to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def torch_probe(draws: int):
        config = ProbeConfig(draws=draws)
        xs, ts = probe_draws(config, scheduler_config, (size, size, channels))
        xs = torch.from_numpy(np.asarray(xs).transpose(0, 3, 1, 2).copy()).to(device)
        ts = torch.from_numpy(np.asarray(ts).copy()).to(device)
        tu.probe_prompt(torch_unet, wrappers, scheduler, "corrected", config.t_enc, xs, ts, t_cond, t_uncond, 7.5)
        sync()

    def torch_sample():
        sampling_scheduler = tu.make_scheduler()
        sampling_scheduler.set_timesteps(args.steps)
        xs = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy()).to(device)
        tu.unguidance_sample(torch_unet, wrappers, sampling_scheduler, xs, t_cond.expand(b, -1, -1),
                             t_uncond.expand(b, -1, -1), 7.5, -1.0)
        sync()

    torch_times = {}
    for name, fn in (("probe_object", lambda: torch_probe(args.draws)), ("probe_i2p", lambda: torch_probe(10)),
                     ("sample", torch_sample)):
        fn()  # warm-up
        clock = Clock()
        with clock:
            fn()
        torch_times[name] = clock.summary()
    torch_per_image = {
        "UnGuide, sampling only": torch_times["sample"]["wall_mean_s"] / b,
        f"UnGuide + probe R={args.draws} once per prompt, N={n}": torch_times["sample"]["wall_mean_s"] / b
        + torch_times["probe_object"]["wall_mean_s"] * (args.prompts + 1) / (args.prompts * n),
        "UnGuide + probe R=10 per image (I2P)": torch_times["sample"]["wall_mean_s"] / b
        + torch_times["probe_i2p"]["wall_mean_s"],
    }
    results.update(jax_components=dict(plain=plain, fused=fused, split=split, probe_object=probe_object,
                                       probe_empty=probe_empty, probe_i2p=probe_i2p),
                   jax_compile_s=compile_s, jax_per_image_s=per_image, torch_components=torch_times,
                   torch_per_image_s=torch_per_image, torch_threads=torch.get_num_threads())

    print(f"UnGuide sampling: {description}, {size}x{size} latents, fp32, {args.steps} DDIM steps, CFG 7.5, "
          f"LoRA r=1 on attn2.to_k/to_v; {args.prompts} prompts, batches of {b} images")
    print(f"JAX on {results['jax_device']}, torch on {args.device} ({results['torch_threads']} threads)")
    print("measured (wall, mean):")
    for name, t in results["jax_components"].items():
        print(f"  JAX {name:14} {t['wall_mean_s']:9.3f} s")
    for name, t in torch_times.items():
        print(f"  torch {name:12} {t['wall_mean_s']:9.3f} s")
    base = per_image["plain CFG"]
    print(f"\n{'per image (s)':58}{'JAX':>9}{'vs plain CFG':>14}")
    for name, value in per_image.items():
        print(f"{name:58}{value:9.4f}{value / base:13.2f}x")
    print(f"\n{'UnGuide per image (s)':58}{'JAX':>9}{'PyTorch':>9}{'PyTorch/JAX':>13}")
    pairs = [("UnGuide, sampling only", "UnGuide fused, sampling only"),  # ours at sample.py's default
             (f"UnGuide + probe R={args.draws} once per prompt, N={n}",
              f"UnGuide fused + probe R={args.draws} once per prompt, N={n}"),
             ("UnGuide + probe R=10 per image (I2P)", "UnGuide fused + probe R=10 per image (I2P)")]
    for torch_name, jax_name in pairs:
        ours, theirs = per_image[jax_name], torch_per_image[torch_name]
        print(f"{torch_name:58}{ours:9.4f}{theirs:9.4f}{theirs / ours:13.2f}")
    print("(JAX first calls, compile included, not in the figures: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
