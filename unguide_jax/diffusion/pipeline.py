"""Prompts -> images with Flax models: the pipeline-level call over the jitted pieces."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.memory import check_fits
from unguide_jax.diffusion.sampler import (
    XLA_CPU_OPTIONS,
    initial_latents,
    sample_latents,
)
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.models.text_encoder import CLIPTextModel, CLIPTextModelWithProjection
from unguide_jax.models.unet import UNet2DConditionModel, pack_context, size_time_ids, with_time_ids
from unguide_jax.models.vae import AutoencoderKL
from unguide_jax.parallel.batches import (
    data_mesh,
    data_size,
    pad_rows,
    padded_rows,
    put_replicated,
    put_rows,
)
from unguide_jax.parallel.hosts import to_numpy
from unguide_jax.parallel.mesh import job_devices


@functools.partial(jax.jit, static_argnames=("text_encoder", "skip_last_layers"), compiler_options=XLA_CPU_OPTIONS)
def encode_text(text_encoder: CLIPTextModel, params, input_ids: jax.Array, skip_last_layers: int = 0) -> jax.Array:
    hidden, _ = text_encoder.apply({"params": params}, input_ids, skip_last_layers=skip_last_layers)
    return hidden


@functools.partial(jax.jit, static_argnames=("text_encoder", "text_encoder_2", "layer"), compiler_options=XLA_CPU_OPTIONS)
def encode_text_sdxl(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection, params, params_2,
                     input_ids, input_ids_2, zero_rows, time_ids, layer: int = 0) -> jax.Array:
    """SDXL's conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` makes it, packed into one
    context (``models.unet.pack_context``): both encoders' hidden states ``hidden_states[-(layer + 2)]``
    concatenated, and the second encoder's projected pooled output. ``zero_rows`` (B,): rows that are all
    zeros instead (``force_zeros_for_empty_prompt``); the time ids stay."""
    hidden, _ = text_encoder.apply({"params": params}, input_ids, sdxl_layer=layer)
    hidden_2, pooled = text_encoder_2.apply({"params": params_2}, input_ids_2, sdxl_layer=layer)
    keep = 1.0 - jnp.asarray(zero_rows, jnp.float32)
    context = jnp.concatenate([hidden, hidden_2], axis=-1) * keep[:, None, None].astype(hidden.dtype)
    pooled = pooled * keep[:, None].astype(pooled.dtype)
    return pack_context(context, pooled, jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (hidden.shape[0], 6)))


@functools.partial(jax.jit, static_argnames=("vae",), compiler_options=XLA_CPU_OPTIONS)
def decode_to_pixels(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
    """Scaled latents -> images in [0, 1], NHWC fp32."""
    images = vae.apply({"params": params}, latents, method=AutoencoderKL.decode_latents)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# Compiled samplers by signature (static settings, argument shapes and placements): compiled ahead so
# that their memory can be checked before they run, and reused like jit's own cache.
_COMPILED_SAMPLERS: dict = {}


@dataclasses.dataclass
class Generation:
    images: np.ndarray  # uint8 (B, H, W, 3)
    latents: np.ndarray  # final latents (B, h, w, c), scaled as the UNet sees them
    settings: dict


@dataclasses.dataclass
class StableDiffusion:
    """A loaded text-to-image model: static modules + one parameter pytree.

    ``params`` = {"unet": ..., "text_encoder": ..., "vae": ...}; adapters live elsewhere and are
    applied on top of ``params["unet"]``. ``mesh``: set by ``on_mesh``, the devices that generation
    shards its rows over (None: the default device).

    SDXL (``is_sdxl``): a second text encoder and tokenizer (``params["text_encoder_2"]``), and a prompt's
    encoding is SDXL's packed context (``models.unet.pack_context``), whose time ids say the default
    size until ``generate`` stamps the size it samples. ``force_zeros_for_empty_prompt`` (the SDXL
    folder's ``model_index.json``): the empty prompt, the unconditional one, is all zeros.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    tokenizer: Any
    scheduler: SchedulerConfig
    params: dict
    clip_skip: int = 0
    mesh: Any = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        return "sdxl" if self.is_sdxl else "sd"

    def attention_context(self, encoded: jax.Array) -> jax.Array:
        """What cross-attention reads of ``encode_prompts``' output: all of it, or for SDXL the text states
        without the packed pooled/time-id token."""
        return encoded[:, :-1] if self.is_sdxl else encoded

    def sized_context(self, encoded: jax.Array, height: int | None, width: int | None) -> jax.Array:
        """``encoded`` with SDXL's time ids for an image of height x width (unchanged for SD 1.x/2.x)."""
        if not self.is_sdxl:
            return encoded
        time_ids = size_time_ids(height or self.default_size, width or self.default_size)
        return with_time_ids(jnp.asarray(encoded), self.unet.config.pooled_dim, time_ids)

    def on_mesh(self, mesh) -> "StableDiffusion":
        """This model with its weights replicated on ``mesh`` (``unguide_jax.parallel.batches.data_mesh``):
        ``generate`` and the w probe then split their rows over the mesh's "data" axis."""
        return dataclasses.replace(self, params=put_replicated(mesh, self.params), mesh=mesh)

    def on_every_device(self) -> "StableDiffusion":
        """On a data mesh over the job's devices (``parallel.mesh.job_devices``) when there are several, else
        unchanged."""
        return self if self.mesh is not None or len(job_devices()) == 1 else self.on_mesh(data_mesh())

    def placement(self) -> dict:
        """Where generation runs, for manifests: device and process counts and the mesh."""
        mesh = {"data": 1, "fsdp": 1} if self.mesh is None else {k: int(v) for k, v in self.mesh.shape.items()}
        devices = 1 if self.mesh is None else int(self.mesh.devices.size)
        return {"devices": devices, "processes": jax.process_count(), "mesh": mesh, "backend": jax.default_backend()}

    @property
    def data_size(self) -> int:
        """How many devices share the rows of a generation call."""
        return data_size(self.mesh)

    def put_rows(self, x, rows: int | None = None) -> jax.Array:
        """``x`` padded to ``rows`` (repeating its last row) and, with a mesh, sharded over its data axis."""
        x = pad_rows(x, x.shape[0] if rows is None else rows)
        return jnp.asarray(x) if self.mesh is None else put_rows(self.mesh, x)

    def put_replicated(self, tree):
        """``tree`` (an edit, the probe's draws) where the weights are."""
        return tree if self.mesh is None or tree is None else put_replicated(self.mesh, tree)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    def _checked_sampler(self, static: dict, args: tuple, height, width):
        """``sample_latents`` compiled for these arguments, after checking (once per shape) that it fits in
        the devices' memory: a request that cannot fit ends in one line, not in an allocator crash."""
        signature = (tuple(sorted(static.items(), key=lambda item: item[0])), jax.tree.structure(args),
                     jax.config.read("jax_disable_most_optimizations"), jax.config.jax_default_matmul_precision,
                     tuple((np.shape(x), getattr(x, "dtype", type(x).__name__), getattr(x, "sharding", None))
                           for x in jax.tree.leaves(args)))
        if signature not in _COMPILED_SAMPLERS:
            compiled = sample_latents.lower(**static, **args).compile()
            rows, (h, w, _) = args["cond"].shape[0], self.latent_shape(height, width)
            f = self.vae_scale_factor
            check_fits(compiled, f"sampling {rows} images of {h * f}x{w * f} px ({rows // self.data_size} per device, "
                       f"{static['num_steps']} steps)", "lower batch_size or the image size, or use more devices")
            _COMPILED_SAMPLERS[signature] = compiled
        return _COMPILED_SAMPLERS[signature]

    def tokenize(self, prompts: Sequence[str], tokenizer=None) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        tokenizer = tokenizer or self.tokenizer
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
        return np.asarray(ids, np.int32)

    def encode_prompts(self, prompts: Sequence[str], empty_is_unconditional: bool = True) -> jax.Array:
        """The text encoders' output for each prompt: (B, 77, D), SDXL's packed (B, 78, D). The empty prompt is
        the unconditional one, which an SDXL model with ``force_zeros_for_empty_prompt`` makes all zeros as its
        pipeline's negative branch does; ``empty_is_unconditional=False`` encodes "" as text."""
        ids = self.tokenize(prompts)
        if not self.is_sdxl:
            return encode_text(self.text_encoder, self.params["text_encoder"], ids, self.clip_skip)
        zero = np.asarray([empty_is_unconditional and self.force_zeros_for_empty_prompt and p == "" for p in prompts],
                          bool)
        time_ids = np.asarray(size_time_ids(self.default_size, self.default_size), np.float32)
        return encode_text_sdxl(self.text_encoder, self.text_encoder_2, self.params["text_encoder"],
                                self.params["text_encoder_2"], ids, self.tokenize(prompts, self.tokenizer_2), zero,
                                time_ids, self.clip_skip)

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
        lora_mix: np.ndarray | None = None,
        sampler: str = "ddim",
    ) -> Generation:
        """Generate one image per prompt; prompt i uses ``seeds[i]`` (default: i) and its own scale.

        ``edit`` (``unguide_jax.edits.edit.Edit``): sample the edited model; with ``w`` as well (one per
        prompt, or one for all), UnGuidance w·CFG_base + (1 − w)·CFG_edit. ``fused``: base and edited
        predictions in one UNet call per step (see ``sampling.unguided_prediction``).
        ``prompt_embeddings`` (B, L, D): text-encoder outputs to use instead of encoding ``prompts``.
        ``lora_mix`` (B, L), with ``w``: which of the edit's L LoRAs prompt b's edited branch applies, and how
        strongly (``diffusion.many_guidance.generate_many``). ``sampler``: "ddim" or "euler" (diffusers'
        ``EulerDiscreteScheduler``, SDXL's default), on the model's noise schedule.
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
        cond, uncond = (self.sized_context(c, height, width) for c in (cond, uncond))
        if latents is None:
            # fp32 whatever the compute dtype: the same seed gives the same x_T, and the DDIM state
            # stays fp32 between steps (the UNet casts its own input).
            latents = initial_latents(seeds, self.latent_shape(height, width))
        rows = padded_rows(n, self.mesh)
        w = None if w is None else self.put_rows(np.broadcast_to(np.asarray(w, np.float32), (n,)), rows)
        static = dict(unet=self.unet, config=self.scheduler, num_steps=num_steps, eta=float(eta), fused=bool(fused),
                      row_groups=self.data_size, sampler=sampler)
        args = dict(unet_params=self.params["unet"], cond=self.put_rows(cond, rows), uncond=self.put_rows(uncond, rows),
                    latents=self.put_rows(np.asarray(latents, np.float32), rows), guidance_scale=self.put_rows(scales, rows),
                    seeds=self.put_rows(seeds.astype(np.uint32), rows), edit=self.put_replicated(edit), w=w)
        if lora_mix is not None:
            if w is None or edit is None:
                raise ValueError("lora_mix is for UnGuidance: give edit and w too")
            mix = np.asarray(lora_mix, np.float32)
            if mix.shape != (n, len(edit.loras)):
                raise ValueError(f"lora_mix needs one row per prompt and one column per LoRA of the edit: "
                                 f"({n}, {len(edit.loras)}), got {mix.shape}")
            args["lora_mix"] = self.put_rows(mix, rows)
        z = self._checked_sampler(static, args, height, width)(**args)
        pixels = to_numpy(decode_to_pixels(self.vae, self.params["vae"], z))[:n]
        images = np.round(pixels * 255).astype(np.uint8)
        settings = dict(num_steps=num_steps, eta=float(eta), negative_prompt=negative_prompt,
                        scheduler={"ddim": "DDIM", "euler": "Euler"}[sampler],
                        height=int(images.shape[1]), width=int(images.shape[2]))
        return Generation(images=images, latents=to_numpy(z)[:n], settings=settings)
