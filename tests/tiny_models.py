"""Tiny random PyTorch reference models (diffusers / transformers), built inside the tests.

Two flavours cover the architecture switches: ``sd1`` (conv proj_in/out, int heads, quick_gelu
text encoder padded with <|endoftext|>, epsilon) and ``sd2`` (linear projection, per-block heads,
upcast attention, gelu text encoder padded with id 0, v-prediction).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from unguide_jax.loading.tokenizer import write_clip_tokenizer

TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o")]
VOCAB_SIZE = 512 + len(TINY_MERGES) + 2
FLAVOURS = ("sd1", "sd2")


def unet_kwargs(flavour: str) -> dict:
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1)
    if flavour == "sd1":
        return dict(common, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)
    return dict(common, block_out_channels=(16, 32, 32), norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=48, attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True)


def text_encoder_kwargs(flavour: str) -> dict:
    common = dict(vocab_size=VOCAB_SIZE, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1)
    if flavour == "sd1":
        return dict(common, hidden_size=32, hidden_act="quick_gelu", pad_token_id=VOCAB_SIZE - 1)
    return dict(common, hidden_size=48, hidden_act="gelu", pad_token_id=0)


def vae_kwargs(flavour: str) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
                block_out_channels=(16, 32) if flavour == "sd1" else (16, 32, 32), norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * (2 if flavour == "sd1" else 3),
                up_block_types=("UpDecoderBlock2D",) * (2 if flavour == "sd1" else 3))


def scheduler_kwargs(flavour: str) -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                prediction_type="epsilon" if flavour == "sd1" else "v_prediction")


def perturb_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (norms near 1), so zero-initialised layers cannot hide a bug."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else p + noise)
    return module.eval()


def build_unet(flavour: str):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return perturb_(UNet2DConditionModel(**unet_kwargs(flavour)))


def build_text_encoder(flavour: str):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(1)
    return perturb_(CLIPTextModel(CLIPTextConfig(**text_encoder_kwargs(flavour))))


def build_vae(flavour: str):
    from diffusers import AutoencoderKL
    torch.manual_seed(2)
    return perturb_(AutoencoderKL(**vae_kwargs(flavour)))


def build_pipeline(flavour: str, tokenizer_dir: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    write_clip_tokenizer(tokenizer_dir, TINY_MERGES, pad_token="<|endoftext|>" if flavour == "sd1" else "!")
    return StableDiffusionPipeline(
        vae=build_vae(flavour), text_encoder=build_text_encoder(flavour),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=build_unet(flavour),
        scheduler=DDIMScheduler(**scheduler_kwargs(flavour)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# SDXL, tiny: a first level without attention, deeper transformers below, linear projections, two text
# encoders (CLIP-L-like quick_gelu, and a bigG-like gelu one with a projection) whose states are concatenated,
# the text_time add-embedding, and SDXL's VAE scaling factor.
SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
                 norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)


def build_sdxl_pipeline(tokenizer_dir: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_clip_tokenizer(tokenizer_dir / "one", TINY_MERGES, pad_token="<|endoftext|>")
    write_clip_tokenizer(tokenizer_dir / "two", TINY_MERGES, pad_token="!")
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**SDXL_UNET))
    torch.manual_seed(1)
    text_encoder = perturb_(CLIPTextModel(CLIPTextConfig(**dict(text_encoder_kwargs("sd1"), hidden_size=32))))
    torch.manual_seed(3)
    config_2 = CLIPTextConfig(**dict(text_encoder_kwargs("sd2"), hidden_size=32, projection_dim=24))
    text_encoder_2 = perturb_(CLIPTextModelWithProjection(config_2))
    torch.manual_seed(2)
    vae = perturb_(AutoencoderKL(**dict(vae_kwargs("sd2"), scaling_factor=0.13025, force_upcast=True)))
    scheduler = DDIMScheduler(**dict(scheduler_kwargs("sd1"), timestep_spacing="leading"))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "one"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir / "two"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def flax_unet(context_dim: int = 16, context_len: int = 5, seed: int = 0):
    """The smallest Flax UNet with cross-attention (one down block, the mid block, one up block) and
    random parameters drawn in numpy from its abstract shapes: Flax's init would cost a compile as
    large as the model's. For tests of our own JAX code that need no PyTorch counterpart."""
    from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
                        cross_attention_dim=context_dim, attention_head_dim=2,
                        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    unet = UNet2DConditionModel(config)
    return unet, random_params(unet, seed, context_len=context_len)


def flax_sdxl_unet(seed: int = 0, remat: str = ""):
    """SDXL's layout at its smallest, in Flax with random parameters (as ``flax_unet``): two levels, the first
    without attention, the second two transformer layers deep, and the text_time add-embedding. It takes the
    packed context (``models.unet.pack_context``) of width 64 with a pooled embedding of 24."""
    from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig

    smallest = dict(SDXL_UNET, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    transformer_layers_per_block=(1, 2))
    unet = UNet2DConditionModel(UNetConfig.from_dict(smallest), remat=remat)
    return unet, random_params(unet, seed)


def random_params(unet, seed: int = 0, **inputs):
    from unguide_jax.models.layers import abstract_params

    abstract = abstract_params(unet, *unet.init_inputs(**inputs))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.05 * rng.standard_normal(leaf.shape), leaf.dtype)
        if name == "bias":
            return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)
