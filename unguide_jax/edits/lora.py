"""LoRA adapters as their own pytree over a frozen base parameter tree.

An adapter is a flat dict ``{module path: {"lora_A": (in, r), "lora_B": (r, out)}}``; the module
path is the diffusers/PyTorch module name (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``),
which is also the Flax module path joined with '.'. The effective weight is

    W' = W + alpha * scale * A @ B          (alpha multiplies directly: the UnGuide/ESD convention,
                                             not PEFT's alpha / r)

Targets are chosen by a regular expression over module paths: the named rules below, or any regex.
Dense kernels (in, out) and 1x1 convolution kernels (1, 1, in, out) can be adapted.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from unguide_jax.settings import Config, at_least, option

Adapter = dict[str, dict[str, jax.Array]]

# The paper's layers (UnGuide's and ESD's code). Searched (re.search) in the dotted module path.
TARGET_RULES: dict[str, str] = {
    # Object erasure: cross-attention key/value projections of every transformer block.
    "object": r"\.attn2\.to_[kv]$",
    # Explicit content (ESD-u style): self-attention, feed-forward and each resnet's time projection;
    # nothing inside attn2, not the time embedding, not the output conv, not the 1x1-conv proj_in/out.
    "explicit": r"(\.attn1\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.0\.proj|\.ff\.net\.2|\.resnets\.\d+\.time_emb_proj)$",
}


LORA_INITS = ("concept", "random")


@dataclasses.dataclass(frozen=True)
class LoraConfig(Config):
    """UnGuide's LoRA adapter."""

    rank: int = option(1, "LoRA rank", check=at_least(1))
    alpha: float = option(8.0, "multiplies A @ B directly (UnGuide's convention, not PEFT's alpha / r)")
    targets: str = option("object", '"object" (attn2.to_k/to_v), "explicit" (ESD-u style) or a regex over module paths')
    init: str = option("concept", "A's init: concept (ours: along the target's tokens outside the anchor's and \"\"'s "
                                  "span, erasers/unguide/concept_direction.py) | random (the authors' code: N(0, 1/r), "
                                  "std 1/√r)",
                       choices=LORA_INITS)

    @property
    def pattern(self) -> str:
        return TARGET_RULES.get(self.targets, self.targets)


def _kernels(params: Mapping) -> dict[str, jax.Array]:
    """Module path -> kernel, for every module of ``params`` that has a kernel."""
    flat = traverse_util.flatten_dict(params)
    return {".".join(path[:-1]): leaf for path, leaf in flat.items() if path[-1] == "kernel"}


def _in_out(path: str, kernel) -> tuple[int, int]:
    shape = tuple(kernel.shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 4 and shape[:2] == (1, 1):
        return shape[2], shape[3]
    raise ValueError(f"LoRA can adapt Dense and 1x1-conv layers only; {path} has a kernel of shape {shape}")


def target_modules(params: Mapping, targets: str) -> list[str]:
    """The module paths of ``params`` that the rule (name or regex) selects; an error if it selects none."""
    pattern = TARGET_RULES.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoRA target rule {targets!r} is not a valid regular expression: {err}") from None
    chosen = sorted(path for path in _kernels(params) if regex.search(path))
    if not chosen:
        raise ValueError(f"LoRA target rule {targets!r} ({pattern}) matches no layer of the model")
    return chosen


def reads_text(path: str) -> bool:
    """Whether the module is a cross-attention K/V projection, which reads the text tokens directly."""
    return re.search(TARGET_RULES["object"], path) is not None


def init_lora(key: jax.Array, params: Mapping, config: LoraConfig, dtype=jnp.float32, directions=None) -> Adapter:
    """A ~ N(0, 1/r) as the authors' code (std 1/√r), B = 0: the adapted model starts equal to the base.
    ``directions`` (in, r): A's init for the cross-attention K/V layers, the ones that read the text tokens the
    directions live in (``lora.init = "concept"``); other layers keep the random init."""
    if (directions is None) != (config.init == "random"):
        raise ValueError(f"LoRA init {config.init!r} " + ("needs the concept's directions (directions=, from "
                         "erasers.unguide.concept_direction): pass them, or use init='random'" if directions is None
                         else "takes no directions: use init='concept' to start A along them"))
    kernels = _kernels(params)
    adapter = {}
    for i, path in enumerate(target_modules(params, config.targets)):
        fan_in, fan_out = _in_out(path, kernels[path])
        if directions is not None and reads_text(path):
            if directions.shape != (fan_in, config.rank):
                raise ValueError(f"LoRA init directions {directions.shape} do not fit {path} ({fan_in} inputs, rank "
                                 f"{config.rank})")
            a = jnp.asarray(directions, dtype)
        else:
            a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, config.rank), dtype) / config.rank ** 0.5
        adapter[path] = {"lora_A": a, "lora_B": jnp.zeros((config.rank, fan_out), dtype)}
    return adapter


def check_fits(params: Mapping, adapter: Adapter, what: str = "adapter") -> None:
    """Every adapted module exists in ``params`` with matching in/out sizes; errors name the module."""
    kernels = _kernels(params)
    for path, ab in adapter.items():
        if path not in kernels:
            raise ValueError(f"{what} adapts {path}, which the model does not have")
        fan_in, fan_out = _in_out(path, kernels[path])
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
            raise ValueError(f"{what} does not fit {path}: A {tuple(a.shape)}, B {tuple(b.shape)} "
                             f"for a layer of {fan_in} -> {fan_out}")


def lora_delta(ab: Mapping[str, jax.Array], kernel_shape: Sequence[int], alpha: float) -> jax.Array:
    delta = alpha * (ab["lora_A"].astype(jnp.float32) @ ab["lora_B"].astype(jnp.float32))
    return delta.reshape(kernel_shape)


def merge(params: Mapping, adapters: Sequence[tuple[Adapter, float]], sign: float = 1.0) -> dict:
    """Base params with ``W + sign * Σ_i alpha_i A_i B_i`` at every adapted kernel (adapters: (adapter, alpha)).

    Pure and jit-friendly; ``unmerge`` is ``merge(..., sign=-1)``. Untouched subtrees are shared, not copied.
    """
    deltas: dict[str, jax.Array] = {}
    kernels = _kernels(params)
    for adapter, alpha in adapters:
        for path, ab in adapter.items():
            if path not in kernels:
                raise ValueError(f"adapter adapts {path}, which the model does not have")
            d = lora_delta(ab, kernels[path].shape, alpha)
            deltas[path] = deltas[path] + d if path in deltas else d
    if not deltas:
        return dict(params)
    flat = traverse_util.flatten_dict(params)
    # Linen module names contain dots ("down_blocks.0"), so a dotted path cannot simply be split.
    kernel_keys = {".".join(key[:-1]): key for key in flat if key[-1] == "kernel"}
    for path, d in deltas.items():
        key = kernel_keys[path]
        flat[key] = (flat[key].astype(jnp.float32) + sign * d).astype(flat[key].dtype)
    return traverse_util.unflatten_dict(flat)


def unmerge(params: Mapping, adapters: Sequence[tuple[Adapter, float]]) -> dict:
    return merge(params, adapters, sign=-1.0)


def count_parameters(adapter: Adapter) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapter))
