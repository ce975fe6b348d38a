"""Typed settings: frozen dataclasses whose fields carry a default, a one-line doc and, where a value can
be wrong, a check; a dict validated into one (``from_dict``) and back (``to_dict``).

Every settings class of the library (``LoraConfig``, ``ProbeConfig``, a job's config...) is a ``Config``:
its fields are declared with ``option(default, doc, choices=..., check=...)``, and the field checks and
the class's ``validate`` run on construction, so a settings object that exists is valid. The Python API
builds them directly; the command line (``unguide_jax.cli.config``) validates a preset's nested dict
and its overrides into the same classes, so both see the same defaults and the same errors, which name
the offending key.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from typing import Any, Callable, Mapping, Sequence, Union


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


def option(default: Any, doc: str, *, choices: Sequence | None = None,
           check: Callable[[Any], str | None] | None = None, infinite: bool = False) -> Any:
    """A schema field: its default, a one-line doc (``--help`` prints it), optionally the values it may
    take (``choices``) or a ``check`` returning what is wrong with a value (None: nothing). Float values must
    be finite unless ``infinite`` (then ±inf is a meaningful value; NaN never is)."""
    metadata: dict[str, Any] = {"doc": doc}
    if infinite:
        metadata["infinite"] = True
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
            # A NaN passes every comparison a check makes and an infinity most: refused here, for every float
            # setting, before anything loads (a field that means something by infinity says so: ``infinite``).
            if isinstance(value, float) and not math.isfinite(value) and not (
                    math.isinf(value) and f.metadata.get("infinite")):
                raise InvalidValue(f.name, f"must be a finite number, got {value!r}")
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
    if isinstance(value, Config):
        return to_dict(value)
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
    """Validate a (nested) dict into the schema ``cls``. Missing keys take the schema's defaults; a sub-dict
    overrides its field's default (``objective={"ddim_steps": 4}`` keeps the rest of the job's own objective);
    ``strict=False`` ignores unknown keys (for configs read back from older run folders)."""
    if not isinstance(data, Mapping):
        raise _wrong_type(prefix.rstrip(".") or "<root>", cls, data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown and strict:
        raise ConfigKeyError(f"unknown config key {prefix + str(unknown[0])!r} (known here: {', '.join(fields)})")
    hints = _hints(cls)
    kwargs = {name: _convert(_over_default(fields[name], hints[name], data[name]), hints[name], prefix + name,
                             strict) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except InvalidValue as err:
        raise ConfigError(_invalid_text(_joined(prefix, err.key), err.message)) from None


def _over_default(f: dataclasses.Field, hint, value):
    """A partial sub-dict of a settings field, completed from that field's default."""
    if _is_schema(hint) and isinstance(value, Mapping):
        default = _default_of(f)
        if isinstance(default, Mapping):
            return deep_merge(default, value)
    return value


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """``base`` with ``update`` applied, sub-mappings merged key by key rather than replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


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
            out[f.name] = with_defaults(hints[f.name], _over_default(f, hints[f.name], raw[f.name]))
        else:
            out[f.name] = copy.deepcopy(raw[f.name])
    out.update({k: copy.deepcopy(v) for k, v in raw.items() if k not in out})
    return out


SEED_LIMIT = 2 ** 32  # seeds are uint32 (PRNG keys, the sampler's noise): outside [0, 2**32) they would wrap


def seed_range(value) -> str | None:
    return None if 0 <= value < SEED_LIMIT else f"must be in [0, 2**32), got {value!r} (seeds are uint32)"


def image_side(value) -> str | None:
    if value < 0 or value % 8:
        return f"must be 0 (the model's default) or a positive multiple of 8 (the VAE's downsampling), got {value!r}"
    return None
