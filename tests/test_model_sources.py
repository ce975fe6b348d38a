"""``load_model``: one entry point for "embedded", a diffusers folder, a single-file checkpoint (with a
config folder or a shipped SD 1.x/2.x/SDXL base config) and a hub id in the local Hugging Face cache (SD 1 and
SDXL). Tiny models built here load to the same parameters as the diffusers folder they came from; the shipped
configs are checked against the real architectures' parameter counts without any weights."""
import dataclasses
import hashlib
import json
import os
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from tests.test_single_file import (
    assert_params_equal,
    clip_to_ldm,
    open_clip_to_ldm,
    open_clip_tower_to_ldm,
    read_configs,
    unet_to_ldm,
    vae_to_ldm,
    with_text_model_prefix,
)
from tests.tiny_models import TINY_MERGES
from unguide_jax.loading import load_model, sd_configs
from unguide_jax.loading.diffusers_folder import COMPONENTS, load_pipeline
from unguide_jax.loading.resolve import (
    EMBEDDED_MODEL,
    ModelNotFound,
    describe_model_source,
    resolve_model_path,
    resolve_model_source,
)
from unguide_jax.loading.single_file import (
    SingleFileError,
    pick_shipped_config,
    shipped_config_for,
)
from unguide_jax.loading.weights import PickledWeightsRefused
from unguide_jax.resources import EMBEDDED_MODEL as SHAPES_EMBEDDED_MODEL

REPO = "tiny-org/tiny-sd"
SDXL_REPO = "tiny-org/tiny-sdxl"
COMMIT_MAIN, COMMIT_V2 = "a" * 40, "b" * 40
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_pipeline_dir):
    """The tiny SD 1 diffusers folder, its parameters as load_pipeline gives them, and its configs."""
    folder, pipe = tiny_pipeline_dir("sd1")
    return {"folder": folder, "pipe": pipe, "ref": load_pipeline(folder), "configs": read_configs(folder)}


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory):
    """The tiny SD 1 model as a single-file (LDM layout) .safetensors checkpoint."""
    pipe, configs = sd1["pipe"], sd1["configs"]
    ckpt = {**unet_to_ldm(pipe.unet.state_dict(), configs["unet"]), **vae_to_ldm(pipe.vae.state_dict(), configs["vae"]),
            **clip_to_ldm(with_text_model_prefix(pipe.text_encoder.state_dict()))}
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in ckpt.items()}, str(path))
    return path


def tiny_shipped(sd1, name, prediction_type="epsilon") -> sd_configs.ShippedConfig:
    """A shipped-config entry for the tiny architecture (the real entries fit only full-size models)."""
    folder = sd1["folder"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return sd_configs.ShippedConfig(
        name=name, description=f"tiny SD 1 ({prediction_type})", text_kind="clip", **sd1["configs"],
        scheduler={**scheduler, "prediction_type": prediction_type}, pad_token="<|endoftext|>", merges=TINY_MERGES,
    )


def _blob(root, data: bytes):
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return blob


def _add_snapshot(storage, commit, files: dict):
    """Lay out a snapshot as huggingface_hub does: files are symlinks into blobs/."""
    for rel, data in files.items():
        target = storage / "snapshots" / commit / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(_blob(storage, data), target.parent), target)


@pytest.fixture(scope="module")
def hub_dir(sd1, tmp_path_factory):
    """A hub cache holding REPO: main (= COMMIT_MAIN, the tiny folder plus fp16 variant weights) and a
    tag v2 (= COMMIT_V2, the same with every UNet weight + 1)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    storage = cache / f"models--{REPO.replace('/', '--')}"
    folder = sd1["folder"]
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for rel in WEIGHT_FILES:
        half = {k: v.astype(np.float16) for k, v in load_numpy(str(folder / rel)).items()}
        tmp = cache.parent / "half.safetensors"
        save_numpy(half, str(tmp))
        files[rel.replace(".safetensors", ".fp16.safetensors")] = tmp.read_bytes()
    _add_snapshot(storage, COMMIT_MAIN, files)
    shifted = {k: v + 1 for k, v in load_numpy(str(folder / WEIGHT_FILES[0])).items()}
    tmp = cache.parent / "shifted.safetensors"
    save_numpy(shifted, str(tmp))
    _add_snapshot(storage, COMMIT_V2, {**files, WEIGHT_FILES[0]: tmp.read_bytes()})
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT_MAIN)
    (storage / "refs" / "v2").write_text(COMMIT_V2)
    return cache


@pytest.fixture(scope="module")
def hub_dir_with_sdxl(hub_dir, tiny_sdxl_dir):
    """hub_dir, plus SDXL_REPO: the tiny SDXL folder as its main snapshot."""
    folder = tiny_sdxl_dir[0]
    storage = hub_dir / f"models--{SDXL_REPO.replace('/', '--')}"
    if not storage.is_dir():
        _add_snapshot(storage, COMMIT_MAIN, {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                                             if p.is_file()})
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(COMMIT_MAIN)
    return hub_dir


@pytest.fixture
def hub_cache(hub_dir, monkeypatch):
    """Point huggingface_hub (its environment variable and its constant, read at import) at hub_dir."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_dir))
    return hub_dir


