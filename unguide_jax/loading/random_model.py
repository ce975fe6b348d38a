"""A tiny Stable Diffusion with *random* weights, for smoke runs (`sample.py:smoke`) and tests.

It has the real architecture and folder layout (so loading, sampling and the outputs are
exercised end to end), a byte-level CLIP tokenizer, and produces noise-like images.
"""
from __future__ import annotations

from pathlib import Path

import jax

from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.loading.diffusers_folder import build_module, save_pipeline
from unguide_jax.loading.tokenizer import build_vocab, write_clip_tokenizer
from unguide_jax.models.text_encoder import CLIPTextConfig
from unguide_jax.models.unet import UNetConfig
from unguide_jax.models.vae import VAEConfig

MERGES = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "n"), ("i", "n")]


def tiny_configs():
    vocab = len(build_vocab(MERGES))
    unet = UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                      attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vae = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    sample_size=32)
    return unet, text, vae


def ensure_random_model(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    from transformers import CLIPTokenizer

    tok_dir = write_clip_tokenizer(path / "tokenizer", MERGES)
    configs = dict(zip(("unet", "text_encoder", "vae"), tiny_configs()))
    modules = {name: build_module(name, cfg) for name, cfg in configs.items()}
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {name: jax.jit(m.init)(k, *m.init_inputs())["params"] for (name, m), k in zip(modules.items(), keys)}
    sd = StableDiffusion(unet=modules["unet"], text_encoder=modules["text_encoder"], vae=modules["vae"],
                         tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)), scheduler=SchedulerConfig(),
                         params=params)
    return save_pipeline(sd, path)
