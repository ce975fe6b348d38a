"""A trained LoRA adapter as one safetensors file in this project's layout.

Tensors: ``<module path>.lora_A`` (in, r) and ``<module path>.lora_B`` (r, out), the pytree of
``unguide_jax.edits.lora`` as is. Metadata (strings): the format tag, ``rank``, ``alpha`` (multiplies
A @ B directly, see lora.py), ``targets`` (the rule or regex the adapter was built with) and
whatever the writer adds (concept, base model, steps) under other keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from unguide_jax.edits.edit import Edit, PromptMemory
from unguide_jax.edits.lora import Adapter, LoraConfig
from unguide_jax.loading.weights import (
    read_safetensors_with_metadata,
    write_safetensors,
)

ADAPTER_FORMAT = "unguide-jax-lora/1"
_PARTS = ("lora_A", "lora_B")


class NonFiniteEdit(ValueError):
    """An edit holding NaN or infinite values: refused when loaded and when a trainer saves it."""


def check_finite(tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Every tensor finite; else ``NonFiniteEdit`` naming ``where`` (a file, or what is being saved) and
    the tensor (module path and part)."""
    for name, value in tensors.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise NonFiniteEdit(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN/inf) of {np.size(value)}; "
                                "this edit cannot be used (a diverged or damaged training run?)")


def save_adapter(path: str | Path, adapter: Adapter, config: LoraConfig,
                 extra: Mapping[str, object] | None = None) -> Path:
    """Write ``adapter`` (fp32) with its LoRA config; ``extra`` values are stored as JSON strings."""
    tensors = {}
    for module, ab in adapter.items():
        for part in _PARTS:
            tensors[f"{module}.{part}"] = np.asarray(ab[part], np.float32)
        if ab["lora_A"].shape[1] != config.rank:
            raise ValueError(f"adapter module {module} has rank {ab['lora_A'].shape[1]}, the config says {config.rank}")
    check_finite(tensors, f"refusing to save the adapter {path}")
    metadata = {key: json.dumps(value, allow_nan=False) for key, value in (extra or {}).items()}
    metadata.update(format=ADAPTER_FORMAT, rank=str(config.rank), alpha=repr(float(config.alpha)),
                    targets=config.targets, init=config.init)
    return write_safetensors(path, tensors, metadata)


def load_adapter(path: str | Path) -> tuple[Adapter, LoraConfig]:
    """(adapter pytree of jnp arrays, LoraConfig) from a file written by ``save_adapter``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing adapter file: {path}")
    tensors, metadata = read_safetensors_with_metadata(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an unguide-jax adapter (metadata format {metadata.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r}); PEFT/kohya files are read by unguide_jax.loading.lora_formats")
    check_finite(tensors, str(path))
    config = LoraConfig(rank=int(metadata["rank"]), alpha=float(metadata["alpha"]), targets=metadata["targets"],
                        init=metadata.get("init", "random"))
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
    _, metadata = read_safetensors_with_metadata(path, names=False)
    fixed = {"format", "rank", "alpha", "targets", "init"}
    return {k: json.loads(v) for k, v in metadata.items() if k not in fixed}


# --- any edit (unguide_jax.edits.edit.Edit): the erasers' common file --------------------------------------

EDIT_FORMAT = "unguide-jax-edit/1"


def save_edit(path: str | Path, edit, kind: str, extra: Mapping[str, object] | None = None) -> Path:
    """Write an ``Edit`` (fp32): ``lora.<i>.alpha`` and ``lora.<i>.<module>.lora_A/lora_B`` for each LoRA
    (per-module ranks allowed), ``delta.<module>.<param>`` for full deltas, ``memory.keys`` /
    ``memory.values`` (m, text_dim) for learnable tokens. Metadata: format, ``kind`` (the eraser),
    ``memory_scope``, and ``extra`` values as JSON strings."""
    tensors = {}
    for i, (adapter, alpha) in enumerate(edit.loras):
        tensors[f"lora.{i}.alpha"] = np.asarray(alpha, np.float32).reshape(())
        for module, ab in adapter.items():
            for part in _PARTS:
                tensors[f"lora.{i}.{module}.{part}"] = np.asarray(ab[part], np.float32)
    for module, leaves in (edit.deltas or {}).items():
        for name, value in leaves.items():
            tensors[f"delta.{module}.{name}"] = np.asarray(value, np.float32)
    metadata = {key: json.dumps(value, allow_nan=False) for key, value in (extra or {}).items()}
    metadata.update(format=EDIT_FORMAT, kind=kind)
    if edit.memory is not None:
        tensors["memory.keys"] = np.asarray(edit.memory.keys, np.float32)
        tensors["memory.values"] = np.asarray(edit.memory.values, np.float32)
        metadata["memory_scope"] = edit.memory.scope
    if not tensors:
        raise ValueError("the edit is empty: nothing to save")
    check_finite(tensors, f"refusing to save the {kind} edit {path}")
    return write_safetensors(path, tensors, metadata)


def load_edit_file(path: str | Path):
    """(Edit, metadata with ``kind`` and the writer's extras JSON-decoded) from a ``save_edit`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing edit file: {path}")
    tensors, metadata = read_safetensors_with_metadata(path)
    if metadata.get("format") != EDIT_FORMAT:
        raise ValueError(f"{path} is not an unguide-jax edit (metadata format {metadata.get('format')!r})")
    check_finite(tensors, str(path))
    loras: dict[int, dict] = {}
    alphas: dict[int, float] = {}
    deltas: dict[str, dict] = {}
    memory = {}
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head == "lora":
            index, _, rest = rest.partition(".")
            if rest == "alpha":
                alphas[int(index)] = float(np.asarray(value).reshape(()))
                continue
            module, _, part = rest.rpartition(".")
            if part not in _PARTS:
                raise ValueError(f"{path}: unexpected tensor {name!r}")
            loras.setdefault(int(index), {}).setdefault(module, {})[part] = jnp.asarray(value)
        elif head == "delta":
            module, _, leaf = rest.rpartition(".")
            deltas.setdefault(module, {})[leaf] = jnp.asarray(value)
        elif head == "memory" and rest in ("keys", "values"):
            memory[rest] = jnp.asarray(value)
        else:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
    if sorted(loras) != sorted(alphas):
        raise ValueError(f"{path}: LoRA tensors for {sorted(loras)} but alphas for {sorted(alphas)}")
    for index, adapter in loras.items():
        for module, ab in adapter.items():
            if set(ab) != set(_PARTS):
                raise ValueError(f"{path}: LoRA {index} module {module} has {sorted(ab)}, needs lora_A and lora_B")
    if memory and (set(memory) != {"keys", "values"} or "memory_scope" not in metadata):
        raise ValueError(f"{path}: memory needs memory.keys, memory.values and a memory_scope")
    edit = Edit(loras=tuple((loras[i], jnp.asarray(alphas[i], jnp.float32)) for i in sorted(loras)),
                deltas=deltas or None,
                memory=PromptMemory(memory["keys"], memory["values"], metadata["memory_scope"]) if memory else None)
    info = {k: (v if k in ("format", "kind", "memory_scope") else json.loads(v)) for k, v in metadata.items()}
    return edit, info
