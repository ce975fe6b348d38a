"""SDXL against diffusers' StableDiffusionXLPipeline on a tiny random folder: loading, both text encoders, the
packed conditioning, the VAE's scaling factor, a 20-step DDIM sample with CFG, and saving back."""
import json

import jax
import numpy as np
import pytest
import torch

from unguide_jax.loading.diffusers_folder import load_pipeline, save_pipeline
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.unet import unpack_context

PROMPTS = ["a photo of the cat", "the ph of cat"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_sdxl_dir):
    folder, torch_pipe = tiny_sdxl_dir
    return folder, torch_pipe, load_model(str(folder))


def unpacked(sd, encoded):
    context, added = unpack_context(np.asarray(encoded), sd.unet.config.pooled_dim)
    return tuple(np.array(a) for a in (context, added["text_embeds"], added["time_ids"]))


def test_both_text_encoders_and_the_pooled_embedding_match_encode_prompt(loaded):
    _, torch_pipe, sd = loaded
    assert sd.is_sdxl and sd.force_zeros_for_empty_prompt
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = torch_pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    context, text_embeds, time_ids = unpacked(sd, sd.encode_prompts(PROMPTS))
    np.testing.assert_allclose(context, embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(text_embeds, pooled.numpy(), atol=1e-4, rtol=0)
    size = sd.default_size
    np.testing.assert_array_equal(time_ids, [[size, size, 0, 0, size, size]] * 2)
    # The empty prompt is the zeros diffusers uses for the unconditional branch.
    context, text_embeds, _ = unpacked(sd, sd.encode_prompts(["", ""]))
    assert not negative.numpy().any() and not negative_pooled.numpy().any()
    assert not context.any() and not text_embeds.any()
    # clip_skip: one more layer down, as diffusers counts it.
    import dataclasses
    with torch.no_grad():
        skipped, _, skipped_pooled, _ = torch_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                                 clip_skip=1)
    context, text_embeds, _ = unpacked(sd, dataclasses.replace(sd, clip_skip=1).encode_prompts(PROMPTS))
    np.testing.assert_allclose(context, skipped.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(text_embeds, skipped_pooled.numpy(), atol=1e-4, rtol=0)


def test_unet_reads_the_packed_context_as_diffusers_reads_added_cond_kwargs(loaded, rng):
    _, torch_pipe, sd = loaded
    h, w, c = sd.latent_shape(None, None)
    x = rng.standard_normal((2, h, w, c), dtype=np.float32)
    encoded = np.asarray(sd.sized_context(sd.encode_prompts(PROMPTS), 96, 64))
    context, text_embeds, time_ids = unpacked(sd, encoded)
    np.testing.assert_array_equal(time_ids, [[96, 64, 0, 0, 96, 64]] * 2)
    with torch.no_grad():
        expected = torch_pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.tensor([3, 917]),
                                   torch.from_numpy(context), added_cond_kwargs={
                                       "text_embeds": torch.from_numpy(text_embeds),
                                       "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    got = jax.jit(sd.unet.apply)({"params": sd.params["unet"]}, x, np.array([3, 917]), encoded)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-4, rtol=0)


def test_vae_decodes_with_sdxl_scaling_factor(loaded, rng):
    from unguide_jax.diffusion.pipeline import decode_to_pixels

    _, torch_pipe, sd = loaded
    assert sd.vae.config.scaling_factor == pytest.approx(0.13025)
    h, w, c = sd.latent_shape(None, None)
    z = rng.standard_normal((1, h, w, c), dtype=np.float32)
    with torch.no_grad():
        expected = torch_pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()) / 0.13025).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(decode_to_pixels(sd.vae, sd.params["vae"], z))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_ddim_sample_with_cfg_matches_the_sdxl_pipeline(loaded, rng):
    """20 DDIM steps with CFG 5 from the same x_T, unconditional branch all zeros: latents within 1e-3."""
    _, torch_pipe, sd = loaded
    h, w, c = sd.latent_shape(None, None)
    x_t = rng.standard_normal((2, h, w, c), dtype=np.float32)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                              latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())).images.numpy()
    got = sd.generate(PROMPTS, [0, 1], guidance_scale=5.0, num_steps=20, latents=x_t)
    np.testing.assert_allclose(got.latents, expected.transpose(0, 2, 3, 1), atol=1e-3, rtol=0)
    # Another size stamps other time ids: same prompts, another sample.
    x_small = x_t[:, : h // 2]
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                              height=h // 2 * sd.vae_scale_factor, width=w * sd.vae_scale_factor,
                              latents=torch.from_numpy(x_small.transpose(0, 3, 1, 2).copy())).images.numpy()
    got = sd.generate(PROMPTS, [0, 1], guidance_scale=5.0, num_steps=20, latents=x_small,
                      height=h // 2 * sd.vae_scale_factor, width=w * sd.vae_scale_factor)
    np.testing.assert_allclose(got.latents, expected.transpose(0, 2, 3, 1), atol=1e-3, rtol=0)


def test_saved_sdxl_folder_loads_in_diffusers_and_back(loaded, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    _, torch_pipe, sd = loaded
    save_pipeline(sd, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(reloaded, name).state_dict(), getattr(torch_pipe, name).state_dict()
        assert set(ours) == set(theirs), name
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    again = load_pipeline(tmp_path / "saved")
    assert again.is_sdxl and again.tokenize(PROMPTS, again.tokenizer_2).tolist() == sd.tokenize(
        PROMPTS, sd.tokenizer_2).tolist()


def test_an_sdxl_unet_with_sd_text_encoder_is_refused(loaded, tmp_path):
    import shutil

    folder, _, _ = loaded
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_pipeline(broken)


def test_euler_sample_matches_the_sdxl_pipeline_with_its_default_scheduler(loaded, rng):
    """SDXL ships EulerDiscreteScheduler: 20 Euler steps with CFG from the same x_T (scaled by the initial σ on
    both sides), latents within 1e-3."""
    from diffusers import EulerDiscreteScheduler

    _, torch_pipe, sd = loaded
    h, w, c = sd.latent_shape(None, None)
    x_t = rng.standard_normal((2, h, w, c), dtype=np.float32)
    euler = EulerDiscreteScheduler.from_config(torch_pipe.scheduler.config)
    original, torch_pipe.scheduler = torch_pipe.scheduler, euler
    try:
        with torch.no_grad():
            expected = torch_pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                                  latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())).images.numpy()
    finally:
        torch_pipe.scheduler = original
    got = sd.generate(PROMPTS, [0, 1], guidance_scale=5.0, num_steps=20, latents=x_t, sampler="euler")
    assert got.settings["scheduler"] == "Euler"
    np.testing.assert_allclose(got.latents, expected.transpose(0, 2, 3, 1), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="eta > 0 is DDIM's"):
        sd.generate(PROMPTS, [0, 1], num_steps=2, sampler="euler", eta=0.5)


def test_bf16_sdxl_samples_near_fp32(loaded):
    import jax.numpy as jnp

    folder, _, sd = loaded
    bf16 = load_model(str(folder), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16.params["text_encoder_2"])[0].dtype == jnp.bfloat16
    kw = dict(seeds=[0, 1], guidance_scale=5.0, num_steps=4)
    ref, got = sd.generate(PROMPTS, **kw).latents, bf16.generate(PROMPTS, **kw).latents
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
