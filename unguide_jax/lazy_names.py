"""Public names of a package imported on first use (PEP 562 module ``__getattr__``), so that importing the
package stays cheap: ``unguide_jax`` does not import jax, and ``unguide_jax.pytorch`` does not import torch,
until a name that needs them is touched."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_names(package: str, namespace: dict, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose globals are ``namespace``; ``exports``: public name ->
    the module that defines it. A name, once imported, is stored in the namespace (later lookups are plain)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
