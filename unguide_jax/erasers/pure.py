"""PURE (Moon et al., arXiv 2605.25765): a closed-form projector on cross-attention K/V built from activations.

1. Collect: every forget and retain anchor prompt runs a short DDIM trajectory (``steps`` steps of a
   ``steps``-step schedule, CFG, the base model) from ``latents`` random x_T. At every
   cross-attention layer and step the attention output before ``to_out`` (heads concatenated) of the
   conditional branch is averaged over spatial positions: one row of H_F (forget) or H_R (retain).
   All anchors and latents of a chunk go through one jitted scan.
2. Subspaces: per layer, the top right-singular vectors of H up to a cumulative energy ``energy``:
   orthonormal V_F, V_R; P = V Vᵀ.
3. Edit: E = I − P_F (I − P_R). PyTorch layout W ∈ R^{d×text}: W ← E W; a Flax kernel (text × d):
   kernel ← kernel Eᵀ, for to_v and (``edit_keys``) to_k. The change −kernel (I − P_R) V_F · V_Fᵀ has
   rank dim V_F: it ships as a LoRA (A = −kernel (I − P_R) V_F, B = V_Fᵀ, alpha 1), exact.
Decisions where the paper is open (see README): unconditional branch not collected, no centring by
default, K edited with the same E, subspaces per attention head (``per_head``: the only way the
V edit acts on the attention output exactly as h ↦ E h).
K concepts at once: V_F spans the K concepts' own forget subspaces, V_R the retain anchors they share
(``pure_edit``); the edit is the same projector.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unguide_jax.diffusion.schedulers import (
    NoiseSchedule,
    SchedulerConfig,
    ddim_step,
    ddim_timesteps,
)
from unguide_jax.edits import edit as edit_lib
from unguide_jax.erasers.common import cross_attention_layers, kernel, low_rank_factors
from unguide_jax.erasers.concepts import Concept
from unguide_jax.erasers.uce import as_concepts, shared_retain
from unguide_jax.models.unet import Attention
from unguide_jax.settings import Config, InvalidValue, at_least, option


def _unit_interval(value) -> str | None:
    return None if value is None or 0.0 <= value <= 1.0 else f"must be in [0, 1] (or null: energy), got {value!r}"


@dataclasses.dataclass(frozen=True)
class PureConfig(Config):
    """PURE's closed-form K/V projectors. The defaults were chosen on the embedded model (docs/results.md, "PURE's
    settings"): in its 16–64-wide cross-attention layers the arrow's activations lie almost wholly in the other
    classes' span, so the paper-like setting (no centring, τ 0.9 for both subspaces, per head; the sd15-object
    preset) edits nothing there. Centred rows, a wide forget subspace (τ_F 0.99) and a narrower protected one
    (τ_R 0.7) over all heads do erase."""

    steps: int = option(5, "DDIM steps of the activation-collection trajectory", check=at_least(1))
    latents: int = option(4, "x_T per anchor prompt", check=at_least(1))
    guidance_scale: float = option(7.5, "CFG scale of that trajectory")
    energy: float = option(0.99, "τ (τ_F): cumulative singular-value energy kept per subspace, in (0, 1]")
    # A lower τ_R shrinks the protected span, so that forget directions shared with the retain anchors are
    # edited too.
    retain_energy: float | None = option(0.7, "τ_R of the retain subspace (null: energy; 0: no retain span, "
                                              "E = I − P_F)", check=_unit_interval)
    edit_keys: bool = option(True, "apply the projector to to_k as well as to_v")
    center: bool = option(True, "subtract the mean activation row before each SVD")
    # Only head by head (a block-diagonal E) does W_V ← E·W_V act on the attention output exactly as h ↦ E h,
    # because each head mixes its values with its own attention weights; over the concatenated heads the edit
    # is exact on V, not on h.
    per_head: bool = option(False, "block-diagonal projector, head by head (exact on the attention output)")
    seed: int = option(0, "seed of the x_T draws")
    anchor_chunk: int = option(16, "anchors per jitted call (memory bound; the last chunk is padded)",
                               check=at_least(1))

    def validate(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise InvalidValue("energy", f"must be in (0, 1], got {self.energy!r}")

    @property
    def retain_tau(self) -> float:
        """τ of the retain subspace: ``retain_energy``, or ``energy`` when that is None."""
        return self.energy if self.retain_energy is None else self.retain_energy


def _capture(unet, params, sample, t, context):
    """(UNet output, {attn2 path: attention output before to_out, mean over positions (B, d)})."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "attend" and isinstance(context.module, Attention) and context.module.name == "attn2":
            context.module.sow("intermediates", "attend_mean", out.astype(jnp.float32).mean(axis=1))
        return out

    with nn.intercept_methods(intercept):
        out, state = unet.apply({"params": params}, sample, t, context, mutable=["intermediates"])
    flat = traverse_util.flatten_dict(state["intermediates"])
    return out, {".".join(k[:-1]): v[0] for k, v in flat.items()}


