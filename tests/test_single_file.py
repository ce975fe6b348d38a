"""Single-file (CompVis / LDM layout) checkpoints: build one from the tiny diffusers pipelines with a
diffusers -> LDM key mapping written here, prove that mapping is the exact inverse of diffusers' own
conversion, then load it with ``load_single_file`` and compare with loading the diffusers folder."""
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from flax import traverse_util
from safetensors.torch import load_file, save_file

from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.loading.single_file import SingleFileError, load_single_file
from unguide_jax.loading.weights import PickledWeightsRefused

UNET, VAE, CLIP, OPEN_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."

# ----------------------------------------------------------------------------------------------
# diffusers -> LDM (the inverse of diffusers.loaders.single_file_utils)
# ----------------------------------------------------------------------------------------------

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SDXL's text_time add-embedding (pooled text + time ids), SGM's label_emb
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state, config) -> dict:
    per_block = config["layers_per_block"] + 1  # resnets (+ attentions) and the down/upsampler slot
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * per_block + j
            new = f"input_blocks.{i}.0.{UNET_RESNET[rest]}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", module):
            new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * per_block + j
            new = f"output_blocks.{i}.0.{UNET_RESNET[rest]}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            b = int(m[1])
            new = f"output_blocks.{b * per_block + per_block - 1}.{2 if up_attention[b] else 1}.conv"
        else:
            new = UNET_TOP[module]
        out[f"{UNET}{new}.{leaf}"] = value
    return out


def vae_to_ldm(state, config) -> dict:
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            new = f"{m[1]}.norm_out"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}"
            if leaf == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        else:  # conv_in, conv_out, quant_conv, post_quant_conv
            new = module
        out[f"{VAE}{new}.{leaf}"] = value
    return out