def flat(params):
    return traverse_util.flatten_dict(params)


# ----------------------------------------------------------------------------------------------
# single-file checkpoints
# ----------------------------------------------------------------------------------------------


def test_single_file_with_config_folder_loads_like_the_folder(sd1, sd1_file):
    sd = load_model(sd1_file, config_folder=sd1["folder"], clip_skip=1)
    assert_params_equal(sd.params, sd1["ref"].params)
    assert sd.clip_skip == 1 and sd.scheduler == sd1["ref"].scheduler


def test_single_file_picks_the_shipped_config_from_its_tensors(sd1, sd1_file, monkeypatch):
    with pytest.raises(SingleFileError, match="no shipped config fits .*cross-attention width 32"):
        load_model(sd1_file)  # only full-size SD 1.x / 2.x are shipped
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny", tiny_shipped(sd1, "tiny"))
    assert pick_shipped_config(sd1_file).name == "tiny"
    sd = load_model(sd1_file)
    ref = sd1["ref"]
    assert_params_equal(sd.params, ref.params)
    assert sd.unet.config == ref.unet.config and sd.text_encoder.config == ref.text_encoder.config
    assert sd.scheduler == ref.scheduler
    np.testing.assert_array_equal(sd.tokenize(["a photo of the cat"]), ref.tokenize(["a photo of the cat"]))
    assert describe_model_source(sd1_file)["config"] == "tiny"


def test_ambiguous_single_file_needs_a_named_config(sd1, sd1_file, monkeypatch):
    """Same tensors, different prediction type (as SD 2.x base vs 768-v): an error naming both; a name picks."""
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny-base", tiny_shipped(sd1, "tiny-base"))
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny-v", tiny_shipped(sd1, "tiny-v", "v_prediction"))
    with pytest.raises(SingleFileError, match="ambiguous.*config_folder='tiny-base'.*config_folder='tiny-v'"):
        load_model(sd1_file)
    sd = load_model(sd1_file, config_folder="tiny-v")
    assert sd.scheduler.prediction_type == "v_prediction"
    assert_params_equal(sd.params, sd1["ref"].params)
    assert describe_model_source(sd1_file)["config"] is None
    assert describe_model_source(sd1_file, config_folder="tiny-v")["config"] == "tiny-v"


def test_shipped_config_error_names_it(sd1, sd1_file, monkeypatch):
    wrong = tiny_shipped(sd1, "tiny-wrong")
    wrong = dataclasses.replace(wrong, text_encoder={**wrong.text_encoder, "intermediate_size": 38})
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny-wrong", wrong)
    with pytest.raises(SingleFileError, match="text encoder does not match the shipped 'tiny-wrong' config's "
                                              "text_encoder/config.json \\(pass config_folder"):
        load_model(sd1_file, config_folder="tiny-wrong")


