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

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from safetensors import safe_open

from unguide_jax.edits import edit as edit_lib
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.loading.edit_files import (
    ADAPTER_FORMAT,
    EDIT_FORMAT,
    check_finite,
    load_adapter,
    load_edit_file,
    read_adapter_metadata,
)
from unguide_jax.loading.lora_formats import import_lora
from unguide_jax.training.checkpoints import RECORD_FILE
from unguide_jax.training.trainers import (
    ADAPTER_FILE,
    EDIT_FILE,
    restore_checkpoint_edit,
)

SOURCE_KINDS = ("run folder", "checkpoint", "adapter file", "edit file", "LoRA file")


@dataclasses.dataclass(frozen=True)
class EditSource:
    """What one source of an edit is: the one classification the loader and the model card share.

    ``kind``: run folder (a folder with ``config.json``, or our edit file inside one; ``edit_file`` None while
    its run has not finished), checkpoint (one Orbax step folder: ``checkpoint``), adapter file / edit file
    (ours, by the safetensors format tag), or LoRA file (a PEFT/diffusers or kohya file or folder)."""

    kind: str
    path: Path                       # the source as given
    run_folder: Path | None = None
    edit_file: Path | None = None
    checkpoint: Path | None = None   # a step folder (for a run folder: its latest complete one, if any)


def _file_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format")
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def _step_dirs(folder: Path) -> list[Path]:
    """The complete Orbax steps of a checkpoints folder, oldest first."""
    if not folder.is_dir():
        return []
    steps = sorted(int(c.name) for c in folder.iterdir() if c.name.isdigit() and (c / RECORD_FILE).is_file())
    return [folder / str(step) for step in steps]


def classify_source(source: str | Path) -> EditSource:
    """The kind of one edit source (see ``EditSource``); a missing path or a file that is not safetensors is an
    error naming it."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"missing edit source: {path}")
    if path.is_dir():
        edit_file = next((path / n for n in (ADAPTER_FILE, EDIT_FILE) if (path / n).is_file()), None)
        if (path / "config.json").is_file() or (edit_file is None and _step_dirs(path / "checkpoints")):
            latest = (_step_dirs(path / "checkpoints") or [None])[-1]
            return EditSource("run folder", path, run_folder=path, edit_file=edit_file, checkpoint=latest)
        if (path / RECORD_FILE).is_file():
            return EditSource("checkpoint", path, checkpoint=path)
        if steps := _step_dirs(path):
            return EditSource("checkpoint", path, checkpoint=steps[-1])
        if edit_file is not None:
            return dataclasses.replace(classify_source(edit_file), path=path)
        return EditSource("LoRA file", path)  # a diffusers/PEFT folder
    if path.name in (ADAPTER_FILE, EDIT_FILE) and (path.parent / "config.json").is_file():
        return EditSource("run folder", path, run_folder=path.parent, edit_file=path,
                          checkpoint=(_step_dirs(path.parent / "checkpoints") or [None])[-1])
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: edits are read from safetensors files (or our run/checkpoint folders)")
    file_format = _file_format(path)
    if file_format == ADAPTER_FORMAT:
        return EditSource("adapter file", path, edit_file=path)
    if file_format == EDIT_FORMAT:
        return EditSource("edit file", path, edit_file=path)
    return EditSource("LoRA file", path)


def _from_adapter_file(path: Path) -> tuple[edit_lib.Edit, dict]:
    adapter, config = load_adapter(path)
    info = {"source": str(path), "kind": "lora", "rank": config.rank, "alpha": config.alpha, "targets": config.targets}
    info.update({k: v for k, v in read_adapter_metadata(path).items() if k in ("concept", "base_model", "steps")})
    return edit_lib.lora_edit(adapter, config.alpha), info


def _from_file(path: Path) -> tuple[edit_lib.Edit, dict]:
    """An adapter or edit file of ours."""
    if _file_format(path) == ADAPTER_FORMAT:
        return _from_adapter_file(path)
    edit, metadata = load_edit_file(path)
    return edit, {"source": str(path), **{k: v for k, v in metadata.items() if k != "format"}}


def _load_one(source: str | Path, unet_params: Mapping) -> tuple[edit_lib.Edit, dict]:
    found = classify_source(source)
    if found.edit_file is not None:  # a finished run, or a file of ours
        return _from_file(found.edit_file)
    if found.checkpoint is not None:  # a checkpoint, or a run that has not finished
        return restore_checkpoint_edit(found.checkpoint, unet_params)
    if found.kind == "run folder":
        raise FileNotFoundError(f"{found.path}: a run folder with neither an edit file nor a complete checkpoint")
    adapter, alpha = import_lora(found.path, unet_params)  # PEFT/diffusers file or folder, or kohya; names what is wrong
    return edit_lib.lora_edit(adapter, alpha), {"source": str(found.path), "kind": "lora (imported)",
                                                "alpha": float(alpha)}


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


def concept_targets(edit_info: list[dict]) -> list[str]:
    """The target prompts of the loaded edits' concepts: adapter and edit files carry their concept, a checkpoint's
    record names it (a shipped concept name, or a concept file)."""
    targets = []
    for info in edit_info:
        concept = info.get("concept")
        if isinstance(concept, str):
            try:
                concept = load_concept(concept).to_json()
            except (FileNotFoundError, ValueError):
                continue  # a concept file that has moved since: no targets from this edit
        targets += list((concept or {}).get("targets", []))
    return targets
