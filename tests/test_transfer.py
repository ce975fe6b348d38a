"""Moving the paper's settings to another model: the kv_scale transfer rule and the concept-aligned LoRA init."""
import jax
import numpy as np
import pytest

from unguide_jax.erasers.unguide.concept_direction import (
    NEUTRAL_ENERGY,
    concept_directions,
)
from unguide_jax.erasers.unguide.transfer import (
    SD14_KV_SCALE,
    kv_scales,
    transfer_settings,
)

# SD 1.4's cross-attention K/V: 16 transformer blocks over a 768-d context, 320/640/1280 wide.
SD14_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280, 1280, 1280]


def _kv_params(context_dim: int, widths, key, scale=None) -> dict:
    """A UNet parameter tree holding only attn2.to_k/to_v kernels, LeCun-normal as a fresh Linear (or ``scale``)."""
    params = {}
    init = jax.nn.initializers.lecun_normal()
    for i, width in enumerate(widths):
        block = {}
        for j, name in enumerate(("to_k", "to_v")):
            k = jax.random.fold_in(key, 2 * i + j)
            kernel = init(k, (context_dim, width)) if scale is None else scale * jax.random.normal(k, (context_dim, width))
            block[name] = {"kernel": np.asarray(kernel)}
        params[f"blocks.{i}"] = {"transformer_blocks.0": {"attn2": block}}
    return params


def test_the_rule_keeps_the_learning_rate_on_lecun_kernels_of_sd14s_shapes():
    """The arithmetic on a model of SD 1.4's shapes: LeCun-initialised K/V kernels over a 768-d context have
    s = 1/√768 = s_SD1.4 by construction, so the rule must return the configured 3e-5 (the mean over 32 layers,
    the ratio, the record). It holds whatever the rule's merit: it is no evidence that the rule transfers."""
    params = _kv_params(768, SD14_WIDTHS, jax.random.key(0))
    context = np.random.default_rng(0).normal(size=(1, 77, 768)) * 0.8 + 0.3
    transfer = transfer_settings("kv_scale", 3e-5, params, context)
    assert transfer.learning_rate == pytest.approx(3e-5, rel=0.03)
    assert transfer.record()["paper_learning_rate"] == 3e-5
    assert len(kv_scales(params, context)) == 32  # 16 blocks × K, V


def test_the_rule_scales_with_the_kv_scale_and_none_keeps_the_settings():
    rng = np.random.default_rng(1)
    context = rng.normal(size=(2, 77, 64))
    # Kernels twice as large as SD 1.4's reference on the tokens they see: twice the learning rate.
    params = _kv_params(64, [16, 32], jax.random.key(1), scale=2 * SD14_KV_SCALE)
    scales = kv_scales(params, context)
    tokens = context.reshape(-1, 64)
    for i, width in enumerate([16, 32]):  # s = ‖c W‖ / (‖c‖ √out), by hand
        w = params[f"blocks.{i}"]["transformer_blocks.0"]["attn2"]["to_k"]["kernel"]
        s = scales[f"blocks.{i}.transformer_blocks.0.attn2.to_k"]
        assert s == pytest.approx(np.linalg.norm(tokens @ w) / (np.linalg.norm(tokens) * np.sqrt(w.shape[1])))
    transfer = transfer_settings("kv_scale", 3e-5, params, context)
    assert transfer.learning_rate == pytest.approx(3e-5 * np.mean(list(scales.values())) / SD14_KV_SCALE)
    assert transfer.learning_rate == pytest.approx(6e-5, rel=0.1)
    assert "3e-05 ->" in transfer.describe()
    assert transfer_settings("none", 3e-5).learning_rate == 3e-5
    with pytest.raises(ValueError, match="unknown transfer rule 'width'"):
        transfer_settings("width", 3e-5, params, context)
    with pytest.raises(ValueError, match="attn2.to_k/to_v"):
        transfer_settings("kv_scale", 3e-5, {"conv": {"kernel": np.zeros((3, 3))}}, context)


def test_concept_directions_leave_the_neutral_prompts_alone():
    rng = np.random.default_rng(2)
    width, shared_dirs = 32, rng.normal(size=(2, 32))
    neutral = rng.normal(size=(2, 77, 2)) @ shared_dirs * 5 + rng.normal(size=(2, 77, 32)) * 0.01
    concept_dir = rng.normal(size=32)
    target = neutral[:1] + rng.normal(size=(1, 77, 1)) * concept_dir
    a = concept_directions(target, neutral, rank=1)
    assert a.shape == (width, 1)
    unit = a[:, 0] / np.linalg.norm(a)
    _, s, vt = np.linalg.svd(neutral.reshape(-1, width), full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), NEUTRAL_ENERGY) + 1)
    assert np.abs(vt[:k] @ unit).max() < 1e-6  # orthogonal to what the neutral prompts share
    tokens = target.reshape(-1, width)
    assert np.linalg.norm(tokens @ a) == pytest.approx(np.linalg.norm(tokens), rel=1e-5)  # a random init's ‖cA‖
    assert np.linalg.norm(neutral.reshape(-1, width) @ a) < 0.05 * np.linalg.norm(tokens @ a)
    two = concept_directions(target, neutral, rank=2)
    assert two.shape == (width, 2)
    # Each column sees what a column of a random N(0, 1/r) A gives the tokens: ‖c‖_F / √r.
    np.testing.assert_allclose(np.linalg.norm(tokens @ two, axis=0), np.linalg.norm(tokens) / np.sqrt(2), rtol=1e-5)


def test_concept_init_starts_only_the_layers_that_read_text():
    from unguide_jax.edits.lora import LoraConfig, init_lora

    params = {"block": {"attn1": {"to_k": {"kernel": np.zeros((8, 4))}},
                        "attn2": {"to_k": {"kernel": np.zeros((8, 4))}, "to_v": {"kernel": np.zeros((8, 6))}}}}
    directions = np.arange(8, dtype=np.float32).reshape(8, 1)
    adapter = init_lora(jax.random.key(0), params, LoraConfig(targets=r"to_[kv]$", init="concept"), directions=directions)
    np.testing.assert_array_equal(adapter["block.attn2.to_k"]["lora_A"], directions)
    np.testing.assert_array_equal(adapter["block.attn2.to_v"]["lora_A"], directions)
    assert not np.array_equal(adapter["block.attn1.to_k"]["lora_A"], directions)  # image features: random
    with pytest.raises(ValueError, match="do not fit block.attn2.to_k"):
        init_lora(jax.random.key(0), params, LoraConfig(targets="object", init="concept"), directions=directions[:4])
    # The config's init is what happens: no silent random start for init=concept, no directions for init=random.
    with pytest.raises(ValueError, match="needs the concept's directions"):
        init_lora(jax.random.key(0), params, LoraConfig(targets="object", init="concept"))
    with pytest.raises(ValueError, match="takes no directions"):
        init_lora(jax.random.key(0), params, LoraConfig(targets="object", init="random"), directions=directions)
