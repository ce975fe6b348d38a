"""The job behind ``sample.py``: requests -> batched jitted generation -> PNGs, grid, manifest."""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from .loading import load_pipeline
from .outputs import image_grid, save_png, slug, write_manifest
from .prompts import Request, collect_requests

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("unguide-jax", "jax", "jaxlib", "flax", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def run_sampling(config: dict) -> Path:
    if config.get("create_random_model"):
        from .smoke import ensure_random_model

        ensure_random_model(config["model"], seed=int(config["seed"]))
    if not config["model"]:
        raise ValueError("config.model is empty: give a diffusers-layout Stable Diffusion folder")
    requests = collect_requests(config)
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = load_pipeline(
        config["model"], dtype=_dtype(config["dtype"]), param_dtype=_dtype(config["param_dtype"]),
        allow_pickle=bool(config["allow_pickle"]), clip_skip=int(config["clip_skip"]),
    )
    height, width = int(config["height"]) or None, int(config["width"]) or None
    batch_size = int(config["batch_size"])
    # Same-size requests share a compiled sampler; the last batch is padded so nothing recompiles.
    size_of = lambda r: (r.height or height or sd.default_size, r.width or width or sd.default_size)  # noqa: E731
    records, images, started = [], [], time.perf_counter()
    order = sorted(range(len(requests)), key=lambda i: size_of(requests[i]))
    batches = [list(g) for _, g in itertools.groupby(order, key=lambda i: size_of(requests[i]))]
    batches = [b[i:i + batch_size] for b in batches for i in range(0, len(b), batch_size)]
    results: dict[int, np.ndarray] = {}
    for batch in tqdm(batches, desc="sampling", unit="batch"):
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        reqs: list[Request] = [requests[i] for i in padded]
        h, w = size_of(reqs[0])
        gen = sd.generate(
            [r.prompt for r in reqs], [r.seed for r in reqs], guidance_scale=[r.guidance_scale for r in reqs],
            num_steps=int(config["num_steps"]), eta=float(config["eta"]), height=h, width=w,
            negative_prompt=config["negative_prompt"],
        )
        for i, image in zip(batch, gen.images):
            results[i] = image
    for i, req in enumerate(requests):
        name = f"{i:05d}_{slug(req.prompt)}_s{req.seed}.png"
        save_png(out_dir / name, results[i])
        images.append(results[i])
        records.append(dict(file=name, prompt=req.prompt, seed=req.seed, guidance_scale=req.guidance_scale,
                            height=int(results[i].shape[0]), width=int(results[i].shape[1]), source=req.source))
    if len({im.shape for im in images}) == 1:
        save_png(out_dir / "grid.png", image_grid(images, int(config["grid_cols"])))
    settings = dict(config)
    settings.update(sampler="DDIM", scheduler=dataclasses.asdict(sd.scheduler), versions=versions(),
                    seconds=round(time.perf_counter() - started, 2))
    manifest = write_manifest(out_dir, settings, records)
    return manifest
