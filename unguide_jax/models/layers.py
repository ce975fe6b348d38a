"""Building blocks shared by the UNet, the VAE and the text encoder.

Module names follow diffusers/transformers exactly (``to_out.0``, ``resnets.1``): Linen accepts
dots in names, so a parameter's path joined with '.' *is* its PyTorch state-dict key up to the
leaf name. The converter relies on that and never rewrites names.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PAD_1 = ((1, 1), (1, 1))  # torch padding=1; 'SAME' differs from torch for stride-2 convs


class DtypeMixin:
    """Compute dtype and parameter dtype, set separately (e.g. fp32 params, bf16 compute)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


def dense(features: int, name: str, mod: DtypeMixin, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=mod.dtype, param_dtype=mod.param_dtype, name=name)


def conv(features: int, kernel: int, name: str, mod: DtypeMixin, stride: int = 1, padding: Any = None) -> nn.Conv:
    if padding is None:
        padding = PAD_1 if kernel == 3 else "VALID"
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding,
        dtype=mod.dtype, param_dtype=mod.param_dtype, name=name,
    )


def group_norm(groups: int, eps: float, name: str, mod: DtypeMixin) -> nn.GroupNorm:
    # Flax defaults (eps 1e-6, fast variance) differ from torch: set both explicitly.
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, use_fast_variance=False,
        dtype=mod.dtype, param_dtype=mod.param_dtype, name=name,
    )


def layer_norm(eps: float, name: str, mod: DtypeMixin) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, use_fast_variance=False, dtype=mod.dtype, param_dtype=mod.param_dtype, name=name,
    )


# Largest fp32 score matrix (B·H·T·S·4 bytes) one attention call materialises. Beyond it the queries go
# through in chunks (``lax.map``), each against every key: softmax is per query, so the result is the
# same, and memory grows with T instead of T·S (SD 1.5 at 512 px: 4,096 tokens, 8 heads, 537 MB of
# scores per image; the shipped model asked for 512 px: 65,536 tokens, 4.3 TB per batch).
ATTENTION_SCORE_BYTES = 256 * 2**20


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, is_causal: bool = False,
                         key_mask: jax.Array | None = None, max_score_bytes: int | None = None) -> jax.Array:
    """(B, T, H*D) projections in, (B, T, H*D) out. Logits and softmax run in fp32.

    ``key_mask`` (B, S) bool, optional: which keys each batch row may attend to. The path is chosen per
    backend and size: on a GPU, fp16/bf16 without a mask, ``jax.nn.dot_product_attention`` (cuDNN's
    flash attention: no score matrix in memory); elsewhere the einsum path below, with the queries in
    chunks when the scores would pass ``max_score_bytes`` (default ``ATTENTION_SCORE_BYTES``).

    Written out rather than ``jax.nn.dot_product_attention``, for the CPU (docs/benchmarks.md, levers):
    the 1/sqrt(D) scale goes into the exponent (no pass of its own over the T x S logits), and the
    softmax is normalised after the product with V (a division over T x D instead of T x S). One head
    (the small UNets' outer blocks) is a plain batched matmul, no head axis.
    """
    b, t, c = q.shape
    s = k.shape[1]
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.float16, jnp.bfloat16) and key_mask is None
            and not is_causal and (c // heads) % 8 == 0 and c // heads <= 128 and v.shape[-1] == c):
        split = lambda x: x.reshape(b, -1, heads, c // heads)  # noqa: E731
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="cudnn")
        return out.reshape(b, t, c)
    limit = ATTENTION_SCORE_BYTES if max_score_bytes is None else max_score_bytes
    score_bytes = b * heads * t * s * 4
    if score_bytes > limit and t > 1 and not is_causal:
        # The largest divisor of T whose chunk's scores fit (at least one query row).
        rows = max(1, t * limit // score_bytes)
        chunk = next(n for n in range(min(rows, t), 0, -1) if t % n == 0)
        if chunk < t:
            chunks = jnp.moveaxis(q.reshape(b, t // chunk, chunk, c), 1, 0)
            out = jax.lax.map(lambda qc: _attention(qc, k, v, heads, None, key_mask), chunks)
            return jnp.moveaxis(out, 0, 1).reshape(b, t, -1)
    return _attention(q, k, v, heads, is_causal, key_mask)


def _attention(q, k, v, heads: int, is_causal: bool | None, key_mask) -> jax.Array:
    b, t, c = q.shape
    s = k.shape[1]
    d = c // heads
    dv = v.shape[-1] // heads
    f32 = jnp.float32
    if heads == 1:
        logits = jnp.einsum("btd,bsd->bts", q, k, preferred_element_type=f32)[:, None]
    else:
        logits = jnp.einsum("bthd,bshd->bhts", q.reshape(b, t, heads, d), k.reshape(b, s, heads, d),
                            preferred_element_type=f32)
    masked = None
    if key_mask is not None:
        masked = key_mask[:, None, None, :]
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), bool))[None, None]
        masked = causal if masked is None else masked & causal
    if masked is not None:
        logits = jnp.where(masked, logits, jnp.finfo(f32).min)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.exp((logits - peak) * (1.0 / math.sqrt(d)))
    total = jnp.sum(probs, axis=-1, keepdims=True)  # (B, H, T, 1)
    if heads == 1:
        out = jnp.einsum("bts,bsd->btd", probs[:, 0].astype(v.dtype), v, preferred_element_type=f32)
        out = out / total[:, 0]
    else:
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v.reshape(b, s, heads, dv),
                         preferred_element_type=f32)
        out = out / jnp.swapaxes(total, 1, 2)
    return out.astype(q.dtype).reshape(b, t, heads * dv)


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of diffusion timesteps, as diffusers' ``get_timestep_embedding`` (fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(mode='nearest')`` to an explicit (H, W), NHWC."""
    b, h, w, c = x.shape
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


def abstract_params(module: nn.Module, *example_args, method: str | None = None) -> dict:
    """Shapes and dtypes of ``module``'s parameters, without allocating them."""
    init = lambda: module.init(jax.random.key(0), *example_args, method=method)  # noqa: E731
    return jax.eval_shape(init)["params"]
