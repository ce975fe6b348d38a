"""LoRA as its own pytree: target rules, initialisation, merge/unmerge, several adapters, fit checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unguide_jax.edits.lora import (
    LoraConfig,
    check_fits,
    count_parameters,
    init_lora,
    merge,
    target_modules,
    unmerge,
)
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig


@pytest.fixture(scope="module")
def sd15_abstract():
    """SD 1.x UNet parameter shapes (UNetConfig's defaults are SD 1.x), never allocated."""
    unet = UNet2DConditionModel(UNetConfig())
    return abstract_params(unet, *unet.init_inputs())


@pytest.mark.parametrize("rule, layers, parameters", [("object", 32, 49_536), ("explicit", 118, 322_880)])
def test_rules_select_the_papers_layers_on_sd1(sd15_abstract, rule, layers, parameters):
    """The layer and parameter counts of the paper's rules on SD 1.x at rank 1."""
    adapter = jax.eval_shape(lambda: init_lora(jax.random.key(0), sd15_abstract, LoraConfig(rank=1, targets=rule, init="random")))
    assert len(adapter) == layers
    assert count_parameters(adapter) == parameters
    if rule == "explicit":
        assert not any(".attn2." in p or "time_embedding" in p or "proj_in" in p for p in adapter)


def test_a_rule_matching_nothing_is_an_error(sd15_abstract):
    with pytest.raises(ValueError, match=r"matches no layer"):
        target_modules(sd15_abstract, r"attn3\.to_k$")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        target_modules(sd15_abstract, "attn2.(to_k")
    with pytest.raises(ValueError, match="conv_in has a kernel of shape"):
        jax.eval_shape(lambda: init_lora(jax.random.key(0), sd15_abstract, LoraConfig(targets=r"conv_in$", init="random")))


@functools.cache
def _tiny_unet_params():
    """Built once per session, jitted: an eager init compiles every op on its own (tens of seconds on 2 cores)."""
    cfg = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=24, attention_head_dim=2,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(cfg)
    return unet, jax.jit(unet.init)(jax.random.key(0), *unet.init_inputs())["params"]


def _random_adapter(params, config, seed):
    adapter = init_lora(jax.random.key(seed), params, config)
    return jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape), adapter)


def test_fresh_adapter_is_the_identity_and_merge_unmerge_round_trip():
    unet, params = _tiny_unet_params()
    config = LoraConfig(rank=2, alpha=8.0, targets="object", init="random")
    fresh = init_lora(jax.random.key(1), params, config)
    assert all(float(jnp.abs(ab["lora_B"]).max()) == 0.0 for ab in fresh.values())
    jax.tree.map(np.testing.assert_array_equal, merge(params, [(fresh, 8.0)]), params)
    adapter = _random_adapter(params, config, 3)
    back = unmerge(merge(params, [(adapter, 8.0)]), [(adapter, 8.0)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, params)


@pytest.mark.parametrize("rank", [1, 4])
def test_random_init_draws_a_with_the_authors_std(rank):
    # Their code scales A by 1/√r; 1/r (another common LoRA init) would agree only at r = 1.
    params = {"attn2": {"to_k": {"kernel": np.zeros((4096, 8))}}}
    a = init_lora(jax.random.key(0), params, LoraConfig(rank=rank, targets=r"to_k$", init="random"))["attn2.to_k"]
    assert float(jnp.std(a["lora_A"])) == pytest.approx(1 / np.sqrt(rank), rel=0.03)


def test_merged_forward_equals_the_explicit_low_rank_update():
    """y = W x + alpha (x A) B at an adapted layer: merged kernel equals W + alpha A B, alpha applied directly."""
    unet, params = _tiny_unet_params()
    adapter = _random_adapter(params, LoraConfig(rank=2, targets="object", init="random"), 5)
    merged = merge(params, [(adapter, 3.0)])
    path = next(iter(adapter))
    module = params
    merged_module = merged
    for part in ("down_blocks.0.attentions.0", "transformer_blocks.0", "attn2", path.rsplit(".", 1)[-1]):
        module, merged_module = module[part], merged_module[part]
    x = jax.random.normal(jax.random.key(9), (5, module["kernel"].shape[0]))
    expected = x @ module["kernel"] + 3.0 * (x @ adapter[path]["lora_A"]) @ adapter[path]["lora_B"]
    np.testing.assert_allclose(x @ merged_module["kernel"], expected, rtol=1e-5, atol=1e-5)
    assert path.startswith("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_")


def test_several_adapters_add_up():
    unet, params = _tiny_unet_params()
    a = _random_adapter(params, LoraConfig(rank=1, targets="object", init="random"), 11)
    b = _random_adapter(params, LoraConfig(rank=2, targets=r"attn2\.to_v$", init="random"), 21)
    both = merge(params, [(a, 8.0), (b, 2.0)])
    one_by_one = merge(merge(params, [(a, 8.0)]), [(b, 2.0)])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), both, one_by_one)
    sample, timesteps, context = unet.init_inputs(batch=2)
    keys = jax.random.split(jax.random.key(0), 2)  # zero context would make every to_k/to_v output zero
    inputs = (jax.random.normal(keys[0], sample.shape), timesteps + 500, jax.random.normal(keys[1], context.shape))
    out_both = unet.apply({"params": both}, *inputs)
    out_base = unet.apply({"params": params}, *inputs)
    assert float(jnp.abs(out_both - out_base).max()) > 1e-4


def test_an_adapter_that_does_not_fit_the_model_is_named():
    unet, params = _tiny_unet_params()
    adapter = init_lora(jax.random.key(0), params, LoraConfig(targets="object", init="random"))
    path = next(iter(adapter))
    wrong = dict(adapter, **{path: {"lora_A": jnp.zeros((7, 1)), "lora_B": jnp.zeros((1, 3))}})
    with pytest.raises(ValueError, match=f"does not fit {path}"):
        check_fits(params, wrong)
    with pytest.raises(ValueError, match="mid_block.attentions.9.attn2.to_k, which the model does not have"):
        check_fits(params, {"mid_block.attentions.9.attn2.to_k": adapter[path]})
