"""CLIP text encoder: numerical parity with transformers, CLIP skip, key mapping, config reading."""
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tests import tiny_models
from unguide_jax.loading.convert import (
    ConversionError,
    flax_to_torch,
    key_table,
    torch_to_flax,
)
from unguide_jax.loading.diffusers_folder import text_encoder_state_dict
from unguide_jax.loading.tokenizer import write_clip_tokenizer
from unguide_jax.models.config_io import ConfigError, read_json
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.text_encoder import (
    CLIPTextConfig,
    CLIPTextModel,
    rename_torch_key,
)

ATOL = 1e-4  # fp32 on CPU; observed max abs error ~1.6e-6
PROMPTS = ["a photo of the cat", "the cat of the photo of a cat, phone photo!"]

# stable-diffusion-v1-5 text_encoder/config.json (written by transformers 4.22).
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


@dataclasses.dataclass
class Pair:
    torch_model: torch.nn.Module
    model: CLIPTextModel
    abstract: dict
    params: dict
    disk_dir: Path  # save_pretrained folder of torch_model
    input_ids: np.ndarray  # (2, 77) int64, padded


@pytest.fixture(scope="module")
def te(flavour, tmp_path_factory):
    from transformers import CLIPTokenizer
    torch_model = tiny_models.build_text_encoder(flavour)
    root = tmp_path_factory.mktemp(f"te_{flavour}")
    torch_model.save_pretrained(root / "model")
    model = CLIPTextModel(CLIPTextConfig.from_dict(read_json(root / "model" / "config.json")))
    abstract = abstract_params(model, *model.init_inputs())
    params = torch_to_flax(torch_model.state_dict(), abstract, rename=rename_torch_key)
    pad = "<|endoftext|>" if flavour == "sd1" else "!"
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "tok", tiny_models.TINY_MERGES, pad_token=pad))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids[0, 0] == model.config.bos_token_id and (ids == model.config.eos_token_id).any(axis=1).all()
    assert (ids[:, -1] == model.config.pad_token_id).all()
    return Pair(torch_model, model, abstract, params, root / "model", ids)


def _torch_forward(torch_model, ids: np.ndarray):
    with torch.no_grad():
        return torch_model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)


def _flavour(te) -> str:
    return "sd1" if te.model.config.hidden_act == "quick_gelu" else "sd2"


def _max_err(got, expected) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(expected)).max())


def test_matches_transformers(te):
    ref = _torch_forward(te.torch_model, te.input_ids)
    hidden, pooled = jax.jit(te.model.apply)({"params": te.params}, te.input_ids)
    assert hidden.shape == (2, 77, te.model.config.hidden_size) and pooled.shape == (2, te.model.config.hidden_size)
    assert _max_err(hidden, ref.last_hidden_state.numpy()) < ATOL
    assert _max_err(pooled, ref.pooler_output.numpy()) < ATOL


