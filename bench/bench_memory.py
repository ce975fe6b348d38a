"""Per-device memory of an UnGuide training step for an SD 1.5- or SDXL-sized UNet, from the compiled
step's own memory analysis (nothing is allocated: the weights are shapes only).

    python bench/bench_memory.py                       # the table: fp32/bf16 x remat off/blocks x 1/8 devices
    python bench/bench_memory.py --quick               # bf16 only, 1 and 8 devices, remat off and on
    python bench/bench_memory.py --dtypes float32      # fp32 only
    python bench/bench_memory.py --model sdxl --quick --devices 8 --remat blocks   # one SDXL row

``--model sd15`` (default): SD 1.5's UNet (860 M) at 64x64 latents (512 px), context (1, 77, 768).
``--model sdxl``: SDXL base 1.0's UNet (2.6 B, ``loading.sd_configs.SDXL_BASE``) at 128x128 latents
(1024 px), context (1, 77 + 1, 2048): the packed context, whose last token carries the pooled text
embedding and the six time ids (``models.unet.pack_context``). Batch 1, the object LoRA (rank 1, attn2
K/V), the paper's objective (t_enc up to 40 of 50 DDIM steps, the CFG trajectory without gradient,
then base and edited predictions at t). Devices: fake CPU devices
(``--xla_force_host_platform_device_count``), a mesh of data 1 x fsdp n, base weights split over fsdp
by the partition rules. The figures are XLA CPU's; a GPU/TPU compile fuses differently
(``bench/accelerator.sh`` reports the accelerator's own). Each row's compile time and this process's
peak resident memory so far (the compile's host RAM: the rows are cumulative, run one row per process
to see one configuration's) are printed with it. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
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

from bench.common import SD15_UNET  # noqa: E402
from unguide_jax.diffusion.memory import needed_bytes  # noqa: E402
from unguide_jax.diffusion.schedulers import SchedulerConfig  # noqa: E402
from unguide_jax.edits.lora import LoraConfig  # noqa: E402
from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig  # noqa: E402
from unguide_jax.erasers.unguide.train_step import (  # noqa: E402
    init_train_state,
    make_optimizer,
    make_train_step,
)
from unguide_jax.loading.sd_configs import SDXL_BASE  # noqa: E402
from unguide_jax.models.layers import abstract_params  # noqa: E402
from unguide_jax.models.unet import TEXT_TIME, UNet2DConditionModel, UNetConfig  # noqa: E402
from unguide_jax.parallel.mesh import make_mesh, shardings_for  # noqa: E402

GB = 2**30
CONTEXT_LENGTH = 77  # CLIP's text tokens

# name -> (description, diffusers UNet config, default latent height/width)
MODELS = {
    "sd15": ("SD 1.5-sized UNet (860 M)", SD15_UNET, 64),
    "sdxl": ("SDXL base-sized UNet (2.6 B)", SDXL_BASE.unet, 128),
}


def context_shape(config: UNetConfig, batch: int = 1) -> tuple[int, int, int]:
    """The context a UNet of ``config`` reads: (batch, 77, width), and for an SDXL (text_time) UNet one
    more token, the packed pooled text embedding and time ids (``models.unet.pack_context``)."""
    return batch, CONTEXT_LENGTH + (config.addition_embed_type == TEXT_TIME), config.cross_attention_dim


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def unguide_train_step(unet, devices: int, size: int):
    """(step, lora_config, optimizer, mesh): the measured training step, the object LoRA and the paper's
    objective at one sample per step, on a mesh of data 1 x fsdp ``devices``."""
    lora_config, optimizer = LoraConfig(rank=1, alpha=8.0, targets="object", init="random"), make_optimizer(3e-5)
    mesh = make_mesh(data=1, fsdp=devices, devices=jax.devices()[:devices])
    step = make_train_step(unet, SchedulerConfig(), lora_config, ObjectiveConfig(samples_per_step=1), optimizer,
                           mesh=mesh, latent_size=size)
    return step, lora_config, optimizer, mesh


def measure(dtype: str, remat: str, devices: int, size: int | None = None, model: str = "sd15") -> dict:
    _, unet_config, default_size = MODELS[model]
    size = size or default_size
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    config = UNetConfig.from_dict(unet_config)
    unet = UNet2DConditionModel(config, dtype=jdtype, param_dtype=jdtype, remat=remat)
    params = abstract_params(unet, *unet.init_inputs())
    step, lora_config, optimizer, mesh = unguide_train_step(unet, devices, size)
    state = jax.eval_shape(lambda k, p: init_train_state(k, p, lora_config, optimizer), jax.random.key(0), params)
    context = jax.ShapeDtypeStruct(context_shape(config), jnp.float32)
    embeddings = ConceptEmbeddings(target=context, reference=context, uncond=context)
    started = time.perf_counter()
    compiled = step.lower(state, params, embeddings).compile()
    stats = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_device_weights = sum(x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
                             for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings_for(params, mesh))))
    total = needed_bytes(compiled)
    return dict(model=model, dtype=dtype, remat=remat or "off", devices=devices, latent=size,
                context=list(context.shape),
                base_weights_gb=round(weights / GB, 3), base_weights_per_device_gb=round(per_device_weights / GB, 3),
                arguments_gb=round(stats.argument_size_in_bytes / GB, 3), temp_gb=round(stats.temp_size_in_bytes / GB, 3),
                total_per_device_gb=round(total / GB, 3), compile_s=round(time.perf_counter() - started, 1),
                host_peak_rss_gb=round(peak_rss_gb(), 2))


def ratio_table(numerators: dict, denominators: dict, field: str) -> dict[str, float]:
    """"a/b" -> numerators[(a, b)][field] / denominators[(a, b)][field], for the keys measured in both."""
    return {f"{a}/{b}": round(numerators[(a, b)][field] / denominators[(a, b)][field], 3)
            for (a, b) in denominators if (a, b) in numerators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15", help="the UNet's size (default sd15)")
    parser.add_argument("--quick", action="store_true", help="bf16 only (the same as --dtypes bfloat16)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                        help="the compute/parameter dtypes to measure")
    parser.add_argument("--remat", nargs="+", choices=("off", "blocks", "dots"), default=["off", "blocks"],
                        help="the UNet's rematerialisation policies to measure")
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 8], help="fsdp sizes to measure (at most 8)")
    parser.add_argument("--size", type=int, default=None,
                        help="latent height/width (default: the model's, sd15 64 = 512 px, sdxl 128 = 1024 px)")
    args = parser.parse_args()
    if max(args.devices) > len(jax.devices()):
        parser.error(f"--devices {max(args.devices)}: this process has {len(jax.devices())} devices")
    description = MODELS[args.model][0]
    print(f"{description}, the UnGuide training step; XLA {jax.default_backend()}, {len(jax.devices())} devices",
          flush=True)
    rows = []
    for dtype in (["bfloat16"] if args.quick else args.dtypes):
        for remat in args.remat:
            for devices in args.devices:
                row = measure(dtype, "" if remat == "off" else remat, devices, args.size, args.model)
                rows.append(row)
                print(f"{args.model} {dtype:8s} remat {row['remat']:6s} {devices} device(s): "
                      f"{row['total_per_device_gb']:6.2f} GB per device (base weights "
                      f"{row['base_weights_per_device_gb']:.2f} of {row['base_weights_gb']:.2f} GB, working "
                      f"{row['temp_gb']:.2f} GB; compiled in {row['compile_s']} s, host peak RSS so far "
                      f"{row['host_peak_rss_gb']:.1f} GB)", flush=True)
    bf16_one = [r for r in rows if r["dtype"] == "bfloat16" and r["devices"] == 1]
    fits = all(r["total_per_device_gb"] <= 16 for r in bf16_one) if bf16_one else None  # None: not measured
    one = {(r["dtype"], r["remat"]): r for r in rows if r["devices"] == 1}
    eight = {(r["dtype"], r["remat"]): r for r in rows if r["devices"] == 8}
    off = {(r["dtype"], r["devices"]): r for r in rows if r["remat"] == "off"}
    blocks = {(r["dtype"], r["devices"]): r for r in rows if r["remat"] == "blocks"}
    ratios = ratio_table(eight, one, "base_weights_per_device_gb")
    total_ratios = ratio_table(eight, one, "total_per_device_gb")
    remat_ratios = ratio_table(blocks, off, "total_per_device_gb")
    for name, table in (("fsdp 8 / 1 device, total per device", total_ratios),
                        ("remat blocks / off, total per device", remat_ratios)):
        if table:
            print(f"{name}: " + ", ".join(f"{key} {value:.3f}x" for key, value in table.items()))
    print(json.dumps(dict(model=args.model, description=description, rows=rows, bf16_one_device_fits_16gb=fits,
                          fsdp8_weights_per_device_ratio=ratios, fsdp8_total_per_device_ratio=total_ratios,
                          remat_blocks_over_off_total=remat_ratios, backend=jax.default_backend())))


if __name__ == "__main__":
    main()
