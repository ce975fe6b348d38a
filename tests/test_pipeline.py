"""Loading a diffusers folder, sampling against diffusers' StableDiffusionPipeline, saving back."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unguide_jax.loading.diffusers_folder import load_pipeline, save_pipeline
from unguide_jax.loading.weights import PickledWeightsRefused

PROMPTS = ["a photo of the cat", "the ph of cat"]


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir, flavour):
    folder, torch_pipe = tiny_pipeline_dir(flavour)
    return folder, torch_pipe, load_pipeline(folder)


def test_tokenizer_and_text_embeddings_match(loaded):
    _, torch_pipe, sd = loaded
    ids = sd.tokenize(PROMPTS)
    expected_ids = torch_pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.asarray(expected_ids))
    with torch.no_grad():
        expected = torch_pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(np.asarray(sd.encode_prompts(PROMPTS)), expected, atol=1e-4)


def test_ddim_sampling_matches_diffusers_pipeline(loaded, rng):
    """20 DDIM steps with CFG 7.5 from the same x_T: final latents within 1e-3."""
    _, torch_pipe, sd = loaded
    h, w, c = sd.latent_shape(None, None)
    x_t = rng.standard_normal((len(PROMPTS), h, w, c), dtype=np.float32)
    with torch.no_grad():
        expected = torch_pipe(
            PROMPTS, num_inference_steps=20, guidance_scale=7.5, output_type="latent",
            latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy()),
        ).images.numpy().transpose(0, 2, 3, 1)
    got = sd.generate(PROMPTS, [0, 1], guidance_scale=7.5, num_steps=20, latents=x_t)
    np.testing.assert_allclose(got.latents, expected, atol=1e-3, rtol=0)
    assert got.images.shape == (2, h * sd.vae_scale_factor, w * sd.vae_scale_factor, 3)
    assert got.images.dtype == np.uint8


def test_decoded_images_match_diffusers(loaded, rng):
    _, torch_pipe, sd = loaded
    h, w, c = sd.latent_shape(None, None)
    x_t = rng.standard_normal((1, h, w, c), dtype=np.float32)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=5.0, output_type="np",
                              latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())).images
    got = sd.generate(PROMPTS[:1], [0], guidance_scale=5.0, num_steps=3, latents=x_t).images
    # uint8 rounding of [0, 1] floats: allow one level.
    assert np.abs(got.astype(int) - np.round(expected * 255).astype(int)).max() <= 1


def test_seeds_are_per_prompt_and_batch_independent(loaded):
    _, _, sd = loaded
    both = sd.generate(["a cat", "a dog"], [7, 8], num_steps=2).images
    alone = sd.generate(["a dog"], [8], num_steps=2).images
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one seed per prompt"):
        sd.generate(["a", "b"], [1], num_steps=2)


def test_save_pipeline_round_trips_through_diffusers(loaded, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, torch_pipe, sd = loaded
    out = save_pipeline(sd, tmp_path / "saved")
    again = load_pipeline(out)
    for name in ("unet", "text_encoder", "vae"):
        a, b = sd.params[name], again.params[name]
        assert all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b))), name
    reloaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    for name in ("unet", "text_encoder", "vae"):
        ours = getattr(reloaded, name).state_dict()
        ref = getattr(torch_pipe, name).state_dict()
        assert set(ours) == set(ref), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_bad_folders_fail_early_with_a_named_problem(tiny_pipeline_dir, tmp_path):
    folder, torch_pipe, = tiny_pipeline_dir("sd1")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*vae"):
        load_pipeline(broken)
    # A pickled .bin is refused unless asked for, then loaded with weights_only.
    torch.save(torch_pipe.vae.state_dict(), broken / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickledWeightsRefused, match="allow_pickle"):
        load_pipeline(broken)
    sd = load_pipeline(broken, allow_pickle=True)
    assert sd.vae.config.latent_channels == 4
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "mystery_option": 3}))
    with pytest.raises(ValueError, match="unknown key 'mystery_option'"):
        load_pipeline(broken, allow_pickle=True)


def test_bf16_parameters_and_compute(loaded, flavour):
    if flavour != "sd1":  # the dtype paths do not depend on the flavour; one compiles in half the time
        pytest.skip("bf16: checked on the sd1 flavour")
    folder, _, sd = loaded
    sd16 = load_pipeline(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    leaf = sd16.params["unet"]["conv_in"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    ref = sd.generate(PROMPTS[:1], [3], num_steps=4).images.astype(int)
    got = sd16.generate(PROMPTS[:1], [3], num_steps=4).images.astype(int)
    assert np.abs(got - ref).mean() < 8  # bf16 drifts a little, not a different image
