#!/usr/bin/env python
"""K concepts in one run: the K-concept UnGuide train step (packed trajectories) vs K single-concept step calls.

    python bench/bench_many_concepts.py                       # the embedded shapes model, K = 1, 2, 4, 10
    python bench/bench_many_concepts.py --model tiny --concepts 1,2,4,8
    python bench/bench_many_concepts.py --concepts 10 --slots 2,3,5,7,10   # the trajectory_slots choice

For each K both sides train the same K concepts (random embeddings, seeds 0..K-1) from the same states, so
they make the same random draws (x_T, t_enc, t) and the same objective. The K-concept step packs the K
trajectories into ``trajectory_slots`` UNet rows per DDIM iteration (erasers/unguide/many.py); its loop work
is slots x iterations, against the sum of the concepts' DDIM steps that K single calls run. Each round runs
the K-concept step once and the K single steps once, alternating which goes first; totals over the rounds are
compared. Compile time is reported apart.

Throughput: concept-steps per second (K per K-concept step), and LoRAs trained per second per device for a
whole run of --run-steps steps: K / (compile + run-steps x step time) for the K-concept run, 1 / (compile +
run-steps x step time) for a single run (process start and model loading, which every separate run pays too,
are not counted: the figure flatters the single runs).

The last line is one JSON object: per K (and slots), many_steps_per_s and single_steps_per_s, speedup (single
time over many time: > 1 means the K-concept step is faster), loop_work (slot-steps the packed loop ran over
the DDIM steps K single calls ran), iterations, and loras_per_s_per_device for both sides.
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
    parser.add_argument("--concepts", default="1,2,4,10", help="the K values, comma-separated")
    parser.add_argument("--slots", default="0", help="trajectory_slots values, comma-separated (0: automatic)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per K (one K-concept step + K single steps)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the objective's trajectory")
    parser.add_argument("--run-steps", type=int, default=200, help="steps of a whole run, for LoRAs per second")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    ks = [int(k) for k in args.concepts.split(",")]
    slot_choices = [int(b) for b in args.slots.split(",")]

    import jax
    import jax.numpy as jnp

    from bench.bench_train import Clock
    from unguide_jax.edits.lora import LoraConfig
    from unguide_jax.erasers.unguide.many import (
        default_slots,
        init_many_states,
        make_many_train_step,
        stack_embeddings,
    )
    from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig, num_sampling_steps
    from unguide_jax.erasers.unguide.train_step import init_train_state, make_optimizer, make_train_step

    jax.config.update("jax_default_matmul_precision", "highest")
    unet, params, scheduler, description = load_model(args.model)
    context_length = 5 if args.model == "tiny" else args.context_length
    lora_config = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    objective = ObjectiveConfig(ddim_steps=args.ddim_steps)
    optimizer = make_optimizer(3e-5)
    width = unet.config.cross_attention_dim
    devices = 1  # both sides run on the default device
    rng = np.random.default_rng(0)

    def new_concept():
        # Random embeddings: their values do not change the cost.
        draw = lambda: jnp.asarray(rng.standard_normal((1, context_length, width), dtype=np.float32))  # noqa: E731
        return ConceptEmbeddings(target=draw(), reference=draw(), uncond=draw())

    print(f"model: {description}; backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"DDIM steps {args.ddim_steps}, {args.rounds} rounds per K; whole runs of {args.run_steps} steps")
    single_step = make_train_step(unet, scheduler, lora_config, objective, optimizer)
    results, compile_s = {}, {}
    clock = Clock()
    with clock:
        probe = init_train_state(jax.random.key(0), params, lora_config, optimizer)
        single = single_step.lower(probe, params, new_concept()).compile()
    compile_s["single"] = clock.wall[0]
    compile_cpu_s = {"single": clock.cpu[0]}
    rows = []
    for k in ks:
        concepts = [new_concept() for _ in range(k)]
        keys = [jax.random.key(i) for i in range(k)]
        for b in slot_choices:
            slots = b or default_slots(k * objective.samples_per_step)
            name = f"k{k}" if len(slot_choices) == 1 else f"k{k}_b{slots}"
            singles = [init_train_state(key, params, lora_config, optimizer) for key in keys]
            states = init_many_states(keys, params, lora_config, optimizer)
            stacked = stack_embeddings(concepts)
            clock = Clock()
            with clock:
                many = make_many_train_step(unet, scheduler, lora_config, objective, optimizer,
                                            trajectory_slots=slots).lower(states, params, stacked).compile()
            compile_s[name], compile_cpu_s[name] = clock.wall[0], clock.cpu[0]
            # Warm-up call of each, then the rounds (both sides keep making the same draws).
            states, _ = many(states, params, stacked)
            singles = [single(s, params, e)[0] for s, e in zip(singles, concepts)]
            jax.block_until_ready((states, singles))
            many_clock, single_clock = Clock(), Clock()
            loop = []  # per round: (each concept's DDIM steps, packed iterations)

            def run_many():
                nonlocal states
                with many_clock:
                    states, metrics = many(states, params, stacked)
                    jax.block_until_ready((states, metrics))
                loop.append((num_sampling_steps(objective, np.asarray(metrics["t_enc"])),
                             int(np.asarray(metrics["trajectory_iterations"])[0])))

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
            loop_work = sum(slots * it for _, it in loop) / max(1, sum(int(s.sum()) for s, _ in loop))
            many_step_s, single_step_s = many_s / args.rounds, single_s / (k * args.rounds)
            many_run_s = compile_s[name] + args.run_steps * many_step_s
            single_run_s = compile_s["single"] + args.run_steps * single_step_s
            results[name] = dict(
                concepts=k, slots=slots, many_steps_per_s=k / many_step_s, single_steps_per_s=1 / single_step_s,
                speedup=single_s / many_s, loop_work=loop_work, iterations=float(np.mean([it for _, it in loop])),
                longest=float(np.mean([int(s.max()) for s, _ in loop])),
                many_cpu_s=sum(many_clock.cpu), single_cpu_s=sum(single_clock.cpu),
                many_loras_per_s_per_device=k / many_run_s / devices,
                single_loras_per_s_per_device=1 / single_run_s / devices,
                run_speedup=k * single_run_s / many_run_s)
            rows.append(name)
            r_ = results[name]
            print(f"K={k} slots={slots}: K-concept step {r_['many_steps_per_s']:6.2f} concept-steps/s | K single "
                  f"{r_['single_steps_per_s']:6.2f} | speedup {r_['speedup']:.2f}x | loop {r_['iterations']:.1f} it "
                  f"(longest {r_['longest']:.1f}), work {loop_work:.2f}x | compile {compile_s[name]:.1f} s "
                  f"({compile_cpu_s[name]:.1f} s CPU) | "
                  f"LoRAs/s/device {r_['many_loras_per_s_per_device']:.4f} vs {r_['single_loras_per_s_per_device']:.4f}"
                  f" (whole runs {r_['run_speedup']:.2f}x)", flush=True)
    print(f"\nsingle step compile {compile_s['single']:.1f} s ({compile_cpu_s['single']:.1f} s CPU); "
          f"whole runs of {args.run_steps} steps, process start "
          "not counted")
    print("| K | slots | K-concept step | K single steps | ratio | loop iterations (longest) | loop work | "
          "LoRAs/s/device, K-concept run | single runs | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in rows:
        r_ = results[name]
        print(f"| {r_['concepts']} | {r_['slots']} | {r_['many_steps_per_s']:.2f} | {r_['single_steps_per_s']:.2f} | "
              f"{r_['speedup']:.2f}x | {r_['iterations']:.1f} ({r_['longest']:.1f}) | {r_['loop_work']:.2f}x | "
              f"{r_['many_loras_per_s_per_device']:.4f} | {r_['single_loras_per_s_per_device']:.4f} | "
              f"{r_['run_speedup']:.2f}x |")
    summary = dict(model=args.model, ddim_steps=args.ddim_steps, rounds=args.rounds, run_steps=args.run_steps,
                   backend=jax.default_backend(), compile_s=compile_s,
                   compile_cpu_s=compile_cpu_s, **results, time=time.strftime("%Y-%m-%d"))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
