"""Configs shipped for single-file SD 1.x / 2.x / SDXL checkpoints, which carry none.

A single-file checkpoint holds weights only. Instead of asking for a diffusers folder of the same
architecture, the four public architectures are known here, as the dicts their diffusers folders
hold (``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1-base``,
``stabilityai/stable-diffusion-2-1``, ``stabilityai/stable-diffusion-xl-base-1.0``), a few KB of
Python in all, so they ship with the package whatever its package-data rules. The tokenizers are not
stored: their 49,408-token vocabulary is built from the CLIP BPE file inside the ``open_clip_torch``
wheel (:mod:`unguide_jax.loading.tokenizer`); SDXL's two differ only in the pad token, as on the Hub.

:meth:`ShippedConfig.write` lays one out as a diffusers folder without weights, which is what
:func:`unguide_jax.loading.single_file.load_single_file` takes as ``config_folder``.

Differences from the Hub files, none changing a float32 forward pass: the scheduler is written as
the DDIM config with the same noise schedule (we sample with DDIM whatever the folder names; SD 1.5
ships a PNDM config); the text encoders' ``bos/eos_token_id`` are CLIP's real 49406/49407 (the Hub
files say 0/2, for which transformers falls back to "EOS is the highest id": the same position);
``upcast_attention`` is on for both SD 2.x configs (the Hub has it on for 2.1-v only; it makes the
attention softmax float32, which matters only with a bf16/fp16 compute dtype). SDXL base's Euler
scheduler is likewise written as DDIM with the same noise schedule, and its second text encoder's
``pad_token_id`` is 0, the id of its tokenizer's pad token "!" (the Hub file says 1; unused by the forward pass).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unguide_jax.json_files import write_json
from unguide_jax.loading.tokenizer import EOS, open_clip_merges, write_clip_tokenizer

DIFFUSERS_VERSION = "0.42.1"
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _unet(cross_attention_dim: int, attention_head_dim, sample_size: int, **extra) -> dict:
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32,
        "norm_eps": 1e-5, "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
        "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP], "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim, "flip_sin_to_cos": True, "freq_shift": 0, **extra,
    }


def _vae(sample_size: int) -> dict:
    return {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": sample_size, "scaling_factor": 0.18215,
    }


def _text_encoder(hidden_size: int, layers: int, heads: int, act: str, pad_token_id: int, projection_dim: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": pad_token_id, "projection_dim": projection_dim,
    }


def _sdxl_unet() -> dict:
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5,
        "down_block_types": [PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN], "up_block_types": [CROSS_UP, CROSS_UP, PLAIN_UP],
        "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    }


def _scheduler(prediction_type: str) -> dict:
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": prediction_type, "steps_offset": 1,
        "set_alpha_to_one": False, "timestep_spacing": "leading", "clip_sample": False,
    }


@dataclasses.dataclass(frozen=True)
class ShippedConfig:
    """One architecture's configs. ``text_kind`` is the single file's text-encoder layout ("clip":
    ``cond_stage_model.transformer.*``, SD 1.x; "open_clip": ``cond_stage_model.model.*``, SD 2.x; "sdxl":
    ``conditioner.embedders.{0,1}.*``, SDXL's two encoders, whose second is ``text_encoder_2``)."""

    name: str
    description: str
    text_kind: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    pad_token: str
    merges: Sequence[tuple[str, str]] | None = None  # None: the real CLIP BPE merges from open_clip
    text_encoder_2: dict | None = None  # SDXL
    pad_token_2: str = "!"

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def signature(self) -> tuple[str, int, int, int]:
        """What a checkpoint's tensors must show to match: (text kind, cross-attention width, UNet
        in_channels, UNet base width)."""
        return (self.text_kind, int(self.unet["cross_attention_dim"]), int(self.unet["in_channels"]),
                int(self.unet["block_out_channels"][0]))

    @property
    def prediction_type(self) -> str:
        return self.scheduler["prediction_type"]

    def configs(self) -> dict[str, dict]:
        out = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "scheduler": self.scheduler}
        return out if self.text_encoder_2 is None else {**out, "text_encoder_2": self.text_encoder_2}

    def write(self, folder: str | Path) -> Path:
        """A diffusers-layout folder without weights: component configs, scheduler, tokenizer(s), model_index."""
        folder = Path(folder)
        for name, config in self.configs().items():
            target = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
            write_json(target, _with_version(config))
        merges = self.merges if self.merges is not None else open_clip_merges()
        write_clip_tokenizer(folder / "tokenizer", merges, pad_token=self.pad_token)
        index = {"_diffusers_version": DIFFUSERS_VERSION, "scheduler": ["diffusers", "DDIMScheduler"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}
        if self.is_sdxl:
            write_clip_tokenizer(folder / "tokenizer_2", merges, pad_token=self.pad_token_2)
            index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                          "tokenizer_2": ["transformers", "CLIPTokenizer"],
                          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
        else:
            index.update({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                          "safety_checker": [None, None], "feature_extractor": [None, None]})
        write_json(folder / "model_index.json", index)
        return folder


def _with_version(config: dict) -> dict[str, Any]:
    return {**config, "_diffusers_version": DIFFUSERS_VERSION} if "_class_name" in config else dict(config)


SD1 = ShippedConfig(
    name="sd1", description="SD 1.x (1.4/1.5 and fine-tunes): 512 px, epsilon prediction, CLIP ViT-L/14 text encoder",
    text_kind="clip", unet=_unet(768, 8, 64), vae=_vae(512),
    text_encoder=_text_encoder(768, 12, 12, "quick_gelu", pad_token_id=49407, projection_dim=768),
    scheduler=_scheduler("epsilon"), pad_token=EOS,
)
_SD2_TEXT = _text_encoder(1024, 23, 16, "gelu", pad_token_id=0, projection_dim=512)  # 23 of OpenCLIP-H's 24 blocks
_SD2_UNET = {"use_linear_projection": True, "upcast_attention": True}
SD2_BASE = ShippedConfig(
    name="sd2-base", description="SD 2.x base (2.0-base, 2.1-base): 512 px, epsilon prediction, OpenCLIP-H text encoder",
    text_kind="open_clip", unet=_unet(1024, [5, 10, 20, 20], 64, **_SD2_UNET), vae=_vae(512),
    text_encoder=_SD2_TEXT, scheduler=_scheduler("epsilon"), pad_token="!",
)
SD2_V = ShippedConfig(
    name="sd2-v", description="SD 2.x 768-v (2.0, 2.1): 768 px, v-prediction, OpenCLIP-H text encoder",
    text_kind="open_clip", unet=_unet(1024, [5, 10, 20, 20], 96, **_SD2_UNET), vae=_vae(768),
    text_encoder=_SD2_TEXT, scheduler=_scheduler("v_prediction"), pad_token="!",
)

SDXL_BASE = ShippedConfig(
    name="sdxl-base", description="SDXL base 1.0 (and fine-tunes): 1024 px, epsilon prediction, CLIP ViT-L/14 and "
                                  "OpenCLIP ViT-bigG/14 text encoders",
    text_kind="sdxl", unet=_sdxl_unet(), vae=dict(_vae(1024), scaling_factor=0.13025),
    text_encoder=_text_encoder(768, 12, 12, "quick_gelu", pad_token_id=49407, projection_dim=768),
    text_encoder_2={**_text_encoder(1280, 32, 20, "gelu", pad_token_id=0, projection_dim=1280),
                    "architectures": ["CLIPTextModelWithProjection"]},
    scheduler=_scheduler("epsilon"), pad_token=EOS,
)

# name -> config; single-file loading picks the one entry whose signature the checkpoint shows, and
# asks for a name when several match (SD 2.x base vs 768-v: same tensors, different prediction type).
SHIPPED_CONFIGS: dict[str, ShippedConfig] = {c.name: c for c in (SD1, SD2_BASE, SD2_V, SDXL_BASE)}
