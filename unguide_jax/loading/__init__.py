"""Weights in and out: safetensors/pickles, PyTorch<->Flax conversion, diffusers folders, single-file
checkpoints (with shipped SD 1.x/2.x/SDXL configs), hub ids in the local Hugging Face cache, the CLIP tokenizer.

``load_model(spec)`` is the one entry point for a model wherever it is kept (:mod:`.resolve`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unguide_jax.loading.resolve import load_model

__all__ = ["load_model"]


def __getattr__(name: str):
    # Resolved on first use: unguide_jax.models imports loading.convert (so this package's __init__
    # runs first), and resolve imports the models back through the pipeline.
    if name == "load_model":
        from unguide_jax.loading.resolve import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
