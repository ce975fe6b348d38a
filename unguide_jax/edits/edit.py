"""Edits of a frozen base UNet: what every eraser produces, applied on top of the base parameters.

An ``Edit`` is a pytree with three optional parts:

- ``loras``: low-rank weight deltas ``W + alpha A B`` ((adapter, alpha) pairs, ``unguide_jax.edits.lora``
  layout). UnGuide's LoRA, and the closed-form K/V edits of PURE and UCE, which are exactly low rank.
- ``deltas``: full weight deltas ``{module path: {param name: delta}}`` (an ESD-style fine-tune).
- ``memory``: extra key/value tokens (p_K, p_V) appended to the text tokens in the cross-attention
  layers of a scope (learnable prompts).

``apply_unet`` runs the UNet with an edit. With ``strength=None`` the edit is simply on: LoRAs and
deltas are merged into the weights and only the memory needs an interceptor. With a per-row
``strength`` (B,), row b sees ``W + strength[b] * alpha A B`` and the memory tokens only where
``strength[b] > 0`` (a key mask): base and edited predictions then come out of *one* UNet call, which
is what UnGuidance and its probe use. A ``strength`` (B, L), L the edit's number of LoRAs, scales each LoRA
on its own: row b sees ``W + Σ_j strength[b, j] alpha_j A_j B_j`` (K concepts' LoRAs, each row applying
only those its prompt carries: ``diffusion.many_guidance``). Full deltas cannot be scaled per row at activation level (a
delta on a 3x3 conv or a norm is not a matmul on the layer's input); an edit with deltas is
evaluated as two calls, base and merged (``supports_rows``).

The LoRA and memory parts act through a Flax method interceptor keyed by module path, so the UNet
module itself knows nothing about adapters.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax import traverse_util

from unguide_jax.edits import lora as lora_lib
from unguide_jax.models.layers import multi_head_attention
from unguide_jax.models.unet import Attention

# Which cross-attention layers carry the memory tokens (learnable prompts' scopes), by module path.
MEMORY_SCOPES: dict[str, str] = {
    "mid": r"^mid_block\.",
    "midout": r"^(mid_block|up_blocks)\.",
    "inmidout": r"^(down_blocks|mid_block|up_blocks)\.",
}


@flax.struct.dataclass
class PromptMemory:
    """Learnable key/value tokens shared by every cross-attention layer in ``scope``."""

    keys: jax.Array    # (m, text_dim): p_K, appended after the text tokens before to_k
    values: jax.Array  # (m, text_dim): p_V, appended before to_v
    scope: str = flax.struct.field(pytree_node=False, default="mid")

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[0])


@flax.struct.dataclass
class Edit:
    loras: tuple = ()                 # ((adapter, alpha), ...); alpha a float32 scalar (an array, not static)
    deltas: dict | None = None        # {module path: {"kernel": ..., "bias": ..., ...}}, added to the base leaves
    memory: PromptMemory | None = None

    @property
    def is_empty(self) -> bool:
        return not self.loras and not self.deltas and self.memory is None

    @property
    def supports_rows(self) -> bool:
        """Whether a per-row strength can be applied in one UNet call (no full weight deltas)."""
        return not self.deltas


def lora_edit(adapter: lora_lib.Adapter, alpha: float) -> Edit:
    return Edit(loras=((adapter, jnp.asarray(alpha, jnp.float32)),))


def combine(edits: Sequence[Edit]) -> Edit:
    """Several edits at once: LoRAs and deltas add up (W + Σ_i Δ_i); at most one memory."""
    memories = [e.memory for e in edits if e.memory is not None]
    if len(memories) > 1:
        raise ValueError("at most one learnable-prompt memory can be combined with other edits")
    deltas: dict = {}
    for e in edits:
        for path, leaves in (e.deltas or {}).items():
            slot = deltas.setdefault(path, {})
            for name, value in leaves.items():
                slot[name] = slot[name] + value if name in slot else value
    return Edit(loras=tuple(pair for e in edits for pair in e.loras), deltas=deltas or None,
                memory=memories[0] if memories else None)


# --- checks -------------------------------------------------------------------------------------------

def _module_leaves(params: Mapping) -> dict[str, dict[str, jax.Array]]:
    out: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        out.setdefault(".".join(path[:-1]), {})[path[-1]] = leaf
    return out


def memory_layers(params: Mapping, scope: str) -> list[str]:
    """The cross-attention module paths (``….attn2``) a memory of this scope is added to."""
    if scope not in MEMORY_SCOPES:
        raise ValueError(f"unknown memory scope {scope!r}; known: {sorted(MEMORY_SCOPES)}")
    regex = re.compile(MEMORY_SCOPES[scope])
    layers = sorted({path.rsplit(".", 1)[0] for path in _module_leaves(params)
                     if path.endswith(".attn2.to_k") and regex.search(path)})
    if not layers:
        raise ValueError(f"memory scope {scope!r} matches no cross-attention layer of the model")
    return layers


def check_edit_fits(params: Mapping, edit: Edit, what: str = "edit") -> None:
    """Every part of ``edit`` fits the UNet parameters ``params``; errors name the module."""
    for i, (adapter, _) in enumerate(edit.loras):
        lora_lib.check_fits(params, adapter, f"{what} (LoRA {i})")
    modules = _module_leaves(params)
    for path, leaves in (edit.deltas or {}).items():
        if path not in modules:
            raise ValueError(f"{what} has a weight delta for {path}, which the model does not have")
        for name, value in leaves.items():
            if name not in modules[path]:
                raise ValueError(f"{what} has a delta for {path}.{name}, which the model does not have")
            if tuple(value.shape) != tuple(modules[path][name].shape):
                raise ValueError(f"{what}: delta {path}.{name} has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(modules[path][name].shape)}")
    if edit.memory is not None:
        layers = memory_layers(params, edit.memory.scope)
        text_dim = modules[layers[0] + ".to_k"]["kernel"].shape[0]
        for name in ("keys", "values"):
            shape = tuple(getattr(edit.memory, name).shape)
            if len(shape) != 2 or shape[1] != text_dim:
                raise ValueError(f"{what}: memory {name} have shape {shape}, expected (m, {text_dim})")


# --- merging ------------------------------------------------------------------------------------------

def merge_weights(params: Mapping, edit: Edit) -> dict:
    """Base parameters with the edit's LoRAs and deltas folded in (the memory is not a weight)."""
    merged = lora_lib.merge(params, [(a, alpha) for a, alpha in edit.loras]) if edit.loras else dict(params)
    if not edit.deltas:
        return merged
    flat = traverse_util.flatten_dict(merged)
    index = {(".".join(key[:-1]), key[-1]): key for key in flat}
    for path, leaves in edit.deltas.items():
        for name, delta in leaves.items():
            key = index[(path, name)]
            flat[key] = (flat[key].astype(jnp.float32) + delta).astype(flat[key].dtype)
    return traverse_util.unflatten_dict(flat)


