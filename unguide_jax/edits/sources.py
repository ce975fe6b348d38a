"""Where sampling gets its edits from: one loader for every file or folder an eraser can leave.

``load_edit(source, unet_params)`` accepts
- an adapter file of ours: a LoRA (``adapter.safetensors`` of train.py) or any edit (``edit.safetensors``
  of the other erasers: PURE, UCE, learnable prompts);
- a train.py run folder (its ``adapter.safetensors``, or its latest Orbax checkpoint if the run has
  not finished);
- an Orbax checkpoint: one step folder (``checkpoints/<step>``) or a ``checkpoints/`` folder (its
  latest complete step);
- a diffusers/PEFT LoRA (``pytorch_lora_weights.safetensors``, a folder holding it, or a peft
  ``save_pretrained`` folder) or a kohya/A1111 LoRA file.
Every edit is checked against the model before it is used; errors name the file and the module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from safetensors import safe_open

from unguide_jax.edits import edit as edit_lib
from unguide_jax.edits.files import (
    ADAPTER_FORMAT,
    EDIT_FORMAT,
    check_finite,
    load_adapter,
    load_edit_file,
    read_adapter_metadata,
)
from unguide_jax.edits.lora_formats import import_lora
from unguide_jax.erasers.registry import (
    ADAPTER_FILE,
    EDIT_FILE,
    restore_checkpoint_edit,
)
from unguide_jax.training.checkpoints import RECORD_FILE, RunCheckpoints


def _file_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format")
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def _from_adapter_file(path: Path) -> tuple[edit_lib.Edit, dict]:
    adapter, config = load_adapter(path)
    info = {"source": str(path), "kind": "lora", "rank": config.rank, "alpha": config.alpha, "targets": config.targets}
    info.update({k: v for k, v in read_adapter_metadata(path).items() if k in ("concept", "base_model", "steps")})
    return edit_lib.lora_edit(adapter, config.alpha), info


def _latest_step_dir(checkpoints_dir: Path) -> Path:
    with RunCheckpoints(checkpoints_dir) as checkpoints:
        step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpoints_dir} holds no complete checkpoint")
    return checkpoints_dir / str(step)


def _load_one(source: str | Path, unet_params: Mapping) -> tuple[edit_lib.Edit, dict]:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"missing adapter: {path}")
    if path.is_dir():
        for name in (ADAPTER_FILE, EDIT_FILE):
            if (path / name).is_file():
                return _load_one(path / name, unet_params)
        if (path / RECORD_FILE).is_file():
            return restore_checkpoint_edit(path, unet_params)
        if (path / "checkpoints").is_dir():
            return restore_checkpoint_edit(_latest_step_dir(path / "checkpoints"), unet_params)
        if any(child.name.isdigit() and (child / RECORD_FILE).is_file() for child in path.iterdir()):
            return restore_checkpoint_edit(_latest_step_dir(path), unet_params)
    elif path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are read from safetensors files (or our run/checkpoint folders)")
    elif (file_format := _file_format(path)) == ADAPTER_FORMAT:
        return _from_adapter_file(path)
    elif file_format == EDIT_FORMAT:
        edit, metadata = load_edit_file(path)
        return edit, {"source": str(path), **{k: v for k, v in metadata.items() if k != "format"}}
    adapter, alpha = import_lora(path, unet_params)  # PEFT/diffusers file or folder, or kohya; names what is wrong
    return edit_lib.lora_edit(adapter, alpha), {"source": str(path), "kind": "lora (imported)", "alpha": float(alpha)}


def load_edit(sources: Sequence[str | Path] | str | Path, unet_params: Mapping) -> tuple[edit_lib.Edit | None, list[dict]]:
    """All ``sources`` as one edit (they add up), and a description of each for manifests."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    loaded = [_load_one(s, unet_params) for s in sources]
    if not loaded:
        return None, []
    for e, info in loaded:
        check_finite(edit_tensors(e), info["source"])
    edit = edit_lib.combine([e for e, _ in loaded])
    for (e, info) in loaded:
        edit_lib.check_edit_fits(unet_params, e, what=info["source"])
    return edit, [json.loads(json.dumps(info, default=_jsonable)) for _, info in loaded]


def edit_tensors(edit: edit_lib.Edit) -> dict[str, object]:
    """The edit's arrays by a readable name (``<module>.lora_B``, ``<module>.<param> (delta)``, ``memory.keys``)."""
    out: dict[str, object] = {}
    for i, (adapter, alpha) in enumerate(edit.loras):
        prefix = f"lora {i}: " if len(edit.loras) > 1 else ""
        out[f"{prefix}alpha"] = alpha
        for module, ab in adapter.items():
            for part, value in ab.items():
                out[f"{prefix}{module}.{part}"] = value
    for module, leaves in (edit.deltas or {}).items():
        for name, value in leaves.items():
            out[f"{module}.{name} (delta)"] = value
    if edit.memory is not None:
        out["memory.keys"], out["memory.values"] = edit.memory.keys, edit.memory.values
    return out


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)
