"""PyTorch state dict <-> Flax parameter pytree, in both directions, exactly inverse.

The table is built from the Flax model's own (abstract) parameter tree: because our module
names spell the diffusers/transformers module paths, a Flax leaf ``(..., 'to_out.0', 'kernel')``
*is* the PyTorch key ``....to_out.0.weight``. Every key must be used exactly once; a missing,
extra or wrongly shaped tensor is an error that names it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# A Flax module holds at most one of kernel/scale/embedding, so 'weight' is never ambiguous.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
    pass


def torch_key(flax_path: tuple[str, ...]) -> str:
    *module, leaf = flax_path
    if leaf not in TORCH_LEAF:
        raise ConversionError(f"no PyTorch name for Flax leaf {'/'.join(flax_path)}")
    return ".".join([*module, TORCH_LEAF[leaf]])


def key_table(abstract_params: Mapping) -> dict[str, tuple[str, ...]]:
    """PyTorch key -> Flax path, for every parameter of the model."""
    table = {}
    for path in traverse_util.flatten_dict(abstract_params):
        key = torch_key(path)
        if key in table:
            raise ConversionError(f"two Flax parameters map to {key}: {table[key]} and {path}")
        table[key] = path
    return table


def _to_flax_layout(value: np.ndarray, leaf: str, flax_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4 and flax_ndim == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # 1x1 conv stored where we use a Linear (old VAE attention)
    if value.ndim == 2:
        return value.T
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        value = value.T
    elif leaf == "kernel" and value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return np.ascontiguousarray(value)


def _describe(keys: set[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a torch tensor / jax array / numpy array; torch bf16 goes through fp32."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def torch_to_flax(
    state_dict: Mapping[str, Any],
    abstract_params: Mapping,
    *,
    dtype: Any = None,
    rename: Callable[[str], str | None] | None = None,
    what: str = "model",
) -> dict:
    """Convert a PyTorch state dict to the Flax pytree shaped like ``abstract_params``.

    ``rename`` maps alternative key spellings to ours (return None to drop a key, e.g. buffers).
    ``dtype`` casts every parameter (e.g. to bf16); by default each keeps the abstract tree's dtype.
    """
    renamed: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = rename(key) if rename else key
        if new is None:
            continue
        if new in renamed:
            raise ConversionError(f"{what}: {key!r} and another key both name the parameter {new!r}")
        renamed[new] = value
    table = key_table(abstract_params)
    missing, unexpected = set(table) - set(renamed), set(renamed) - set(table)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    flat_abstract = traverse_util.flatten_dict(abstract_params)
    flat = {}
    for key in sorted(set(table) & set(renamed)):
        path = table[key]
        expected = flat_abstract[path]
        value = _to_flax_layout(to_numpy(renamed[key]), path[-1], len(expected.shape))
        if tuple(value.shape) != tuple(expected.shape):
            problems.append(f"wrong shape for {key}: got {tuple(value.shape)} (as Flax), expected {tuple(expected.shape)}")
            continue
        flat[path] = jnp.asarray(value, dtype=dtype or expected.dtype)
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax pytree -> PyTorch-layout numpy state dict (exact inverse of ``torch_to_flax``)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(dtype)
        out[torch_key(path)] = _to_torch_layout(array, path[-1])
    return out
