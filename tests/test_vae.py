"""AutoencoderKL: numerical parity with diffusers, posterior sampling, latent scaling, name mapping, config."""
import json

import jax
import numpy as np
import pytest
import torch

from tests import tiny_models
from unguide_jax.loading.convert import flax_to_torch, key_table, torch_to_flax
from unguide_jax.models.config_io import ConfigError
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    rename_torch_key,
    sample_posterior,
    scale_latents,
    unscale_latents,
)

ATOL = 1e-4  # fp32 on CPU; observed max abs error ~5e-6


@pytest.fixture(scope="module")
def vae_pair(flavour):
    torch_vae = tiny_models.build_vae(flavour)
    model = AutoencoderKL(VAEConfig.from_dict(dict(torch_vae.config)))
    abstract = abstract_params(model, *model.init_inputs())
    params = torch_to_flax(torch_vae.state_dict(), abstract, rename=rename_torch_key)
    return torch_vae, model, params


@pytest.fixture(scope="module")
def images():
    # Non-square, NCHW as diffusers takes it.
    return np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 24)).astype(np.float32)


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def test_encode_matches_diffusers(vae_pair, images):
    torch_vae, model, params = vae_pair
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = jax.jit(model.apply, static_argnames="method")({"params": params}, nhwc(images), method="encode")
    np.testing.assert_allclose(nchw(mean), dist.mean.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(nchw(logvar), dist.logvar.numpy(), atol=ATOL, rtol=0)


def test_decode_matches_diffusers(vae_pair, rng):
    torch_vae, model, params = vae_pair
    f = 2 ** (len(model.config.block_out_channels) - 1)
    z = rng.standard_normal((2, model.config.latent_channels, 32 // f, 24 // f), dtype=np.float32)
    with torch.no_grad():
        expected = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
    decode = jax.jit(model.apply, static_argnames="method")
    got = decode({"params": params}, nhwc(z), method="decode")
    assert got.shape == (2, 32, 24, 3)
    np.testing.assert_allclose(nchw(got), expected, atol=ATOL, rtol=0)
    # The pipeline's entry point takes latents scaled as the UNet sees them.
    scaled = np.asarray(scale_latents(nhwc(z), model.config))
    np.testing.assert_allclose(decode({"params": params}, scaled, method="decode_latents"), got, atol=1e-5, rtol=0)


def test_posterior_sample(vae_pair, rng):
    _, model, params = vae_pair
    x = rng.uniform(-1, 1, (1, 16, 8, 3)).astype(np.float32)
    mean, logvar = model.apply({"params": params}, x, method="encode")
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    expected = np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * noise
    np.testing.assert_allclose(sample_posterior(mean, logvar, noise), expected, rtol=1e-6, atol=1e-6)
    latents = model.apply({"params": params}, x, noise, method="encode_latents")
    np.testing.assert_allclose(latents, expected * model.config.scaling_factor, rtol=1e-5, atol=1e-6)
    # __call__ draws its own noise: it differs from the mean-only reconstruction.
    recon = model.apply({"params": params}, x)
    drawn = model.apply({"params": params}, x, True, jax.random.key(0))
    assert recon.shape == drawn.shape == x.shape and not np.allclose(recon, drawn)


def test_latent_scaling_with_shift():
    cfg = VAEConfig(scaling_factor=0.5, shift_factor=0.25)
    z = np.linspace(-2, 2, 8, dtype=np.float32)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.25) * 0.5)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, atol=1e-6)


def test_mapping_round_trip_is_exact(vae_pair):
    torch_vae, model, params = vae_pair
    state = torch_vae.state_dict()
    assert set(key_table(abstract_params(model, *model.init_inputs()))) == set(state)
    back = flax_to_torch(params)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.numpy().dtype and np.array_equal(back[key], tensor.numpy()), key


def test_legacy_attention_names_load(vae_pair):
    """Pre-0.14 diffusers checkpoints: query/key/value/proj_attn, stored as 1x1 convs."""
    torch_vae, model, params = vae_pair
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy, renamed = {}, 0
    for key, tensor in torch_vae.state_dict().items():
        for new, old in new_to_old.items():
            marker = f".attentions.0.{new}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old}.")
                tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
                renamed += 1
        legacy[key] = tensor
    assert renamed == 16  # 4 projections x weight/bias x encoder/decoder
    got = torch_to_flax(legacy, abstract_params(model, *model.init_inputs()), rename=rename_torch_key)
    jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.mark.parametrize("switch", ["use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"])
def test_optional_layers_match_diffusers_keys(switch):
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    kwargs = dict(tiny_models.vae_kwargs("sd1"), **{switch: False})
    torch_vae = TorchAutoencoderKL(**kwargs)
    model = AutoencoderKL(VAEConfig.from_dict(dict(torch_vae.config)))
    assert set(key_table(abstract_params(model, *model.init_inputs()))) == set(torch_vae.state_dict())


def test_config_every_saved_key_understood(vae_pair, tmp_path):
    torch_vae, model, _ = vae_pair
    torch_vae.save_config(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert VAEConfig.from_dict(raw) == model.config
    assert model.config.scaling_factor == 0.18215 and model.config.shift_factor is None
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        VAEConfig.from_dict({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="act_fn"):
        VAEConfig.from_dict({**raw, "act_fn": "gelu"})
    with pytest.raises(ConfigError, match="latents_mean"):
        VAEConfig.from_dict({**raw, "latents_mean": [0.0] * 4})
    with pytest.raises(ConfigError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_dict({**raw, "down_block_types": ["AttnDownEncoderBlock2D"] * len(raw["down_block_types"])})
