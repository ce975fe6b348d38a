"""Reading diffusers/transformers ``config.json`` files into our frozen config dataclasses.

Every key of the file must be understood: either a field of our config, a key we know and whose
value must keep the default we implement, or bookkeeping (``_class_name``, versions). Anything
else is an error that names the key, so an unsupported architecture never loads silently wrong.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    pass


def _normalize(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def config_from_dict(
    cls: type,
    raw: Mapping[str, Any],
    *,
    required_defaults: Mapping[str, Any] = {},
    ignored: frozenset[str] = frozenset(),
    renamed: Mapping[str, str] = {},
    source: str = "config",
):
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in raw.items():
        key = renamed.get(key, key)
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            kwargs[key] = _normalize(value)
        elif key in required_defaults:
            allowed = required_defaults[key]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if _normalize(value) not in allowed:
                problems.append(f"{key}={value!r} is not supported (supported: {allowed!r})")
        else:
            problems.append(f"unknown key {key!r}")
    if problems:
        raise ConfigError(f"{source} ({cls.__name__}): " + "; ".join(problems))
    return cls(**kwargs)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    with open(path) as f:
        return json.load(f)


def config_to_dict(config: Any, class_name: str, extra: Mapping[str, Any] = {}) -> dict:
    out = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out.update(extra)
    return out