def test_pooled_legacy_eos_id_2(te):
    """Hub SD configs say eos_token_id=2: transformers then pools at argmax(input_ids)."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    hf = HFModel(HFConfig(**{**tiny_models.text_encoder_kwargs(_flavour(te)), "eos_token_id": 2})).eval()
    hf.load_state_dict(te.torch_model.state_dict())
    ids = te.input_ids.copy()
    ids[:, 2] = 2  # a token with id 2 before EOS: the two pooling rules disagree here
    model = CLIPTextModel(dataclasses.replace(te.model.config, eos_token_id=2))
    _, pooled = model.apply({"params": te.params}, ids)
    assert _max_err(pooled, _torch_forward(hf, ids).pooler_output.numpy()) < ATOL


@pytest.mark.parametrize("skip", [1, 2])
def test_clip_skip_matches_transformers_hidden_states(te, skip):
    ref = _torch_forward(te.torch_model, te.input_ids)
    with torch.no_grad():
        expected = te.torch_model.final_layer_norm(ref.hidden_states[-(skip + 1)]).numpy()
    apply = jax.jit(te.model.apply, static_argnames="skip_last_layers")
    hidden, pooled = apply({"params": te.params}, te.input_ids, skip_last_layers=skip)
    assert _max_err(hidden, expected) < ATOL
    eos = (te.input_ids == te.model.config.eos_token_id).argmax(axis=1)
    # The same values up to rounding: the pooled row and the hidden states may come out of different fusions.
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(hidden)[np.arange(2), eos], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="skip_last_layers"):
        te.model.apply({"params": te.params}, te.input_ids, skip_last_layers=te.model.config.num_hidden_layers)


def _assert_round_trip(state: dict[str, np.ndarray], back: dict[str, np.ndarray]):
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_round_trip_in_memory_keys(te):
    """transformers 5.x builds CLIPTextModel without the `text_model.` prefix: our names exactly."""
    state = {k: v.numpy() for k, v in te.torch_model.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in state)
    assert set(key_table(te.abstract)) == set(state)
    _assert_round_trip(state, flax_to_torch(torch_to_flax(state, te.abstract, rename=rename_torch_key)))


def test_round_trip_on_disk_keys(te, tmp_path):
    # A freshly built model is saved as it is in memory (no prefix) by transformers 5.23...
    fresh = load_file(te.disk_dir / "model.safetensors")
    params = torch_to_flax(fresh, te.abstract, rename=rename_torch_key)
    _assert_round_trip(fresh, flax_to_torch(params))
    # ...while the Hub layout (and what transformers 4.x writes) has `text_model.`: we export that,
    # and transformers loads it back exactly, then saves it again with the same keys.
    from transformers import CLIPTextModel as HFModel
    exported = text_encoder_state_dict(params)
    assert set(exported) == {"text_model." + k for k in fresh}
    te.torch_model.config.save_pretrained(tmp_path / "ours")
    save_file(exported, tmp_path / "ours" / "model.safetensors", metadata={"format": "pt"})
    loaded, info = HFModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    _assert_round_trip(fresh, {k: v.numpy() for k, v in loaded.state_dict().items()})
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    _assert_round_trip(exported, resaved)
    _assert_round_trip(exported, text_encoder_state_dict(torch_to_flax(resaved, te.abstract, rename=rename_torch_key)))


def test_conversion_drops_position_ids_only(te):
    state = {"text_model." + k: v for k, v in te.torch_model.state_dict().items()}
    old = {**state, "text_model.embeddings.position_ids": torch.arange(77)[None]}  # persisted by transformers < 4.31
    assert set(flax_to_torch(torch_to_flax(old, te.abstract, rename=rename_torch_key))) == set(te.torch_model.state_dict())
    with pytest.raises(ConversionError, match=r"unexpected tensors: .*vision_model\.embeddings\.position_ids"):
        torch_to_flax({**state, "vision_model.embeddings.position_ids": torch.arange(77)[None], "logit_scale": torch.zeros(())},
                      te.abstract, rename=rename_torch_key)
    missing = dict(state)
    del missing["text_model.final_layer_norm.bias"]
    with pytest.raises(ConversionError, match=r"missing tensors: final_layer_norm\.bias"):
        torch_to_flax(missing, te.abstract, rename=rename_torch_key)


def test_config_reads_what_transformers_writes(te):
    kwargs = tiny_models.text_encoder_kwargs(_flavour(te))
    expected = dataclasses.replace(CLIPTextConfig(), **kwargs)
    on_disk = read_json(te.disk_dir / "config.json")
    assert CLIPTextConfig.from_dict(on_disk) == te.model.config == expected  # every key written is understood
    assert CLIPTextConfig.from_dict(te.torch_model.config.to_dict()) == expected  # the full dict, too
    hub = CLIPTextConfig.from_dict(SD15_CONFIG)
    assert (hub.hidden_size, hub.eos_token_id, hub.projection_dim) == (768, 2, 768)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        CLIPTextConfig.from_dict({**on_disk, "bogus": 1})
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_dict({**on_disk, "hidden_act": "gelu_new"})
    with pytest.raises(ConfigError, match="is_encoder_decoder"):
        CLIPTextConfig.from_dict({**on_disk, "is_encoder_decoder": True})


def test_bf16_compute_stays_close(te):
    """bf16 compute with fp32 parameters: a smoke check of the dtype plumbing, loose tolerance."""
    ref, ref_pooled = te.model.apply({"params": te.params}, te.input_ids)
    bf16 = CLIPTextModel(te.model.config, dtype=jax.numpy.bfloat16)
    out, pooled = bf16.apply({"params": te.params}, te.input_ids)
    assert out.dtype == pooled.dtype == jax.numpy.bfloat16
    scale = float(np.abs(np.asarray(ref)).max())
    assert _max_err(np.asarray(out, np.float32), ref) < 0.1 * scale
    assert _max_err(np.asarray(pooled, np.float32), ref_pooled) < 0.1 * scale
