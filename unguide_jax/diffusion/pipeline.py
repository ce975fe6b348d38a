"""Prompts -> images with Flax models: the pipeline-level call over the jitted pieces."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.sampler import (
    XLA_CPU_OPTIONS,
    initial_latents,
    sample_latents,
)
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.models.text_encoder import CLIPTextModel
from unguide_jax.models.unet import UNet2DConditionModel
from unguide_jax.models.vae import AutoencoderKL


@functools.partial(jax.jit, static_argnames=("text_encoder", "skip_last_layers"), compiler_options=XLA_CPU_OPTIONS)
def encode_text(text_encoder: CLIPTextModel, params, input_ids: jax.Array, skip_last_layers: int = 0) -> jax.Array:
    hidden, _ = text_encoder.apply({"params": params}, input_ids, skip_last_layers=skip_last_layers)
    return hidden


@functools.partial(jax.jit, static_argnames=("vae",), compiler_options=XLA_CPU_OPTIONS)
def decode_to_pixels(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images in [0, 1], NHWC fp32."""
    images = vae.apply({"params": params}, latents, method=AutoencoderKL.decode_latents)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@dataclasses.dataclass
class Generation:
    images: np.ndarray  # uint8 (B, H, W, 3)
    latents: np.ndarray  # final latents (B, h, w, c), scaled as the UNet sees them
    settings: dict


@dataclasses.dataclass
class StableDiffusion:
    """A loaded text-to-image model: static modules + one parameter pytree.

    ``params`` = {"unet": ..., "text_encoder": ..., "vae": ...}; adapters live elsewhere and are
    applied on top of ``params["unet"]``.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    tokenizer: Any
    scheduler: SchedulerConfig
    params: dict
    clip_skip: int = 0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
        ).input_ids
        return np.asarray(ids, np.int32)

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        return encode_text(self.text_encoder, self.params["text_encoder"], self.tokenize(prompts), self.clip_skip)

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        height, width = height or self.default_size, width or self.default_size
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return height // f, width // f, self.unet.config.in_channels

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        guidance_scale: float | Sequence[float] = 7.5,
        num_steps: int = 50,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
        latents: np.ndarray | None = None,
        edit=None,
        w: float | Sequence[float] | None = None,
        fused: bool = True,
        prompt_embeddings: np.ndarray | None = None,
    ) -> Generation:
        """Generate one image per prompt; prompt i uses ``seeds[i]`` (default: i) and its own scale.

        ``edit`` (``unguide_jax.edits.edit.Edit``): sample the edited model; with ``w`` as well (one per
        prompt, or one for all), UnGuidance w·CFG_base + (1 − w)·CFG_edit. ``fused``: base and edited
        predictions in one UNet call per step (see ``sampling.unguided_prediction``).
        ``prompt_embeddings`` (B, L, D): text-encoder outputs to use instead of encoding ``prompts``.
        """
        n = len(prompts)
        seeds = np.arange(n) if seeds is None else np.asarray(seeds)
        if seeds.shape != (n,):
            raise ValueError(f"need one seed per prompt: {n} prompts, {seeds.size} seeds")
        scales = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,))
        cond = self.encode_prompts(list(prompts)) if prompt_embeddings is None else jnp.asarray(prompt_embeddings)
        if cond.shape[0] != n:
            raise ValueError(f"need one prompt embedding per prompt: {n} prompts, {cond.shape[0]} embeddings")
        uncond = self.encode_prompts([negative_prompt] * n)
        if latents is None:
            # fp32 whatever the compute dtype: the same seed gives the same x_T, and the DDIM state
            # stays fp32 between steps (the UNet casts its own input).
            latents = initial_latents(seeds, self.latent_shape(height, width))
        if w is not None:
            w = jnp.asarray(np.broadcast_to(np.asarray(w, np.float32), (n,)))
        z = sample_latents(
            self.unet, self.scheduler, num_steps, float(eta), self.params["unet"], cond, uncond,
            jnp.asarray(latents, jnp.float32), jnp.asarray(scales), jnp.asarray(seeds, jnp.uint32),
            edit, w, fused=bool(fused),
        )
        pixels = decode_to_pixels(self.vae, self.params["vae"], z)
        images = np.asarray(jnp.round(pixels * 255)).astype(np.uint8)
        settings = dict(num_steps=num_steps, eta=float(eta), negative_prompt=negative_prompt, scheduler="DDIM",
                        height=int(images.shape[1]), width=int(images.shape[2]))
        return Generation(images=images, latents=np.asarray(z), settings=settings)
