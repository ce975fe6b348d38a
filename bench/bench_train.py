#!/usr/bin/env python
"""JAX vs PyTorch, side by side in one run: UnGuide training iterations (the paper's objective).

    python bench/bench_train.py                                   # the embedded shapes model, CPU
    python bench/bench_train.py --model sd15 --size 64 --device cuda    # SD 1.5 UNet shapes, GPU

One iteration: partial DDIM with CFG on the target using the LoRA model (no grad), two frozen-base
UNet calls, one LoRA forward/backward, one Adam step; LoRA r=1, alpha=8 on attn2.to_k/to_v.
JAX runs our jitted train step (``unguide_jax.erasers.unguide.train_step``); PyTorch runs the plain loop of
``unguide_jax/pytorch/reference.py`` with the same weights, adapter init, embeddings and the same (t_enc, t)
sequence as the JAX step drew (from its metrics), so both do the same amount of sampling.
Compile time is reported apart. Text embeddings are random: their values do not change the cost.

``--model embedded``: the shipped shapes model (unguide_jax.resources.EMBEDDED_MODEL) if it exists,
else a random UNet of the same configuration (configs/embedded.py). ``--model sd15``: the SD 1.5
UNet configuration with random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: makes bench.* importable

from bench.common import build_torch_unet  # noqa: E402

CONTEXT_LENGTH = 77


class Clock:
    """Wall time and this process's CPU time (all threads) of timed blocks.

    On a shared CPU machine wall time also counts waiting for other processes; CPU time does not,
    so both are reported (on a GPU only wall time means anything).
    """

    def __init__(self):
        self.wall, self.cpu = [], []

    def __enter__(self):
        self._start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def summary(self) -> dict[str, float]:
        return dict(wall_mean_s=float(np.mean(self.wall)), wall_median_s=float(np.median(self.wall)),
                    cpu_mean_s=float(np.mean(self.cpu)), calls=len(self.wall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["embedded", "sd15"], default="embedded")
    parser.add_argument("--size", type=int, default=0, help="latent height/width (0: the model's own; sd15: 32)")
    parser.add_argument("--iterations", type=int, default=6, help="timed training iterations on each side")
    parser.add_argument("--timestep-mode", choices=["corrected", "reference"], default="corrected")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (parameters and the adapter stay fp32; torch uses autocast)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); JAX uses its default backend")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")

    import jax
    import jax.numpy as jnp
    import torch

    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.edits.lora import LoraConfig
    from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig
    from unguide_jax.erasers.unguide.train_step import (
        init_train_state,
        make_optimizer,
        make_train_step,
    )
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models.unet import UNetConfig
    from unguide_jax.pytorch import reference as tu

    jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else "default")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Set explicitly (0: every core), and printed. torch's OpenMP threads spin at barriers: on a 2-core machine
    # with other load, 2 threads ran the shipped UNet up to 10x slower than on an idle one, 1 thread far less
    # so (docs/benchmarks.md); pass --torch-threads 1 there.
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]

    torch_unet, description, default_size = build_torch_unet(args.model)
    size = args.size or default_size
    unet_config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", unet_config, dtype=jax_dtype, param_dtype=jnp.float32)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jnp.float32)

    lora_config = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    objective = ObjectiveConfig(timestep_mode=args.timestep_mode)
    learning_rate = 3e-5
    optimizer = make_optimizer(learning_rate)
    scheduler_config = SchedulerConfig()  # SD's schedule, as the reference (scaled linear, steps_offset 1)

    rng = np.random.default_rng(args.seed)
    width = unet_config.cross_attention_dim
    target, reference, uncond = (rng.standard_normal((1, CONTEXT_LENGTH, width), dtype=np.float32) for _ in range(3))
    embeddings = ConceptEmbeddings(target=jnp.asarray(target), reference=jnp.asarray(reference), uncond=jnp.asarray(uncond))
    state = init_train_state(jax.random.key(args.seed), params, lora_config, optimizer)
    initial_adapter = jax.tree.map(np.asarray, jax.device_get(state.adapter))  # before the step may donate it
    step = make_train_step(unet, scheduler_config, lora_config, objective, optimizer, latent_size=size)

    # --- JAX: compile apart, then timed iterations (each blocks until its results are ready).
    compile_clock = Clock()
    with compile_clock:
        if hasattr(step, "lower"):
            compiled = step.lower(state, params, embeddings).compile()
        else:  # not a jax.jit object: the first call compiles (and runs once)
            state, _ = step(state, params, embeddings)
            jax.block_until_ready(state)
            compiled = step
    compile_s, compile_cpu_s = compile_clock.wall[0], compile_clock.cpu[0]
    state, metrics = compiled(state, params, embeddings)  # warm-up, as on the torch side
    jax.block_until_ready((state, metrics))
    jax_clock, draws = Clock(), []
    for _ in range(args.iterations):
        with jax_clock:
            state, metrics = compiled(state, params, embeddings)
            jax.block_until_ready((state, metrics))
        metrics = jax.device_get(metrics)
        if "t_enc" not in metrics or "t" not in metrics:
            raise KeyError(f"the train step's metrics {sorted(metrics)} lack t_enc/t: the torch side needs the same draws")
        # The sampling length depends on t_enc: both sides run the same draws, so the same amount of work.
        draws.append((int(metrics["t_enc"]), int(metrics["t"])))

    # --- PyTorch: the same weights and adapter init; one warm-up iteration, then the same (t_enc, t).
    device = torch.device(args.device)
    torch_unet = torch_unet.to(device)
    wrappers = tu.add_lora(torch_unet, rank=lora_config.rank, alpha=lora_config.alpha)
    tu.set_adapter(wrappers, initial_adapter)
    adam = tu.make_adam(wrappers, learning_rate)
    scheduler = tu.make_scheduler()
    torch_objective = tu.TorchObjective(objective.start_guidance, objective.negative_guidance, args.timestep_mode)
    t_target, t_reference, t_uncond = (torch.from_numpy(x).to(device) for x in (target, reference, uncond))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def torch_iteration(t_enc: int, t: int) -> int:
        x_T = torch.from_numpy(rng.standard_normal((1, unet_config.in_channels, size, size), dtype=np.float32)).to(device)
        with autocast:
            out = tu.unguide_iteration(torch_unet, wrappers, adam, scheduler, torch_objective, x_T, t_enc, t,
                                       t_target, t_reference, t_uncond)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(out["sample_steps"])

    torch_iteration(*draws[0])
    torch_clock, sampling_steps = Clock(), []
    for t_enc, t in draws:
        with torch_clock:
            sampling_steps.append(torch_iteration(t_enc, t))

    jax_t, torch_t = jax_clock.summary(), torch_clock.summary()
    results = dict(
        model=args.model, description=description, jax_device=str(jax.devices()[0].device_kind), torch_device=args.device,
        torch_threads=torch.get_num_threads(), dtype=args.dtype, latent_size=size, timestep_mode=args.timestep_mode,
        iterations=args.iterations, draws=draws, mean_sampling_steps=float(np.mean(sampling_steps)),
        jax_compile_s=compile_s, jax_compile_cpu_s=compile_cpu_s, **{f"jax_{k}": v for k, v in jax_t.items()},
        **{f"torch_{k}": v for k, v in torch_t.items()}, speedup_wall_mean=torch_t["wall_mean_s"] / jax_t["wall_mean_s"],
    )
    print(f"UnGuide training iteration: {description}, {size}x{size} latents, {args.dtype}, "
          f"{args.timestep_mode} timesteps, LoRA r=1 on attn2.to_k/to_v")
    print(f"JAX on {results['jax_device']}, torch on {args.device} ({results['torch_threads']} threads); "
          f"{args.iterations} iterations each with the same (t_enc, t), "
          f"mean {results['mean_sampling_steps']:.1f} CFG sampling steps per iteration")
    print(f"{'per iteration':24}{'JAX (s)':>10}{'PyTorch (s)':>13}{'PyTorch/JAX':>13}")
    rows = [("wall, mean", "wall_mean_s"), ("wall, median", "wall_median_s")]
    if args.device == "cpu" and jax.default_backend() == "cpu":
        rows.append(("process CPU, mean", "cpu_mean_s"))
    for label, key in rows:
        print(f"{label:24}{jax_t[key]:10.4f}{torch_t[key]:13.4f}{torch_t[key] / jax_t[key]:13.2f}")
    print(f"(JAX compile, not in the figures: train step {compile_s:.1f}s wall, {compile_cpu_s:.1f}s CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
