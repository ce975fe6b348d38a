"""Dtype names as configs spell them."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_named(name: str, key: str = "dtype", allowed: tuple[str, ...] = tuple(DTYPES)):
    """The jnp dtype called ``name``; an error naming ``key`` and the choices otherwise."""
    if name not in allowed:
        raise ValueError(f"config.{key} must be one of {sorted(allowed)}, got {name!r}")
    return DTYPES[name]
