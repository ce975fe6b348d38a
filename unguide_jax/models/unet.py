"""UNet2DConditionModel of Stable Diffusion 1.x / 2.x in Flax Linen, NHWC.

Covers what SD1.4/1.5, SD2.0/2.1 base and SD2.1-768 need: cross-attention dim 768/1024, heads as
an int or a per-block list, conv (SD1) or linear (SD2) ``proj_in/proj_out``, upcast attention
(a no-op here: logits and softmax always run in fp32). The prediction type (epsilon or v) is a
scheduler property; the network is the same. SDXL's layout too: per-level transformer depth, a first
level without attention, and the ``text_time`` add-embedding (``added_cond``).

SDXL's conditioning travels as one array, the *packed context*: the cross-attention context with one
more token holding the pooled text embedding and the six micro-conditioning ids (``pack_context``).
Everything between the text encoders and the UNet (samplers, the probe, training, sharding, the edits)
then handles an SDXL prompt as it handles an SD 1.x one: one (B, L, D) array per prompt. The UNet splits
the token off again before any block sees the context (``unpack_context``), so cross-attention and its
LoRAs read the concatenated text-encoder states only, as diffusers' do.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unguide_jax.models.config_io import config_from_dict
from unguide_jax.models.layers import (
    DtypeMixin,
    conv,
    dense,
    group_norm,
    layer_norm,
    multi_head_attention,
    timestep_embedding,
    upsample_nearest,
)

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"

# ``UNet2DConditionModel.remat`` -> jax.checkpoint policy: "blocks" keeps only each block's inputs
# (least memory), "dots" also keeps the matmul/conv outputs without batch dimensions.
REMAT_POLICIES = {
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
TEXT_TIME = "text_time"  # SDXL's addition_embed_type
TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


def size_time_ids(height: int, width: int) -> tuple[int, ...]:
    """The time ids of an image of height x width, uncropped, as diffusers' SDXL pipeline makes them by default:
    original size = target size = (height, width), crop (0, 0)."""
    return (height, width, 0, 0, height, width)


def pooled_width(projection_class_embeddings_input_dim: int, addition_time_embed_dim: int) -> int:
    """The pooled text embedding's width a text_time UNet's add-embedding reads beside the embedded time ids."""
    return projection_class_embeddings_input_dim - TIME_IDS * addition_time_embed_dim


def pack_context(context: jax.Array, text_embeds: jax.Array, time_ids: jax.Array) -> jax.Array:
    """(B, L, D) context, (B, P) pooled text embedding, (B, 6) time ids -> (B, L + 1, D): the last token is
    [text_embeds, time_ids, 0...]. Needs P + 6 <= D (SDXL: 1280 + 6 <= 2048)."""
    batch, _, width = context.shape
    pooled = text_embeds.shape[-1]
    if pooled + TIME_IDS > width:
        raise ValueError(f"a pooled embedding of {pooled} and {TIME_IDS} time ids do not fit in one context token "
                         f"of width {width}")
    token = jnp.concatenate([text_embeds.astype(context.dtype), jnp.asarray(time_ids, context.dtype),
                             jnp.zeros((batch, width - pooled - TIME_IDS), context.dtype)], axis=-1)
    return jnp.concatenate([context, token[:, None]], axis=1)


def unpack_context(packed: jax.Array, pooled: int) -> tuple[jax.Array, dict]:
    """``pack_context``'s inverse: (context (B, L, D), {"text_embeds": (B, pooled), "time_ids": (B, 6)})."""
    token = packed[:, -1]
    return packed[:, :-1], {"text_embeds": token[:, :pooled], "time_ids": token[:, pooled:pooled + TIME_IDS]}


