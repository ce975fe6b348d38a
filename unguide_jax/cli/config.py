"""Python config files with presets, and ``--config.<key>=<value>`` overrides.

``--config configs/sample.py:smoke`` calls ``get_config("smoke")`` in that file, which returns a
nested dict. Each ``--config.a.b=value`` must name an existing key (unknown keys are an error) and
is parsed to the type of the value it replaces (JSON for lists and dicts).
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence


class ConfigKeyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def load_config_file(spec: str) -> dict:
    path, _, preset = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"missing config file: {file}")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{file} defines no get_config(preset)")
    return module.get_config(preset or "default")


def _parse(raw: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        if current is None:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        value = json.loads(raw)
        if isinstance(current, (list, tuple)) and not isinstance(value, list):
            value = [value]
        return type(current)(value) if isinstance(current, (list, tuple)) else value
    except (ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"--config.{key}={raw!r}: cannot parse as {type(current).__name__}") from err


def apply_overrides(config: dict, overrides: dict[str, str]) -> dict:
    config = copy.deepcopy(config)
    for dotted, raw in overrides.items():
        node = config
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigKeyError(f"unknown config key {dotted!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigKeyError(f"unknown config key {dotted!r} (known here: {known})")
        node[parts[-1]] = _parse(raw, node[parts[-1]], dotted)
    return config


def parse_cli(argv: Sequence[str], default_spec: str) -> dict:
    """``--config FILE[:preset]`` plus ``--config.key=value`` (or ``--config.key value``) arguments."""
    spec, overrides, i = default_spec, {}, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(
                f"usage: --config FILE[:preset] [--config.KEY=VALUE ...]\n(default config: {default_spec};"
                " every key of the config file can be overridden)"
            )
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        elif not eq and name != "--config" and name.startswith("--config."):
            raise ValueError(f"{name} needs a value")
        if name == "--config":
            spec = value
        elif name.startswith("--config."):
            overrides[name[len("--config."):]] = value
        else:
            raise ValueError(f"unknown argument {arg!r} (expected --config FILE[:preset] or --config.KEY=VALUE)")
        i += 1
    return apply_overrides(load_config_file(spec), overrides)
