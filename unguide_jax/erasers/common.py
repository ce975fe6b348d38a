"""Pieces the closed-form erasers share: cross-attention K/V kernels, and a dense delta as a LoRA."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import traverse_util


def cross_attention_layers(unet_params: Mapping) -> list[str]:
    """Module paths of every cross-attention (``….attn2``), in parameter order."""
    flat = traverse_util.flatten_dict(unet_params)
    return sorted({".".join(k[:-2]) for k in flat if k[-2] == "to_k" and k[-3] == "attn2"})


def kernel(unet_params: Mapping, module: str) -> np.ndarray:
    """The kernel (in, out) of a Dense module given by its dotted path, as float64."""
    flat = traverse_util.flatten_dict(unet_params)
    for key, value in flat.items():
        if key[-1] == "kernel" and ".".join(key[:-1]) == module:
            return np.asarray(value, np.float64)
    raise KeyError(f"the model has no Dense module {module}")


def low_rank_factors(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """A kernel delta A @ B (in, r) @ (r, out) as LoRA factors, rank min(r, in): when r >= in the
    identity and the product are the smaller exact factorisation."""
    if a.shape[1] >= a.shape[0]:
        a, b = np.eye(a.shape[0]), a @ b
    return {"lora_A": a.astype(np.float32), "lora_B": b.astype(np.float32)}