def with_time_ids(packed: jax.Array, pooled: int, time_ids) -> jax.Array:
    """A packed context with its time ids replaced (one row of 6 for all, or one per row)."""
    time_ids = jnp.broadcast_to(jnp.asarray(time_ids, packed.dtype), (packed.shape[0], TIME_IDS))
    return packed.at[:, -1, pooled:pooled + TIME_IDS].set(time_ids)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    # diffusers quirk: in SD configs `attention_head_dim` is the number of heads, unless
    # `num_attention_heads` is given.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding and the six size/crop ids, each id
    # embedded sinusoidally with addition_time_embed_dim channels, go through add_embedding into the time
    # embedding. projection_class_embeddings_input_dim = pooled dim + 6 · addition_time_embed_dim.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        if self.addition_embed_type not in (None, TEXT_TIME):
            raise ValueError(f"unsupported addition_embed_type {self.addition_embed_type!r} (None or {TEXT_TIME!r})")
        if self.addition_embed_type == TEXT_TIME and not (self.addition_time_embed_dim
                                                           and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        for kind in self.down_block_types:
            if kind not in (CROSS_DOWN, PLAIN_DOWN):
                raise ValueError(f"unsupported down block type {kind!r}")
        for kind in self.up_block_types:
            if kind not in (CROSS_UP, PLAIN_UP):
                raise ValueError(f"unsupported up block type {kind!r}")
        for name in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} blocks")

    def _per_block(self, value) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return self._per_block(heads)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return self._per_block(self.transformer_layers_per_block)

    @property
    def pooled_dim(self) -> int | None:
        """The width of the pooled text embedding a text_time (SDXL) UNet takes; None for other UNets."""
        if self.addition_embed_type != TEXT_TIME:
            return None
        return pooled_width(self.projection_class_embeddings_input_dim, self.addition_time_embed_dim)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "unet config") -> "UNetConfig":
        return config_from_dict(cls, raw, required_defaults=_UNET_FIXED, source=source)


# Keys diffusers writes whose non-default values we do not implement.
_UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
    "addition_embed_type_num_heads": 64,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "dual_cross_attention": False, "only_cross_attention": False, "mid_block_only_cross_attention": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": (1, 1.0), "downsample_padding": 1,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": (1, 1.0),
    "attention_type": "default", "dropout": (0, 0.0), "reverse_transformer_layers_per_block": None,
    "use_attention_mask": False,
}


class ResnetBlock(nn.Module, DtypeMixin):
    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self)(x))
        h = conv(self.out_channels, 3, "conv1", self)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", self)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self)(h))
        h = conv(self.out_channels, 3, "conv2", self)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self)(x)
        return x + h


class Attention(nn.Module, DtypeMixin):
    """diffusers ``Attention`` as used in transformer blocks: q/k/v without bias, ``to_out.0`` with."""

    heads: int
    dim_head: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = dense(inner, "to_q", self, use_bias=False)(x)
        k = dense(inner, "to_k", self, use_bias=False)(context)
        v = dense(inner, "to_v", self, use_bias=False)(context)
        return dense(x.shape[-1], "to_out.0", self)(self.attend(q, k, v))

    def attend(self, q, k, v):
        """Heads concatenated, before ``to_out``. A method of its own so that edits can intercept it
        (extra key/value tokens with a per-row mask, activation capture); see ``unguide_jax.edits``."""
        return multi_head_attention(q, k, v, self.heads)


