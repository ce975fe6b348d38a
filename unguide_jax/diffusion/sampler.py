"""Jitted sampling: DDIM (or Euler, SDXL's default) scanned over steps with classifier-free guidance, per-prompt
seeds and scales.

Everything at a jit boundary is explicit: the module and scheduler config are static (hashable),
parameters, embeddings, latents, guidance scales and seeds are arrays.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.schedulers import (
    SAMPLERS,
    NoiseSchedule,
    SchedulerConfig,
    ddim_step,
    ddim_timesteps,
    euler_sigmas,
    euler_step,
)
from unguide_jax.edits.edit import Edit, apply_unet, merge_weights

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (latents, timestep) -> model output

# XLA options for the jitted samplers (``jax.jit(..., compiler_options=...)``). YNNPACK fusions off:
# on the CPU they made the shipped model's UNet step about 1.4x slower (their reductions and
# element-wise graphs cost more than XLA's own loops; docs/benchmarks.md, levers). An XLA CPU option:
# other backends ignore it.
XLA_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# Rows per UNet call on the CPU: a sampler step's UNet rows go through in chunks of about this many,
# one after the other, so that each chunk's activations stay in the caches (on the shipped model,
# 32 rows cost 1.2x less per row than 64, 128 rows 1.2x more; docs/benchmarks.md, levers). Other
# backends take the whole batch in one call.
CPU_ROWS_PER_CALL = 32


def rows_per_call() -> int:
    """The UNet chunk size for this backend (0: the whole batch at once)."""
    return CPU_ROWS_PER_CALL if jax.default_backend() == "cpu" else 0


def map_rows(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array, groups: int = 1) -> jax.Array:
    """``fn(*arrays)`` for a row-independent ``fn``, computed over chunks of rows one after the other
    (``lax.map``): the same values, less memory traffic. The chunk is the largest divisor of the rows
    in [chunk / 2, chunk]; with none, or ``chunk`` <= 0, or no more rows than ``chunk``: one call.

    ``groups``: the rows are that many equal blocks, one per device of a "data" mesh axis; the chunks
    are then taken within each block (``chunk`` rows per device per call), so that every call keeps
    every device busy on rows it already holds."""
    n = arrays[0].shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"{n} rows do not split into {groups} equal groups")
    local = n // groups
    size = next((c for c in range(min(chunk, local), max(chunk // 2, 1) - 1, -1) if local % c == 0), 0) if chunk > 0 else 0
    if not size or size >= local:
        return fn(*arrays)
    calls = local // size

    def split(a):  # (groups·calls·size, ...) -> (calls, groups·size, ...): call j takes chunk j of every group
        return a.reshape(groups, calls, size, *a.shape[1:]).swapaxes(0, 1).reshape(calls, groups * size, *a.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), [split(a) for a in arrays])
    return out.reshape(calls, groups, size, *out.shape[2:]).swapaxes(0, 1).reshape(n, *out.shape[2:])


def unet_rows(unet, params, edit, sample, t, context, strength=None, groups: int = 1) -> jax.Array:
    """``apply_unet`` over the rows of (sample, context[, strength]) at timestep ``t``, in chunks of
    ``rows_per_call()`` (per device, with ``groups`` devices on the rows). ``t``: a scalar or one
    timestep per row."""
    n = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (n,))
    has_strength = strength is not None
    strength = strength if has_strength else jnp.ones((n,))
    return map_rows(lambda x, tt, c, s: apply_unet(unet, params, edit, x, tt, c, strength=s if has_strength else None),
                    rows_per_call(), sample, t, context, strength, groups=groups)


def initial_latents(seeds: jax.Array, shape: tuple[int, int, int], dtype=jnp.float32) -> jax.Array:
    """x_T for each prompt from its own seed: the same seed gives the same noise in any batch."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, dtype))(jnp.asarray(seeds, jnp.uint32))


