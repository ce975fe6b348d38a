"""Reading and writing weight files. Safetensors by default; pickles only when asked, and then
through ``torch.load(weights_only=True)``. Writes are atomic: a crash never leaves a half file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from unguide_jax.loading.convert import to_numpy

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class PickledWeightsRefused(ValueError):
    pass


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        return load_file(str(path))  # bf16 comes back as ml_dtypes.bfloat16
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UnreadableWeights(path, err) from None


class UnreadableWeights(ValueError):
    """A weights file that is not a readable safetensors file (truncated, damaged, or another format)."""

    def __init__(self, path: str | Path, err: BaseException):
        self.path = Path(path)
        super().__init__(f"{path} is not a readable safetensors file (truncated or damaged?): {err}")


def read_safetensors_with_metadata(path: str | Path, names: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a damaged file is an ``UnreadableWeights`` naming it.
    ``names=False`` reads the metadata only (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()} if names else {}
    except Exception as err:
        raise UnreadableWeights(path, err) from None
    return tensors, metadata


def read_pickle(path: str | Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    path = Path(path)
    if not allow_pickle:
        raise PickledWeightsRefused(
            f"{path} is a pickled PyTorch file; pickles can run code when loaded. Convert it to safetensors, "
            "or pass --config.allow_pickle=true to load it with torch.load(weights_only=True)."
        )
    import torch  # optional dependency: pip install 'unguide-jax[torch]'

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle)
    if path.name.endswith(".safetensors.index.json"):
        index = json.loads(path.read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_safetensors(path.parent / shard))
        return out
    return read_safetensors(path)


def find_weights_file(folder: str | Path, stems: tuple[str, ...], variant: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """The weights file of a diffusers/transformers component folder, safetensors preferred."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    infix = f".{variant}" if variant else ""
    candidates = [f"{s}{infix}.safetensors" for s in stems] + [f"{s}{infix}.safetensors.index.json" for s in stems]
    pickles = [f"{s}{infix}.bin" for s in stems]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    for name in pickles:
        if (folder / name).is_file():
            if not allow_pickle:
                read_pickle(folder / name, allow_pickle=False)  # raises with the explanation
            return folder / name
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(candidates + pickles)}")


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
