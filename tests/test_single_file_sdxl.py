"""Single-file SDXL base checkpoints (Stability's SGM layout, as ``sd_xl_base_1.0.safetensors``): build one from
the tiny diffusers SDXL pipeline with a diffusers -> SGM key mapping written here, prove that mapping is the
exact inverse of diffusers' own conversion functions, then load the file with ``load_model`` (a config folder,
or a shipped config picked from its tensors) and compare with loading the diffusers folder. The refiner is
refused by name."""
import json
import re
import types

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from tests.test_single_file import (
    UNET,
    VAE,
    assert_params_equal,
    assert_state_dicts_equal,
    clip_to_ldm,
    open_clip_tower_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    with_text_model_prefix,
    without,
)
from tests.tiny_models import TINY_MERGES
from unguide_jax.loading import load_model, sd_configs
from unguide_jax.loading.diffusers_folder import COMPONENTS, load_pipeline, load_tokenizer
from unguide_jax.loading.resolve import describe_model_source
from unguide_jax.loading.single_file import SingleFileError, pick_shipped_config, read_config_folder

CLIP_L, BIG_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
PROMPTS = ["a photo of the cat", "the ph of cat"]
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


def read_sdxl_configs(folder) -> dict:
    return {name: json.loads((folder / name / "config.json").read_text()) for name in COMPONENT_NAMES}


def sdxl_to_sgm(original: dict, configs: dict) -> dict:
    """diffusers SDXL state dicts -> one SGM-layout checkpoint, with the extras the real file carries: CLIP-L's
    position_ids buffer and bigG's logit_scale (both unused)."""
    return {**unet_to_ldm(original["unet"], configs["unet"]), **vae_to_ldm(original["vae"], configs["vae"]),
            **clip_to_ldm(original["text_encoder"], prefix=CLIP_L),
            **open_clip_tower_to_ldm(original["text_encoder_2"], BIG_G), BIG_G + "logit_scale": torch.tensor(4.6)}


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL folder, its diffusers state dicts, the SGM single file made of them, and the reference load."""
    folder, pipe = tiny_sdxl_dir
    configs = read_sdxl_configs(folder)
    original = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
                "text_encoder": with_text_model_prefix(pipe.text_encoder.state_dict()),
                # CLIPTextModelWithProjection keeps its text_model. prefix, and text_projection stays unprefixed
                "text_encoder_2": pipe.text_encoder_2.state_dict()}
    ckpt = {k: v.detach().clone().contiguous() for k, v in sdxl_to_sgm(original, configs).items()}
    path = tmp_path_factory.mktemp("sgm") / "tiny-sdxl.safetensors"
    save_file(ckpt, str(path))
    return {"folder": folder, "configs": configs, "original": original, "ckpt": ckpt, "path": path,
            "ref": load_pipeline(folder)}


def tiny_sdxl_shipped(sdxl, name="tiny-xl") -> sd_configs.ShippedConfig:
    """A shipped-config entry for the tiny SDXL architecture (the real "sdxl-base" fits only full-size files)."""
    folder = sdxl["folder"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return sd_configs.ShippedConfig(
        name=name, description="tiny SDXL", text_kind="sdxl", **sdxl["configs"], scheduler=scheduler,
        pad_token="<|endoftext|>", pad_token_2="!", merges=TINY_MERGES,
    )


def write(path, ckpt) -> str:
    save_file(ckpt, str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------
# the mapping, checked against diffusers
# ----------------------------------------------------------------------------------------------


def test_sgm_mapping_is_the_inverse_of_diffusers_conversion(sdxl):
    """diffusers' forward conversion of the file we wrote (SDXL prefixes) gives back the state dicts exactly."""
    ckpt, configs, original = load_file(str(sdxl["path"])), sdxl["configs"], sdxl["original"]
    assert any(k.startswith(UNET + "label_emb.0.0.") for k in ckpt)  # SGM's name of the text_time add-embedding
    assert_state_dicts_equal(sfu.convert_ldm_unet_checkpoint(ckpt, configs["unet"]), original["unet"])
    assert_state_dicts_equal(sfu.convert_ldm_vae_checkpoint(ckpt, configs["vae"]), original["vae"])
    text = sfu.convert_ldm_clip_checkpoint(ckpt)
    assert text.pop("text_model.embeddings.position_ids").shape == (1, 77)
    assert_state_dicts_equal(text, original["text_encoder"])
    # The qkv split width comes from text_projection's first dimension; the shim's value must not matter.
    shim = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=-1))
    assert_state_dicts_equal(sfu.convert_open_clip_checkpoint(shim, ckpt, prefix=BIG_G), original["text_encoder_2"])


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def test_sdxl_single_file_with_config_folder_loads_like_the_folder(sdxl):
    ref = sdxl["ref"]
    sd = load_model(sdxl["path"], config_folder=sdxl["folder"], clip_skip=1)
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt and sd.clip_skip == 1
    assert_params_equal(sd.params, ref.params)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(sd, part).config == getattr(ref, part).config, part
    assert sd.scheduler == ref.scheduler
    for tokenizer, ref_tokenizer in ((sd.tokenizer, ref.tokenizer), (sd.tokenizer_2, ref.tokenizer_2)):
        np.testing.assert_array_equal(sd.tokenize(PROMPTS, tokenizer), ref.tokenize(PROMPTS, ref_tokenizer))
    assert describe_model_source(sdxl["path"], config_folder=sdxl["folder"])["config"] == str(sdxl["folder"])


