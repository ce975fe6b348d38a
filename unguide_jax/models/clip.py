"""CLIP (transformers' ``CLIPModel``) in Flax Linen: a ViT image tower, the text encoder of
:mod:`.text_encoder`, their projections into the shared space and the learnt logit scale.

Parameter paths spell transformers' ``CLIPModel`` keys (``vision_model.encoder.layers.0.self_attn.q_proj``,
``text_model.final_layer_norm``, ``visual_projection``), so the table-driven converter maps them 1:1.
The two bare ``nn.Parameter``s of the torch model (the class token and ``logit_scale``) have no module
around them; here each lives in a one-leaf module, and ``rename_torch_key`` adds the ``.weight`` that
the converter's table gives such a leaf. Images are NHWC, normalised as CLIP's image processor does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from unguide_jax.models.config_io import ConfigError, config_from_dict
from unguide_jax.models.layers import (
    DtypeMixin,
    layer_norm,
)
from unguide_jax.models.text_encoder import (
    CLIP_IGNORED,
    CLIPEncoderLayer,
    CLIPTextConfig,
    CLIPTextModel,
    check_tower,
)

# The text encoder's ignored keys, and the generation settings transformers 4.x wrote into every sub-config:
# none changes the inference forward pass of CLIP.
_IGNORED = CLIP_IGNORED | frozenset({
    "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_decoder_ids",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "prefix", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
    "torchscript", "typical_p", "use_bfloat16", "gradient_checkpointing",
})
# Generic keys whose other values would change the architecture: they must keep these.
_FIXED = {"is_decoder": False, "is_encoder_decoder": False, "add_cross_attention": False, "pruned_heads": ({},)}
# The vision config inherits token ids it never uses.
_VISION_IGNORED = _IGNORED | {"bos_token_id", "eos_token_id", "pad_token_id"}

BARE_PARAMETERS = ("vision_model.embeddings.class_embedding", "logit_scale")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    # Defaults are transformers' CLIPVisionConfig defaults, so a sparse config reads the same.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # CLIPModel projects with the top-level projection_dim; kept for round trips

    def __post_init__(self):
        check_tower(self)
        if not 0 < self.patch_size <= self.image_size:
            raise ConfigError(f"patch_size={self.patch_size} must be in [1, image_size={self.image_size}]")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "vision config") -> "CLIPVisionConfig":
        return config_from_dict(cls, raw, required_defaults=_FIXED, ignored=_VISION_IGNORED, source=source)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # only the initial value: loaded weights carry the learnt one

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "CLIP config") -> "CLIPConfig":
        """A transformers ``CLIPModel`` config.json, of transformers 4.x or 5.x."""
        raw = dict(raw)
        subs = {}
        for name, sub_cls in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            legacy, current = raw.pop(f"{name}_dict", None), raw.pop(name, None)
            # transformers rebuilds the sub-config from `<name>_dict` alone (its defaults filling the
            # rest) when a file has one, overriding `<name>`: old Hub files depend on that.
            sub = legacy if legacy is not None else (current or {})
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{source}: {name} must be a mapping, got {type(sub).__name__}")
            ignored = _IGNORED if sub_cls is CLIPTextConfig else _VISION_IGNORED
            subs[name] = config_from_dict(sub_cls, sub, required_defaults=_FIXED, ignored=ignored,
                                          source=f"{source}, {name}")
        top_fixed = dict(_FIXED, model_type="clip")
        top = config_from_dict(cls, raw, required_defaults=top_fixed, ignored=_IGNORED - {"model_type"}, source=source)
        return dataclasses.replace(top, **subs)


class _Tensor(nn.Module):
    """A bare torch ``nn.Parameter``: one leaf, named so that the converter has a torch name for it."""

    shape: tuple[int, ...]
    leaf: str
    initializer: Callable
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param(self.leaf, self.initializer, self.shape, self.param_dtype)


class CLIPVisionTransformer(nn.Module, DtypeMixin):
    """``__call__(pixel_values (B, H, W, C)) -> (last_hidden_state (B, 1 + patches, D), pooled (B, D))``.

    ``pooled`` is ``post_layernorm`` of the class token, transformers' ``pooler_output``. H and W must
    be the config's ``image_size``: the position embeddings are not interpolated.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected (batch, {', '.join(map(str, expected))}) (NHWC)")
        p, width = cfg.patch_size, cfg.hidden_size
        x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="embeddings.patch_embedding")(pixel_values.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, width)  # row-major over the patch grid, as torch's flatten(2)
        cls = _Tensor((width,), "embedding", nn.initializers.normal(1.0), self.param_dtype,
                      name="embeddings.class_embedding")()
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, width)), x], axis=1)
        positions = nn.Embed(cfg.num_positions, width, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="embeddings.position_embedding")(jnp.arange(cfg.num_positions))
        x = layer_norm(cfg.layer_norm_eps, "pre_layrnorm", self)(x + positions[None])
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, causal=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"encoder.layers.{i}")(x)
        pooled = layer_norm(cfg.layer_norm_eps, "post_layernorm", self)(x[:, 0])
        return x, pooled


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` over the last axis in fp32, without an epsilon, as transformers' CLIPModel."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module, DtypeMixin):
    """Both towers and their projections. ``__call__(pixel_values, input_ids)`` is transformers'
    forward: ``(logits_per_image (I, T), image_embeds (I, P), text_embeds (T, P))``, the embeddings
    L2-normalised. Evaluators embed images and prompts apart (``image_embeddings``,
    ``text_embeddings``) and score pairs with ``logits_per_image``."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextModel(cfg.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, **kw)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
        self.logit_scale = _Tensor((), "scale", nn.initializers.constant(cfg.logit_scale_init_value), self.param_dtype)

    def init_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array]:
        """Placeholder inputs for ``init``/``eval_shape``."""
        v = self.config.vision_config
        pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
        return pixels, jnp.zeros((batch, self.config.text_config.max_position_embeddings), jnp.int32)

    def image_embeddings(self, pixel_values: jax.Array, normalize: bool = False) -> jax.Array:
        """(B, H, W, C) normalised pixels -> (B, projection_dim): transformers' ``get_image_features``
        (fp32 and unit length with ``normalize``)."""
        embeds = self.visual_projection(self.vision_model(pixel_values)[1])
        return l2_normalize(embeds) if normalize else embeds

    def text_embeddings(self, input_ids: jax.Array, normalize: bool = False) -> jax.Array:
        """(B, L) token ids -> (B, projection_dim): transformers' ``get_text_features``."""
        embeds = self.text_projection(self.text_model(input_ids)[1])
        return l2_normalize(embeds) if normalize else embeds

    def logits_per_image(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """(I, P), (T, P) embeddings, normalised or not -> (I, T) ``exp(logit_scale) * cosine``, fp32."""
        cosine = jnp.einsum("ip,tp->it", l2_normalize(image_embeds), l2_normalize(text_embeds),
                            preferred_element_type=jnp.float32)
        return jnp.exp(self.logit_scale().astype(jnp.float32)) * cosine

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        image_embeds = self.image_embeddings(pixel_values, normalize=True)
        text_embeds = self.text_embeddings(input_ids, normalize=True)
        return self.logits_per_image(image_embeds, text_embeds), image_embeds, text_embeds


def rename_torch_key(key: str) -> str | None:
    """transformers ``CLIPModel`` key -> ours: drops the ``position_ids`` buffers that older files hold,
    and names the leaf of the two bare parameters. Anything else is kept, so a stray tensor is reported
    as unexpected."""
    if key.endswith("embeddings.position_ids"):
        return None
    return f"{key}.weight" if key in BARE_PARAMETERS else key


def torch_key_of(key: str) -> str:
    """The inverse of ``rename_torch_key``: our converter key -> transformers' key."""
    base = key.removesuffix(".weight")
    return base if base in BARE_PARAMETERS else key
