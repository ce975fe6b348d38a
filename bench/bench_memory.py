"""Per-device memory of an UnGuide training step for an SD 1.5-sized UNet, from the compiled step's own
memory analysis (nothing is allocated: the weights are shapes only).

    python bench/bench_memory.py                       # the table: fp32/bf16 x remat off/blocks x 1/8 devices
    python bench/bench_memory.py --quick               # bf16 only, 1 and 8 devices, remat off and on
    python bench/bench_memory.py --dtypes float32      # fp32 only

At 64x64 latents (512 px), batch 1, the object LoRA (rank 1, attn2 K/V), the paper's objective (t_enc
up to 40 of 50 DDIM steps, the CFG trajectory without gradient, then base and edited predictions at
t). Devices: fake CPU devices (``--xla_force_host_platform_device_count``), a mesh of data 1 x fsdp n,
base weights split over fsdp by the partition rules. The figures are XLA CPU's; a GPU/TPU compile
fuses differently (``bench/accelerator.sh`` reports the accelerator's own). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: makes bench.* importable

# Run as a script: 8 fake CPU devices for the fsdp rows (imported, e.g. by bench_accelerator.py, the
# devices stay what the host has).
if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.bench_unet import SD15_UNET  # noqa: E402
from unguide_jax.diffusion.memory import needed_bytes  # noqa: E402
from unguide_jax.diffusion.schedulers import SchedulerConfig  # noqa: E402
from unguide_jax.edits.lora import LoraConfig  # noqa: E402
from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig  # noqa: E402
from unguide_jax.erasers.unguide.train_step import (  # noqa: E402
    init_train_state,
    make_optimizer,
    make_train_step,
)
from unguide_jax.models.layers import abstract_params  # noqa: E402
from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from unguide_jax.parallel.mesh import make_mesh, shardings_for  # noqa: E402

GB = 2**30


def unguide_train_step(unet, devices: int, size: int):
    """(step, lora_config, optimizer, mesh): the measured training step, the object LoRA and the paper's
    objective at one sample per step, on a mesh of data 1 x fsdp ``devices``."""
    lora_config, optimizer = LoraConfig(rank=1, alpha=8.0, targets="object", init="random"), make_optimizer(3e-5)
    mesh = make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])
    step = make_train_step(unet, SchedulerConfig(), lora_config, ObjectiveConfig(samples_per_step=1), optimizer,
                           mesh=mesh, latent_size=size)
    return step, lora_config, optimizer, mesh


def measure(dtype: str, remat: str, devices: int, size: int) -> dict:
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    unet = UNet2DConditionModel(UNetConfig.from_dict(SD15_UNET), dtype=jdtype, param_dtype=jdtype, remat=remat)
    params = abstract_params(unet, *unet.init_inputs())
    step, lora_config, optimizer, mesh = unguide_train_step(unet, devices, size)
    state = jax.eval_shape(lambda k, p: init_train_state(k, p, lora_config, optimizer), jax.random.key(0), params)
    context = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
    embeddings = ConceptEmbeddings(target=context, reference=context, uncond=context)
    started = time.perf_counter()
    compiled = step.lower(state, params, embeddings).compile()
    stats = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_device_weights = sum(x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
                             for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings_for(params, mesh))))
    total = needed_bytes(compiled)
    return dict(dtype=dtype, remat=remat or "off", devices=devices, latent=size,
                base_weights_gb=round(weights / GB, 3), base_weights_per_device_gb=round(per_device_weights / GB, 3),
                arguments_gb=round(stats.argument_size_in_bytes / GB, 3), temp_gb=round(stats.temp_size_in_bytes / GB, 3),
                total_per_device_gb=round(total / GB, 3), compile_s=round(time.perf_counter() - started, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only (the same as --dtypes bfloat16)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                        help="the compute/parameter dtypes to measure")
    parser.add_argument("--size", type=int, default=64, help="latent height/width (64: 512 px)")
    args = parser.parse_args()
    rows = []
    for dtype in (["bfloat16"] if args.quick else args.dtypes):
        for remat in ("", "blocks"):
            for devices in (1, 8):
                row = measure(dtype, remat, devices, args.size)
                rows.append(row)
                print(f"{dtype:8s} remat {row['remat']:6s} {devices} device(s): {row['total_per_device_gb']:6.2f} GB per "
                      f"device (base weights {row['base_weights_per_device_gb']:.2f} of {row['base_weights_gb']:.2f} GB, "
                      f"working {row['temp_gb']:.2f} GB; compiled in {row['compile_s']} s)", flush=True)
    bf16_one = [r for r in rows if r["dtype"] == "bfloat16" and r["devices"] == 1]
    fits = all(r["total_per_device_gb"] <= 16 for r in bf16_one) if bf16_one else None  # None: not measured
    one = {(r["dtype"], r["remat"]): r for r in rows if r["devices"] == 1}
    eight = {(r["dtype"], r["remat"]): r for r in rows if r["devices"] == 8}
    ratios = {f"{d}/{m}": round(eight[(d, m)]["base_weights_per_device_gb"] / one[(d, m)]["base_weights_per_device_gb"], 3)
              for (d, m) in one if (d, m) in eight}
    print(json.dumps(dict(rows=rows, bf16_one_device_fits_16gb=fits, fsdp8_weights_per_device_ratio=ratios,
                          backend=jax.default_backend())))


if __name__ == "__main__":
    main()
