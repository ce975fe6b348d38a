"""Reading and writing weight files. Safetensors by default; pickles only when asked, and then
through ``torch.load(weights_only=True)``. Writes are atomic: a crash never leaves a half file."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from unguide_jax.loading.convert import to_numpy

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class PickledWeightsRefused(ValueError):
    pass


# What a failed write means for the user: the disk or the folder, not the data (quota, read-only, too big).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)


def _errno_of(err: BaseException) -> int | None:
    """The OS error code of ``err``: an OSError's, or the one TensorStore (Orbax's writer) or safetensors (Rust's
    ``(os error N)``) puts in its message."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", str(err))
    return int(found.group(1) or found.group(2)) if found else None


class WriteFailed(OSError):
    """Writing ``path`` failed (a full disk, a quota, a read-only folder): the message names the path, which the
    OS error raised by a ``write`` does not."""

    exit_code = 1  # the run failed; its input was fine

    def __init__(self, path: str | Path, err: BaseException, what: str = "write"):
        code = _errno_of(err)
        reason = os.strerror(code) if code else (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        super().__init__(code, reason, str(path))
        self.message = f"could not {what} {path}: {reason}" + (f" (errno {code})" if code else "")

    def __str__(self) -> str:
        return self.message


def is_write_failure(err: BaseException) -> bool:
    """An error that says the disk (or the folder) refused a write, whatever library raised it."""
    return _errno_of(err) in WRITE_ERRNOS


@contextlib.contextmanager
def naming_the_folder(folder: str | Path, what: str = "the folder") -> Iterator[None]:
    """Within the block, an OS error of a refused write (full disk, quota, read-only) that names no file becomes a
    ``WriteFailed`` naming ``folder``: the error of a ``write`` call has no file name, and the JSON, event-file
    and PNG writers pass it on as it is."""
    try:
        yield
    except OSError as err:
        if isinstance(err, WriteFailed) or err.filename is not None or not is_write_failure(err):
            raise
        raise WriteFailed(folder, err, f"write into {what}") from err


class UnsafePickle(ValueError):
    """``allow_pickle=true``, and the pickle asks for more than tensors (possibly code)."""


def _torch_reason(err: BaseException) -> str:
    """The line of torch's several-paragraph unpickling error that says what it met (the rest is boilerplate
    about torch's defaults)."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    reason = (useful[0] if useful else paragraphs[0] if paragraphs else type(err).__name__).splitlines()[-1]
    return reason.removeprefix("WeightsUnpickler error:").strip().rstrip(".")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        return load_file(str(path))  # bf16 comes back as ml_dtypes.bfloat16
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UnreadableWeights(path, err) from None


class UnreadableWeights(ValueError):
    """A weights file that is not a readable safetensors (or PyTorch) file (truncated, damaged, another format)."""

    def __init__(self, path: str | Path, err: BaseException, kind: str = "safetensors"):
        self.path = Path(path)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        super().__init__(f"{path} is not a readable {kind} file (truncated or damaged?): {reason}")


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
    import pickle

    import torch  # optional dependency: pip install 'unguide-jax[torch]'

    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickle(f"{path}: torch.load(weights_only=True) refused it ({_torch_reason(err)}): a pickle that "
                           "holds more than tensors can run code when loaded. Use a safetensors copy of these weights "
                           "from a source you trust") from None
    except Exception as err:  # torch's zip reader and unpickler raise RuntimeError, EOFError, ...
        raise UnreadableWeights(path, err, "PyTorch weights") from None
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
    except Exception as err:
        if is_write_failure(err):
            raise WriteFailed(path, err) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
