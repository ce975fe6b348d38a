"""UnGuidance with K edits (issue 38): one w per prompt and edit, from ``erasers.unguide.many_probe``.

Three ways to combine the K probes' answers (``COMBINE_RULES``):

  flagged-mean  guided = w·CFG_base + (1 − w)·CFG_F, where F is the set of edits the probe flagged for the
  (default)     prompt (the concepts it carries) and CFG_F the prediction with exactly those LoRAs applied
                together; w = w_erase. A prompt that flags none is pushed away (w = w_keep) from the mean of
                the K LoRAs: each applied at strength 1/K.
  flagged       the same, but a prompt that flags none is pushed away from all K LoRAs together.
  sum           guided = w₀·CFG_base + Σ_k (1 − w_k)·CFG_k, w₀ = 1 − Σ_k (1 − w_k): each edit's own UnGuidance
                correction, added up, every edit with its own CFG pair.

All are w·CFG_base + (1 − w)·CFG_edit at K = 1, today's formula, and ``generate_many`` then runs today's
sampler itself (the same images). The default was chosen on the several-concept table's first split
(docs/results.md, "Several concepts at once"): pushing the prompts that carry no erased concept away from
all K LoRAs together cost them Acc_s as K grew; from their mean it did not. Cost per DDIM step: the flagged
rules are one fused UNet call on 4 rows per image whatever K (each row applies its own LoRAs at its own
strengths: ``edits.edit.apply_unet`` with a (rows, K) strength); "sum" is K + 1 CFG pairs.
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
from unguide_jax.edits.edit import combine as combine_edits
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


COMBINE_RULES = ("flagged", "flagged-mean", "sum")
FLAGGED_RULES = ("flagged", "flagged-mean")  # the rules that apply per prompt the LoRAs it flags


def flagged_guidance(w, flags, combine: str = "flagged-mean") -> tuple[np.ndarray, np.ndarray]:
    """The flagged rules' (w (P,), LoRA mix (P, K)) from the probe's w and flags (P, K).

    A prompt that flags some edits gets their w (w_erase: every flagged edit has the same) and applies only
    those LoRAs; one that flags none gets w_keep and all K LoRAs together ("flagged") or their mean, each at
    strength 1/K ("flagged-mean"). At K = 1 the two are the same."""
    if combine not in FLAGGED_RULES:
        raise ValueError(f"flagged_guidance takes combine {FLAGGED_RULES}, got {combine!r}")
    w = np.asarray(w, np.float32)
    flags = np.asarray(flags, bool)
    if flags.shape != w.shape:
        raise ValueError(f"flags {flags.shape} and w {w.shape} must have the same shape (prompts, edits)")
    any_flag = flags.any(axis=1)
    per_prompt = np.empty(len(w), np.float32)
    for p, (row, flagged) in enumerate(zip(w, flags)):
        chosen = row[flagged] if flagged.any() else row  # none flagged: every edit has w_keep
        if np.any(chosen != chosen[0]):
            raise ValueError(f"prompt {p}: the edits it {'flags' if flagged.any() else 'does not flag'} have "
                             f"different w ({chosen.tolist()}); the flagged rule takes one w_erase and one w_keep")
        per_prompt[p] = chosen[0]
    unflagged = 1.0 if combine == "flagged" else 1.0 / flags.shape[1]
    mix = np.where(any_flag[:, None], flags.astype(np.float32), np.float32(unflagged)).astype(np.float32)
    return per_prompt, mix


def generate_many(sd: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int] | None = None, *, edits,
                  w, flags=None, combine: str = "flagged-mean", guidance_scale: float | Sequence[float] = 7.5,
                  num_steps: int = 50, eta: float = 0.0, height: int | None = None, width: int | None = None,
                  negative_prompt: str = "", fused: bool = True, sampler: str = "ddim") -> Generation:
    """``StableDiffusion.generate`` with K edits and w (P, K) (``ManyProbeResult.w``): one image per prompt.

    ``combine`` (``COMBINE_RULES``): the flagged rules need ``flags`` (P, K) (``ManyProbeResult.flags``); "sum"
    takes w alone. At K = 1 both are the one-edit sampler."""
    edits = tuple(edits)
    n = len(prompts)
    w = np.asarray(w, np.float32)
    if w.shape != (n, len(edits)):
        raise ValueError(f"need one w per prompt and edit: {n} prompts x {len(edits)} edits, got w {w.shape}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if combine in FLAGGED_RULES and len(edits) > 1:
        if flags is None:
            raise ValueError(f'combine="{combine}" needs the probe\'s flags (ManyProbeResult.flags)')
        per_prompt, mix = flagged_guidance(w, flags, combine)
        for k, e in enumerate(edits):
            if e.deltas or e.memory is not None or not e.loras:
                raise ValueError(f'combine="{combine}" applies LoRAs per prompt; edit {k} is not a LoRA edit (it has '
                                 'full weight deltas, a prompt memory or nothing): use combine="sum"')
        # One column per LoRA of the combined edit: an edit made of several LoRAs repeats its column.
        mix = np.repeat(mix, [len(e.loras) for e in edits], axis=1)
        generation = sd.generate(prompts, seeds, guidance_scale=guidance_scale, num_steps=num_steps, eta=eta,
                                 height=height, width=width, negative_prompt=negative_prompt, edit=combine_edits(edits),
                                 w=per_prompt, fused=fused, lora_mix=mix, sampler=sampler)
        generation.settings.update(edits=len(edits), combine=combine)
        return generation
    if sampler != "ddim":
        raise ValueError(f'combine="sum" samples with DDIM only, not {sampler!r}')
    seeds = np.arange(n) if seeds is None else np.asarray(seeds)
    if seeds.shape != (n,):
        raise ValueError(f"need one seed per prompt: {n} prompts, {seeds.size} seeds")
    scales = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,))
    cond, uncond = (sd.sized_context(sd.encode_prompts(p), height, width) for p in (list(prompts), [negative_prompt] * n))
    latents = initial_latents(seeds, sd.latent_shape(height, width))
    rows = padded_rows(n, sd.mesh)
    z = sample_latents_many(sd.unet, sd.scheduler, num_steps, float(eta), sd.params["unet"], sd.put_rows(cond, rows),
                            sd.put_rows(uncond, rows), sd.put_rows(np.asarray(latents, np.float32), rows),
                            sd.put_rows(scales, rows), sd.put_rows(seeds.astype(np.uint32), rows),
                            sd.put_replicated(edits), sd.put_rows(w, rows), fused=bool(fused), row_groups=sd.data_size)
    pixels = to_numpy(decode_to_pixels(sd.vae, sd.params["vae"], z))[:n]
    images = np.round(pixels * 255).astype(np.uint8)
    settings = dict(num_steps=num_steps, eta=float(eta), negative_prompt=negative_prompt, scheduler="DDIM",
                    height=int(images.shape[1]), width=int(images.shape[2]), edits=len(edits),
                    combine=combine)
    return Generation(images=images, latents=to_numpy(z)[:n], settings=settings)
