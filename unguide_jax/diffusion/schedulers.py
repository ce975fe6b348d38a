"""DDPM noise schedules and the DDIM and Euler sampler steps, as pure JAX functions usable inside ``lax.scan``.

Configured from any diffusers ``scheduler_config.json`` (SD folders ship PNDM's; the betas,
offsets and prediction type are what matter). Timestep tables are computed in numpy, once, as
diffusers' ``DDIMScheduler.set_timesteps`` does, and become static arrays of the jitted sampler.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.models.config_io import config_from_dict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and self.trained_betas is None:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "scheduler config") -> "SchedulerConfig":
        return config_from_dict(
            cls, raw, required_defaults={"thresholding": False}, ignored=_OTHER_SCHEDULER_KEYS, source=source
        )


# Keys other diffusers schedulers write (PNDM, Euler, DPM-Solver, ...) that do not change the
# noise schedule; we sample with DDIM whatever scheduler the folder names.
_OTHER_SCHEDULER_KEYS = frozenset({
    "skip_prk_steps", "dynamic_thresholding_ratio", "sample_max_value", "variance_type", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "interpolation_type", "sigma_min", "sigma_max", "timestep_type",
    "final_sigmas_type", "algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final",
    "lambda_min_clipped", "use_lu_lambdas", "variance_tradeoff", "final_alpha_cumprod", "use_flow_sigmas",
    "flow_shift", "predict_x0", "solver_p", "disable_corrector", "use_dynamic_shifting",
})


def betas(config: SchedulerConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        b = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        b = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
    elif config.beta_schedule == "scaled_linear":
        b = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float32) ** 2
    else:  # squaredcos_cap_v2 (GLIDE cosine)
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    sqrt_ab = np.sqrt(np.cumprod(1.0 - b, dtype=np.float32))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


class NoiseSchedule(NamedTuple):
    """The arrays a jitted function needs (a pytree): ᾱ_t for every training step, and ᾱ before step 0."""

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> "NoiseSchedule":
        ac = np.cumprod(1.0 - betas(config), dtype=np.float32)
        final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
        return cls(jnp.asarray(ac), jnp.asarray(final))

    def alpha_at(self, t: jax.Array) -> jax.Array:
        """ᾱ_t, with t < 0 meaning 'before the first step' (diffusers' final_alpha_cumprod)."""
        t = jnp.asarray(t)
        return jnp.where(t >= 0, self.alphas_cumprod[jnp.clip(t, 0, None)], self.final_alpha_cumprod)


def _per_example(value: jax.Array, like: jax.Array) -> jax.Array:
    value = jnp.asarray(value, jnp.float32)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """DDPM forward process q(x_t | x_0); ``t`` is a scalar or one timestep per example."""
    a = _per_example(schedule.alphas_cumprod[t], x0)
    return (jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction training target."""
    a = _per_example(schedule.alphas_cumprod[t], x0)
    return (jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0).astype(x0.dtype)


def training_target(config: SchedulerConfig, schedule: NoiseSchedule, x0, noise, t) -> jax.Array:
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def ddim_timesteps(config: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, previous timesteps), descending, exactly as diffusers' DDIMScheduler.

    The previous timestep is always ``t - num_train_timesteps // num_steps`` (diffusers' rule, also
    for 'linspace' spacing); a negative value means ᾱ_prev = final_alpha_cumprod.
    """
    n = config.num_train_timesteps
    ts = np.round(spaced_timesteps(config, num_steps)).astype(np.int64)  # only 'linspace' has fractions to round
    return ts.astype(np.int32), (ts - n // num_steps).astype(np.int32)


def spaced_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The sampling timesteps, descending, as diffusers' schedulers space them (``timestep_spacing``), before DDIM
    rounds them: 'linspace' spreads them over [0, n − 1] (fractional), 'leading' steps n // num_steps up from
    ``steps_offset``, 'trailing' steps n / num_steps down from n − 1."""
    n = config.num_train_timesteps
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(num_steps) * (n // num_steps)).round()[::-1] + config.steps_offset
    return np.round(np.arange(n, 0, -n / num_steps)) - 1


def predict_x0_eps(prediction_type: str, model_output, sample, alpha_t) -> tuple[jax.Array, jax.Array]:
    """Model output -> (predicted x_0, predicted noise) at noise level ᾱ_t."""
    sa, sb = jnp.sqrt(alpha_t), jnp.sqrt(1.0 - alpha_t)
    if prediction_type == "epsilon":
        return (sample - sb * model_output) / sa, model_output
    if prediction_type == "v_prediction":
        return sa * sample - sb * model_output, sa * model_output + sb * sample
    return model_output, (sample - sa * model_output) / sb


def ddim_step(
    schedule: NoiseSchedule,
    config: SchedulerConfig,
    model_output: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    sample: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_{t_prev}; returns (x_{t_prev}, predicted x_0). fp32 throughout.

    ``t``/``t_prev`` may be scalars or per-example vectors; ``noise`` is required when eta > 0.
    """
    dtype = sample.dtype
    model_output, sample = model_output.astype(jnp.float32), sample.astype(jnp.float32)
    a_t = _per_example(schedule.alpha_at(t), sample)
    a_prev = _per_example(schedule.alpha_at(t_prev), sample)
    x0, eps = predict_x0_eps(config.prediction_type, model_output, sample, a_t)
    if config.clip_sample:
        # As diffusers (use_clipped_model_output=False): clip x_0, keep the predicted noise.
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = _per_example(eta, sample) * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.clip(1.0 - a_prev - std**2, 0.0, None)) * eps
    if noise is not None:
        prev = prev + std * noise.astype(jnp.float32)
    return prev.astype(dtype), x0.astype(dtype)


SAMPLERS = ("ddim", "euler")


def euler_sigmas(config: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(timesteps (float), sigmas with a final 0, the initial noise's scale), as diffusers'
    ``EulerDiscreteScheduler.set_timesteps`` makes them with its defaults (linear interpolation of
    σ_t = √((1 − ᾱ_t)/ᾱ_t), no Karras sigmas, a zero final sigma): SDXL's default scheduler."""
    n = config.num_train_timesteps
    ts = spaced_timesteps(config, num_steps).astype(np.float32)
    ac = np.cumprod(1.0 - betas(config), dtype=np.float32)
    sigmas = np.interp(ts, np.arange(n), ((1 - ac) / ac) ** 0.5).astype(np.float32)
    top = float(sigmas.max())
    init_sigma = top if config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return ts, np.concatenate([sigmas, np.zeros(1, np.float32)]), init_sigma


def euler_step(config: SchedulerConfig, model_output: jax.Array, sigma, sigma_next, sample: jax.Array) -> jax.Array:
    """One Euler update at σ -> σ_next of the ODE dx/dσ = (x − x̂_0)/σ; fp32 throughout. ``model_output`` is the
    UNet's on the input x / √(σ² + 1)."""
    dtype = sample.dtype
    out, x = model_output.astype(jnp.float32), sample.astype(jnp.float32)
    if config.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif config.prediction_type == "v_prediction":
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        raise ValueError("the Euler sampler takes epsilon or v_prediction models")
    return (x + (x - x0) / sigma * (sigma_next - sigma)).astype(dtype)