def eta_noise_keys(seeds: jax.Array) -> jax.Array:
    """Per-prompt keys for DDIM's eta noise, independent of the x_T stream of the same seed."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(jnp.asarray(seeds, jnp.uint32))


def ddim_loop(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    config: SchedulerConfig,
    timesteps: np.ndarray,
    prev_timesteps: np.ndarray,
    latents: jax.Array,
    eta: float = 0.0,
    noise_keys: jax.Array | None = None,
) -> jax.Array:
    """Run DDIM from ``latents`` over the given (timestep, previous timestep) pairs with ``lax.scan``."""
    if eta > 0 and noise_keys is None:
        raise ValueError("eta > 0 needs noise_keys (one key per example)")

    def step(z, xs):
        t, t_prev, i = xs
        output = denoise(z, t)
        noise = None
        if eta > 0:
            draw = lambda k: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:], jnp.float32)  # noqa: E731
            noise = jax.vmap(draw)(noise_keys)
        z, _ = ddim_step(schedule, config, output, t, t_prev, z, eta, noise)
        return z, None

    steps = (jnp.asarray(timesteps), jnp.asarray(prev_timesteps), jnp.arange(len(timesteps)))
    latents, _ = jax.lax.scan(step, latents, steps)
    return latents


def euler_loop(denoise: Denoiser, config: SchedulerConfig, num_steps: int, latents: jax.Array) -> jax.Array:
    """Euler (diffusers' ``EulerDiscreteScheduler``, no churn) from x_T = ``latents`` (unit variance: scaled here
    by the initial σ, as diffusers' pipelines do) with ``lax.scan``."""
    timesteps, sigmas, init_sigma = euler_sigmas(config, num_steps)

    def step(x, xs):
        t, sigma, sigma_next = xs
        output = denoise((x.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1)).astype(x.dtype), t)
        return euler_step(config, output, sigma, sigma_next, x), None

    xs = (jnp.asarray(timesteps), jnp.asarray(sigmas[:-1]), jnp.asarray(sigmas[1:]))
    x, _ = jax.lax.scan(step, latents * init_sigma, xs)
    return x


def join_rows(parts: list[jax.Array], groups: int = 1) -> jax.Array:
    """``jnp.concatenate(parts)`` when ``groups`` is 1. With the rows in ``groups`` device blocks, the
    parts are joined block by block (block g of the result is block g of every part), so that each
    device's rows stay on that device."""
    if groups == 1:
        return jnp.concatenate(parts)
    blocks = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]
    joined = jnp.concatenate(blocks, axis=1)
    return joined.reshape(-1, *joined.shape[2:])


def split_rows(x: jax.Array, parts: int, groups: int = 1) -> list[jax.Array]:
    """The inverse of ``join_rows`` for ``parts`` equal parts."""
    if groups == 1:
        return jnp.split(x, parts)
    blocks = jnp.split(x.reshape(groups, -1, *x.shape[1:]), parts, axis=1)
    return [b.reshape(-1, *b.shape[2:]) for b in blocks]


def guided_prediction(unet, unet_params, z, t, cond, uncond, guidance_scale, edit=None, groups: int = 1) -> jax.Array:
    """CFG: one UNet call on [uncond; cond], then u + s·(c − u) with a per-example scale s.

    ``edit`` (``unguide_jax.edits.edit.Edit``, optional) is applied fully to both branches. ``groups``:
    the rows are that many device blocks (``join_rows``).
    """
    out = unet_rows(unet, unet_params, edit, join_rows([z, z], groups), t, join_rows([uncond, cond], groups),
                    groups=groups)
    uncond_out, cond_out = split_rows(out, 2, groups)
    return _cfg(uncond_out, cond_out, guidance_scale)


def _cfg(uncond_out, cond_out, guidance_scale) -> jax.Array:
    scale = jnp.asarray(guidance_scale, jnp.float32).reshape(-1, *([1] * (uncond_out.ndim - 1)))
    uncond_out = uncond_out.astype(jnp.float32)
    return uncond_out + scale * (cond_out.astype(jnp.float32) - uncond_out)


