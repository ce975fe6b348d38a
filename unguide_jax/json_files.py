"""Strict JSON files: every JSON record the project writes (configs, manifests, metrics, reports) goes
through ``write_json``, which refuses NaN and infinities and replaces the file atomically."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


def _non_finite_at(obj, where: str = "") -> str | None:
    """The key path of the first NaN/inf float in a JSON-able value (None: none)."""
    if isinstance(obj, float):
        return None if obj == obj and obj not in (float("inf"), float("-inf")) else (where or "<root>")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite_at(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def dumps_json(obj, *, what: str = "a JSON record", **kwargs) -> str:
    """``json.dumps`` that refuses NaN and infinities (bare ``NaN`` is not JSON): the error names the key
    path of the first non-finite value and ``what`` was being written."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = _non_finite_at(obj)
        if where is None:
            raise
        raise ValueError(f"{what}: {where} is not a finite number; refusing to write non-standard JSON") from None


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON (no NaN/inf), written atomically: every JSON file the project writes goes through here."""
    path = Path(path)
    text = dumps_json(obj, what=str(path), indent=2, sort_keys=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with naming_the_file(path):
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


@contextlib.contextmanager
def naming_the_file(path: str | Path) -> Iterator[None]:
    """An OS error that names no file (a ``write`` refused by a full disk or a quota has none) names ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise type(err)(err.errno, err.strerror, str(path)) from err