@functools.partial(jax.jit, static_argnames=("unet", "scheduler_config", "steps"))
def trajectory_activations(unet, scheduler_config: SchedulerConfig, steps: int, params, cond, uncond, x_T,
                           guidance_scale) -> dict[str, jax.Array]:
    """{attn2 path: (steps, N, d)} along DDIM with CFG from x_T (N, h, w, c); conditional rows only."""
    schedule = NoiseSchedule.from_config(scheduler_config)
    timesteps, prev = ddim_timesteps(scheduler_config, steps)
    n = x_T.shape[0]

    def step(z, ts):
        t, t_prev = ts
        out, captured = _capture(unet, params, jnp.concatenate([z, z]), t, jnp.concatenate([uncond, cond]))
        u, c = jnp.split(out.astype(jnp.float32), 2)
        z, _ = ddim_step(schedule, scheduler_config, u + guidance_scale * (c - u), t, t_prev, z)
        return z, {k: v[n:] for k, v in captured.items()}

    _, acts = jax.lax.scan(step, x_T.astype(jnp.float32), (jnp.asarray(timesteps), jnp.asarray(prev)))
    return acts


def collect(sd, prompts, config: PureConfig) -> tuple[dict[str, np.ndarray], int]:
    """{attn2 path: H (len(prompts)·latents·steps, d)}, and the number of UNet rows evaluated."""
    latent_shape = sd.latent_shape(None, None)
    x_T = jax.random.normal(jax.random.key(config.seed), (config.latents, *latent_shape), jnp.float32)
    embeddings = sd.encode_prompts(list(prompts))
    uncond = sd.encode_prompts([""])
    chunk = min(config.anchor_chunk, len(prompts))
    rows: dict[str, list] = {}
    unet_rows = 0
    for start in range(0, len(prompts), chunk):
        c = embeddings[start:start + chunk]
        real = c.shape[0]
        c = jnp.concatenate([c, jnp.repeat(c[-1:], chunk - real, axis=0)]) if real < chunk else c
        cond = jnp.repeat(c, config.latents, axis=0)  # anchor-major: anchor a, latent j at a * latents + j
        acts = trajectory_activations(sd.unet, sd.scheduler, config.steps, sd.params["unet"], cond,
                                      jnp.broadcast_to(uncond, cond.shape), jnp.tile(x_T, (chunk, 1, 1, 1)),
                                      config.guidance_scale)
        unet_rows += 2 * cond.shape[0] * config.steps
        for path, h in acts.items():
            h = np.asarray(h, np.float64)[:, : real * config.latents]  # (steps, N, d), padding dropped
            rows.setdefault(path, []).append(h.reshape(-1, h.shape[-1]))
    return {k: np.concatenate(v) for k, v in rows.items()}, unet_rows


