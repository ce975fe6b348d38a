"""Which base model an edit was made on: fingerprints of the base weights it adapts.

An edit only means what it was trained to mean on top of the weights it was trained on; a LoRA loaded
onto another model of the same shape runs without complaint and erases nothing (or something else). So
the fingerprint of each adapted module's base weight travels with the edit:

- a run folder records it in ``base_model.json`` (written by the training run, before the first step,
  so that an unfinished run's checkpoints carry it too):
  {format, model (the spec it was trained with), modules, fingerprint, tolerance};
- ``unguide.json`` beside a PEFT export carries the same fingerprint, which ``UnGuidePipeline`` checks
  against the diffusers UNet it is loaded into;
- ``unguide-export`` compares a run's record with ``--model`` before it writes anything.

A fingerprint is [‖W‖_F, <W, u>] of the PyTorch-layout weight, float64, u a fixed pseudo-random direction
seeded by the module path: two arrays agree within ``FINGERPRINT_TOLERANCE`` ‖W‖ up to a dtype cast
(fp16/bf16 storage), and differ far more for a fine-tune or another model.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

# Fingerprint agreement, as a fraction of ‖W‖_F: a bf16 round trip moves <W, u> by about 2e-3 ‖W‖, a
# fine-tuned or another model's weights by far more.
FINGERPRINT_TOLERANCE = 1e-2
BASE_MODEL_FILE = "base_model.json"
BASE_MODEL_FORMAT = "unguide-jax-base-model/1"


class BaseModelMismatch(ValueError):
    """An edit meets a model whose weights differ from the ones it was made on."""


def weight_fingerprint(weights: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """module path -> [Frobenius norm, projection on a fixed unit-variance direction] of its PyTorch-layout
    weight. The direction is seeded by the path, so both sides draw it alike whatever the module order."""
    out = {}
    for path in sorted(weights):
        w = np.asarray(weights[path], np.float64).ravel()
        direction = np.random.default_rng(zlib.crc32(path.encode())).standard_normal(w.size)
        out[path] = [float(np.linalg.norm(w)), float(w @ direction)]
    return out


def fingerprint_mismatches(expected: Mapping[str, Sequence[float]], got: Mapping[str, Sequence[float]],
                           tolerance: float = FINGERPRINT_TOLERANCE) -> list[str]:
    """The modules whose fingerprints differ by more than ``tolerance`` ‖W‖ (or that one side lacks)."""
    bad = sorted(set(expected) ^ set(got))
    for path in sorted(set(expected) & set(got)):
        (norm_a, proj_a), (norm_b, proj_b) = expected[path], got[path]
        scale = tolerance * max(norm_a, 1e-12)
        if abs(norm_a - norm_b) > scale or abs(proj_a - proj_b) > scale:
            bad.append(path)
    return bad


def adapted_modules(edit) -> list[str]:
    """The modules whose base weight (``kernel``) an ``Edit`` changes: its LoRAs' and its deltas' modules.
    Memory tokens change no weight; a delta on a norm or bias alone has no kernel to fingerprint."""
    modules = {path for adapter, _ in edit.loras for path in adapter}
    modules |= {path for path, leaves in (edit.deltas or {}).items() if "kernel" in leaves}
    return sorted(modules)


def base_weights(unet_params: Mapping, modules: Sequence[str]) -> dict[str, np.ndarray] | None:
    """PyTorch-layout weights of ``modules`` from our Flax UNet parameters (None: abstract parameters)."""
    from unguide_jax.loading.convert import flax_to_torch

    wanted = set(modules)
    kernels = {path: leaf for path, leaf in traverse_util.flatten_dict(unet_params).items()
               if path[-1] == "kernel" and ".".join(path[:-1]) in wanted}
    missing = wanted - {".".join(p[:-1]) for p in kernels}
    if missing:
        raise BaseModelMismatch(f"the UNet has no weight for adapted module(s) {sorted(missing)[:5]}")
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in kernels.values()):
        return None
    torch_state = flax_to_torch(traverse_util.unflatten_dict(kernels))
    return {key.rsplit(".", 1)[0]: value for key, value in torch_state.items()}


def base_fingerprint(unet_params: Mapping, modules: Sequence[str]) -> dict[str, list[float]] | None:
    """``weight_fingerprint`` of ``modules``' base weights in ``unet_params`` (None: abstract parameters)."""
    weights = base_weights(unet_params, modules)
    return None if weights is None else weight_fingerprint(weights)


def base_model_record(model: str, unet_params: Mapping, modules: Sequence[str]) -> dict:
    """What a run folder's ``base_model.json`` holds for an edit of ``modules`` made on ``unet_params``."""
    return {"format": BASE_MODEL_FORMAT, "model": str(model), "modules": sorted(modules),
            "fingerprint": base_fingerprint(unet_params, modules), "tolerance": FINGERPRINT_TOLERANCE}


def read_base_model_record(folder: str | Path) -> dict | None:
    """A run folder's ``base_model.json``, or None where there is none (runs of older versions)."""
    path = Path(folder) / BASE_MODEL_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BaseModelMismatch(f"{path} is unreadable ({err}): delete it to skip the base-model check") from None
    if not isinstance(record, dict) or record.get("format") != BASE_MODEL_FORMAT \
            or not isinstance(record.get("fingerprint"), dict):
        raise BaseModelMismatch(f"{path}: not a {BASE_MODEL_FORMAT} record; delete it to skip the base-model check")
    return record


def base_model_mismatches(record: Mapping, unet_params: Mapping) -> list[str]:
    """The recorded modules whose base weights in ``unet_params`` differ from ``record``'s fingerprint."""
    expected = record["fingerprint"]
    try:
        got = base_fingerprint(unet_params, list(expected))
    except BaseModelMismatch:  # a module the model does not have: it is not this model
        have = {".".join(p[:-1]) for p in traverse_util.flatten_dict(unet_params) if p[-1] == "kernel"}
        return sorted(set(expected) - have)
    if got is None:
        return []
    return fingerprint_mismatches(expected, got, float(record.get("tolerance", FINGERPRINT_TOLERANCE)))


def describe_mismatch(bad: Sequence[str], total: int) -> str:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{len(bad)} of {total} adapted modules differ ({shown})"
