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
    return load_file(str(path))  # bf16 comes back as ml_dtypes.bfloat16


def read_pickle(path: str | Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    path = Path(path)
    if not allow_pickle:
        raise PickledWeightsRefused(
            f"{path} is a pickled PyTorch file; pickles can run code when loaded. Convert it to safetensors, "
            "or pass allow_pickle=True (--allow-pickle) to load it with torch.load(weights_only=True)."
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


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
