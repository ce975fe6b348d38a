"""The command line every job shares: argv -> a preset file, ``--config.<key>=<value>`` overrides -> one
validation into the job's settings class -> the job.

A job's settings are a frozen dataclass of the library (``unguide_jax.settings.Config``: ``TrainConfig``'s
in ``training/config.py``, ``SampleConfig`` in ``sampling/config.py``...), the same class the Python API
builds. Presets stay Python files (``unguide_jax.presets``): ``--config sample.py:smoke`` calls
``get_config("smoke")`` in that file, which returns a nested dict of what differs from the defaults. That
dict, with the class's defaults for keys it leaves out and the overrides applied, is validated once
(``from_dict``): an unknown key, a value of the wrong type or a bad value is a ``ConfigError`` naming the
key. Jobs read attributes (``config.lora.rank``); what they write to disk is ``to_dict(config)``.

Command line (``run_cli``, used by unguide-train, unguide-sample and the shapes recipe)::

    --config FILE[:PRESET]   FILE: a path, or a packaged preset (unguide.py, unguide, configs/unguide.py)
    --config.KEY=VALUE       VALUE parsed to the key's type (JSON for lists and dicts; a JSON dict
                             given for a sub-config is merged into it); also --config.KEY VALUE
    --print-config           print the resolved config as JSON and exit
    --dry-run                the job's plan (work to do, time estimated here) instead of the job, where the
                             command has one (``Command.dry_run``: unguide-sample's evaluation jobs)
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
import json
import os
import sys
import types
import typing
from typing import Any, Callable, Mapping, Sequence, Union

from unguide_jax.presets import (
    _load_module,
    load_config_file,
    packaged_presets,
    resolve_config_file,
    split_spec,
)
from unguide_jax.settings import (
    ConfigError,
    ConfigKeyError,
    Schema,
    _default_of,
    _hints,
    _is_schema,
    _type_name,
    deep_merge,
    from_dict,
    schema_for,
    to_dict,
    with_defaults,
)

# --- config files and overrides -------------------------------------------------------------------


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
            return deep_merge(current, value) if isinstance(current, dict) else value
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
    dry_run: Callable[[Any], int] | None = None  # --dry-run: plans the validated config's job instead of running it


@dataclasses.dataclass
class Arguments:
    spec: str | None = None
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    help: bool = False
    print_config: bool = False
    debug: bool = False
    dry_run: bool = False


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """``--config FILE[:preset]``, ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``), ``--print-config``,
    ``--dry-run``, ``-h``."""
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
        if arg == "--dry-run":
            args.dry_run = True
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if name != "--config" and not name.startswith("--config."):
            raise ConfigError(f"unknown argument {arg!r} (expected --config FILE[:preset], --config.KEY=VALUE, "
                              "--print-config, --dry-run, --debug or --help)")
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
    dry_run = " [--dry-run]" if command.dry_run is not None else ""
    lines = [f"usage: {command.prog} [--config FILE[:PRESET]] [--config.KEY=VALUE ...] [--print-config]{dry_run} [-h]",
             "",
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
    lines += ["", "--print-config  print the resolved config as JSON and exit"]
    if command.dry_run is not None:
        lines.append("--dry-run       print the job's plan (images, UNet and evaluator calls, runs to train, the time "
                     "estimated from one step measured here) and exit: nothing is generated, scored or trained")
    lines += ["--debug         show the traceback of an error (also: UNGUIDE_DEBUG=1)",
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
        if args.dry_run and command.dry_run is None:
            raise ConfigError(f"--dry-run: {command.prog} has no dry run")
    except ConfigError as err:
        if not debug_requested(argv):
            raise
        print(f"error: {err}", file=sys.stderr)  # a config error needs no traceback, even with --debug
        return 2
    return command.dry_run(config) if args.dry_run else job(config)
