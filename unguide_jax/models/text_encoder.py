"""CLIP text encoders of Stable Diffusion 1.x (quick_gelu) / 2.x (gelu) / SDXL in Flax Linen.

SDXL has two: CLIP ViT-L (``CLIPTextModel``) and OpenCLIP ViT-bigG with its projection
(``CLIPTextModelWithProjection``); both give the un-normalised hidden states of a layer below the last
(``sdxl_layer``), as diffusers' SDXL pipeline reads ``hidden_states[-(clip_skip + 2)]``.

Parameter paths are transformers' ``CLIPTextModel`` keys without the ``text_model.`` prefix, so the
table-driven converter maps them 1:1. ``rename_torch_key`` accepts both spellings: transformers 5.x
builds the model without the prefix (and saves a freshly built one without it), while files made
by transformers 4.x, including every SD checkpoint on the Hub, have it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unguide_jax.models.config_io import ConfigError, config_from_dict
from unguide_jax.models.layers import (
    DtypeMixin,
    dense,
    layer_norm,
    multi_head_attention,
)

TORCH_PREFIX = "text_model."
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    # Defaults are transformers' CLIPTextConfig defaults, so a sparse config.json reads the same.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    projection_dim: int = 512  # used by CLIPModel's projection only, kept for round trips

    def __post_init__(self):
        check_tower(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "text encoder config") -> "CLIPTextConfig":
        return config_from_dict(cls, raw, required_defaults=_CLIP_FIXED, ignored=CLIP_IGNORED, source=source)


def check_tower(config) -> None:
    """What a CLIP transformer tower (text or vision) needs of its config."""
    if config.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={config.hidden_act!r} is not supported (supported: {ACTIVATIONS!r})")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"hidden_size={config.hidden_size} is not divisible by num_attention_heads="
                          f"{config.num_attention_heads}")


# Bookkeeping, initialisation, training-only (dropout) and output-selection keys: none changes the
# inference forward pass. `torch_dtype`/`dropout` come from transformers 4.x files.
CLIP_IGNORED = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
})
_CLIP_FIXED = {"is_encoder_decoder": False}


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class CLIPEncoderLayer(nn.Module, DtypeMixin):
    """One pre-LN block of a CLIP tower: the text tower's is causal, the vision tower's (``causal=False``)
    lets every patch see every patch."""

    config: Any  # CLIPTextConfig, or the vision tower's config
    causal: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width = cfg.hidden_size
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", self)(x)
        q, k, v = (dense(width, f"self_attn.{n}_proj", self)(h) for n in "qkv")
        h = multi_head_attention(q, k, v, cfg.num_attention_heads, is_causal=self.causal)
        x = x + dense(width, "self_attn.out_proj", self)(h)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", self)(x)
        h = activation(cfg.hidden_act)(dense(cfg.intermediate_size, "mlp.fc1", self)(h))
        return x + dense(width, "mlp.fc2", self)(h)


class CLIPTextModel(nn.Module, DtypeMixin):
    """``__call__(input_ids (B, L), skip_last_layers=0) -> (last_hidden_state (B, L, D), pooled (B, D))``.

    ``skip_last_layers=N`` (diffusers' ``clip_skip``) returns ``final_layer_norm`` of the output of
    layer ``num_hidden_layers - N``; the last N layers are not run. ``pooled`` is gathered from the
    returned sequence at the EOS position, as transformers' ``pooler_output`` (N=0).

    ``sdxl_layer=N`` (SDXL): the hidden states are the output of layer ``num_hidden_layers - 1 - N``
    *without* ``final_layer_norm`` (transformers' ``hidden_states[-(N + 2)]``), and ``pooled`` is the
    full model's ``pooler_output``.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def init_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Placeholder inputs for ``init``/``eval_shape``."""
        return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array, skip_last_layers: int = 0,
                 sdxl_layer: int | None = None) -> tuple[jax.Array, jax.Array]:
        return self._encode(input_ids, skip_last_layers, sdxl_layer)

    def _encode(self, input_ids, skip_last_layers, sdxl_layer):
        cfg = self.config
        if not 0 <= skip_last_layers < cfg.num_hidden_layers:
            raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, {cfg.num_hidden_layers})")
        if sdxl_layer is not None and (skip_last_layers or not 0 <= sdxl_layer < cfg.num_hidden_layers - 1):
            raise ValueError(f"sdxl_layer={sdxl_layer} must be in [0, {cfg.num_hidden_layers - 1}) and comes "
                             "without skip_last_layers")
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = embed(cfg.vocab_size, "embeddings.token_embedding")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "embeddings.position_embedding")(jnp.arange(length))[None]
        hidden = None
        for i in range(cfg.num_hidden_layers - skip_last_layers):
            x = CLIPEncoderLayer(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"encoder.layers.{i}")(x)
            if sdxl_layer is not None and i == cfg.num_hidden_layers - 2 - sdxl_layer:
                hidden = x
        x = layer_norm(cfg.layer_norm_eps, "final_layer_norm", self)(x)
        if cfg.eos_token_id == 2:
            # transformers' legacy rule for configs predating its eos fix (the SD Hub configs
            # say eos_token_id=2): EOS is the highest id in the sequence.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first EOS, 0 if none
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return (x if hidden is None else hidden), pooled


class CLIPTextModelWithProjection(CLIPTextModel):
    """``CLIPTextModel`` whose pooled output goes through ``text_projection`` (no bias): transformers'
    ``CLIPTextModelWithProjection`` (``text_embeds``), SDXL's second text encoder."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, skip_last_layers: int = 0,
                 sdxl_layer: int | None = None) -> tuple[jax.Array, jax.Array]:
        hidden, pooled = self._encode(input_ids, skip_last_layers, sdxl_layer)
        return hidden, dense(self.config.projection_dim, "text_projection", self, use_bias=False)(pooled)


def rename_torch_key(key: str) -> str | None:
    """transformers key (with or without ``text_model.``) -> ours; drops the ``position_ids`` buffer
    that older files contain. Anything else is kept, so a stray tensor is reported as unexpected."""
    key = key.removeprefix(TORCH_PREFIX)
    return None if key == "embeddings.position_ids" else key


def config_to_transformers_dict(config: CLIPTextConfig, architecture: str = "CLIPTextModel") -> dict:
    """The ``config.json`` that ``transformers.<architecture>.from_pretrained`` reads."""
    out = {"architectures": [architecture], "model_type": "clip_text_model"}
    out.update(dataclasses.asdict(config))
    return out
