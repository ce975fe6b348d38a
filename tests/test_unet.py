"""UNet2DConditionModel: numerical parity with diffusers, name mapping, conversion errors."""
import jax
import numpy as np
import pytest
import torch

from tests import tiny_models
from unguide_jax.loading.convert import (
    ConversionError,
    flax_to_torch,
    key_table,
    torch_to_flax,
)
from unguide_jax.models.config_io import ConfigError
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig, pack_context

ATOL = 1e-4  # fp32 on CPU; observed max abs error ~3e-7


@pytest.fixture(scope="module")
def unet_pair(flavour):
    torch_unet = tiny_models.build_unet(flavour)
    model = UNet2DConditionModel(UNetConfig.from_dict(dict(torch_unet.config)))
    return torch_unet, model, abstract_params(model, *model.init_inputs())


def test_unet_matches_diffusers(unet_pair, rng):
    torch_unet, model, abstract = unet_pair
    params = torch_to_flax(torch_unet.state_dict(), abstract)
    ctx_dim = model.config.cross_attention_dim
    # Non-square latent, two different timesteps in one batch.
    sample = rng.standard_normal((2, 4, 16, 8), dtype=np.float32)
    context = rng.standard_normal((2, 7, ctx_dim), dtype=np.float32)
    timesteps = np.array([3, 917])
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample.numpy()
    got = jax.jit(model.apply)({"params": params}, sample.transpose(0, 2, 3, 1), timesteps, context)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=ATOL, rtol=0)


def test_unet_mapping_covers_every_parameter_both_ways(unet_pair):
    torch_unet, _, abstract = unet_pair
    torch_keys = set(torch_unet.state_dict())
    assert set(key_table(abstract)) == torch_keys
    params = torch_to_flax(torch_unet.state_dict(), abstract)
    back = flax_to_torch(params)
    assert set(back) == torch_keys
    for key, tensor in torch_unet.state_dict().items():
        assert back[key].dtype == tensor.numpy().dtype and np.array_equal(back[key], tensor.numpy()), key


def test_conversion_errors_name_the_tensor(unet_pair):
    torch_unet, _, abstract = unet_pair
    state = dict(torch_unet.state_dict())
    missing = dict(state)
    del missing["conv_in.weight"]
    with pytest.raises(ConversionError, match=r"missing tensors: conv_in\.weight"):
        torch_to_flax(missing, abstract)
    with pytest.raises(ConversionError, match=r"unexpected tensors: extra\.weight"):
        torch_to_flax({**state, "extra.weight": torch.zeros(1)}, abstract)
    bad = dict(state)
    bad["conv_out.bias"] = torch.zeros(5)
    with pytest.raises(ConversionError, match=r"wrong shape for conv_out\.bias"):
        torch_to_flax(bad, abstract)


def test_unet_config_rejects_unknown_and_unsupported_keys(unet_pair):
    torch_unet, model, _ = unet_pair
    raw = dict(torch_unet.config)
    assert UNetConfig.from_dict(raw) == model.config  # every key diffusers writes is understood
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        UNetConfig.from_dict({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="class_embed_type"):
        UNetConfig.from_dict({**raw, "class_embed_type": "timestep"})


def test_unet_bf16_compute_stays_close(unet_pair, rng):
    """bf16 compute with fp32 parameters: a smoke check of the dtype plumbing, loose tolerance."""
    torch_unet, model, abstract = unet_pair
    params = torch_to_flax(torch_unet.state_dict(), abstract)
    bf16 = UNet2DConditionModel(model.config, dtype=jax.numpy.bfloat16)
    x = rng.standard_normal((1, 8, 8, 4), dtype=np.float32)
    ctx = rng.standard_normal((1, 5, model.config.cross_attention_dim), dtype=np.float32)
    ref = jax.jit(model.apply)({"params": params}, x, 500, ctx)  # jitted: op-by-op dispatch is slower on CPU
    out = jax.jit(bf16.apply)({"params": params}, x, 500, ctx)
    assert out.dtype == jax.numpy.bfloat16
    err = float(np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max())
    assert err < 0.1 * float(np.abs(np.asarray(ref)).max())


# SDXL's UNet layout, tiny: no attention at the first level, a deeper transformer below it, linear projections,
# and the text_time add-embedding (the pooled text embedding and six micro-conditioning ids).
TINY_SDXL = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
                 norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                 attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)


def test_sdxl_layout_unet_with_the_text_time_embedding_matches_diffusers(rng):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    torch_unet = tiny_models.perturb_(TorchUNet(**TINY_SDXL))
    model = UNet2DConditionModel(UNetConfig.from_dict(dict(torch_unet.config)))
    abstract = abstract_params(model, *model.init_inputs())
    assert set(key_table(abstract)) == set(torch_unet.state_dict())  # add_embedding.* included
    params = torch_to_flax(torch_unet.state_dict(), abstract)
    sample = rng.standard_normal((2, 4, 16, 8), dtype=np.float32)
    context = rng.standard_normal((2, 5, 24), dtype=np.float32)
    text_embeds = rng.standard_normal((2, 12), dtype=np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 1024]], np.float32)
    timesteps = np.array([3, 917])
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                              added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                 "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    got = jax.jit(model.apply)({"params": params}, sample.transpose(0, 2, 3, 1), timesteps, context, added)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=ATOL, rtol=0)
    # The micro-conditioning matters, and leaving it out is refused by name.
    other = dict(added, time_ids=time_ids[::-1].copy())
    assert np.abs(np.asarray(jax.jit(model.apply)({"params": params}, sample.transpose(0, 2, 3, 1), timesteps,
                                                  context, other)) - np.asarray(got)).max() > 1e-4
    # The same conditioning packed into the context's last token (what samplers and trainers pass).
    packed = pack_context(context, text_embeds, time_ids)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": params}, sample.transpose(0, 2, 3, 1),
                                                               timesteps, packed)), np.asarray(got), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not fit in one context token"):
        pack_context(context[..., :16], text_embeds, time_ids)
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig.from_dict({**dict(torch_unet.config), "addition_time_embed_dim": None})