def unguided_prediction(unet, base_params, edit, z, t, cond, uncond, guidance_scale, w, merged=None,
                        groups: int = 1, lora_mix=None) -> jax.Array:
    """UnGuidance (UnGuide, Polowczyk et al., arXiv 2508.05755): w·CFG_base + (1 − w)·CFG_edit, with w, s per example.

    ``merged`` None (fused): the four predictions (base/edit × uncond/cond) in one UNet call on 4B
    rows with a per-row edit strength. ``merged`` = ``fold_weights(base_params, edit)``: two calls on
    2B rows, with the base weights and with the edited weights. ``lora_mix`` (B, L): example b's edit is
    the edit's L LoRAs scaled by lora_mix[b] (K concepts, each prompt with its own; fused or not, the
    LoRAs are applied per row, never folded).
    """
    # The edited rows' strengths: 1 (the whole edit) or, with a mix, each LoRA's own.
    on = jnp.ones((z.shape[0],)) if lora_mix is None else jnp.asarray(lora_mix, jnp.float32)
    if merged is None:
        off = jnp.zeros_like(on)
        strength = join_rows([off, off, on, on], groups)
        out = unet_rows(unet, base_params, edit, join_rows([z, z, z, z], groups), t,
                        join_rows([uncond, cond, uncond, cond], groups), strength, groups=groups)
        base_u, base_c, edit_u, edit_c = split_rows(out, 4, groups)
        base, edited = _cfg(base_u, base_c, guidance_scale), _cfg(edit_u, edit_c, guidance_scale)
    else:
        base = guided_prediction(unet, base_params, z, t, cond, uncond, guidance_scale, groups=groups)
        if lora_mix is None:
            edited = guided_prediction(unet, merged[0], z, t, cond, uncond, guidance_scale, merged[1], groups=groups)
        else:
            out = unet_rows(unet, base_params, edit, join_rows([z, z], groups), t, join_rows([uncond, cond], groups),
                            join_rows([on, on], groups), groups=groups)
            edited = _cfg(*split_rows(out, 2, groups), guidance_scale)
    w = jnp.asarray(w, jnp.float32).reshape(-1, *([1] * (z.ndim - 1)))
    return w * base + (1.0 - w) * edited


def fold_weights(params, edit):
    """(params with the edit's LoRAs and deltas merged in, the rest of the edit: its memory) — done
    once before a step loop, so that the loop applies no weight edit itself."""
    if edit is None or not (edit.loras or edit.deltas):
        return params, edit
    return merge_weights(params, edit), Edit(memory=edit.memory)


@functools.partial(jax.jit, static_argnames=("unet", "config", "num_steps", "eta", "fused", "row_groups", "sampler"),
                   compiler_options=XLA_CPU_OPTIONS)
def sample_latents(
    unet,
    config: SchedulerConfig,
    num_steps: int,
    eta: float,
    unet_params,
    cond: jax.Array,
    uncond: jax.Array,
    latents: jax.Array,
    guidance_scale: jax.Array,
    seeds: jax.Array,
    edit=None,
    w: jax.Array | None = None,
    fused: bool = True,
    row_groups: int = 1,
    lora_mix: jax.Array | None = None,
    sampler: str = "ddim",
) -> jax.Array:
    """Text-to-image DDIM (``sampler="euler"``: Euler) with CFG for a batch of prompts. ``latents`` is x_T (NHWC),
    unit variance.

    Without ``edit``: the model ``unet_params``. With ``edit`` and no ``w``: the edited model. With
    both: UnGuidance between the base and the edited model, ``w`` (B,) per prompt; ``lora_mix`` (B, L)
    then says which of the edit's L LoRAs each prompt's edited branch applies (``unguided_prediction``).
    ``row_groups``: the mesh's data size when the rows are sharded over it (``unguide_jax.parallel.batches``).
    """
    schedule = NoiseSchedule.from_config(config)
    timesteps, prev_timesteps = ddim_timesteps(config, num_steps)
    if w is None:
        params, rest = fold_weights(unet_params, edit)
        denoise = lambda z, t: guided_prediction(unet, params, z, t, cond, uncond, guidance_scale, rest,  # noqa: E731
                                                      row_groups)
    else:
        if edit is None:
            raise ValueError("UnGuidance (w given) needs an edit")
        if lora_mix is not None and not edit.supports_rows:
            raise ValueError("a per-prompt LoRA mix needs an edit without full weight deltas")
        merged = None if fused and edit.supports_rows else fold_weights(unet_params, edit)
        if lora_mix is not None:
            merged = None if fused else (unet_params, edit)  # the mix is applied per row: nothing is folded
        denoise = lambda z, t: unguided_prediction(unet, unet_params, edit, z, t, cond, uncond,  # noqa: E731
                                                   guidance_scale, w, merged, row_groups, lora_mix)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "euler":
        if eta > 0:
            raise ValueError("eta > 0 is DDIM's: the Euler sampler is deterministic")
        return euler_loop(denoise, config, num_steps, latents)
    keys = eta_noise_keys(seeds) if eta > 0 else None
    return ddim_loop(denoise, schedule, config, timesteps, prev_timesteps, latents, eta, keys)