def with_text_model_prefix(state) -> dict:
    """transformers 5 drops the ``text_model.`` prefix from CLIPTextModel's state dict; LDM files have it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def clip_to_ldm(state, prefix=CLIP) -> dict:
    """SD 1.x's text encoder (``prefix``: SDXL's first one is the same model under conditioner.embedders.0.transformer.)."""
    out = {prefix + k: v for k, v in with_text_model_prefix(state).items()}
    # Old checkpoints also carry the position_ids buffer (int64); loaders must ignore it.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def open_clip_tower_to_ldm(state, prefix) -> dict:
    """transformers CLIP text model (with or without ``text_model.``) -> OpenCLIP names under ``prefix``, fused
    qkv; a CLIPTextModelWithProjection's ``text_projection.weight`` (out, in) -> OpenCLIP's ``text_projection``
    (in, out: the tower multiplies from the right)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module == "text_projection":
            out[prefix + "text_projection"] = value.T
        elif module == "embeddings.token_embedding":
            out[prefix + "token_embedding.weight"] = value
        elif module == "embeddings.position_embedding":
            out[prefix + "positional_embedding"] = value
        elif module == "final_layer_norm":
            out[f"{prefix}ln_final.{leaf}"] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj", module):
            parts = [state[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{leaf}"] = torch.cat(parts)
        elif re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj", module):
            continue  # fused above
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)
            out[f"{prefix}transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{leaf}"] = value
    return out


def open_clip_to_ldm(state, config) -> dict:
    """SD 2.x's text encoder in OpenCLIP names, plus the extras SD 2 files carry: one more (unused) final
    resblock, ``text_projection`` and ``logit_scale``."""
    n, width = config["num_hidden_layers"], config["hidden_size"]
    out = open_clip_tower_to_ldm(state, OPEN_CLIP)
    gen = torch.Generator().manual_seed(7)
    for key in [k for k in out if ".resblocks.0." in k]:
        out[key.replace(".resblocks.0.", f".resblocks.{n}.")] = torch.randn(out[key].shape, generator=gen)
    out[OPEN_CLIP + "text_projection"] = torch.randn(width, 32, generator=gen)
    out[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6)
    return out


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


def read_configs(folder):
    import json
    return {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}


@pytest.fixture(scope="module")
def pipeline_folder(tiny_pipeline_dir, tmp_path_factory):
    """flavour -> (diffusers folder, torch pipeline). A copy of the shared tiny folder whose tokenizer/
    also has vocab.json + merges.txt, as real SD folders do (transformers 5 saves only tokenizer.json),
    so the loader's BPE-files path is covered too."""
    cache = {}

    def get(flavour):
        if flavour not in cache:
            shared, pipe = tiny_pipeline_dir(flavour)
            folder = tmp_path_factory.mktemp(f"folder_{flavour}") / "pipeline"
            shutil.copytree(shared, folder)
            for src in (shared.parent / "tokenizer_src").iterdir():
                if not (folder / "tokenizer" / src.name).exists():
                    shutil.copy(src, folder / "tokenizer" / src.name)
            cache[flavour] = (folder, pipe)
        return cache[flavour]

    return get


@pytest.fixture(scope="module")
def ldm_files(pipeline_folder, tmp_path_factory):
    """flavour -> dict(folder, configs, diffusers state dicts, LDM checkpoint tensors, its .safetensors path)."""
    cache = {}

    def get(flavour):
        if flavour not in cache:
            folder, pipe = pipeline_folder(flavour)
            configs = read_configs(folder)
            original = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
                        "text_encoder": with_text_model_prefix(pipe.text_encoder.state_dict())}
            ckpt = {**unet_to_ldm(original["unet"], configs["unet"]), **vae_to_ldm(original["vae"], configs["vae"])}
            if flavour == "sd1":
                ckpt.update(clip_to_ldm(original["text_encoder"]))
            else:
                ckpt.update(open_clip_to_ldm(original["text_encoder"], configs["text_encoder"]))
            ckpt["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # scheduler buffers that LDM files carry
            ckpt = {k: v.detach().clone().contiguous() for k, v in ckpt.items()}
            path = tmp_path_factory.mktemp(f"ldm_{flavour}") / "model.safetensors"
            save_file(ckpt, str(path))
            cache[flavour] = dict(folder=folder, configs=configs, original=original, ckpt=ckpt, path=path)
        return cache[flavour]

    return get


@pytest.fixture(scope="module")
def reference(pipeline_folder):
    cache = {}

    def get(flavour):
        if flavour not in cache:
            cache[flavour] = load_pipeline(pipeline_folder(flavour)[0])
        return cache[flavour]

    return get


def assert_params_equal(got, expected):
    got, expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg="/".join(path))