def subspace(h: np.ndarray, energy: float, center: bool = False) -> np.ndarray:
    """Orthonormal basis (d, k) of the top right-singular vectors of H holding ``energy`` of its energy."""
    if center:
        h = h - h.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(h, full_matrices=False)
    power = s**2
    if power.sum() <= 0:
        return np.zeros((h.shape[1], 0))
    k = int(np.searchsorted(np.cumsum(power) / power.sum(), energy - 1e-12) + 1)
    return vt[: min(k, len(s))].T


def head_subspace(h: np.ndarray, heads: int, energy: float, center: bool = False) -> np.ndarray:
    """Block-diagonal orthonormal basis (d, Σ k_h): each head's channels get their own subspace."""
    d = h.shape[1]
    if d % heads:
        raise ValueError(f"{d} channels do not split into {heads} heads")
    width = d // heads
    blocks = [subspace(h[:, i * width:(i + 1) * width], energy, center) for i in range(heads)]
    basis = np.zeros((d, sum(b.shape[1] for b in blocks)))
    col = 0
    for i, b in enumerate(blocks):
        basis[i * width:(i + 1) * width, col:col + b.shape[1]] = b
        col += b.shape[1]
    return basis


def layer_heads(unet_config, layer: str) -> int:
    """Attention heads of a cross-attention layer, from its block (up blocks use the reversed list, as the UNet)."""
    heads = unet_config.heads_per_block
    block, _, rest = layer.partition(".")
    if block == "mid_block":
        return heads[-1]
    index = int(rest.split(".", 1)[0])
    return heads[index] if block == "down_blocks" else heads[::-1][index]


def layer_bases(h_forget: np.ndarray, h_retain: np.ndarray | None, heads: int, config: PureConfig):
    """One layer's forget and retain bases (V_F, V_R) from its activation rows; V_R has no columns when
    there are no retain rows or retain_energy is 0."""
    v_f = head_subspace(h_forget, heads, config.energy, config.center)
    if h_retain is None or config.retain_tau == 0:
        return v_f, np.zeros((v_f.shape[0], 0))
    return v_f, head_subspace(h_retain, heads, config.retain_tau, config.center)


def removed_fraction(h: np.ndarray, e: np.ndarray) -> float:
    """‖H (I − E)ᵀ‖ / ‖H‖: how much of these activation rows the edit takes away. Comparing it for the
    forget and the retain rows shows whether the layer tells the concept apart at all."""
    return float(np.linalg.norm(h - h @ e.T) / max(np.linalg.norm(h), 1e-30))


def projector(basis: np.ndarray) -> np.ndarray:
    return basis @ basis.T


def edit_matrix(forget_basis: np.ndarray, retain_basis: np.ndarray) -> np.ndarray:
    """E = I − P_F (I − P_R)."""
    d = forget_basis.shape[0]
    return np.eye(d) - projector(forget_basis) @ (np.eye(d) - projector(retain_basis))


def kernel_delta_factors(kernel_: np.ndarray, forget_basis: np.ndarray, retain_basis: np.ndarray):
    """(A, B) with kernel Eᵀ = kernel + A B: A = −kernel (I − P_R) V_F, B = V_Fᵀ."""
    d = forget_basis.shape[0]
    return -kernel_ @ (np.eye(d) - projector(retain_basis)) @ forget_basis, forget_basis.T


def union_basis(bases: Sequence[np.ndarray], heads: int = 1) -> np.ndarray:
    """Orthonormal basis of the sum of the spans of ``bases`` (each (d, k_i), orthonormal), head by head so
    that block-diagonal bases stay block-diagonal; one basis comes back as it is."""
    if len(bases) == 1:
        return bases[0]
    d = bases[0].shape[0]
    width = d // heads
    blocks = []
    for i in range(heads):
        rows = np.concatenate([b[i * width:(i + 1) * width] for b in bases], axis=1)
        u, s, _ = np.linalg.svd(rows, full_matrices=False)
        # numpy's matrix_rank tolerance: a direction only one concept's subspace holds, however nearly the
        # others reach it, is still a direction of the sum.
        keep = s > (s.max(initial=0.0) * max(rows.shape) * np.finfo(rows.dtype).eps)
        blocks.append(u[:, keep])
    basis = np.zeros((d, sum(b.shape[1] for b in blocks)))
    col = 0
    for i, b in enumerate(blocks):
        basis[i * width:(i + 1) * width, col:col + b.shape[1]] = b
        col += b.shape[1]
    return basis


