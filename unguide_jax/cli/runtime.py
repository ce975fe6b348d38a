"""Process-level JAX settings for the command-line tools."""
from __future__ import annotations

import os
from pathlib import Path

import jax


def setup_runtime(cache_dir: str | None = None) -> None:
    """Turn on JAX's persistent compilation cache (repeat runs skip most compile time)."""
    cache = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "unguide-jax" / "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