def assert_state_dicts_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def without(ckpt, *prefixes):
    return {k: v for k, v in ckpt.items() if not k.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


def test_ldm_mapping_is_the_inverse_of_diffusers_conversion(ldm_files, flavour):
    """diffusers' forward conversion of the file we wrote gives back the diffusers state dicts exactly."""
    f = ldm_files(flavour)
    ckpt, configs, original = load_file(str(f["path"])), f["configs"], f["original"]
    assert_state_dicts_equal(sfu.convert_ldm_unet_checkpoint(ckpt, configs["unet"]), original["unet"])
    assert_state_dicts_equal(sfu.convert_ldm_vae_checkpoint(ckpt, configs["vae"]), original["vae"])
    if flavour == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(ckpt)
        assert text.pop("text_model.embeddings.position_ids").shape == (1, 77)
    else:
        shim = type("M", (), {"config": type("C", (), {"hidden_size": configs["text_encoder"]["hidden_size"]})})
        text = sfu.convert_open_clip_checkpoint(shim, ckpt)
        # the surplus last OpenCLIP block (SD 2 uses the penultimate layer) comes through: the loader drops it
        n = configs["text_encoder"]["num_hidden_layers"]
        surplus = [k for k in text if k.startswith(f"text_model.encoder.layers.{n}.")]
        assert len(surplus) == 16
        text = {k: v for k, v in text.items() if k not in surplus}
    assert_state_dicts_equal(text, original["text_encoder"])


def test_single_file_loads_like_the_diffusers_folder(ldm_files, reference, flavour):
    f = ldm_files(flavour)
    ref = reference(flavour)
    sd = load_single_file(f["path"], f["folder"], clip_skip=1)
    assert_params_equal(sd.params, ref.params)
    assert sd.unet.config == ref.unet.config and sd.vae.config == ref.vae.config
    assert sd.text_encoder.config == ref.text_encoder.config
    assert sd.scheduler == ref.scheduler  # prediction type from the folder: v_prediction for sd2
    assert sd.scheduler.prediction_type == ("epsilon" if flavour == "sd1" else "v_prediction")
    assert sd.clip_skip == 1
    np.testing.assert_array_equal(sd.tokenize(["a photo of the cat"]), ref.tokenize(["a photo of the cat"]))


def test_missing_part_is_named(ldm_files, tmp_path):
    ckpt = ldm_files("sd1")["ckpt"]
    folder = ldm_files("sd1")["folder"]
    for prefix, part in ((VAE, "VAE"), (UNET, "UNet"), ("cond_stage_model.", "text encoder")):
        path = tmp_path / f"no_{part}.safetensors"
        save_file(without(ckpt, prefix), str(path))
        with pytest.raises(SingleFileError, match=f"lacks the {part} \\({re.escape(prefix)}"):
            load_single_file(path, folder)


def test_missing_files_fail_early(ldm_files, tmp_path):
    f = ldm_files("sd1")
    with pytest.raises(FileNotFoundError, match="missing checkpoint file"):
        load_single_file(tmp_path / "nope.safetensors", f["folder"])
    with pytest.raises(FileNotFoundError, match="missing config folder"):
        load_single_file(f["path"], tmp_path / "no_folder")
    partial = tmp_path / "partial"
    shutil.copytree(f["folder"], partial, ignore=shutil.ignore_patterns("scheduler", "*.safetensors"))
    with pytest.raises(FileNotFoundError, match="scheduler/scheduler_config.json"):
        load_single_file(f["path"], partial)


def test_config_folder_weights_are_not_needed(ldm_files, reference, tmp_path):
    f = ldm_files("sd1")
    configs_only = tmp_path / "configs_only"
    shutil.copytree(f["folder"], configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    sd = load_single_file(f["path"], configs_only)
    assert_params_equal(sd.params, reference("sd1").params)


def test_pickled_checkpoint_needs_allow_pickle(ldm_files, reference, tmp_path):
    f = ldm_files("sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": f["ckpt"], "global_step": 1}, path)  # the usual LDM .ckpt wrapping
    with pytest.raises(PickledWeightsRefused, match="allow_pickle"):
        load_single_file(path, f["folder"])
    sd = load_single_file(path, f["folder"], allow_pickle=True)
    assert_params_equal(sd.params, reference("sd1").params)


def test_bf16_checkpoint(ldm_files, tmp_path):
    f = ldm_files("sd1")
    path = tmp_path / "model.bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in f["ckpt"].items()}, str(path))
    sd = load_single_file(path, f["folder"], param_dtype=jnp.bfloat16)
    assert_params_equal(sd.params, load_pipeline(f["folder"], param_dtype=jnp.bfloat16).params)


def test_extract_ema(ldm_files, reference, tmp_path):
    """With ``extract_ema`` the UNet comes from the ``model_ema.*`` copy (flattened LDM names), else not."""
    f = ldm_files("sd1")
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in f["ckpt"].items() if k.startswith(UNET)}
    path = tmp_path / "with_ema.safetensors"
    save_file({**f["ckpt"], **ema}, str(path))
    ref = reference("sd1").params
    plain = load_single_file(path, f["folder"])
    assert_params_equal(plain.params, ref)
    sd = load_single_file(path, f["folder"], extract_ema=True)
    assert_params_equal(sd.params["vae"], ref["vae"])
    expected_unet = {k: v + 1 for k, v in traverse_util.flatten_dict(ref["unet"]).items()}
    assert_params_equal(sd.params["unet"], traverse_util.unflatten_dict(expected_unet))


def test_config_folder_of_another_architecture_is_an_error(ldm_files, pipeline_folder):
    sd2_folder = pipeline_folder("sd2")[0]
    with pytest.raises(SingleFileError, match="does not match .*unet/config.json"):
        load_single_file(ldm_files("sd1")["path"], sd2_folder)
