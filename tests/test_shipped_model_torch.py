"""The shipped model in PyTorch the plain way: ``StableDiffusionPipeline.from_pretrained(folder)`` with no
dtype argument, and with ``torch_dtype=torch.float16``, each draws an image."""
import numpy as np
import pytest
import torch

from unguide_jax.resources import EMBEDDED_MODEL

PROMPTS = ["a photo of the star", "a photo of the striped heart"]
STEPS = 2


def _pipeline(**kwargs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe) -> np.ndarray:
    with torch.inference_mode():
        return pipe(PROMPTS, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def _parameter_dtypes(pipe) -> dict:
    return {name: {p.dtype for p in getattr(pipe, name).parameters()} for name in ("unet", "text_encoder", "vae")}


@pytest.fixture(scope="module")
def plain_images():
    pipe = _pipeline()
    return _parameter_dtypes(pipe), _draw(pipe)


def test_plain_from_pretrained_loads_every_module_in_fp32_and_draws(plain_images):
    dtypes, images = plain_images
    # transformers 5 builds the text encoder in its stored dtype, diffusers the UNet and VAE in fp32: they agree
    # only because every file holds fp32.
    assert dtypes == {name: {torch.float32} for name in dtypes}
    assert images.shape == (len(PROMPTS), 32, 32, 3)
    assert np.isfinite(images).all()
    assert images.std(axis=(1, 2, 3)).min() > 0.05  # a picture, not a flat colour
    assert np.abs(images[0] - images[1]).mean() > 0.05  # the prompt decides what is drawn


def test_from_pretrained_in_float16_draws_what_fp32_draws(plain_images):
    pipe = _pipeline(torch_dtype=torch.float16)
    assert _parameter_dtypes(pipe) == {name: {torch.float16} for name in ("unet", "text_encoder", "vae")}
    images = _draw(pipe)
    assert np.isfinite(images).all()
    # Measured: mean |fp16 - fp32| 0.0025 after 2 steps, while the two prompts' images differ by 0.23.
    fp32 = plain_images[1]
    assert np.abs(images - fp32).mean() < 0.02
    assert np.abs(images - fp32).mean() < 0.2 * np.abs(fp32[0] - fp32[1]).mean()
