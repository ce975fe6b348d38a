"""UnGuidance with K edits (issue 38): one w per prompt and edit, from ``erasers.unguide.many_probe``.

    guided = w₀·CFG_base + Σ_k (1 − w_k)·CFG_k,    w₀ = 1 − Σ_k (1 − w_k)

that is CFG_base + Σ_k (1 − w_k)·(CFG_k − CFG_base): each edit's own UnGuidance correction, added up. At
K = 1 it is w·CFG_base + (1 − w)·CFG_edit, today's formula; an edit with w_k = 1 drops out.

Cost: K + 1 CFG pairs per step (each edit's weights merged once before the loop). Applying only the
flagged LoRAs together, as one edit in one fused call, would need a strength per row *and per LoRA*,
which ``edits.edit.apply_unet`` does not have (its strength scales every LoRA of the edit alike).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.pipeline import Generation, StableDiffusion, decode_to_pixels
from unguide_jax.diffusion.sampler import (
    XLA_CPU_OPTIONS,
    ddim_loop,
    eta_noise_keys,
    fold_weights,
    guided_prediction,
    initial_latents,
    unguided_prediction,
)
from unguide_jax.diffusion.schedulers import NoiseSchedule, SchedulerConfig, ddim_timesteps
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy


def many_unguided_prediction(unet, base_params, folded, z, t, cond, uncond, guidance_scale, w,
                             groups: int = 1) -> jax.Array:
    """w₀·CFG_base + Σ_k (1 − w_k)·CFG_k; ``folded``: ``fold_weights(base_params, edit_k)`` per edit, w (B, K)."""
    w = jnp.asarray(w, jnp.float32)
    rows = lambda v: v.reshape(-1, *([1] * (z.ndim - 1)))  # noqa: E731
    base = guided_prediction(unet, base_params, z, t, cond, uncond, guidance_scale, groups=groups)
    # w₀ = w at K = 1 taken as it is, not as 1 − (1 − w): the same floats as the one-edit sampler's.
    keep = w[:, 0] if w.shape[1] == 1 else 1.0 - jnp.sum(1.0 - w, axis=1)
    out = rows(keep) * base
    for k, (params_k, rest_k) in enumerate(folded):
        edited = guided_prediction(unet, params_k, z, t, cond, uncond, guidance_scale, rest_k, groups=groups)
        out = out + rows(1.0 - w[:, k]) * edited
    return out


@functools.partial(jax.jit, static_argnames=("unet", "config", "num_steps", "eta", "fused", "row_groups"),
                   compiler_options=XLA_CPU_OPTIONS)
def sample_latents_many(unet, config: SchedulerConfig, num_steps: int, eta: float, unet_params, cond, uncond,
                        latents, guidance_scale, seeds, edits: tuple, w: jax.Array, fused: bool = True,
                        row_groups: int = 1) -> jax.Array:
    """``sampler.sample_latents`` with K edits and w (B, K). At K = 1 it *is* the one-edit UnGuidance sampler
    (fused or not), so that one edit gives today's images whichever way it is called."""
    schedule = NoiseSchedule.from_config(config)
    timesteps, prev_timesteps = ddim_timesteps(config, num_steps)
    if len(edits) == 1:
        edit = edits[0]
        merged = None if fused and edit.supports_rows else fold_weights(unet_params, edit)
        denoise = lambda z, t: unguided_prediction(unet, unet_params, edit, z, t, cond, uncond,  # noqa: E731
                                                   guidance_scale, w[:, 0], merged, row_groups)
    else:
        folded = [fold_weights(unet_params, e) for e in edits]
        denoise = lambda z, t: many_unguided_prediction(unet, unet_params, folded, z, t, cond, uncond,  # noqa: E731
                                                        guidance_scale, w, row_groups)
    keys = eta_noise_keys(seeds) if eta > 0 else None
    return ddim_loop(denoise, schedule, config, timesteps, prev_timesteps, latents, eta, keys)


def generate_many(sd: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int] | None = None, *, edits,
                  w, guidance_scale: float | Sequence[float] = 7.5, num_steps: int = 50, eta: float = 0.0,
                  height: int | None = None, width: int | None = None, negative_prompt: str = "",
                  fused: bool = True) -> Generation:
    """``StableDiffusion.generate`` with K edits and w (P, K) (``ManyProbeResult.w``): one image per prompt."""
    edits = tuple(edits)
    n = len(prompts)
    w = np.asarray(w, np.float32)
    if w.shape != (n, len(edits)):
        raise ValueError(f"need one w per prompt and edit: {n} prompts x {len(edits)} edits, got w {w.shape}")
    seeds = np.arange(n) if seeds is None else np.asarray(seeds)
    if seeds.shape != (n,):
        raise ValueError(f"need one seed per prompt: {n} prompts, {seeds.size} seeds")
    scales = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,))
    cond = sd.encode_prompts(list(prompts))
    uncond = sd.encode_prompts([negative_prompt] * n)
    latents = initial_latents(seeds, sd.latent_shape(height, width))
    rows = padded_rows(n, sd.mesh)
    z = sample_latents_many(sd.unet, sd.scheduler, num_steps, float(eta), sd.params["unet"], sd.put_rows(cond, rows),
                            sd.put_rows(uncond, rows), sd.put_rows(np.asarray(latents, np.float32), rows),
                            sd.put_rows(scales, rows), sd.put_rows(seeds.astype(np.uint32), rows),
                            sd.put_replicated(edits), sd.put_rows(w, rows), fused=bool(fused), row_groups=sd.data_size)
    pixels = to_numpy(decode_to_pixels(sd.vae, sd.params["vae"], z))[:n]
    images = np.round(pixels * 255).astype(np.uint8)
    settings = dict(num_steps=num_steps, eta=float(eta), negative_prompt=negative_prompt, scheduler="DDIM",
                    height=int(images.shape[1]), width=int(images.shape[2]), edits=len(edits))
    return Generation(images=images, latents=to_numpy(z)[:n], settings=settings)
