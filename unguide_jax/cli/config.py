"""Typed configs: Python preset files, ``--config.<key>=<value>`` overrides, one validation into a
frozen dataclass, and the command line every job shares.

A job's config is a frozen dataclass (its schema, in ``unguide_jax.cli.schemas``) whose fields carry
a one-line doc and, where a value can be wrong, a check. Presets stay Python files:
``--config sample.py:smoke`` calls ``get_config("smoke")`` in that file, which returns a nested dict.
That dict, with the schema's defaults for keys it leaves out and the ``--config.a.b=value``
overrides applied, is validated once into the dataclass (``from_dict``): an unknown key, a value of
the wrong type or a bad value is a ``ConfigError`` naming the key. Jobs read attributes
(``config.lora.rank``); what they write to disk is ``to_dict(config)``, the same JSON as the dict.

Command line (``run_cli``, used by unguide-train, unguide-sample and the shapes recipe)::

    --config FILE[:PRESET]   FILE: a path, or a packaged preset (unguide.py, unguide, configs/unguide.py)
    --config.KEY=VALUE       VALUE parsed to the key's type (JSON for lists and dicts; a JSON dict
                             given for a sub-config is merged into it); also --config.KEY VALUE
    --print-config           print the resolved config as JSON and exit
    --debug                  show the traceback of an error (also: environment UNGUIDE_DEBUG=1)
    -h, --help               print every key with its value in this config and its doc, and exit

Errors reach the user as ``error: ...`` on stderr (``run_cli``): exit status 2 for bad input (a config
error, a missing or unreadable input file, a folder that belongs to another run...), 1 for a run that
failed (a diverged loss, non-finite images), with a second line pointing at ``--debug`` for errors
that are not about the input. The traceback only with ``--debug`` or ``UNGUIDE_DEBUG=1``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from unguide_jax.resources import packaged_configs


class ConfigError(ValueError):
    """A config problem, named by its key; the command-line tools print it as one line and exit 2."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigKeyError(ConfigError, KeyError):
    """A key the schema does not have."""

    __str__ = ConfigError.__str__


class InvalidValue(ConfigError):
    """Raised by a schema's checks: ``key`` relative to the dataclass that raised it (None: the
    dataclass as a whole), ``message`` such as "must be > 0, got 0" (or ": ..." after the key).
    ``from_dict`` re-raises it as a ``ConfigError`` with the full dotted key."""

    def __init__(self, key: str | None, message: str):
        self.key, self.message = key, message
        super().__init__(_invalid_text(key, message))


def _invalid_text(key: str | None, message: str) -> str:
    name = f"config.{key}" if key else "config"
    return f"{name}{message}" if message.startswith(":") else f"{name} {message}"


def _joined(prefix: str, key: str | None) -> str | None:
    if not key:
        return prefix.rstrip(".") or None
    return prefix + key


# --- schemas -------------------------------------------------------------------------------------


def option(default: Any, doc: str, *, choices: Sequence | None = None,
           check: Callable[[Any], str | None] | None = None) -> Any:
    """A schema field: its default, a one-line doc (``--help`` prints it), optionally the values it may
    take (``choices``) or a ``check`` returning what is wrong with a value (None: nothing)."""
    metadata: dict[str, Any] = {"doc": doc}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if check is not None:
        metadata["check"] = check
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def positive(value) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return f"must be > 0, got {value!r}"
    return None


def non_negative(value) -> str | None:
    if not math.isfinite(value) or value < 0:
        return f"must be >= 0, got {value!r}"
    return None


def at_least(minimum: int) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}, got {value!r}"
    return check


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every schema: per-field ``choices``/``check`` and the class's ``validate`` run on
    construction, so a config that exists is valid."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise InvalidValue(f.name, f"must be one of {choices}, got {value!r}")
            check = f.metadata.get("check")
            if check is not None and (problem := check(value)):
                raise InvalidValue(f.name, problem)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise ``InvalidValue(key, message)``."""

    def check_with(self, domain: Callable[..., Any]) -> None:
        """Build the domain settings class (``LoraConfig``, ``ProbeConfig``...) from these fields, so that
        its own checks run here; its error becomes this sub-config's."""
        try:
            domain(**dataclasses.asdict(self))
        except (ValueError, TypeError) as err:
            raise InvalidValue(None, f": {err}") from None

    def to_dict(self) -> dict:
        return to_dict(self)