def pure_edit(sd, concepts: Concept | Sequence[Concept], config: PureConfig) -> tuple[edit_lib.Edit, dict]:
    """PURE on one concept (its forget and retain anchors), or on K -> (Edit, report with ranks, seconds,
    UNet rows).

    K concepts: the forget subspace is the sum of the K concepts' own subspaces, each taken at τ_F from its
    own activation rows (one SVD over all K concepts' rows would rank directions by energy across concepts, so
    a concept with weaker or fewer rows could fall below τ and stay unerased); the retain subspace comes from
    the retain anchors of all K less those another concept erases (``uce.shared_retain``). E = I − P_F (I − P_R)
    is then PURE's edit with those two subspaces, still closed form and of rank dim V_F."""
    listed = as_concepts(concepts)
    for concept in listed:
        if not concept.forget_anchors:
            raise ValueError(f"concept {concept.name!r} has no forget anchors")
    retain, dropped = shared_retain(listed)
    started = time.perf_counter()
    h_forgets, rows_f = [], 0
    for concept in listed:
        h, rows = collect(sd, list(concept.forget_anchors), config)
        h_forgets.append(h)
        rows_f += rows
    if config.retain_tau == 0:
        retain = []  # no retain subspace: its anchors are not collected
    h_retain, rows_r = (collect(sd, retain, config) if retain else ({}, 0))
    collect_seconds = time.perf_counter() - started
    adapter, ranks = {}, {}
    for layer in cross_attention_layers(sd.params["unet"]):
        heads = layer_heads(sd.unet.config, layer) if config.per_head else 1
        first, v_r = layer_bases(h_forgets[0][layer], h_retain.get(layer), heads, config)
        own = [first] + [head_subspace(h[layer], heads, config.energy, config.center) for h in h_forgets[1:]]
        v_f = union_basis(own, heads)
        e = edit_matrix(v_f, v_r)
        h_forget = h_forgets[0][layer] if len(listed) == 1 else np.concatenate([h[layer] for h in h_forgets])
        ranks[layer] = dict(forget=int(v_f.shape[1]), retain=int(v_r.shape[1]),
                            forget_removed=round(removed_fraction(h_forget, e), 4),
                            retain_removed=round(removed_fraction(h_retain[layer], e), 4) if retain else None)
        if not isinstance(concepts, Concept):
            ranks[layer].update(forget_per_concept=[int(f.shape[1]) for f in own],
                                forget_removed_per_concept=[round(removed_fraction(h[layer], e), 4)
                                                            for h in h_forgets])
        for name in ("to_k", "to_v") if config.edit_keys else ("to_v",):
            module = f"{layer}.{name}"
            a, b = kernel_delta_factors(kernel(sd.params["unet"], module), v_f, v_r)
            adapter[module] = low_rank_factors(a, b)
    adapter = jax.tree.map(jnp.asarray, adapter)
    report = dict(forget_anchors=sum(len(c.forget_anchors) for c in listed), retain_anchors=len(retain), ranks=ranks,
                  unet_rows=rows_f + rows_r, collect_seconds=round(collect_seconds, 2),
                  seconds=round(time.perf_counter() - started, 2), config=dataclasses.asdict(config))
    if not isinstance(concepts, Concept):
        report.update(concepts=[c.name for c in listed], retain_dropped=dropped)
    return edit_lib.lora_edit(adapter, 1.0), report
