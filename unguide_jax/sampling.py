"""Jitted sampling: DDIM scanned over steps with classifier-free guidance, per-prompt seeds and scales.

Everything at a jit boundary is explicit: the module and scheduler config are static (hashable),
parameters, embeddings, latents, guidance scales and seeds are arrays.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .schedulers import NoiseSchedule, SchedulerConfig, ddim_step, ddim_timesteps

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (latents, timestep) -> model output


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


def guided_prediction(unet, unet_params, z, t, cond, uncond, guidance_scale) -> jax.Array:
    """CFG: one UNet call on [uncond; cond], then u + s·(c − u) with a per-example scale s."""
    out = unet.apply({"params": unet_params}, jnp.concatenate([z, z]), t, jnp.concatenate([uncond, cond]))
    uncond_out, cond_out = jnp.split(out, 2)
    scale = jnp.asarray(guidance_scale, jnp.float32).reshape(-1, *([1] * (z.ndim - 1)))
    return uncond_out.astype(jnp.float32) + scale * (cond_out.astype(jnp.float32) - uncond_out)


@functools.partial(jax.jit, static_argnames=("unet", "config", "num_steps", "eta"))
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
) -> jax.Array:
    """Text-to-image DDIM with CFG for a batch of prompts. ``latents`` is x_T (NHWC)."""
    schedule = NoiseSchedule.from_config(config)
    timesteps, prev_timesteps = ddim_timesteps(config, num_steps)
    denoise = lambda z, t: guided_prediction(unet, unet_params, z, t, cond, uncond, guidance_scale)  # noqa: E731
    keys = eta_noise_keys(seeds) if eta > 0 else None
    return ddim_loop(denoise, schedule, config, timesteps, prev_timesteps, latents, eta, keys)