def test_sdxl_single_file_picks_the_shipped_config_from_its_tensors(sdxl, monkeypatch):
    with pytest.raises(SingleFileError, match="no shipped config fits .*SDXL's CLIP ViT-L and OpenCLIP bigG.*"
                                              "cross-attention width 64"):
        load_model(sdxl["path"])  # the real sdxl-base fits only a full-size file
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny-xl", tiny_sdxl_shipped(sdxl))
    assert pick_shipped_config(sdxl["path"]).name == "tiny-xl"
    assert describe_model_source(sdxl["path"])["config"] == "tiny-xl"
    sd, ref = load_model(sdxl["path"]), sdxl["ref"]  # through ShippedConfig.write's SDXL folder
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt
    assert_params_equal(sd.params, ref.params)
    assert sd.text_encoder_2.config == ref.text_encoder_2.config and sd.scheduler == ref.scheduler
    np.testing.assert_array_equal(sd.tokenize(PROMPTS, sd.tokenizer_2), ref.tokenize(PROMPTS, ref.tokenizer_2))


def test_shipped_sdxl_base_folder(tmp_path):
    """The "sdxl-base" folder ShippedConfig.write lays out: both configs parse, both tokenizers (CLIP's real ids;
    the second pads with '!', id 0), the SDXL model index."""
    folder = sd_configs.SDXL_BASE.write(tmp_path / "sdxl")
    configs = read_config_folder(folder)
    assert set(configs) == {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"}
    for name in COMPONENT_NAMES:
        COMPONENTS[name].config_cls.from_dict(configs[name], source=name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    one, two = load_tokenizer(folder / "tokenizer"), load_tokenizer(folder / "tokenizer_2")
    ids = [one(["a cat"], padding="max_length", max_length=6).input_ids,
           two(["a cat"], padding="max_length", max_length=6).input_ids]
    assert ids == [[[49406, 320, 2368, 49407, 49407, 49407]], [[49406, 320, 2368, 49407, 0, 0]]]


# ----------------------------------------------------------------------------------------------
# what is refused
# ----------------------------------------------------------------------------------------------


def test_refiner_is_refused_by_name(sdxl, tmp_path):
    """The SDXL refiner: bigG alone, under conditioner.embedders.0.model. (and no CLIP-L)."""
    original, configs = sdxl["original"], sdxl["configs"]
    refiner = {**unet_to_ldm(original["unet"], configs["unet"]), **vae_to_ldm(original["vae"], configs["vae"]),
               **open_clip_tower_to_ldm(original["text_encoder_2"], "conditioner.embedders.0.model.")}
    path = write(tmp_path / "refiner.safetensors", {k: v.contiguous() for k, v in refiner.items()})
    for config_folder in (None, sdxl["folder"], "sdxl-base"):
        with pytest.raises(SingleFileError, match="an SDXL refiner checkpoint .*conditioner.embedders.0.model.*"
                                                  "the refiner is not supported"):
            load_model(path, config_folder=config_folder)


def test_missing_sdxl_encoder_is_named(sdxl, tmp_path):
    for prefix, part in ((CLIP_L, "first text encoder, CLIP ViT-L"), (BIG_G, "second text encoder, OpenCLIP bigG")):
        path = write(tmp_path / "partial.safetensors", without(sdxl["ckpt"], prefix))
        with pytest.raises(SingleFileError, match=f"lacks SDXL's {part} \\({re.escape(prefix)}"):
            load_model(path, config_folder=sdxl["folder"])


def test_sdxl_file_and_sd_folder_do_not_mix(sdxl, tiny_pipeline_dir, tmp_path):
    """Either way round, the mismatch is named before any weight is read."""
    sd1_folder = tiny_pipeline_dir("sd1")[0]
    with pytest.raises(SingleFileError, match="is an SDXL checkpoint .* is not an SDXL layout.*'sdxl-base'"):
        load_model(sdxl["path"], config_folder=sd1_folder)
    sd1_like = tmp_path / "sd1-like.safetensors"
    save_numpy({name: np.zeros((4,), np.float32) for name in (
        UNET + "input_blocks.0.0.bias", VAE + "encoder.conv_in.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias")}, str(sd1_like))
    for config_folder in (sdxl["folder"], "sdxl-base"):
        with pytest.raises(SingleFileError, match="is an SD 1.x/2.x checkpoint .* is an SDXL layout"):
            load_model(sd1_like, config_folder=config_folder)


def test_sdxl_config_folder_without_its_second_encoder(sdxl, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(sdxl["folder"], partial, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(FileNotFoundError, match="missing text_encoder_2/config.json, tokenizer_2/"):
        load_model(sdxl["path"], config_folder=partial)