class GEGLU(nn.Module, DtypeMixin):
    inner_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(dense(2 * self.inner_dim, "proj", self)(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module, DtypeMixin):
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net.0")(x)
        return dense(dim, "net.2", self)(h)


class BasicTransformerBlock(nn.Module, DtypeMixin):
    heads: int
    dim_head: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(heads=self.heads, dim_head=self.dim_head, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(**kw, name="attn1")(layer_norm(1e-5, "norm1", self)(x))
        x = x + Attention(**kw, name="attn2")(layer_norm(1e-5, "norm2", self)(x), context)
        x = x + FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(layer_norm(1e-5, "norm3", self)(x))
        return x


class Transformer2D(nn.Module, DtypeMixin):
    heads: int
    groups: int
    num_layers: int
    linear_projection: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        residual = x
        x = group_norm(self.groups, 1e-6, "norm", self)(x)
        if self.linear_projection:
            x = dense(c, "proj_in", self)(x.reshape(b, h * w, c))
        else:
            x = conv(c, 1, "proj_in", self)(x).reshape(b, h * w, c)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                self.heads, c // self.heads, dtype=self.dtype, param_dtype=self.param_dtype,
                name=f"transformer_blocks.{i}",
            )(x, context)
        if self.linear_projection:
            x = dense(c, "proj_out", self)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", self)(x.reshape(b, h, w, c))
        return x + residual


class UNet2DConditionModel(nn.Module, DtypeMixin):
    """``__call__(sample NHWC, timesteps (B,) or scalar, encoder_hidden_states (B, L, D)) -> NHWC``."""

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Gradient checkpointing of every resnet and transformer block (training memory): "" off; a policy
    # of REMAT_POLICIES: what a block keeps for the backward pass, the rest is recomputed. The
    # parameter tree is the same either way.
    remat: str = ""

    def _block(self, cls):
        if not self.remat:
            return cls
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be '' or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        return nn.remat(cls, policy=REMAT_POLICIES[self.remat])

    def _resnet(self, out_channels: int, name: str) -> ResnetBlock:
        return self._block(ResnetBlock)(
            out_channels, self.config.norm_num_groups, self.config.norm_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )

    def _transformer(self, heads: int, layers: int, name: str) -> Transformer2D:
        return self._block(Transformer2D)(
            heads, self.config.norm_num_groups, layers, self.config.use_linear_projection,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )

    def init_inputs(self, batch: int = 1, size: int = 8, context_len: int = 77):
        """Placeholder inputs for ``init``/``eval_shape`` (parameter shapes do not depend on them)."""
        inputs = (
            jnp.zeros((batch, size, size, self.config.in_channels), self.dtype),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, context_len, self.config.cross_attention_dim), self.dtype),
        )
        if self.config.addition_embed_type != TEXT_TIME:
            return inputs
        return inputs + ({"text_embeds": jnp.zeros((batch, self.config.pooled_dim), self.dtype),
                          "time_ids": jnp.zeros((batch, TIME_IDS), jnp.float32)},)

    def _added_embedding(self, added_cond, batch: int) -> jax.Array:
        """SDXL's text_time embedding (diffusers' add_time_proj + add_embedding), added to the time embedding."""
        cfg = self.config
        if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
            raise ValueError("this UNet (addition_embed_type 'text_time') needs added_cond with 'text_embeds' (the "
                             "pooled text embedding) and 'time_ids' (original size, crop, target size: 6 numbers)")
        time_ids = jnp.asarray(added_cond["time_ids"], jnp.float32).reshape(batch, -1)
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                         cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32), time_embeds], axis=-1)
        add = dense(cfg.block_out_channels[0] * 4, "add_embedding.linear_1", self)(add.astype(self.dtype))
        return dense(cfg.block_out_channels[0] * 4, "add_embedding.linear_2", self)(nn.silu(add))

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None):
        """``added_cond``: {"text_embeds" (B, pooled), "time_ids" (B, 6)}, for a text_time (SDXL) UNet only;
        without it such a UNet reads them from ``encoder_hidden_states``' last token (``pack_context``)."""
        cfg = self.config
        if cfg.addition_embed_type == TEXT_TIME and added_cond is None:
            encoder_hidden_states, added_cond = unpack_context(encoder_hidden_states, cfg.pooled_dim)
        channels = cfg.block_out_channels
        heads, tlayers = cfg.heads_per_block, cfg.transformer_layers
        last = len(channels) - 1
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)

        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        temb = dense(channels[0] * 4, "time_embedding.linear_1", self)(temb)
        temb = dense(channels[0] * 4, "time_embedding.linear_2", self)(nn.silu(temb))
        if cfg.addition_embed_type == TEXT_TIME:
            temb = temb + self._added_embedding(added_cond, sample.shape[0])
        elif added_cond is not None:
            raise ValueError("added_cond was given to a UNet without an addition embedding (addition_embed_type None)")

        h = conv(channels[0], 3, "conv_in", self)(sample)
        skips = [h]
        for i, kind in enumerate(cfg.down_block_types):
            prefix = f"down_blocks.{i}"
            for j in range(cfg.layers_per_block):
                h = self._resnet(channels[i], f"{prefix}.resnets.{j}")(h, temb)
                if kind == CROSS_DOWN:
                    h = self._transformer(heads[i], tlayers[i], f"{prefix}.attentions.{j}")(h, context)
                skips.append(h)
            if i != last:
                h = conv(channels[i], 3, f"{prefix}.downsamplers.0.conv", self, stride=2)(h)
                skips.append(h)

        h = self._resnet(channels[-1], "mid_block.resnets.0")(h, temb)
        h = self._transformer(heads[-1], tlayers[-1], "mid_block.attentions.0")(h, context)
        h = self._resnet(channels[-1], "mid_block.resnets.1")(h, temb)

        up_heads, up_tlayers, up_channels = heads[::-1], tlayers[::-1], channels[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            prefix = f"up_blocks.{i}"
            for j in range(cfg.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._resnet(up_channels[i], f"{prefix}.resnets.{j}")(h, temb)
                if kind == CROSS_UP:
                    h = self._transformer(up_heads[i], up_tlayers[i], f"{prefix}.attentions.{j}")(h, context)
            if i != last:
                # Upsample to the next skip's size, which handles sizes that are not powers of two.
                h = upsample_nearest(h, skips[-1].shape[1:3])
                h = conv(up_channels[i], 3, f"{prefix}.upsamplers.0.conv", self)(h)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self)(h))
        return conv(cfg.out_channels, 3, "conv_out", self)(h)
