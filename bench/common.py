"""What the benchmarks share: the SD 1.5 UNet configuration and the PyTorch UNet that each side of a
JAX-vs-PyTorch benchmark starts from (``--model embedded`` or ``sd15``)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def embedded_unet_config():
    """(diffusers UNet config dict, where it came from, default latent size) for ``--model embedded``."""
    from unguide_jax.resources import EMBEDDED_MODEL

    config_file = EMBEDDED_MODEL / "unet" / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        return raw, f"shipped weights ({EMBEDDED_MODEL})", raw["sample_size"]
    from unguide_jax.loading.diffusers_folder import component_config_dict
    from unguide_jax.presets import load_config_file
    from unguide_jax.settings import as_config, to_dict
    from unguide_jax.shapes import pretrain
    from unguide_jax.shapes.recipe_config import RecipeConfig

    # The recipe's default preset holds only what differs from RecipeConfig's defaults: resolve it.
    cfg = to_dict(as_config(load_config_file(str(ROOT / "configs" / "embedded.py")), RecipeConfig))
    latent_size = cfg["image_size"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    unet_cfg = pretrain.unet_config(cfg["unet"], latent_size, cfg["vae"]["latent_channels"],
                                    cfg["text_encoder"]["hidden_size"])
    description = "random weights, shipped configuration (no shipped model found)"
    return component_config_dict("unet", unet_cfg), description, latent_size


def build_torch_unet(model: str):
    """-> (diffusers UNet in fp32 on CPU, description, default latent size)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "sd15":
        return UNet2DConditionModel(**SD15_UNET).eval(), "SD 1.5 UNet, random weights", 32
    raw, source, latent_size = embedded_unet_config()
    from unguide_jax.resources import EMBEDDED_MODEL

    if source.startswith("shipped"):
        unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL / "unet", torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel.from_config(raw)
    return unet.eval(), f"embedded shapes UNet, {source}", latent_size