# --- applying -----------------------------------------------------------------------------------------

def _rows(strength: jax.Array, ndim: int) -> jax.Array:
    return strength.reshape((-1,) + (1,) * (ndim - 1))


def _interceptor(loras: Mapping[str, list], memory: PromptMemory | None, memory_paths: frozenset[str],
                 strength: jax.Array | None):
    """A method interceptor: LoRA terms on Dense / 1x1-conv outputs (scaled per row), memory tokens on
    the inputs of to_k / to_v of the attention layers in ``memory_paths``, and their key mask."""

    def intercept(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if method == "attend" and isinstance(module, Attention):
            path = ".".join(module.path)
            if memory is None or path not in memory_paths or strength is None:
                return next_fun(*args, **kwargs)
            q, k, v = args
            batch, text_len = k.shape[0], k.shape[1] - memory.num_tokens
            on = strength > 0 if strength.ndim == 1 else jnp.any(strength > 0, axis=1)
            mask = jnp.concatenate([jnp.ones((batch, text_len), bool),
                                    jnp.broadcast_to(on[:, None], (batch, memory.num_tokens))], axis=1)
            return multi_head_attention(q, k, v, module.heads, key_mask=mask)
        if method != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        path = ".".join(module.path)
        x = args[0]
        if memory is not None and path.rsplit(".", 1)[0] in memory_paths and path.rsplit(".", 1)[1] in ("to_k", "to_v"):
            tokens = memory.keys if path.endswith("to_k") else memory.values
            tokens = jnp.broadcast_to(tokens.astype(x.dtype), (x.shape[0],) + tokens.shape)
            x = jnp.concatenate([x, tokens], axis=1)
            args = (x,) + tuple(args[1:])
        y = next_fun(*args, **kwargs)
        if path in loras:
            terms = [(j, alpha * ((x.astype(jnp.float32) @ a.astype(jnp.float32)) @ b.astype(jnp.float32)))
                     for a, b, alpha, j in loras[path]]
            if strength is not None and strength.ndim == 2:
                delta = sum(_rows(strength[:, j].astype(jnp.float32), term.ndim) * term for j, term in terms)
            else:
                delta = sum(term for _, term in terms)
                if strength is not None:
                    delta = _rows(strength.astype(jnp.float32), delta.ndim) * delta
            y = (y.astype(jnp.float32) + delta).astype(y.dtype)
        return y

    return intercept


def apply_unet(unet, params: Mapping, edit: Edit | None, sample: jax.Array, timesteps, context: jax.Array,
               strength: jax.Array | None = None) -> jax.Array:
    """The UNet with ``edit`` applied; ``strength`` (B,) scales it per row (None: fully on everywhere), or
    (B, L) each of its L LoRAs per row.

    Pure and jit-friendly. ``strength`` is for edits without full deltas (``edit.supports_rows``).
    """
    if edit is None or edit.is_empty:
        return unet.apply({"params": params}, sample, timesteps, context)
    if strength is None:
        params = merge_weights(params, edit)
        loras: dict = {}
    else:
        if not edit.supports_rows:
            raise ValueError("an edit with full weight deltas cannot be scaled per row: evaluate the base and "
                             "the edited model as two calls")
        strength = jnp.asarray(strength, jnp.float32)
        if strength.ndim == 2:
            if strength.shape != (sample.shape[0], len(edit.loras)):
                raise ValueError(f"a per-LoRA strength needs shape (rows, LoRAs) = ({sample.shape[0]}, "
                                 f"{len(edit.loras)}), got {strength.shape}")
        else:
            strength = jnp.broadcast_to(strength, (sample.shape[0],))
        loras = {}
        for j, (adapter, alpha) in enumerate(edit.loras):
            for path, ab in adapter.items():
                loras.setdefault(path, []).append((ab["lora_A"], ab["lora_B"], alpha, j))
    if not loras and edit.memory is None:
        return unet.apply({"params": params}, sample, timesteps, context)
    memory_paths = frozenset(memory_layers(params, edit.memory.scope)) if edit.memory is not None else frozenset()
    with nn.intercept_methods(_interceptor(loras, edit.memory, memory_paths, strength)):
        return unet.apply({"params": params}, sample, timesteps, context)