def _real_ldm_shapes(shipped: sd_configs.ShippedConfig) -> dict:
    """Tensor name -> shape of a real full-size single file, from models built on the meta device, and the
    parameter counts of its UNet, VAE, text encoder (and SDXL's second one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def strip(d):
        return {k: v for k, v in d.items() if not k.startswith("_")}

    def text_config(d):
        return CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})

    with torch.device("meta"):
        models = [UNet2DConditionModel.from_config(strip(shipped.unet)), AutoencoderKL.from_config(strip(shipped.vae)),
                  CLIPTextModel(text_config(shipped.text_encoder))]
        if shipped.is_sdxl:
            models.append(CLIPTextModelWithProjection(text_config(shipped.text_encoder_2)))
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    unet, vae, text = models[:3]
    ckpt = {**unet_to_ldm(unet.state_dict(), shipped.unet), **vae_to_ldm(vae.state_dict(), shipped.vae)}
    text_state = with_text_model_prefix(text.state_dict())
    if shipped.text_kind == "clip":
        ckpt.update(clip_to_ldm(text_state))
    elif shipped.text_kind == "sdxl":  # CLIP-L and bigG (with its projection) under SGM's conditioner.embedders
        ckpt.update(clip_to_ldm(text_state, prefix="conditioner.embedders.0.transformer."))
        ckpt.update(open_clip_tower_to_ldm(models[3].state_dict(), "conditioner.embedders.1.model."))
    else:  # the OpenCLIP renaming only needs shapes: stand-ins for the tower's 24th block come out real-sized
        ckpt.update(open_clip_to_ldm(text_state, shipped.text_encoder))
    return {k: tuple(v.shape) for k, v in ckpt.items()}, counts


def test_shipped_configs_are_the_real_architectures():
    """Parameter counts of SD 1.5 / SD 2.1 / SDXL base 1.0 (UNet, VAE, text encoder(s)), every config key
    understood by our loaders, and the pick from a full-size file's tensor shapes: SD 1.x and SDXL base
    outright, SD 2.x ambiguous."""
    from unguide_jax.diffusion.schedulers import SchedulerConfig

    expected = {"sd1": [859_520_964, 83_653_863, 123_060_480], "sd2-base": [865_910_724, 83_653_863, 340_387_840],
                "sd2-v": [865_910_724, 83_653_863, 340_387_840],
                "sdxl-base": [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]}
    assert set(sd_configs.SHIPPED_CONFIGS) == set(expected)
    for name, shipped in sd_configs.SHIPPED_CONFIGS.items():
        for part in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if shipped.is_sdxl else ()):
            COMPONENTS[part].config_cls.from_dict(shipped.configs()[part], source=name)
        SchedulerConfig.from_dict(shipped.scheduler, source=name)
        shapes, counts = _real_ldm_shapes(shipped)
        assert counts == expected[name], name
        if name in ("sd1", "sdxl-base"):
            assert shipped_config_for(shapes).name == name
        else:
            with pytest.raises(SingleFileError, match="ambiguous.*'sd2-base'.*512 px, epsilon.*'sd2-v'.*v-prediction"):
                shipped_config_for(shapes)
    assert sd_configs.SD2_V.prediction_type == "v_prediction" and sd_configs.SD2_BASE.prediction_type == "epsilon"


def test_shipped_tokenizer_is_clips(tmp_path):
    """The shipped configs' tokenizer is built from open_clip's BPE file: CLIP's real ids; SD 2 pads with '!' (0)."""
    from unguide_jax.loading.diffusers_folder import load_tokenizer

    sd_configs.SD2_V.write(tmp_path / "sd2")
    tokenizer = load_tokenizer(tmp_path / "sd2" / "tokenizer")
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=9).input_ids
    assert ids == [[49406, 320, 1125, 539, 320, 2368, 49407, 0, 0]]
    assert len(tokenizer) == 49408
    assert (tmp_path / "sd2" / "model_index.json").is_file()


def test_unknown_architecture_and_incomplete_files(tmp_path):
    def write(name, tensors):
        path = tmp_path / name
        save_numpy({k: np.zeros(shape, np.float16) for k, shape in tensors.items()}, str(path))
        return path

    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    parts = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    inpaint = write("inpaint.safetensors", {**unet, **parts})
    with pytest.raises(SingleFileError, match="no shipped config fits.*in_channels 9 \\(an inpainting model\\?\\)"):
        load_model(inpaint)
    sdxl = write("sdxl.safetensors", {**unet, "conditioner.embedders.0.x": (4,)})
    with pytest.raises(SingleFileError, match="lacks the VAE .*; SDXL's first text encoder, CLIP ViT-L "
                                              "\\(conditioner.embedders.0.transformer.*; SDXL's second"):
        load_model(sdxl)
    unet_only = write("unet_only.safetensors", unet)
    with pytest.raises(SingleFileError, match="lacks the VAE"):
        load_model(unet_only)


def test_pickled_single_file_needs_allow_pickle(sd1, sd1_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file)), "global_step": 1}, path)
    with pytest.raises(PickledWeightsRefused, match="allow_pickle"):
        load_model(path)
    monkeypatch.setitem(sd_configs.SHIPPED_CONFIGS, "tiny", tiny_shipped(sd1, "tiny"))
    assert pick_shipped_config(path, allow_pickle=True).name == "tiny"  # shapes via a memory-mapped load
    assert_params_equal(load_model(path, allow_pickle=True).params, sd1["ref"].params)


