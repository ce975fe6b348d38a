"""AutoencoderKL (the Stable Diffusion VAE) in Flax Linen, NHWC.

Numerically diffusers' ``AutoencoderKL``: encoder -> ``quant_conv`` -> diagonal Gaussian
(mean, logvar); ``post_quant_conv`` -> decoder. Images are in [-1, 1]. The UNet works on
*scaled* latents, ``(z - shift_factor) * scaling_factor``; ``encode_latents``/``decode_latents``
apply that, ``encode``/``decode`` do not.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unguide_jax.models.config_io import ConfigError, config_from_dict
from unguide_jax.models.layers import (
    DtypeMixin,
    conv,
    dense,
    group_norm,
    multi_head_attention,
    upsample_nearest,
)
from unguide_jax.models.unet import ResnetBlock

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
EPS = 1e-6  # every GroupNorm of the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # Defaults are diffusers' AutoencoderKL defaults, so a config.json that omits a key means
    # the same here as in diffusers.
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # diffusers runs fp16 VAEs in fp32 when set; kept for round trips
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError("down_block_types, up_block_types and block_out_channels must have the same length")
        for kind in self.down_block_types:
            if kind != DOWN_BLOCK:
                raise ConfigError(f"unsupported down block type {kind!r} (supported: {DOWN_BLOCK!r})")
        for kind in self.up_block_types:
            if kind != UP_BLOCK:
                raise ConfigError(f"unsupported up block type {kind!r} (supported: {UP_BLOCK!r})")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "vae config") -> "VAEConfig":
        return config_from_dict(cls, raw, required_defaults=_VAE_FIXED, source=source)


# Keys diffusers writes whose non-default values we do not implement (latents_mean/std are
# per-channel latent statistics used by other pipelines, never by SD 1.x / 2.x).
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}


class VAEAttention(nn.Module, DtypeMixin):
    """diffusers ``Attention`` in the VAE mid block: GroupNorm, one head over all channels, residual."""

    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, EPS, "group_norm", self)(x).reshape(b, h * w, c)
        q, k, v = (dense(c, name, self)(y) for name in ("to_q", "to_k", "to_v"))
        y = dense(c, "to_out.0", self)(multi_head_attention(q, k, v, heads=1))
        return x + y.reshape(b, h, w, c)


class _VAEHalf(nn.Module, DtypeMixin):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _resnet(self, out_channels: int, name: str) -> ResnetBlock:
        return ResnetBlock(
            out_channels, self.config.norm_num_groups, EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def _mid_block(self, h: jax.Array) -> jax.Array:
        c = self.config.block_out_channels[-1]
        h = self._resnet(c, "mid_block.resnets.0")(h)
        if self.config.mid_block_add_attention:
            h = VAEAttention(
                self.config.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                name="mid_block.attentions.0",
            )(h)
        return self._resnet(c, "mid_block.resnets.1")(h)

    def _norm_act_conv(self, h: jax.Array, features: int) -> jax.Array:
        h = nn.silu(group_norm(self.config.norm_num_groups, EPS, "conv_norm_out", self)(h))
        return conv(features, 3, "conv_out", self)(h)


class Encoder(_VAEHalf):
    """Images -> (mean, logvar) concatenated on channels, before ``quant_conv``."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        h = conv(channels[0], 3, "conv_in", self)(images.astype(self.dtype))
        for i, c in enumerate(channels):
            for j in range(cfg.layers_per_block):
                h = self._resnet(c, f"down_blocks.{i}.resnets.{j}")(h)
            if i != len(channels) - 1:
                # torch pads (0, 1) bottom/right only, then a stride-2 conv without padding.
                h = conv(c, 3, f"down_blocks.{i}.downsamplers.0.conv", self, stride=2, padding=((0, 1), (0, 1)))(h)
        return self._norm_act_conv(self._mid_block(h), 2 * cfg.latent_channels)


class Decoder(_VAEHalf):
    """Latents (after ``post_quant_conv``) -> images."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        h = conv(channels[0], 3, "conv_in", self)(z)
        h = self._mid_block(h)
        for i, c in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                h = self._resnet(c, f"up_blocks.{i}.resnets.{j}")(h)
            if i != len(channels) - 1:
                h = upsample_nearest(h, (2 * h.shape[1], 2 * h.shape[2]))
                h = conv(c, 3, f"up_blocks.{i}.upsamplers.0.conv", self)(h)
        return self._norm_act_conv(h, cfg.out_channels)


class AutoencoderKL(nn.Module, DtypeMixin):
    """``encode(images) -> (mean, logvar)``, ``decode(z) -> images``; NHWC, images in [-1, 1]."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        # setup rather than compact: Linen allows one compact method, and encode/decode are separate entry points.
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, "quant_conv", self)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, "post_quant_conv", self)

    def init_inputs(self, batch: int = 1, size: int | None = None) -> tuple[jax.Array]:
        """Placeholder images for ``init``/``eval_shape`` (parameter shapes do not depend on them)."""
        size = size or 2 ** len(self.config.block_out_channels)  # >= 2 pixels at the deepest level
        return (jnp.zeros((batch, size, size, self.config.in_channels), self.dtype),)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_latents(self, images: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """Images -> scaled latents as the UNet sees them: the posterior mean, or a sample given ``noise``."""
        mean, logvar = self.encode(images)
        z = mean if noise is None else sample_posterior(mean, logvar, noise)
        return scale_latents(z, self.config)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (as the UNet sees them) -> images in [-1, 1]."""
        return self.decode(unscale_latents(latents.astype(self.dtype), self.config))

    def __call__(self, images: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None) -> jax.Array:
        """Encode then decode (diffusers' ``forward``); ``init`` through here creates every parameter."""
        mean, logvar = self.encode(images)
        z = mean
        if sample_posterior:
            if rng is None:
                raise ValueError("sample_posterior=True needs rng")
            z = _sample_posterior(mean, logvar, jax.random.normal(rng, mean.shape, mean.dtype))
        return self.decode(z)


def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior, given standard normal ``noise``."""
    return mean + jnp.exp(0.5 * logvar) * noise


_sample_posterior = sample_posterior  # for AutoencoderKL.__call__, whose flag shadows the name


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the UNet's latent space."""
    if config.shift_factor is not None:
        z = z - config.shift_factor
    return z * config.scaling_factor


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """The UNet's latent space -> VAE latents (inverse of ``scale_latents``)."""
    z = latents / config.scaling_factor
    return z if config.shift_factor is None else z + config.shift_factor


# Pre-0.14 diffusers names of the mid-block attention (diffusers' _fix_state_dict_keys_on_load;
# group_norm kept its name). Very old files store these as 1x1 convs; convert.py accepts that.
_LEGACY_ATTENTION = re.compile(r"^(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_torch_key(key: str) -> str:
    match = _LEGACY_ATTENTION.match(key)
    if match is None:
        return key
    path, old, leaf = match.groups()
    return f"{path}.{_LEGACY_NAMES[old]}.{leaf}"
