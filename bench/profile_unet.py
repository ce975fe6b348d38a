#!/usr/bin/env python
"""Where one UNet call and one sampler step spend their time: our compiled XLA program (jax.profiler
trace, per thunk, mapped to the HLO and its source module) against PyTorch's ops (torch.profiler),
the shipped model at the benchmark's batch.

    python bench/profile_unet.py                 # batch 32: 64 UNet rows, CPU
    python bench/profile_unet.py --calls 5 --compiler-default   # XLA's default options instead of ours

Times are per call, summed over threads (two cores: the sum is up to twice the wall time), so the
shares are shares of CPU time. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_train import CONTEXT_LENGTH, build_torch_unet  # noqa: E402

# One name per kind of work, for both frameworks.
LAYERS = (("attn1", "self-attention"), ("attn2", "cross-attention"), ("/ff/", "feed-forward (GEGLU)"))


def parse_hlo(text: str) -> dict:
    """instruction name -> (opcode, shape, op_name metadata) for every instruction of a compiled module."""
    info = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ([\w\-]+)\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            info[m.group(1)] = (m.group(3), m.group(2), op_name.group(1) if op_name else "")
    return info


def jax_kind(name: str, info: dict) -> tuple[str, str]:
    """(layer, kind of op) of one thunk."""
    opcode, shape, op_name = info.get(name, ("", "", ""))
    layer = "other (resnets, up/down, time embedding)"
    for key, label in LAYERS:
        if key in op_name:
            layer = label
    if re.search(r"/norm\d?/|conv_norm_out|/norm1/|/norm2/", op_name) or op_name.endswith("/norm"):
        layer = "GroupNorm / LayerNorm"
    base = re.sub(r"\.\d+$", "", name)
    prim = op_name.rsplit("/", 1)[-1] if op_name else ""
    if "conv_general_dilated" in (base, prim) or opcode == "convolution":
        kind = "convolution"
    elif base == "dot" or prim == "dot_general" or opcode == "dot":
        kind = "matmul"
    elif "reduce" in base or prim in ("reduce_sum", "reduce_max"):
        kind = "reduction"
    elif "copy" in base or "transpose" in base or prim in ("transpose", "reshape"):
        kind = "layout copy"
    elif "ynn_fusion" in base:
        kind = "YNNPACK fusion"
    else:
        kind = "element-wise"
    if layer.startswith("other") and kind == "matmul" and re.search(r"\[\d+,\d+,(256|77|64|16|80)\]", shape):
        layer = "self-attention" if "256]" in shape.split("{")[0] else layer
    return layer, kind


def torch_kind(name: str) -> str:
    if "convolution" in name:
        return "convolution"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "attention" in name:
        return "fused attention (SDPA)"
    if "norm" in name:
        return "GroupNorm / LayerNorm"
    if name in ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone"):
        return "layout copy"
    return "element-wise"


def profile_jax(compiled, call, calls: int) -> tuple[dict, float]:
    import jax

    info = parse_hlo(compiled.as_text())
    call()
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            wall = (time.perf_counter() - start) / calls
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)[0])
    totals = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue
                totals[jax_kind(event.name, info)] += event.duration_ns / calls / 1e6
    return dict(totals), wall


def profile_torch(fn, calls: int) -> tuple[dict, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            wall = (time.perf_counter() - start) / calls
    totals = collections.Counter()
    for event in prof.key_averages():
        totals[torch_kind(event.key)] += event.self_cpu_time_total / calls / 1e3
    return dict(totals), wall


def table(title: str, totals: dict, wall: float) -> list[str]:
    total = sum(totals.values())
    lines = [f"{title}: wall {1e3 * wall:.0f} ms per call, op time {total:.0f} ms (summed over threads)"]
    for key, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        label = " / ".join(key) if isinstance(key, tuple) else key
        lines.append(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {label}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images (UNet rows: 2x with CFG)")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls (after one warm-up)")
    parser.add_argument("--compiler-default", action="store_true", help="XLA's default CPU options, not ours")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

    import jax
    import jax.numpy as jnp

    from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS, guided_prediction
    from unguide_jax.diffusion.schedulers import (
        NoiseSchedule,
        SchedulerConfig,
        ddim_step,
    )
    from unguide_jax.loading.diffusers_folder import (
        build_module,
        params_from_state_dict,
    )
    from unguide_jax.models.unet import UNetConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    options = {} if args.compiler_default else XLA_CPU_OPTIONS
    torch_unet, description, size = build_torch_unet("embedded")
    config = UNetConfig.from_dict(dict(torch_unet.config))
    unet = build_module("unet", config)
    params = params_from_state_dict("unet", unet, torch_unet.state_dict(), param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    b = args.batch
    z = jnp.asarray(rng.standard_normal((b, size, size, config.in_channels), dtype=np.float32))
    cond = jnp.asarray(rng.standard_normal((b, CONTEXT_LENGTH, config.cross_attention_dim), dtype=np.float32))
    uncond = jnp.asarray(rng.standard_normal((b, CONTEXT_LENGTH, config.cross_attention_dim), dtype=np.float32))
    x2, ctx = jnp.concatenate([z, z]), jnp.concatenate([uncond, cond])
    scheduler = SchedulerConfig()
    schedule = NoiseSchedule.from_config(scheduler)
    scale = jnp.full((b,), 7.5)

    forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(
        params, x2, 500, ctx).compile(compiler_options=options)

    def one_step(p, z, t, t_prev):
        out = guided_prediction(unet, p, z, t, cond, uncond, scale)
        return ddim_step(schedule, scheduler, out, t, t_prev, z)[0]

    step = jax.jit(one_step).lower(params, z, jnp.int32(501), jnp.int32(481)).compile(compiler_options=options)
    report = dict(model=description, batch=b, rows=2 * b, compiler_options=options, calls=args.calls)
    lines = [f"{description}, batch {b} ({2 * b} UNet rows), {size}x{size}x{config.in_channels} latents, "
             f"compiler options {options}"]
    for name, compiled, call in (
            ("JAX UNet forward", forward, lambda: forward(params, x2, 500, ctx).block_until_ready()),
            ("JAX sampler step (CFG + DDIM)", step,
             lambda: step(params, z, jnp.int32(501), jnp.int32(481)).block_until_ready())):
        totals, wall = profile_jax(compiled, call, args.calls)
        by_kind, by_layer = collections.Counter(), collections.Counter()
        for (layer, kind), ms in totals.items():
            by_kind[kind] += ms
            by_layer[layer] += ms
        lines += table(f"{name}, by op", dict(by_kind), wall) + table(f"{name}, by layer", dict(by_layer), wall)
        report[name] = dict(wall_ms=1e3 * wall, by_kind=dict(by_kind), by_layer=dict(by_layer))

    if not args.no_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # as the benchmarks (bench_unet.py)
        t_x = torch.from_numpy(np.asarray(x2).transpose(0, 3, 1, 2).copy())
        t_ctx = torch.from_numpy(np.asarray(ctx))
        totals, wall = profile_torch(lambda: torch_unet(t_x, 500, t_ctx), args.calls)
        lines += table(f"PyTorch {torch.__version__} UNet forward ({torch.get_num_threads()} threads), by op",
                       totals, wall)
        report["PyTorch UNet forward"] = dict(wall_ms=1e3 * wall, by_kind=totals, threads=torch.get_num_threads())
    print("\n".join(lines))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