# ----------------------------------------------------------------------------------------------
# hub ids in the local cache
# ----------------------------------------------------------------------------------------------


def test_hub_id_loads_like_the_folder(sd1, hub_cache):
    sd = load_model(REPO)
    assert_params_equal(sd.params, sd1["ref"].params)
    assert sd.scheduler == sd1["ref"].scheduler
    assert describe_model_source(REPO) == {
        "kind": "hub", "spec": REPO, "path": str(hub_cache.resolve() / f"models--tiny-org--tiny-sd/snapshots/{COMMIT_MAIN}"),
        "repo_id": REPO, "revision": "main", "commit": COMMIT_MAIN}
    # callers that take a folder get the snapshot
    assert resolve_model_path(REPO) == resolve_model_source(REPO).path


def test_hub_id_of_an_sdxl_folder_loads_like_the_folder(tiny_sdxl_dir, hub_dir_with_sdxl, hub_cache):
    sd, ref = load_model(SDXL_REPO), load_pipeline(tiny_sdxl_dir[0])
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt
    assert_params_equal(sd.params, ref.params)
    assert sd.text_encoder_2.config == ref.text_encoder_2.config and sd.scheduler == ref.scheduler
    assert describe_model_source(SDXL_REPO)["commit"] == COMMIT_MAIN


def test_hub_variant_and_revision(sd1, hub_cache):
    ref = flat(sd1["ref"].params)
    half = flat(load_model(REPO, variant="fp16").params)
    assert half.keys() == ref.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(half[key], np.asarray(value).astype(np.float16).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bf16.safetensors"):
        load_model(REPO, variant="bf16")

    v2 = load_model(REPO, revision="v2").params
    assert_params_equal(v2["vae"], sd1["ref"].params["vae"])
    shifted = traverse_util.unflatten_dict({k: v + 1 for k, v in flat(sd1["ref"].params["unet"]).items()})
    assert_params_equal(v2["unet"], shifted)
    assert describe_model_source(REPO, revision="v2")["commit"] == COMMIT_V2
    assert resolve_model_source(REPO, revision=COMMIT_V2).path.name == COMMIT_V2  # a commit, no refs/ needed


def test_missing_hub_id_or_revision_names_id_and_cache(hub_cache):
    with pytest.raises(ModelNotFound, match=f"'tiny-org/absent'.*Hugging Face cache at {hub_cache}"):
        load_model("tiny-org/absent")
    with pytest.raises(ModelNotFound, match=f"'{REPO}' \\(revision 'nope'\\).*refs: main, v2"):
        load_model(REPO, revision="nope")
    with pytest.raises(ModelNotFound, match="'tiny-org/absent'"):
        resolve_model_path("tiny-org/absent")


# ----------------------------------------------------------------------------------------------
# folders, "embedded", and what is not a model
# ----------------------------------------------------------------------------------------------


def test_folder_and_embedded_sources(sd1):
    assert resolve_model_source(sd1["folder"]).kind == "folder"
    source = describe_model_source("embedded")
    assert source == {"kind": "embedded", "spec": "embedded", "path": str(EMBEDDED_MODEL)}
    assert EMBEDDED_MODEL == SHAPES_EMBEDDED_MODEL == resolve_model_path("embedded")
    assert_params_equal(load_model(sd1["folder"]).params, sd1["ref"].params)


def test_what_is_not_a_model(sd1, sd1_file, tmp_path):
    with pytest.raises(ModelNotFound, match=f"missing model: {tmp_path / 'nope'} does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFound, match="not a diffusers folder \\(no model_index.json\\); it holds tiny-sd1.safetensors"):
        load_model(sd1_file.parent)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown model file type '.onnx'"):
        load_model(odd)
    with pytest.raises(ValueError, match="revision='v2' applies to hub ids only"):
        load_model(sd1["folder"], revision="v2")
    with pytest.raises(ValueError, match="variant='fp16' applies to diffusers folders and hub ids"):
        load_model(sd1_file, variant="fp16")
    with pytest.raises(ValueError, match="config_folder applies to single-file checkpoints"):
        load_model(sd1["folder"], config_folder="sd1")
    copy = tmp_path / "copy"
    shutil.copytree(sd1["folder"], copy, ignore=shutil.ignore_patterns("model_index.json"))
    with pytest.raises(ModelNotFound, match="no model_index.json"):
        load_model(copy)
