"""Preset files: ``FILE[:PRESET]`` names a Python file whose ``get_config(PRESET)`` returns a nested dict
of settings (only what differs from the settings classes' defaults). Packaged presets (``configs/``)
are found by name (``unguide.py``, ``unguide``, ``configs/unguide.py``) in a checkout and in an
installed wheel alike. The command line and the library (an evaluation that trains a missing edit
from a preset) read them the same way."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from unguide_jax.resources import packaged_configs
from unguide_jax.settings import ConfigError


def packaged_presets() -> list[str]:
    return sorted(p.name for p in packaged_configs().glob("*.py") if not p.name.startswith("_"))


def _is_config_file(path: Path) -> bool:
    try:
        return path.is_file() and "def get_config" in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def resolve_config_file(path: str) -> Path:
    """An existing config file as given; else a packaged preset named ``unguide.py``, ``unguide`` or
    ``configs/unguide.py``. (A file that defines no ``get_config``, such as the repository's
    ``sample.py`` wrapper beside the packaged ``sample.py`` preset, does not shadow the preset.)"""
    given = Path(path).expanduser()
    if _is_config_file(given):
        return given
    if given.parent in (Path("."), Path("configs")):
        for name in (given.name, given.name + ".py"):
            if name.endswith(".py") and not name.startswith("_") and (packaged_configs() / name).is_file():
                return packaged_configs() / name
    if given.is_file():
        return given  # not a config file: _load_module says so
    raise ConfigError(f"--config: missing config file {path!r} (not a file, nor a packaged preset: "
                      f"{', '.join(packaged_presets())})")


def split_spec(spec: str) -> tuple[str, str]:
    """``FILE[:PRESET]`` -> (FILE, PRESET or "default")."""
    if _is_config_file(Path(spec).expanduser()):
        return spec, "default"
    path, _, preset = spec.partition(":")
    return path, preset or "default"


def _load_module(file: Path):
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {file} defines no get_config(preset)")
    return module


def load_config_file(spec: str) -> dict:
    """The nested dict of ``FILE[:PRESET]`` (``get_config(PRESET)``, default "default")."""
    path, preset = split_spec(spec)
    file = resolve_config_file(path)
    try:
        config = _load_module(file).get_config(preset)
    except (ValueError, KeyError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--config {spec}: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {spec}: get_config({preset!r}) returned {type(config).__name__}, not a dict")
    return config
