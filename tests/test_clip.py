"""CLIP in Flax: numerical parity with transformers' CLIPModel (quick_gelu and gelu), loading a
save_pretrained folder, a single file and a hub id, config reading, and the JAX image preprocessing
against CLIPImageProcessor (Pillow's resize, pixel for pixel)."""
import dataclasses
import json
from pathlib import Path

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file, save_file

from tests import tiny_models
from unguide_jax.loading.clip import (
    BICUBIC,
    BILINEAR,
    BOX,
    HAMMING,
    LANCZOS,
    CLIPImageProcessing,
    load_clip,
    pil_vertical_first,
    preprocess_images,
    read_image_processing,
    resize_like_pil,
)
from unguide_jax.loading.convert import ConversionError, flax_to_torch
from unguide_jax.loading.resolve import ModelNotFound
from unguide_jax.loading.tokenizer import write_clip_tokenizer
from unguide_jax.loading.weights import PickledWeightsRefused
from unguide_jax.models.clip import CLIPConfig, torch_key_of
from unguide_jax.models.config_io import ConfigError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-4  # fp32 on CPU; observed max abs error ~2.4e-6 on logits of magnitude ~6
ACTIVATIONS = ("quick_gelu", "gelu")
VOCAB, LENGTH, EOS = 99, 16, 98
TINY_PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def torch_clip(act: str):
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act=act)
    # quick_gelu: the legacy eos_token_id=2 of the openai configs (pooling at the highest id);
    # gelu: pooling at the first eos_token_id.
    text = dict(common, vocab_size=VOCAB, max_position_embeddings=LENGTH, bos_token_id=0, pad_token_id=1,
                eos_token_id=2 if act == "quick_gelu" else EOS)
    config = transformers.CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8),
                                     projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # away from the unit LayerNorms and zero biases of a fresh init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@dataclasses.dataclass
class Pair:
    torch_model: torch.nn.Module
    folder: Path
    loaded: object  # LoadedCLIP


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """act -> Pair: the torch model, its save_pretrained folder, and that folder loaded by load_clip. The
    quick_gelu folder has a preprocessor_config.json, the gelu one transformers 5's processor_config.json."""
    cache = {}

    def get(act: str) -> Pair:
        if act not in cache:
            model = torch_clip(act)
            folder = tmp_path_factory.mktemp(f"clip_{act}") / "model"
            model.save_pretrained(folder)
            processor = transformers.CLIPImageProcessorPil(**TINY_PROCESSOR)
            if act == "quick_gelu":
                processor.save_pretrained(folder)
            else:
                tokenizer_dir = write_clip_tokenizer(folder.parent / "tok", tiny_models.TINY_MERGES)
                tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
                transformers.CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
            cache[act] = Pair(model, folder, load_clip(folder))
        return cache[act]

    return get


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(3, EOS, (3, LENGTH))
    ids[:, 0] = 0
    for row, end in enumerate((5, LENGTH - 1, 9)):
        ids[row, end] = EOS
        ids[row, end + 1:] = 1
    return pixels, ids


def max_err(got, expected) -> float:
    return float(np.abs(np.asarray(got) - expected.detach().numpy()).max())


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_parity_with_transformers(built, act):
    pair = built(act)
    model, params = pair.loaded.model, {"params": pair.loaded.params}
    pixels, ids = inputs()

    @jax.jit
    def run(params, pixels, ids):
        return (model.apply(params, pixels, ids), model.apply(params, pixels, method="image_embeddings"),
                model.apply(params, ids, method="text_embeddings"))

    (logits, image_embeds, text_embeds), image_features, text_features = run(params, pixels, ids)
    px, tid = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids)
    with torch.no_grad():
        out = pair.torch_model(input_ids=tid, pixel_values=px)
        expected_image = pair.torch_model.get_image_features(pixel_values=px).pooler_output
        expected_text = pair.torch_model.get_text_features(input_ids=tid).pooler_output
    errors = {
        "image_features": max_err(image_features, expected_image), "text_features": max_err(text_features, expected_text),
        "image_embeds": max_err(image_embeds, out.image_embeds), "text_embeds": max_err(text_embeds, out.text_embeds),
        "logits_per_image": max_err(logits, out.logits_per_image),
    }
    assert max(errors.values()) < ATOL, errors
    assert logits.shape == (2, 3) and float(np.abs(np.asarray(logits)).max()) > 1.0  # not a vacuous comparison
    # embeddings normalised on request; logits from unnormalised ones are the same
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image_embeds), axis=-1), 1.0, rtol=1e-6)
    again = model.apply(params, image_features, text_features, method="logits_per_image")
    np.testing.assert_allclose(np.asarray(again), np.asarray(logits), atol=1e-5)


