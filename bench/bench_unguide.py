#!/usr/bin/env python
"""UnGuide sampling cost, side by side in one run: vs plain CFG (JAX), and vs a plain PyTorch reference.

    python bench/bench_unguide.py                                 # the embedded shapes model, CPU
    python bench/bench_unguide.py --model sd15 --size 64 --device cuda --images-per-prompt 8 --batch 8

What one image costs with UnGuidance, probe included:
- plain CFG: our jitted DDIM + CFG sampler, the base model alone (2 UNet rows per step), against
  diffusers' own StableDiffusionPipeline on the same batch (embedded model: its DDIM scheduler, the
  same embeddings and x_T, latents out, no VAE decode);
- UnGuide, ours: the probe (all prompts and draws in one vmapped call per chunk; D("") once) and the
  UnGuidance sampler with base and LoRA predictions in one UNet call per step (fused, the default:
  4 rows per image), and with two calls (split: base weights, then merged LoRA weights);
- UnGuide, PyTorch reference: the procedure as the authors' code runs it, one prompt at a time:
  the probe's R draws of one prompt as one batch through the base model's CFG steps and both models,
  then the prompt's images with two separate CFG calls per step (adapters off, adapters on), from
  ``unguide_jax/pytorch/reference.py``; the same weights and adapter.
Two settings: object erasure (the probe once per prompt, R = 30, amortised over N images per
prompt) and explicit content (R = 10 per prompt, one image per prompt, as for I2P). Each component
is timed on its own (a batch of images, a chunk of probed prompts) after a warm-up call, the JAX and
PyTorch components interleaved (one call of each per round, median over rounds), so that a shared
machine's load falls on both alike; per-image costs are derived from those timings, and every
timing is printed. Compile time is reported apart.

The last line is one JSON object: plain_cfg_s and unguide_s (per image; unguide_s is the fused
sampler + the object setting's probe), unguide_over_plain, pytorch_over_jax (the PyTorch
reference's time per image over ours, object setting: > 1 means we are faster), the sampling-only
and I2P ratios, diffusers_over_jax_plain, and diffusers_unguide_s / diffusers_unguide_over_jax: the
diffusers ``UnGuidePipeline`` (unguide_jax.pytorch; embedded model only: it loads the model's folder and
an export of the same adapter) per image in the object setting, its batched probe of all prompts and
D("") amortised as ours, and that over ours (diffusers_unguide_sampling_over_jax: sampling only); its
components have no warm-up call (their JAX draws are compiled beforehand, and torch compiles nothing).
``--quick`` (batch 8, 4 prompts, 50 steps and the probe's amortisation over N = 32 images kept, so that
the ratios mean the same) runs in about 6 minutes on the
2-core dev machine (5.8 with --torch-threads 1, load falling from 6 to 2; the UnGuidePipeline's two
components take about 1 of them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Collection

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: makes bench.bench_train importable

from bench.bench_train import CONTEXT_LENGTH, Clock, build_torch_unet  # noqa: E402


def interleaved(fns: dict, repeats: int, budget_s: float | None = None,
                no_warm_up: Collection[str] = ()) -> tuple[dict, dict]:
    """({name: first call's wall seconds, compile included}, {name: Clock summary of ``repeats`` more calls}).

    The timed calls are interleaved (every component once per round, the order reversed every other
    round), so that a shared machine's load falls alike on JAX and PyTorch. ``budget_s``: no new round
    starts once the timed rounds have taken that long (at least one round runs). ``no_warm_up``:
    components that compile nothing (warmed by their builder): no untimed first call."""
    import jax

    first = {}
    for name, fn in fns.items():
        if name in no_warm_up:
            continue
        clock = Clock()
        with clock:
            jax.block_until_ready(fn())
        first[name] = clock.wall[0]
    clocks = {name: Clock() for name in fns}
    names = list(fns)
    started = time.perf_counter()
    for r in range(repeats):
        if r and budget_s is not None and time.perf_counter() - started >= budget_s:
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            with clocks[name]:
                jax.block_until_ready(fns[name]())
    return first, {name: clock.summary() for name, clock in clocks.items()}


def random_adapter(params, lora, rng: np.random.Generator) -> dict:
    """The LoRA's initial A with a small random B: an edit that changes the UNet's output (B = 0 would not)."""
    import jax

    from unguide_jax.edits.lora import init_lora

    return {p: {"lora_A": np.asarray(ab["lora_A"]),
                "lora_B": 0.01 * rng.standard_normal(ab["lora_B"].shape, dtype=np.float32)}
            for p, ab in init_lora(jax.random.key(0), params, lora).items()}


def jax_components(unet, scheduler_config, params, edit, cond, uncond, x_T, steps: int, draws: int, prompts: int,
                   split: bool = True, i2p: bool = True) -> dict:
    """{name: zero-argument callable} for the JAX side's components over one batch of b = len(cond) images:
    "jax plain" (CFG, base model), "jax fused" / "jax split" (UnGuidance, one or two UNet calls per
    step, w alternating erase/keep), "jax probe_object" (``prompts`` prompts, R = ``draws``), "jax
    probe_empty" (D(""), the same draws) and "jax probe_i2p" (R = 10)."""
    import jax.numpy as jnp

    from unguide_jax.diffusion.sampler import sample_latents
    from unguide_jax.erasers.unguide.probe import (
        ProbeConfig,
        probe_distances,
        probe_draws,
    )

    b, size, channels = x_T.shape[0], x_T.shape[1], x_T.shape[-1]
    scales, seeds = jnp.full((b,), 7.5), jnp.arange(b)
    ws = jnp.asarray(np.where(np.arange(b) % 2, -1.0, 2.0), jnp.float32)

    def sampler(**kw):
        return lambda: sample_latents(unet, scheduler_config, steps, 0.0, params, cond, uncond, x_T, scales, seeds, **kw)

    def probe(probe_draws_: int, probe_prompts: int):
        config = ProbeConfig(draws=probe_draws_, prompt_chunk=probe_prompts)
        xs, ts = probe_draws(config, scheduler_config, (size, size, channels))
        c = cond[:probe_prompts] if probe_prompts <= b else jnp.repeat(cond[:1], probe_prompts, axis=0)
        return lambda: probe_distances(unet, scheduler_config, config, params, edit, c, uncond[:1],
                                       jnp.full((probe_prompts,), 7.5), xs, ts)

    components = {"jax plain": sampler(), "jax fused": sampler(edit=edit, w=ws, fused=True)}
    if split:
        components["jax split"] = sampler(edit=edit, w=ws, fused=False)
    components.update({"jax probe_object": probe(draws, prompts), "jax probe_empty": probe(draws, 1)})
    if i2p:
        components["jax probe_i2p"] = probe(10, prompts)
    return components


def jax_per_image(wall: dict, batch: int, prompts: int, images_per_prompt: int, draws: int) -> dict:
    """Per-image seconds from the components' median wall times (``jax_components``' names): plain CFG,
    and for each UnGuide sampler timed, sampling only, + the object setting's probe (R = ``draws`` once
    per prompt, and D("") once, over N = ``images_per_prompt`` images) and, if timed, + the I2P probe
    (R = 10 per image)."""
    n = images_per_prompt
    per_image = {"plain CFG": wall["jax plain"] / batch}
    object_probe = (wall["jax probe_object"] + wall["jax probe_empty"]) / (prompts * n)
    for name in ("fused", "split"):  # fused: sample.py's default
        if f"jax {name}" not in wall:
            continue
        per_image[f"UnGuide {name}, sampling only"] = wall[f"jax {name}"] / batch
        per_image[f"UnGuide {name} + probe R={draws} once per prompt, N={n}"] = wall[f"jax {name}"] / batch + object_probe
        if "jax probe_i2p" in wall:
            per_image[f"UnGuide {name} + probe R=10 per image (I2P)"] = (wall[f"jax {name}"] / batch
                                                                         + wall["jax probe_i2p"] / prompts)
    return per_image


def pipeline_components(adapter: dict, alpha: float, unet_params, batch: int, prompts: int, steps: int, draws: int,
                        device, sync) -> dict:
    """The diffusers ``UnGuidePipeline`` (unguide_jax.pytorch) on the embedded model's folder with an export of the
    same adapter: "torch UnGuidePipeline sample" (``batch`` images, w alternating erase/keep, latents out, no
    VAE decode) and "torch UnGuidePipeline probe" (``prompts`` distinct prompts and D("") in one batched probe,
    R = ``draws``). Prompt encoding and the seeds' JAX-drawn latents are inside the timings; the JAX draws are
    compiled here, so that the components need no warm-up call."""
    import tempfile

    import torch

    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.loading.lora_formats import export_peft
    from unguide_jax.publishing.unguide_json import write_unguide_json
    from unguide_jax.erasers.unguide.probe import ProbeConfig
    from unguide_jax.pytorch import UnGuidePipeline, jax_latents, jax_probe_draws
    from unguide_jax.resources import EMBEDDED_MODEL
    from unguide_jax.shapes.data import CLASSES, STYLES

    pipe = UnGuidePipeline.from_pretrained(EMBEDDED_MODEL, safety_checker=None, requires_safety_checker=False,
                                           torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as folder:
        file = export_peft(Path(folder) / "diffusers", adapter, alpha, unet_params)
        # The arrow's target prompt: what the default (calibrated) rule sets its threshold from.
        write_unguide_json(folder, file, adapter, alpha, unet_params, ProbeConfig(draws=draws),
                           concept_prompts=["a photo of the arrow"])
        pipe.load_unguide(folder)
    texts = [f"a {style} {c}" for style in ("photo of the",) + STYLES for c in CLASSES]
    ws = np.where(np.arange(batch) % 2, -1.0, 2.0)
    jax_latents(range(batch), pipe.latent_shape())
    jax_probe_draws(ProbeConfig(draws=draws), pipe.latent_shape(), SchedulerConfig.from_dict(dict(pipe.scheduler.config)))

    def sample():
        pipe([texts[i % len(CLASSES)] for i in range(batch)], w=ws, seeds=range(batch), num_inference_steps=steps,
             output_type="latent")
        sync()

    def probe():
        pipe.probe(texts[:prompts], reuse_empty=False)  # D("") probed each time, as the object setting counts it
        sync()

    return {"torch UnGuidePipeline sample": sample, "torch UnGuidePipeline probe": probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["embedded", "sd15"], default="embedded")
    parser.add_argument("--size", type=int, default=0, help="latent height/width (0: the model's own; sd15: 32)")
    parser.add_argument("--prompts", type=int, default=13, help="prompts probed (13: target, 3 synonyms, 9 others)")
    parser.add_argument("--images-per-prompt", type=int, default=32, help="N, object-erasure setting")
    parser.add_argument("--batch", type=int, default=32, help="images per sampler call (JAX and torch)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--draws", type=int, default=30, help="R, object-erasure setting (explicit content: 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per component, after a warm-up")
    parser.add_argument("--quick", action="store_true",
                        help="under 5 minutes: batch 8, 4 prompts, 2 timed calls, no split sampler (steps, R, N as set)")
    parser.add_argument("--no-split", action="store_true", help="skip the two-call (split) UnGuide sampler")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its default backend")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.prompts, args.repeats = 8, 4, 2
        args.no_split = True

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.lora import LoraConfig
    from unguide_jax.erasers.unguide.probe import ProbeConfig, probe_draws
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models.unet import UNetConfig
    from unguide_jax.pytorch import reference as tu

    jax.config.update("jax_default_matmul_precision", "highest")
    # Set explicitly (0: every core), and printed. torch's OpenMP threads spin at barriers: on a 2-core machine
    # with other load, 2 threads ran the shipped UNet up to 10x slower than on an idle one, 1 thread far less
    # so (docs/benchmarks.md); pass --torch-threads 1 there.
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    torch_unet, description, default_size = build_torch_unet(args.model)
    size = args.size or default_size
    unet_config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", unet_config)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jnp.float32)
    scheduler_config = SchedulerConfig()
    lora = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    rng = np.random.default_rng(0)
    adapter = random_adapter(params, lora, rng)
    edit = lora_edit(adapter, lora.alpha)
    width, channels = unet_config.cross_attention_dim, unet_config.in_channels
    b = args.batch
    cond = jnp.asarray(rng.standard_normal((b, CONTEXT_LENGTH, width), dtype=np.float32))
    uncond = jnp.asarray(np.repeat(rng.standard_normal((1, CONTEXT_LENGTH, width), dtype=np.float32), b, axis=0))
    x_T = jnp.asarray(rng.standard_normal((b, size, size, channels), dtype=np.float32))

    # --- PyTorch: diffusers' own StableDiffusionPipeline for plain CFG (its UNet, DDIM, latents out, no
    # VAE decode), and the reference procedure for UnGuide: one prompt, its probe (R draws as one batch)
    # and its images (batch of b), two CFG calls per step (adapters off, adapters on).
    device = torch.device(args.device)
    torch_unet = torch_unet.to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    pipe = None
    if args.model == "embedded":
        from unguide_jax.resources import EMBEDDED_MODEL

        if (EMBEDDED_MODEL / "model_index.json").is_file():
            pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, unet=torch_unet, safety_checker=None,
                                                           torch_dtype=torch.float32).to(device)
    if pipe is not None:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    wrappers = tu.add_lora(torch_unet, rank=lora.rank, alpha=lora.alpha)
    tu.set_adapter(wrappers, adapter)
    t_cond = torch.from_numpy(np.asarray(cond[:1])).to(device)
    t_uncond = torch.from_numpy(np.asarray(uncond[:1])).to(device)
    t_x_T = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy()).to(device)

    def torch_probe(draws: int):
        config = ProbeConfig(draws=draws)
        xs, ts = probe_draws(config, scheduler_config, (size, size, channels))
        xs = torch.from_numpy(np.asarray(xs).transpose(0, 3, 1, 2).copy()).to(device)
        ts = torch.from_numpy(np.asarray(ts).copy()).to(device)
        tu.probe_prompt(torch_unet, wrappers, tu.make_scheduler(), "corrected", config.t_enc, xs, ts, t_cond, t_uncond,
                        7.5)
        sync()

    def torch_sample():
        sampling_scheduler = tu.make_scheduler()
        sampling_scheduler.set_timesteps(args.steps)
        tu.unguidance_sample(torch_unet, wrappers, sampling_scheduler, t_x_T, t_cond.expand(b, -1, -1),
                             t_uncond.expand(b, -1, -1), 7.5, -1.0)
        sync()

    t_cond_b = torch.from_numpy(np.asarray(cond)).to(device)
    t_uncond_b = torch.from_numpy(np.asarray(uncond)).to(device)

    def diffusers_plain():
        with tu.adapters_off(wrappers), torch.inference_mode():
            pipe(prompt_embeds=t_cond_b, negative_prompt_embeds=t_uncond_b, latents=t_x_T, num_inference_steps=args.steps,
                 guidance_scale=7.5, eta=0.0, output_type="latent")
        sync()

    components = jax_components(unet, scheduler_config, params, edit, cond, uncond, x_T, args.steps, args.draws,
                                args.prompts, split=not args.no_split)
    if pipe is not None:
        components["torch diffusers plain"] = diffusers_plain
    components.update({"torch probe_object": lambda: torch_probe(args.draws), "torch probe_i2p": lambda: torch_probe(10),
                       "torch sample": torch_sample})
    if pipe is not None:  # the pipeline needs the model's folder
        components.update(pipeline_components(adapter, lora.alpha, params, b, args.prompts, args.steps, args.draws,
                                               device, sync))
    first, timings = interleaved(components, args.repeats,
                                 no_warm_up=("torch UnGuidePipeline sample", "torch UnGuidePipeline probe"))
    wall = {name: t["wall_median_s"] for name, t in timings.items()}

    n = args.images_per_prompt
    per_image = jax_per_image(wall, b, args.prompts, n, args.draws)
    torch_per_image = {
        "UnGuide, sampling only": wall["torch sample"] / b,
        f"UnGuide + probe R={args.draws} once per prompt, N={n}": wall["torch sample"] / b
        + wall["torch probe_object"] * (args.prompts + 1) / (args.prompts * n),
        "UnGuide + probe R=10 per image (I2P)": wall["torch sample"] / b + wall["torch probe_i2p"],
    }
    if pipe is not None:
        torch_per_image["plain CFG, diffusers StableDiffusionPipeline"] = wall["torch diffusers plain"] / b
        torch_per_image["UnGuidePipeline (diffusers), sampling only"] = wall["torch UnGuidePipeline sample"] / b
        torch_per_image[f"UnGuidePipeline + probe R={args.draws} once per prompt, N={n}"] = (
            wall["torch UnGuidePipeline sample"] / b + wall["torch UnGuidePipeline probe"] / (args.prompts * n))

    results = dict(model=args.model, description=description, latent_size=size, steps=args.steps, batch=b,
                   prompts=args.prompts, images_per_prompt=n, draws=args.draws, repeats=args.repeats,
                   jax_device=str(jax.devices()[0].device_kind), torch_device=args.device,
                   torch_threads=torch.get_num_threads(), components=timings, first_call_s=first,
                   jax_per_image_s=per_image, torch_per_image_s=torch_per_image)
    print(f"UnGuide sampling: {description}, {size}x{size} latents, fp32, {args.steps} DDIM steps, CFG 7.5, "
          f"LoRA r=1 on attn2.to_k/to_v; {args.prompts} prompts, batches of {b} images")
    print(f"JAX on {results['jax_device']}, torch on {args.device} ({results['torch_threads']} threads); "
          f"components interleaved, median of {args.repeats} (wall; process CPU in brackets)")
    for name, t in timings.items():
        print(f"  {name:24} {t['wall_median_s']:9.3f} s  ({t['cpu_mean_s']:8.3f} s CPU)")
    base = per_image["plain CFG"]
    print(f"\n{'per image (s)':58}{'JAX':>9}{'vs plain CFG':>14}")
    for name, value in per_image.items():
        print(f"{name:58}{value:9.4f}{value / base:13.2f}x")
    print(f"\n{'per image (s)':58}{'JAX':>9}{'PyTorch':>9}{'PyTorch/JAX':>13}")
    pairs = [("UnGuide, sampling only", "UnGuide fused, sampling only"),  # ours at sample.py's default
             (f"UnGuide + probe R={args.draws} once per prompt, N={n}",
              f"UnGuide fused + probe R={args.draws} once per prompt, N={n}"),
             ("UnGuide + probe R=10 per image (I2P)", "UnGuide fused + probe R=10 per image (I2P)")]
    if pipe is not None:
        pairs.insert(0, ("plain CFG, diffusers StableDiffusionPipeline", "plain CFG"))
        pairs += [("UnGuidePipeline (diffusers), sampling only", "UnGuide fused, sampling only"),
                  (f"UnGuidePipeline + probe R={args.draws} once per prompt, N={n}",
                   f"UnGuide fused + probe R={args.draws} once per prompt, N={n}")]
    ratios = {}
    for torch_name, jax_name in pairs:
        ours, theirs = per_image[jax_name], torch_per_image[torch_name]
        ratios[torch_name] = theirs / ours
        print(f"{torch_name:58}{ours:9.4f}{theirs:9.4f}{theirs / ours:13.2f}")
    print("(first calls, JAX compile included, not in the figures: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in first.items()) + ")")
    unguide_name = f"UnGuide fused + probe R={args.draws} once per prompt, N={n}"
    summary = dict(
        plain_cfg_s=per_image["plain CFG"],
        unguide_s=per_image[unguide_name],
        unguide_over_plain=per_image[unguide_name] / per_image["plain CFG"],
        pytorch_over_jax=ratios[f"UnGuide + probe R={args.draws} once per prompt, N={n}"],
        pytorch_over_jax_sampling=ratios["UnGuide, sampling only"],
        pytorch_over_jax_i2p=ratios["UnGuide + probe R=10 per image (I2P)"],
        diffusers_plain_s=torch_per_image.get("plain CFG, diffusers StableDiffusionPipeline"),
        diffusers_over_jax_plain=ratios.get("plain CFG, diffusers StableDiffusionPipeline"),
        unguide_i2p_s=per_image["UnGuide fused + probe R=10 per image (I2P)"],
        torch_reference_s=torch_per_image[f"UnGuide + probe R={args.draws} once per prompt, N={n}"],
        diffusers_unguide_s=torch_per_image.get(f"UnGuidePipeline + probe R={args.draws} once per prompt, N={n}"),
        diffusers_unguide_over_jax=ratios.get(f"UnGuidePipeline + probe R={args.draws} once per prompt, N={n}"),
        diffusers_unguide_sampling_over_jax=ratios.get("UnGuidePipeline (diffusers), sampling only"),
        steps=args.steps, batch=b, quick=args.quick,
    )
    results["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
