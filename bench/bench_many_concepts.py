#!/usr/bin/env python
"""K concepts in one run: one vmapped UnGuide train step over K adapters vs K single-concept step calls.

    python bench/bench_many_concepts.py                       # the embedded shapes model, K = 1, 2, 4
    python bench/bench_many_concepts.py --model tiny --concepts 1,2,4,8

For each K both sides train the same K concepts (random embeddings, seeds 0..K-1) from the same states, so
they make the same random draws (x_T, t_enc, t) and the same amount of UNet work, with one exception that
is part of what is measured: in the vmapped step every concept's trajectory runs as many DDIM steps as the
longest one of that step (the loop is shared; finished concepts keep their latent). Each round runs the
many-concept step once and the K single steps once, alternating which goes first; totals over the rounds
are compared. Compile time is reported apart. Throughput is concept-steps per second (K per many-step).

The last line is one JSON object: per K, many_steps_per_s and single_steps_per_s (concept-steps per second)
speedup (single time over many time: > 1 means the vmapped step is faster) and loop_work (the DDIM steps the
vmapped loop ran, K x the longest per step, over the steps K single calls ran).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: makes tests.tiny_models importable


def load_model(name: str):
    """-> (Flax UNet, params, scheduler config, description)."""
    from unguide_jax.diffusion.schedulers import SchedulerConfig

    if name == "tiny":
        from tests.tiny_models import flax_unet

        unet, params = flax_unet(context_dim=16, context_len=5)
        return unet, params, SchedulerConfig(), "tiny random UNet (tests/tiny_models.py)"
    from unguide_jax.models.config_io import read_json
    from unguide_jax.loading.diffusers_folder import load_component
    from unguide_jax.resources import EMBEDDED_MODEL

    unet, params = load_component(EMBEDDED_MODEL / "unet", "unet")
    scheduler = SchedulerConfig.from_dict(read_json(EMBEDDED_MODEL / "scheduler" / "scheduler_config.json"))
    return unet, params, scheduler, f"embedded shapes model ({EMBEDDED_MODEL})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded")
    parser.add_argument("--concepts", default="1,2,4", help="the K values, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per K (one many-step + K single steps)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the objective's trajectory")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    ks = [int(k) for k in args.concepts.split(",")]

    import jax
    import jax.numpy as jnp

    from bench.bench_train import Clock
    from unguide_jax.edits.lora import LoraConfig
    from unguide_jax.erasers.unguide.many import init_many_states, make_many_train_step, stack_embeddings
    from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig, num_sampling_steps
    from unguide_jax.erasers.unguide.train_step import init_train_state, make_optimizer, make_train_step

    jax.config.update("jax_default_matmul_precision", "highest")
    unet, params, scheduler, description = load_model(args.model)
    context_length = 5 if args.model == "tiny" else args.context_length
    lora_config = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    objective = ObjectiveConfig(ddim_steps=args.ddim_steps)
    optimizer = make_optimizer(3e-5)
    width = unet.config.cross_attention_dim
    rng = np.random.default_rng(0)

    def new_concept():
        # Random embeddings: their values do not change the cost.
        draw = lambda: jnp.asarray(rng.standard_normal((1, context_length, width), dtype=np.float32))  # noqa: E731
        return ConceptEmbeddings(target=draw(), reference=draw(), uncond=draw())

    print(f"model: {description}; backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"DDIM steps {args.ddim_steps}, {args.rounds} rounds per K")
    single_step = make_train_step(unet, scheduler, lora_config, objective, optimizer)
    results, compile_s = {}, {}
    clock = Clock()
    with clock:
        probe = init_train_state(jax.random.key(0), params, lora_config, optimizer)
        single = single_step.lower(probe, params, new_concept()).compile()
    compile_s["single"] = clock.wall[0]
    for k in ks:
        concepts = [new_concept() for _ in range(k)]
        keys = [jax.random.key(i) for i in range(k)]
        singles = [init_train_state(key, params, lora_config, optimizer) for key in keys]
        states = init_many_states(keys, params, lora_config, optimizer)
        stacked = stack_embeddings(concepts)
        clock = Clock()
        with clock:
            many = make_many_train_step(unet, scheduler, lora_config, objective, optimizer).lower(
                states, params, stacked).compile()
        compile_s[f"many_{k}"] = clock.wall[0]
        # Warm-up call of each, then the rounds (both sides keep making the same draws).
        states, _ = many(states, params, stacked)
        singles = [single(s, params, e)[0] for s, e in zip(singles, concepts)]
        jax.block_until_ready((states, singles))
        many_clock, single_clock = Clock(), Clock()
        loop_steps = []  # per round: each concept's DDIM steps (samples_per_step is 1)

        def run_many():
            nonlocal states
            with many_clock:
                states, metrics = many(states, params, stacked)
                jax.block_until_ready((states, metrics))
            loop_steps.append(num_sampling_steps(objective, np.asarray(metrics["t_enc"])))

        def run_singles():
            nonlocal singles
            with single_clock:
                out = [single(s, params, e) for s, e in zip(singles, concepts)]
                jax.block_until_ready(out)
            singles = [s for s, _ in out]

        for r in range(args.rounds):
            for fn in ((run_many, run_singles) if r % 2 == 0 else (run_singles, run_many)):
                fn()
        many_s, single_s = sum(many_clock.wall), sum(single_clock.wall)
        # The vmapped loop runs max(steps) for every concept: the sampling work it does over what K calls do.
        loop_work = sum(len(s) * max(s) for s in loop_steps) / max(1, sum(sum(s) for s in loop_steps))
        results[k] = dict(many_steps_per_s=k * args.rounds / many_s, single_steps_per_s=k * args.rounds / single_s,
                          speedup=single_s / many_s, loop_work=loop_work, many_cpu_s=sum(many_clock.cpu), single_cpu_s=sum(single_clock.cpu))
        print(f"K={k}: vmapped {results[k]['many_steps_per_s']:7.2f} concept-steps/s | K single calls "
              f"{results[k]['single_steps_per_s']:7.2f} concept-steps/s | speedup {results[k]['speedup']:.2f}x "
              f"(wall {many_s:.2f} s vs {single_s:.2f} s; DDIM loop work {loop_work:.2f}x; compile {compile_s[f'many_{k}']:.1f} s)", flush=True)
    summary = dict(model=args.model, ddim_steps=args.ddim_steps, rounds=args.rounds, backend=jax.default_backend(),
                   compile_s=compile_s, **{f"k{k}": v for k, v in results.items()}, time=time.strftime("%Y-%m-%d"))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