def test_loaded_params_are_the_state_dict(built):
    """Every tensor of the save_pretrained folder lands in the Flax tree, and converts back unchanged."""
    pair = built("quick_gelu")
    back = {torch_key_of(k): v for k, v in flax_to_torch(pair.loaded.params).items()}
    expected = {k: v.numpy() for k, v in pair.torch_model.state_dict().items()}
    assert set(back) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert pair.loaded.weights == pair.folder / "model.safetensors"
    assert pair.loaded.processing == CLIPImageProcessing(size=32, crop_size=(32, 32))
    assert built("gelu").loaded.processing == CLIPImageProcessing(size=32, crop_size=(32, 32))  # processor_config.json


def _same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]))


def test_single_file_pickle_and_hub_cache(built, tmp_path, monkeypatch):
    pair = built("quick_gelu")
    weights = pair.folder / "model.safetensors"
    alone = tmp_path / "clip.safetensors"
    alone.write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match="needs config_folder"):
        load_clip(alone)
    _same_params(load_clip(alone, config_folder=pair.folder).params, pair.loaded.params)
    with pytest.raises(ValueError, match="config_folder applies to a single weights file"):
        load_clip(pair.folder, config_folder=pair.folder)

    # pytorch_model.bin: refused without allow_pickle, the same params with it
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((pair.folder / "config.json").read_text())
    torch.save(pair.torch_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PickledWeightsRefused, match="pytorch_model.bin"):
        load_clip(pickled)
    _same_params(load_clip(pickled, allow_pickle=True).params, pair.loaded.params)
    assert load_clip(pickled, allow_pickle=True).processing == CLIPImageProcessing()  # no preprocessor file: defaults

    # a hub id found in the local cache (laid out as huggingface_hub does, minus the blob symlinks)
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-clip" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in pair.folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--tiny-org--tiny-clip" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_hub = load_clip("tiny-org/tiny-clip")
    assert from_hub.weights == snapshot / "model.safetensors"
    _same_params(from_hub.params, pair.loaded.params)
    with pytest.raises(ModelNotFound, match="'tiny-org/absent'"):
        load_clip("tiny-org/absent")


def test_errors_name_the_file_and_the_tensor(built, tmp_path):
    pair = built("quick_gelu")
    with pytest.raises(FileNotFoundError, match=f"missing config file: {tmp_path}/config.json"):
        load_clip(tmp_path)
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_clip(tmp_path / "absent")
    (tmp_path / "config.json").write_text((pair.folder / "config.json").read_text())
    state = load_file(str(pair.folder / "model.safetensors"))
    broken = dict(state, **{"vision_model.extra.weight": np.zeros(3, np.float32)})
    del broken["text_projection.weight"]
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        load_clip(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "missing tensors: text_projection.weight" in message and "unexpected tensors: vision_model.extra.weight" in message


# --- configs -------------------------------------------------------------------------------------------

# The shape of openai/clip-vit-large-patch14's config.json (transformers 4.x): every generic
# PretrainedConfig key in each sub-config, and `*_config_dict`s that override them.
_LEGACY_GENERIC = {
    "add_cross_attention": False, "architectures": None, "bad_words_ids": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": True,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False, "typical_p": 1.0,
    "use_bfloat16": False, "initializer_factor": 1.0, "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0,
    "_name_or_path": "", "transformers_version": "4.21.3",
}
LEGACY_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPModel"], "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": None,
    "text_config": dict(_LEGACY_GENERIC, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="quick_gelu",
                        hidden_size=512, intermediate_size=2048, layer_norm_eps=1e-5, max_position_embeddings=77,
                        model_type="clip_text_model", num_attention_heads=8, num_hidden_layers=12, projection_dim=768,
                        vocab_size=49408),
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": dict(_LEGACY_GENERIC, bos_token_id=None, eos_token_id=None, pad_token_id=None, hidden_act="quick_gelu",
                          hidden_size=768, image_size=224, intermediate_size=3072, layer_norm_eps=1e-5,
                          model_type="clip_vision_model", num_attention_heads=12, num_channels=3, num_hidden_layers=12,
                          patch_size=32, projection_dim=768),
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}