def to_dict(config: Config) -> dict:
    """The config as plain JSON values (what run folders, checkpoints and manifests record)."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_schema(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if tp is Any:
        return "any value"
    if _is_schema(tp):
        return f"a mapping of {tp.__name__} keys"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _wrong_type(key: str, tp, value) -> ConfigError:
    return ConfigError(f"config.{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})")


def _convert(value, tp, key: str, strict: bool):
    """``value`` checked against the annotation ``tp`` (ints are fine for floats; lists become tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_schema(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=key + ".", strict=strict)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, strict)
            except ConfigKeyError:
                raise
            except ConfigError:
                continue
        raise _wrong_type(key, tp, value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{key}[{i}]", strict) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(key, tp, value)
        item = args[1] if args else Any
        return {k: _convert(v, item, f"{key}.{k}", strict) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong_type(key, tp, value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(key, tp, value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _wrong_type(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong_type(key, tp, value)
        return value
    raise TypeError(f"config.{key}: unsupported schema type {tp!r}")


def from_dict(cls: type, data: Mapping, *, prefix: str = "", strict: bool = True):
    """Validate a (nested) dict into the schema ``cls``. Missing keys take the schema's defaults;
    ``strict=False`` ignores unknown keys (for configs read back from older run folders)."""
    if not isinstance(data, Mapping):
        raise _wrong_type(prefix.rstrip(".") or "<root>", cls, data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown and strict:
        raise ConfigKeyError(f"unknown config key {prefix + str(unknown[0])!r} (known here: {', '.join(fields)})")
    hints = _hints(cls)
    kwargs = {name: _convert(data[name], hints[name], prefix + name, strict) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except InvalidValue as err:
        raise ConfigError(_invalid_text(_joined(prefix, err.key), err.message)) from None


# A schema argument: a Config class, or a function choosing one from the raw dict (by its
# ``method`` or ``job`` key), raising ConfigError when it cannot.
Schema = Union[type, Callable[[Mapping], type]]


def schema_for(schema: Schema, raw: Mapping) -> type:
    return schema if isinstance(schema, type) else schema(raw)


def as_config(config, schema: Schema, *, strict: bool = True):
    """A job's config: a schema instance as is, or a dict (a preset, a run's config.json) validated."""
    if isinstance(config, Config):
        expected = schema_for(schema, to_dict(config))
        if not isinstance(config, expected):
            raise ConfigError(f"config: expected a {expected.__name__}, got a {type(config).__name__}")
        return config
    return from_dict(schema_for(schema, config), config, strict=strict)


def _default_of(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return to_dict(value) if isinstance(value, Config) else _plain(value)


def with_defaults(cls: type, raw: Mapping) -> dict:
    """``raw`` with the schema's defaults for the keys it leaves out (sub-configs too); keys the schema
    does not have are kept, for validation to name."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            out[f.name] = _default_of(f)
        elif _is_schema(hints[f.name]) and isinstance(raw[f.name], Mapping):
            out[f.name] = with_defaults(hints[f.name], raw[f.name])
        else:
            out[f.name] = copy.deepcopy(raw[f.name])
    out.update({k: copy.deepcopy(v) for k, v in raw.items() if k not in out})
    return out


# --- config files and overrides -------------------------------------------------------------------


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


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def _target_type(current, annotation):
    if annotation is not None:
        return annotation
    if current is None:
        return Any
    if isinstance(current, (bool, int, float, str)):
        return type(current)
    if isinstance(current, (list, tuple)):
        return list
    if isinstance(current, dict):
        return dict  # without a schema, every dict is a sub-config: merged into
    return Any


def _json_or_text(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse(raw: str, current, key: str, annotation=None):
    """A command-line value, parsed to the type of its key (the schema's annotation, else the type of
    the value it replaces)."""
    tp = _target_type(current, annotation)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin in (Union, types.UnionType):
            if raw.strip().lower() in ("none", "null"):
                return None
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                return _parse(raw, current, key, rest[0])
            return _json_or_text(raw)
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if tp is Any:
            return _json_or_text(raw)
        value = json.loads(raw)
        if tp in (list, tuple) or origin in (list, tuple):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if _is_schema(tp) or tp is dict:
            if not isinstance(value, dict):
                raise ValueError(raw)
            # A sub-config given as JSON is merged into the one it overrides (its other keys stay).
            return _deep_merge(current, value) if isinstance(current, dict) else value
        return value  # a free-form dict (replaced whole) or another JSON value
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"--config.{key}={raw!r}: cannot parse as {_type_name(tp)}") from err


def apply_overrides(config: dict, overrides: Mapping[str, str], schema: type | None = None) -> dict:
    """``config`` (not modified) with ``{"a.b": "value"}`` applied; every key must exist."""
    config = copy.deepcopy(config)
    for dotted, raw in overrides.items():
        node, cls = config, schema
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigKeyError(f"unknown config key {dotted!r}")
            node = node[part]
            hint = _hints(cls).get(part) if cls is not None else None
            cls = hint if _is_schema(hint) else None
        last = parts[-1]
        if not isinstance(node, dict) or last not in node:
            known = ", ".join(node) if isinstance(node, dict) else ""
            raise ConfigKeyError(f"unknown config key {dotted!r} (known here: {known})")
        annotation = _hints(cls).get(last) if cls is not None else None
        node[last] = _parse(raw, node[last], dotted, annotation)
    return config


# --- the command line ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One command-line job: its name, a one-line summary, its default config file and its schema."""

    prog: str
    summary: str
    default_config: str  # a packaged preset name ("unguide.py") or a path
    schema: Schema


@dataclasses.dataclass
class Arguments:
    spec: str | None = None
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    help: bool = False
    print_config: bool = False
    debug: bool = False


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """``--config FILE[:preset]``, ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``), ``--print-config``, ``-h``."""
    args, argv, i = Arguments(), list(argv), 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            args.help = True
            i += 1
            continue
        if arg == "--print-config":
            args.print_config = True
            i += 1
            continue
        if arg == "--debug":
            args.debug = True
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if name != "--config" and not name.startswith("--config."):
            raise ConfigError(f"unknown argument {arg!r} (expected --config FILE[:preset], --config.KEY=VALUE, "
                              "--print-config, --debug or --help)")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{name} needs a value")
            value, i = argv[i + 1], i + 1
        if name == "--config":
            args.spec = value
        else:
            args.overrides[name[len("--config."):]] = value
        i += 1
    return args


def resolve(args: Arguments, default_spec: str, schema: Schema) -> tuple[str, type, dict]:
    """(the config file spec, the schema class, the raw dict with defaults and overrides applied)."""
    spec = args.spec or default_spec
    raw = load_config_file(spec)
    cls = schema_for(schema, raw)
    resolved = apply_overrides(with_defaults(cls, raw), args.overrides, cls)
    other = schema_for(schema, resolved)
    if other is not cls:  # an override of the key that picks the schema (method, job)
        cls, resolved = other, apply_overrides(with_defaults(other, raw), args.overrides, other)
    return spec, cls, resolved


def parse_cli(argv: Sequence[str], default_spec: str, schema: Schema):
    """The validated config that ``argv`` names (``--help``/``--print-config`` are ``run_cli``'s)."""
    args = parse_arguments(argv)
    _, cls, raw = resolve(args, default_spec, schema)
    return from_dict(cls, raw)


def _docstring_head(spec: str) -> str:
    path, _ = split_spec(spec)
    try:
        doc = _load_module(resolve_config_file(path)).__doc__ or ""
    except ConfigError:
        return ""
    return doc.strip().split("\n\n")[0]


def help_rows(cls: type, raw: Mapping, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as JSON, doc) for every key of the schema, sub-configs as their keys."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, doc = prefix + f.name, f.metadata.get("doc", "")
        if "choices" in f.metadata:
            doc += f" [{' | '.join(map(str, f.metadata['choices']))}]"
        value = raw.get(f.name, _default_of(f)) if isinstance(raw, Mapping) else _default_of(f)
        if _is_schema(hints[f.name]) and isinstance(value, Mapping):
            rows.append((key + ".*", "", doc))
            rows += help_rows(hints[f.name], value, key + ".")
        else:
            rows.append((key, json.dumps(value, ensure_ascii=False), doc))
    return rows


def help_text(command: Command, spec: str, cls: type, raw: Mapping) -> str:
    path, preset = split_spec(spec)
    lines = [f"usage: {command.prog} [--config FILE[:PRESET]] [--config.KEY=VALUE ...] [--print-config] [-h]", "",
             command.summary, "",
             f"config: {spec} (file {resolve_config_file(path)}, preset {preset!r}); schema {cls.__name__}",
             f"  FILE: a path, or a packaged preset: {', '.join(packaged_presets())}"]
    head = _docstring_head(spec)
    if head:
        lines += ["  " + line for line in head.splitlines()]
    lines += ["", "keys: the value in this config, then what it is. Override with --config.KEY=VALUE (JSON for "
              "lists and dicts; a JSON dict given for a sub-config is merged into it).", ""]
    for key, value, doc in help_rows(cls, raw):
        if key.endswith(".*"):
            lines.append(f"  {key}  {doc}")
        else:
            lines.append(f"  {key} = {value}")
            lines.append(f"      {doc}")
    lines += ["", "--print-config  print the resolved config as JSON and exit",
              "--debug         show the traceback of an error (also: UNGUIDE_DEBUG=1)",
              "-h, --help      print this and exit",
              "An error prints one line (error: ...) and exits with status 2 for bad input, 1 for a failed run."]
    return "\n".join(lines)


# Bad input: exit status 2. ValueError covers the loaders' and checks' messages (PickledWeightsRefused,
# UnreadableWeights, NonFiniteEdit, an undecodable CSV...); an exception class may also say
# ``exit_code = 2`` (CheckpointError: a damaged checkpoint).
INPUT_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("UNGUIDE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def exit_code_of(err: BaseException) -> int:
    """2: bad input; 1: the run failed; 130: interrupted."""
    if isinstance(err, KeyboardInterrupt):
        return 130
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    return 2 if isinstance(err, INPUT_ERRORS) else 1


def error_lines(err: BaseException) -> list[str]:
    """What the user reads: ``error: <message>``, and for errors that are not about the input, where to
    find more."""
    if isinstance(err, KeyboardInterrupt):
        return ["interrupted"]
    text = str(err).strip() or type(err).__name__
    if exit_code_of(err) == 2 or type(err).__module__.startswith("unguide_jax"):
        return [f"error: {text}"]
    return [f"error: {type(err).__name__}: {text}",
            "(not an input error this tool recognises: rerun with --debug or UNGUIDE_DEBUG=1 for the traceback)"]


def run_cli(command: Command, argv: Sequence[str] | None, job: Callable[[Any], int]) -> int:
    """Parse ``argv`` for ``command`` and run ``job(config)``. ``--help`` and ``--print-config`` print and
    return 0. An error, here or in the job, prints ``error: ...`` (one or two lines) and returns its
    ``exit_code_of`` (2 for bad input); with ``--debug`` or ``UNGUIDE_DEBUG=1`` it propagates instead,
    traceback and all."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if debug_requested(argv):
        return _run_cli(command, argv, job)
    try:
        return _run_cli(command, argv, job)
    except (Exception, KeyboardInterrupt) as err:
        for line in error_lines(err):
            print(line, file=sys.stderr)
        return exit_code_of(err)


def _run_cli(command: Command, argv: list[str], job: Callable[[Any], int]) -> int:
    try:
        args = parse_arguments(argv)
        spec, cls, raw = resolve(args, command.default_config, command.schema)
        if args.help:
            print(help_text(command, spec, cls, raw))
            return 0
        config = from_dict(cls, raw)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
            return 0
    except ConfigError as err:
        if not debug_requested(argv):
            raise
        print(f"error: {err}", file=sys.stderr)  # a config error needs no traceback, even with --debug
        return 2
    return job(config)
