#!/usr/bin/env python
"""The CPU levers (docs/benchmarks.md, "Levers"), each measured side by side in one process (interleaved A, B, A, B, ...).

    python bench/bench_levers.py            # shipped model, batch 32 (64 UNet rows with CFG), CPU
    python bench/bench_levers.py --quick    # fewer rounds, fewer sampler steps

Each lever compares the code as shipped (``kept``) with one alternative, on the shipped model's
UNet at the benchmark's batch: a UNet forward over the CFG rows, or a short DDIM + CFG run. One line
per lever: median wall time of each side, ``speedup`` = time(baseline) / time(variant) (> 1: the
variant is faster), and the same ratio on this process's CPU time, which a shared machine disturbs
less than wall time. The last line is one JSON object with every figure.

The baseline of each lever is what the package does now (``kept``), except where the lever is the
change itself (``attention``, ``ynn``): there the baseline is the code before the lever.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import CONTEXT_LENGTH, build_torch_unet  # noqa: E402
from bench.levers_off.attention_before import dot_product_attention as attention_before  # noqa: E402


def interleave(fns: dict, rounds: int) -> dict:
    """{name: blocking zero-arg callable} -> {name: {wall_s, cpu_s}} medians; one warm-up call each,
    then ``rounds`` rounds calling every variant once, the order reversed every other round."""
    names = list(fns)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for k in names:
        fns[k]()
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: dict(wall_s=float(np.median(wall[k])), cpu_s=float(np.median(cpu[k]))) for k in names}


def compare(name: str, fns: dict, rounds: int, results: dict, note: str = "") -> None:
    """Time the variants (the first one is the baseline) and print one line per variant."""
    timing = interleave(fns, rounds)
    base = next(iter(timing.values()))
    for variant, t in list(timing.items())[1:]:
        row = dict(lever=name, variant=variant, baseline=next(iter(timing)), baseline_s=base["wall_s"],
                   variant_s=t["wall_s"], speedup=base["wall_s"] / t["wall_s"],
                   cpu_speedup=base["cpu_s"] / t["cpu_s"], note=note)
        results["levers"].append(row)
        print(f"{name:12} {variant:34} vs {row['baseline']:22} {base['wall_s']:8.3f}s -> {t['wall_s']:8.3f}s  "
              f"speedup {row['speedup']:5.2f} (cpu {row['cpu_speedup']:5.2f}) {note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images per call (2x UNet rows with CFG)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="DDIM steps for the sampler levers")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 3 steps")
    parser.add_argument("--only", default="", help="comma-separated lever names to run")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 3

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import unguide_jax.models.unet as unet_module
    from unguide_jax.diffusion import sampler as sampler_module
    from unguide_jax.diffusion.schedulers import (
        NoiseSchedule,
        SchedulerConfig,
        ddim_step,
        ddim_timesteps,
    )
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models import layers
    from unguide_jax.models.unet import UNetConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    only = set(filter(None, args.only.split(",")))
    run = lambda lever: not only or lever in only  # noqa: E731
    kept = dict(sampler_module.XLA_CPU_OPTIONS)  # the compiler options the package's jitted functions use
    ynn_default = {k: v for k, v in kept.items() if k != "xla_cpu_experimental_ynn_fusion_type"}

    torch_unet, description, size = build_torch_unet("embedded")
    config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", config)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    b = args.batch
    rows = 2 * b
    x = jnp.asarray(rng.standard_normal((rows, size, size, config.in_channels), dtype=np.float32))
    ctx = jnp.asarray(rng.standard_normal((rows, CONTEXT_LENGTH, config.cross_attention_dim), dtype=np.float32))
    results = dict(model=description, batch=b, rows=rows, latent_size=size, rounds=args.rounds, steps=args.steps,
                   kept_compiler_options=kept, levers=[])
    print(f"{description}: {size}x{size}x{config.in_channels} latents, batch {b} ({rows} UNet rows), "
          f"{args.rounds} interleaved rounds; kept compiler options {kept}", flush=True)

    def forward(options=None, module=None, patch=None):
        """A compiled UNet forward over the CFG rows; ``patch`` {module attribute: replacement} while tracing."""
        module = module or unet
        fn = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
        saved = {}
        for (mod, attr), value in (patch or {}).items():
            saved[(mod, attr)] = getattr(mod, attr)
            setattr(mod, attr, value)
        try:
            compiled = fn.lower(params, x, 500, ctx).compile(compiler_options=kept if options is None else options)
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)
        return lambda: compiled(params, x, 500, ctx).block_until_ready()

    # --- the UNet forward ----------------------------------------------------------------------------
    before = {(unet_module, "multi_head_attention"): attention_before}
    if run("ynn"):
        compare("ynn", {"YNNPACK fusions on (XLA default)": forward(ynn_default, patch=before),
                        "YNNPACK fusions off": forward(kept, patch=before)}, args.rounds, results,
                "xla_cpu_experimental_ynn_fusion_type='' (old attention)")
    if run("attention"):
        compare("attention", {"jax.nn.dot_product_attention": forward(patch=before),
                              "einsum, scale in exp, late normalise": forward()}, args.rounds, results,
                "YNNPACK off")
        compare("attention", {"jax.nn.dot_product_attention, ynn on": forward(ynn_default, patch=before),
                              "einsum, ynn on": forward(ynn_default)}, args.rounds, results, "YNNPACK on")

    if run("attn_rows"):
        def attention_in_row_chunks(n):
            """The kept attention over chunks of n batch rows (lax.map): each chunk's T x S scores fit in L2."""
            def attention(q, k, v, heads, is_causal=False, key_mask=None, max_score_bytes=None):
                bb = q.shape[0]
                if bb % n or key_mask is not None or bb == n:
                    return layers.multi_head_attention(q, k, v, heads, is_causal, key_mask, max_score_bytes)
                split = lambda a: a.reshape(bb // n, n, *a.shape[1:])  # noqa: E731
                out = jax.lax.map(lambda qkv: layers.multi_head_attention(*qkv, heads, is_causal),
                                  (split(q), split(k), split(v)))
                return out.reshape(bb, *out.shape[2:])
            return attention

        for call_rows in (rows, rows // 2):  # one call over the CFG rows; one of the sampler's chunks
            xs, cs = x[:call_rows], ctx[:call_rows]
            variants = {}
            for n in (0, 2, 8):
                fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
                saved = unet_module.multi_head_attention
                unet_module.multi_head_attention = attention_in_row_chunks(n) if n else saved
                try:
                    compiled = fn.lower(params, xs, 500, cs).compile(compiler_options=kept)
                finally:
                    unet_module.multi_head_attention = saved
                variants[f"{n}-row chunks" if n else "whole call (kept)"] = (
                    lambda c=compiled, xs=xs, cs=cs: c(params, xs, 500, cs).block_until_ready())
            compare("attn_rows", variants, args.rounds, results, f"attention in row chunks, {call_rows}-row UNet call")

    if run("norm"):
        def group_norm_fast(groups, eps, name, mod):
            return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=True, dtype=mod.dtype,
                                param_dtype=mod.param_dtype, name=name)

        def layer_norm_fast(eps, name, mod):
            return nn.LayerNorm(epsilon=eps, use_fast_variance=True, dtype=mod.dtype, param_dtype=mod.param_dtype,
                                name=name)

        compare("norm", {"two-pass variance (kept)": forward(),
                         "one-pass E[x^2]-E[x]^2": forward(patch={(unet_module, "group_norm"): group_norm_fast,
                                                                  (unet_module, "layer_norm"): layer_norm_fast})},
                args.rounds, results, "GroupNorm and LayerNorm, fp32")

    if run("conv"):
        class ConvNCHW(nn.Module):
            """The same parameters (HWIO kernel, bias) as nn.Conv; the convolution in NCHW/OIHW."""
            features: int
            kernel_size: tuple
            strides: tuple
            padding: object
            dtype: object = jnp.float32
            param_dtype: object = jnp.float32

            @nn.compact
            def __call__(self, x):
                kernel = self.param("kernel", nn.initializers.zeros,
                                    (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
                bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                y = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1)),
                                                 self.strides, self.padding, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                 precision=jax.lax.Precision.HIGHEST)
                return jnp.transpose(y, (0, 2, 3, 1)) + bias

        def conv_nchw(features, kernel, name, mod, stride=1, padding=None):
            if padding is None:
                padding = layers.PAD_1 if kernel == 3 else "VALID"
            return ConvNCHW(features, (kernel, kernel), (stride, stride), padding, dtype=mod.dtype,
                            param_dtype=mod.param_dtype, name=name)

        compare("conv", {"NHWC (kept)": forward(), "NCHW dimension_numbers": forward(
            patch={(unet_module, "conv"): conv_nchw})}, args.rounds, results, "every UNet convolution")

    if run("flags"):
        flags = {
            "xnnpack off": {"xla_cpu_use_xnnpack": False},
            "fast math": {"xla_cpu_enable_fast_math": True},
            "oneDNN": {"xla_cpu_use_onednn": True},
            "single-thread Eigen": {"xla_cpu_multi_thread_eigen": False},
            "vector width 128": {"xla_cpu_prefer_vector_width": 128},
            "no loop unrolling": {"xla_cpu_disable_loop_unrolling": True},
            "concurrency-optimised scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
        }
        variants = {"kept options": forward()}
        for name, extra in flags.items():
            try:
                variants[name] = forward({**kept, **extra})
            except Exception as error:  # an option this jaxlib does not take
                print(f"flags        {name}: not accepted ({str(error)[:80]})")
        compare("flags", variants, args.rounds, results, "on top of the kept options")

    if run("batch"):
        calls, sizes = {}, (16, 32, 64, 128, 256)
        for n in sizes:
            xs = jnp.asarray(rng.standard_normal((n, size, size, config.in_channels), dtype=np.float32))
            cs = jnp.asarray(rng.standard_normal((n, CONTEXT_LENGTH, config.cross_attention_dim), dtype=np.float32))
            compiled = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(
                params, xs, 500, cs).compile(compiler_options=kept)
            reps = max(1, 256 // n)  # the same rows per timed call
            calls[n] = lambda c=compiled, xs=xs, cs=cs, reps=reps: [c(params, xs, 500, cs).block_until_ready()
                                                                   for _ in range(reps)]
        timing = interleave(calls, args.rounds)
        ref = timing[rows] if rows in timing else timing[64]
        for n, t in timing.items():
            row = dict(lever="batch", variant=f"{n} rows per call", baseline=f"{rows if rows in timing else 64} rows",
                       baseline_s=ref["wall_s"] / 256, variant_s=t["wall_s"] / 256,
                       speedup=ref["wall_s"] / t["wall_s"], cpu_speedup=ref["cpu_s"] / t["cpu_s"],
                       note="UNet forward, time per row")
            results["levers"].append(row)
            print(f"batch        {row['variant']:34} {1e3 * row['variant_s']:8.2f} ms per row  speedup vs "
                  f"{row['baseline']} {row['speedup']:5.2f} (cpu {row['cpu_speedup']:5.2f})", flush=True)

    # --- the sampler ---------------------------------------------------------------------------------
    scheduler = SchedulerConfig()
    schedule = NoiseSchedule.from_config(scheduler)
    timesteps, prev_timesteps = ddim_timesteps(scheduler, args.steps)
    cond, uncond = ctx[b:], ctx[:b]
    z0 = x[:b]
    scale = jnp.full((b,), 7.5)

    def cfg_one_call(p, z, t):
        return sampler_module.guided_prediction(unet, p, z, t, cond, uncond, scale)

    def cfg_two_calls(p, z, t):
        u = unet.apply({"params": p}, z, t, uncond)
        c = unet.apply({"params": p}, z, t, cond)
        return sampler_module._cfg(u, c, scale)

    def scan_sampler(predict, unroll=1):
        def run_all(p, z):
            def step(z, xs):
                t, t_prev = xs
                z, _ = ddim_step(schedule, scheduler, predict(p, z, t), t, t_prev, z)
                return z, None
            return jax.lax.scan(step, z, (jnp.asarray(timesteps), jnp.asarray(prev_timesteps)), unroll=unroll)[0]
        compiled = jax.jit(run_all).lower(params, z0).compile(compiler_options=kept)
        return lambda: compiled(params, z0).block_until_ready()

    if run("cfg"):
        compare("cfg", {"one call on 2B rows (kept)": scan_sampler(cfg_one_call),
                        "two calls on B rows": scan_sampler(cfg_two_calls)}, args.rounds, results,
                f"{args.steps}-step DDIM + CFG")
    if run("chunks"):
        def chunked(rows_per_call):
            def predict(p, z, t):
                zz, cc = jnp.concatenate([z, z]), jnp.concatenate([uncond, cond])
                out = sampler_module.map_rows(lambda x, c: unet.apply({"params": p}, x, t, c), rows_per_call, zz, cc)
                u, c = jnp.split(out, 2)
                return sampler_module._cfg(u, c, scale)
            return predict

        compare("chunks", {f"one call on {rows} rows": scan_sampler(cfg_one_call),
                           **{f"lax.map over {r}-row chunks": scan_sampler(chunked(r)) for r in (8, 16, 32)}},
                args.rounds, results, f"{args.steps}-step DDIM + CFG")
    if run("unroll"):
        compare("unroll", {"lax.scan unroll=1 (kept)": scan_sampler(cfg_one_call),
                           "unroll=2": scan_sampler(cfg_one_call, 2)}, args.rounds, results,
                f"{args.steps}-step DDIM + CFG")
    if run("host"):
        step = jax.jit(lambda p, z, t, t_prev: ddim_step(schedule, scheduler, cfg_one_call(p, z, t), t, t_prev, z)[0])
        compiled_step = step.lower(params, z0, jnp.int32(0), jnp.int32(0)).compile(compiler_options=kept)

        def python_loop():
            z = z0
            for t, t_prev in zip(timesteps, prev_timesteps):
                z = compiled_step(params, z, jnp.int32(t), jnp.int32(t_prev))
                np.asarray(z[0, 0, 0, 0])  # a host read each step, as a per-step callback or progress bar would
            return z.block_until_ready()

        compare("host", {"lax.scan, no host trip (kept)": scan_sampler(cfg_one_call),
                         "python loop, host read per step": python_loop}, args.rounds, results,
                f"{args.steps}-step DDIM + CFG")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