def test_legacy_config_reads_as_transformers_reads_it():
    ours = CLIPConfig.from_dict(LEGACY_CONFIG)
    theirs = transformers.CLIPConfig.from_dict(json.loads(json.dumps(LEGACY_CONFIG)))
    for sub, ref in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
        for field in dataclasses.fields(sub):
            assert getattr(sub, field.name) == getattr(ref, field.name), field.name
    assert (ours.vision_config.hidden_size, ours.vision_config.patch_size, ours.text_config.hidden_size) == (1024, 14, 768)
    assert ours.projection_dim == theirs.projection_dim == 768


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="vision_config.*unknown key 'use_rope'"):
        CLIPConfig.from_dict({"vision_config": {"use_rope": True}}, source="x/config.json")
    with pytest.raises(ConfigError, match="x/config.json.*model_type='siglip'"):
        CLIPConfig.from_dict({"model_type": "siglip"}, source="x/config.json")
    with pytest.raises(ConfigError, match="text_config.*pruned_heads"):
        CLIPConfig.from_dict({"text_config": {"pruned_heads": {"0": [1]}}})
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        CLIPConfig.from_dict({"vision_config": {"hidden_act": "relu"}})


def test_image_processing_configs(tmp_path):
    # transformers 4.x CLIPFeatureExtractor files: ints for size and crop
    old = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    assert CLIPImageProcessing.from_dict(old) == CLIPImageProcessing()
    assert read_image_processing(tmp_path) == CLIPImageProcessing()
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": dict(old, size={"height": 40, "width": 30},
                                                                                        do_center_crop=False, resample=2)}))
    assert read_image_processing(tmp_path) == CLIPImageProcessing(size=(40, 30), crop_size=None, resample=BILINEAR)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(old, do_normalize=False, crop_pct=0.9)))
    with pytest.raises(ConfigError, match="preprocessor_config.json.*crop_pct"):
        read_image_processing(tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'do_magic'"):
        CLIPImageProcessing.from_dict({"do_magic": True})
    with pytest.raises(ConfigError, match="resample=0"):
        CLIPImageProcessing.from_dict({"resample": 0})
    with pytest.raises(ConfigError, match="longest_edge"):
        CLIPImageProcessing.from_dict({"size": {"shortest_edge": 224, "longest_edge": 448}})


# --- preprocessing ---------------------------------------------------------------------------------------

def _smooth(h: int, w: int, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.clip(np.stack([128 + 120 * np.sin(x / 7.0 + c + phase) * np.cos(y / 5.0 - c) for c in range(3)], -1),
                   0, 255).astype(np.uint8)


def _images(h: int, w: int, seed: int) -> np.ndarray:
    """One random and one smooth image, (2, h, w, 3) uint8."""
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.stack([noise, _smooth(h, w, seed)])


@pytest.mark.parametrize("settings", [{}, TINY_PROCESSOR, dict(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 24})],
                         ids=["defaults-224", "tiny-32", "crop-pads"])
def test_preprocessing_matches_clip_image_processor(settings):
    processor = transformers.CLIPImageProcessorPil(**settings)
    processing = CLIPImageProcessing.from_dict(processor.to_dict())
    std = np.asarray(processing.image_std, np.float32)
    for seed, (h, w) in enumerate([(40, 56), (64, 48), (31, 31)]):
        images = _images(h, w, seed)
        expected = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        got = np.asarray(preprocess_images(jnp.asarray(images), processing))
        assert got.shape == expected.shape
        # back in 0..255 levels: Pillow's resize is reproduced exactly, what is left is float rounding
        assert float(np.abs(got - expected).max() * std.max() * 255) < 1e-3, (h, w)


def test_resize_is_pillows_for_every_filter_and_pass_order():
    cases = [((40, 56), (32, 44)), ((31, 31), (64, 64)), ((64, 48), (42, 20)), ((150, 40), (60, 33)), ((20, 90), (45, 30))]
    assert pil_vertical_first((150, 40), (60, 33), 13) and not pil_vertical_first((150, 40), (60, 33), 12)
    resize = jax.jit(resize_like_pil, static_argnums=(1, 2))
    for seed, ((h, w), (oh, ow)) in enumerate(cases):
        images = _images(h, w, seed)
        for resample in (BICUBIC, BILINEAR, LANCZOS, BOX, HAMMING):
            expected = np.stack([np.asarray(Image.fromarray(im).resize((ow, oh), resample)) for im in images])
            got = np.asarray(resize(jnp.asarray(images), (oh, ow), resample))
            np.testing.assert_array_equal(got, expected, err_msg=f"{(h, w)} -> {(oh, ow)}, resample={resample}")


def test_preprocess_takes_uint8_only():
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images(jnp.zeros((1, 8, 8, 3), jnp.float32))
