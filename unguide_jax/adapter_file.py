"""A trained LoRA adapter as one safetensors file in this project's layout.

Tensors: ``<module path>.lora_A`` (in, r) and ``<module path>.lora_B`` (r, out), the pytree of
``unguide_jax.lora`` as is. Metadata (strings): the format tag, ``rank``, ``alpha`` (multiplies
A @ B directly, see lora.py), ``targets`` (the rule or regex the adapter was built with) and
whatever the writer adds (concept, base model, steps) under other keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from .lora import Adapter, LoraConfig
from .weights import write_safetensors

ADAPTER_FORMAT = "unguide-jax-lora/1"
_PARTS = ("lora_A", "lora_B")


def save_adapter(path: str | Path, adapter: Adapter, config: LoraConfig,
                 extra: Mapping[str, object] | None = None) -> Path:
    """Write ``adapter`` (fp32) with its LoRA config; ``extra`` values are stored as JSON strings."""
    tensors = {}
    for module, ab in adapter.items():
        for part in _PARTS:
            tensors[f"{module}.{part}"] = np.asarray(ab[part], np.float32)
        if ab["lora_A"].shape[1] != config.rank:
            raise ValueError(f"adapter module {module} has rank {ab['lora_A'].shape[1]}, the config says {config.rank}")
    metadata = {key: json.dumps(value) for key, value in (extra or {}).items()}
    metadata.update(format=ADAPTER_FORMAT, rank=str(config.rank), alpha=repr(float(config.alpha)),
                    targets=config.targets)
    return write_safetensors(path, tensors, metadata)


def load_adapter(path: str | Path) -> tuple[Adapter, LoraConfig]:
    """(adapter pytree of jnp arrays, LoraConfig) from a file written by ``save_adapter``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing adapter file: {path}")
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an unguide-jax adapter (metadata format {metadata.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r}); PEFT/kohya files are read by unguide_jax.lora_io")
    config = LoraConfig(rank=int(metadata["rank"]), alpha=float(metadata["alpha"]), targets=metadata["targets"])
    adapter: Adapter = {}
    for name, value in tensors.items():
        module, _, part = name.rpartition(".")
        if part not in _PARTS:
            raise ValueError(f"{path}: unexpected tensor {name!r} (expected <module>.lora_A / <module>.lora_B)")
        adapter.setdefault(module, {})[part] = jnp.asarray(value)
    for module, ab in adapter.items():
        missing = [p for p in _PARTS if p not in ab]
        if missing:
            raise ValueError(f"{path}: module {module} has no {missing[0]}")
        if ab["lora_A"].shape[1] != config.rank or ab["lora_B"].shape[0] != config.rank:
            raise ValueError(f"{path}: module {module} has A {ab['lora_A'].shape}, B {ab['lora_B'].shape}, "
                             f"not rank {config.rank}")
    return adapter, config


def read_adapter_metadata(path: str | Path) -> dict[str, object]:
    """The writer's extra metadata (JSON-decoded), without reading the tensors."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    fixed = {"format", "rank", "alpha", "targets"}
    return {k: json.loads(v) for k, v in metadata.items() if k not in fixed}
