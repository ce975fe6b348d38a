"""Schedulers vs diffusers' DDIMScheduler / DDPMScheduler, and inside lax.scan."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from unguide_jax.diffusion.sampler import ddim_loop
from unguide_jax.diffusion.schedulers import (
    NoiseSchedule,
    SchedulerConfig,
    add_noise,
    ddim_step,
    ddim_timesteps,
    training_target,
    velocity,
)
from unguide_jax.models.config_io import ConfigError

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False,
         timestep_spacing="leading", prediction_type="epsilon"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0, set_alpha_to_one=True,
         timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", steps_offset=0, set_alpha_to_one=False, timestep_spacing="linspace",
         prediction_type="sample", clip_sample=True, clip_sample_range=1.5),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
         timestep_spacing="trailing", prediction_type="v_prediction"),
]


def _pair(kwargs):
    kwargs = {"clip_sample": False, **kwargs}
    ref = DDIMScheduler(**kwargs)
    return ref, SchedulerConfig.from_dict(dict(ref.config))


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("num_steps", [20, 50, 7])
def test_ddim_timesteps_match_diffusers(kwargs, num_steps):
    ref, config = _pair(kwargs)
    ref.set_timesteps(num_steps)
    ts, prev = ddim_timesteps(config, num_steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    np.testing.assert_array_equal(prev, ts - 1000 // num_steps)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_alphas_cumprod_match_diffusers(kwargs):
    ref, config = _pair(kwargs)
    schedule = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
    assert float(schedule.final_alpha_cumprod) == pytest.approx(float(ref.final_alpha_cumprod))


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match_diffusers(kwargs, eta, rng):
    ref, config = _pair(kwargs)
    schedule = NoiseSchedule.from_config(config)
    ref.set_timesteps(10)
    ts, prev = ddim_timesteps(config, 10)
    sample = rng.standard_normal((2, 4, 5, 3), dtype=np.float32)
    for t, t_prev in zip(ts, prev):
        output = rng.standard_normal(sample.shape, dtype=np.float32)
        noise = rng.standard_normal(sample.shape, dtype=np.float32)
        expected = ref.step(torch.from_numpy(output), int(t), torch.from_numpy(sample), eta=eta,
                            variance_noise=torch.from_numpy(noise))
        got, x0 = ddim_step(schedule, config, jnp.asarray(output), t, t_prev, jnp.asarray(sample), eta,
                            jnp.asarray(noise) if eta > 0 else None)
        np.testing.assert_allclose(np.asarray(got), expected.prev_sample.numpy(), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), atol=2e-5, rtol=1e-5)
        sample = expected.prev_sample.numpy()


def test_forward_noising_and_velocity_match_diffusers(rng):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    config = SchedulerConfig.from_dict(dict(ref.config))
    schedule = NoiseSchedule.from_config(config)
    x0 = rng.standard_normal((3, 4, 4, 2), dtype=np.float32)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    t = np.array([0, 500, 999])
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(np.asarray(add_noise(schedule, x0, noise, t)),
                               ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=1e-6)
    expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(np.asarray(velocity(schedule, x0, noise, t)), expected_v, atol=1e-6)
    np.testing.assert_allclose(np.asarray(training_target(config, schedule, x0, noise, t)), expected_v, atol=1e-6)


def test_ddim_loop_runs_inside_jit_and_matches_python_loop(rng):
    """The scanned loop equals stepping diffusers' scheduler by hand with the same toy model."""
    ref, config = _pair(CONFIGS[0])
    schedule = NoiseSchedule.from_config(config)
    ts, prev = ddim_timesteps(config, 15)
    z0 = rng.standard_normal((2, 3, 3, 4), dtype=np.float32)
    toy_model = lambda z, t: 0.1 * z + 1e-4 * t  # noqa: E731
    got = jax.jit(lambda z: ddim_loop(toy_model, schedule, config, ts, prev, z))(z0)
    ref.set_timesteps(15)
    z = torch.from_numpy(z0)
    for t in ref.timesteps:
        z = ref.step(toy_model(z, t.float()), t, z).prev_sample
    np.testing.assert_allclose(np.asarray(got), z.numpy(), atol=1e-5)


def test_scheduler_config_reads_pndm_and_rejects_unknown_keys():
    pndm = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False}
    assert SchedulerConfig.from_dict(pndm).steps_offset == 1
    with pytest.raises(ConfigError, match="unknown key 'betas_please'"):
        SchedulerConfig.from_dict({**pndm, "betas_please": 1})
    with pytest.raises(ConfigError, match="thresholding"):
        SchedulerConfig.from_dict({**pndm, "thresholding": True})
    with pytest.raises(ValueError, match="prediction_type"):
        SchedulerConfig(prediction_type="flow")
