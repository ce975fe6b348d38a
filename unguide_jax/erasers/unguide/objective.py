"""The UnGuide objective (Polowczyk et al., arXiv 2508.05755), with the reference code's timestep quirks as an
option.

One sample of the objective, given x_T, t_enc = k and a query timestep t:
  1. z = DDIM (eta 0) from x_T with the *current* LoRA model, CFG ``start_guidance`` on the target
     prompt, stopped early according to k (no gradient);
  2. e0 = ε₀(z, t, reference), ep = ε₀(z, t, target) with the frozen base model;
  3. ε* = e0 − γ (ep − e0), γ = ``negative_guidance``;
  4. loss = mean (ε_θ(z, t, target) − sg(ε*))², ε_θ the LoRA model, the only term with a gradient.
"ε" is the raw model output whatever the prediction type (as ESD/UnGuide do on SD2's v-models).

Timestep modes, for a DDIM table τ (descending, N = ``ddim_steps`` entries; SD: 981, 961, …, 1):
  reference  the authors' code (inherited from ESD): sampling drops τ[0] and treats x_T as the
             latent at τ[1]; stopping at k runs min(N − k, N − 1) steps, leaving z at noise level
             τ[N−k] − 20 (ᾱ(20k − 39) for SD); t is drawn from [round(kT/N), round((k+1)T/N)), so
             the model is told z is 39–58 steps noisier than it is.
  corrected  sampling starts at τ[0]; stopping at k runs N − 1 − k steps, leaving z at exactly τ[N−1−k]
             (20k + 1 for SD), and the model is queried at that t.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.sampler import guided_prediction
from unguide_jax.diffusion.schedulers import (
    NoiseSchedule,
    SchedulerConfig,
    ddim_step,
    ddim_timesteps,
)
from unguide_jax.edits import lora
from unguide_jax.settings import Config, at_least, option

TIMESTEP_MODES = ("corrected", "reference")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(Config):
    """The erasure objective (UnGuide, Sec. 3; the timestep modes above)."""

    start_guidance: float = option(9.0, "CFG scale of the trajectory that produces z")
    negative_guidance: float = option(2.0, "γ in the target ε* = e0 − γ (ep − e0)")
    ddim_steps: int = option(50, "DDIM steps of that trajectory", check=at_least(2))
    # "corrected" trains on exactly the (z, t) pairs that DDIM/UnGuidance sampling visits (the latent is
    # where the model is told it is, and t = τ[0], the step that lays out the image, is trained too);
    # "reference" reproduces the authors' off-by-39..58-steps queries and dropped first step.
    timestep_mode: str = option("corrected", "corrected: query at the true timestep; reference: the authors' code",
                                choices=TIMESTEP_MODES)
    samples_per_step: int = option(1, "independent (x_T, t_enc, t, pair) draws per step, batched through the UNet",
                                   check=at_least(1))


@flax.struct.dataclass
class ConceptEmbeddings:
    """Text-encoder outputs of a concept: pair i is (target[i], reference[i])."""

    target: jax.Array     # (P, L, D)
    reference: jax.Array  # (P, L, D)
    uncond: jax.Array     # (1, L, D): the empty prompt, CFG's unconditional branch

    @property
    def num_pairs(self) -> int:
        return self.target.shape[0]


def embed_concept(sd, concept) -> ConceptEmbeddings:
    """Encode a concept's (target, reference) pairs and "" with the pipeline's text encoder."""
    targets, references = zip(*concept.pairs)
    return ConceptEmbeddings(
        target=jnp.asarray(sd.encode_prompts(list(targets))),
        reference=jnp.asarray(sd.encode_prompts(list(references))),
        uncond=jnp.asarray(sd.encode_prompts([""])),
    )


# --- timestep arithmetic (works on Python ints, numpy and traced arrays) ---------------------------

def sampling_table(scheduler_config: SchedulerConfig, objective: ObjectiveConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(DDIM timesteps, their previous timesteps, index of the first step sampling runs)."""
    timesteps, prev = ddim_timesteps(scheduler_config, objective.ddim_steps)
    return timesteps, prev, 1 if objective.timestep_mode == "reference" else 0


def num_sampling_steps(objective: ObjectiveConfig, t_enc):
    """How many DDIM steps the trajectory runs before stopping at t_enc (quirk 2 in reference mode)."""
    n = objective.ddim_steps
    if objective.timestep_mode == "reference":
        return jnp.minimum(n - t_enc, n - 1) if isinstance(t_enc, jax.Array) else np.minimum(n - t_enc, n - 1)
    return n - 1 - t_enc


def query_timestep_range(scheduler_config: SchedulerConfig, objective: ObjectiveConfig, t_enc):
    """[low, high) of the DDPM timestep t the models are queried at for a trajectory stopped at t_enc."""
    xp = jnp if isinstance(t_enc, jax.Array) else np
    n, total = objective.ddim_steps, scheduler_config.num_train_timesteps
    if objective.timestep_mode == "reference":
        # ESD's og_num / og_num_lim: the k-th of N equal slices of the training timesteps.
        low = xp.round(t_enc * total / n).astype(np.int32)
        high = xp.round((t_enc + 1) * total / n).astype(np.int32)
        return low, high
    timesteps, _, _ = sampling_table(scheduler_config, objective)
    t = xp.asarray(timesteps)[n - 1 - t_enc]
    return t, t + 1


def sampling_timesteps(scheduler_config: SchedulerConfig, objective: ObjectiveConfig, t_enc: int) -> np.ndarray:
    """The timesteps the trajectory stopped at ``t_enc`` queries the model at, in order (for inspection)."""
    timesteps, _, start = sampling_table(scheduler_config, objective)
    return timesteps[start:start + int(num_sampling_steps(objective, int(t_enc)))]


def latent_timestep(scheduler_config: SchedulerConfig, objective: ObjectiveConfig, t_enc):
    """The noise level z is actually at after stopping at t_enc (negative: ᾱ_final, before step 0)."""
    timesteps, prev, start = sampling_table(scheduler_config, objective)
    steps = num_sampling_steps(objective, t_enc)
    xp = jnp if isinstance(t_enc, jax.Array) else np
    last = start + steps - 1
    return xp.where(steps > 0, xp.asarray(prev)[xp.maximum(last, 0)], xp.asarray(timesteps)[start])


# --- the objective -------------------------------------------------------------------------------

def sample_until(unet, unet_params, scheduler_config, objective, x_T, t_enc, cond, uncond,
                 guidance_scale=None) -> jax.Array:
    """DDIM (eta 0) with CFG from x_T, each example stopped after its own number of steps.

    ``guidance_scale`` (scalar or per example; default ``objective.start_guidance``) is the CFG scale.

    All examples start at the same timestep, so step j is the same timestep for everyone; the loop
    runs max(steps) iterations (a while loop: the length is data-dependent) and an example that has
    stopped keeps its latent.
    """
    schedule = NoiseSchedule.from_config(scheduler_config)
    timesteps, prev, start = sampling_table(scheduler_config, objective)
    timesteps, prev = jnp.asarray(timesteps), jnp.asarray(prev)
    steps = num_sampling_steps(objective, jnp.asarray(t_enc, jnp.int32))
    batch = x_T.shape[0]
    scale = objective.start_guidance if guidance_scale is None else guidance_scale

    def body(j, z):
        t, t_prev = timesteps[start + j], prev[start + j]
        out = guided_prediction(unet, unet_params, z, t, cond, uncond, scale)
        z_next, _ = ddim_step(schedule, scheduler_config, out, t, t_prev, z)
        running = (j < steps).reshape((batch,) + (1,) * (z.ndim - 1))
        return jnp.where(running, z_next, z)

    return jax.lax.fori_loop(0, jnp.max(steps), body, x_T.astype(jnp.float32))


def _sample_inputs(embeddings: ConceptEmbeddings, batch: int, t_enc, pair_index):
    """(t_enc (S,), pair_index (S,), target (S, L, D), uncond (S, L, D)) for S = ``batch`` samples."""
    t_enc = jnp.asarray(t_enc, jnp.int32).reshape(batch)
    pair_index = jnp.zeros((batch,), jnp.int32) if pair_index is None else jnp.asarray(pair_index, jnp.int32)
    uncond = jnp.broadcast_to(embeddings.uncond, (batch,) + embeddings.uncond.shape[1:])
    return t_enc, pair_index, embeddings.target[pair_index], uncond


def trajectory_latent(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig,
                      objective: ObjectiveConfig, base_params, adapter, embeddings: ConceptEmbeddings, x_T, t_enc,
                      pair_index=None) -> jax.Array:
    """Step 1 of the objective: z from x_T by DDIM with the adapter frozen (no gradient), (S, h, w, c)."""
    t_enc, _, target, uncond = _sample_inputs(embeddings, x_T.shape[0], t_enc, pair_index)
    frozen_adapter = jax.lax.stop_gradient(adapter)
    sampling_params = lora.merge(base_params, [(frozen_adapter, lora_config.alpha)])
    z = sample_until(unet, sampling_params, scheduler_config, objective, x_T, t_enc, target, uncond)
    return jax.lax.stop_gradient(z)


def loss_at_latent(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig, objective: ObjectiveConfig,
                   base_params, adapter, embeddings: ConceptEmbeddings, z, t_enc, t, pair_index=None):
    """Steps 2-4 of the objective at a given z (``trajectory_latent``'s) -> (loss, aux) as ``unguide_loss``'s."""
    batch = z.shape[0]
    t_enc, pair_index, target, _ = _sample_inputs(embeddings, batch, t_enc, pair_index)
    t = jnp.asarray(t, jnp.int32).reshape(batch)
    reference = embeddings.reference[pair_index]
    z = jax.lax.stop_gradient(z)

    # Both frozen-base predictions in one UNet call.
    base_out = unet.apply({"params": base_params}, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                          jnp.concatenate([reference, target])).astype(jnp.float32)
    e0, ep = jnp.split(base_out, 2)
    eps_star = jax.lax.stop_gradient(e0 - objective.negative_guidance * (ep - e0))

    eps_theta = unet.apply({"params": lora.merge(base_params, [(adapter, lora_config.alpha)])}, z, t,
                           target).astype(jnp.float32)
    loss = jnp.mean((eps_theta - eps_star) ** 2)
    aux = dict(z=z, eps_star=eps_star, eps_theta=jax.lax.stop_gradient(eps_theta),
               steps=num_sampling_steps(objective, t_enc))
    return loss, aux


def unguide_loss(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig, objective: ObjectiveConfig,
                 base_params, adapter, embeddings: ConceptEmbeddings, x_T, t_enc, t, pair_index=None):
    """The objective for given draws -> (loss, aux). Pure; differentiate with respect to ``adapter``.

    x_T (S, h, w, c); t_enc, t, pair_index (S,) ints (pair_index None: pair 0 for every sample).
    aux: z (the latent the models are queried at), eps_star, eps_theta, steps (DDIM steps run).
    ``trajectory_latent`` then ``loss_at_latent``: apart so that several trajectories can be packed
    (``many.py``) before their losses.
    """
    z = trajectory_latent(unet, scheduler_config, lora_config, objective, base_params, adapter, embeddings, x_T,
                          t_enc, pair_index)
    return loss_at_latent(unet, scheduler_config, lora_config, objective, base_params, adapter, embeddings, z,
                          t_enc, t, pair_index)


def draw_samples(key: jax.Array, scheduler_config: SchedulerConfig, objective: ObjectiveConfig,
                 latent_shape: tuple[int, int, int], num_pairs: int):
    """The random part of one iteration: (x_T, t_enc, t, pair_index), ``samples_per_step`` of each."""
    k_tenc, k_t, k_noise, k_pair = jax.random.split(key, 4)
    batch = objective.samples_per_step
    t_enc = jax.random.randint(k_tenc, (batch,), 0, objective.ddim_steps, jnp.int32)
    low, high = query_timestep_range(scheduler_config, objective, t_enc)
    t = jax.random.randint(k_t, (batch,), low, high, jnp.int32)
    x_T = jax.random.normal(k_noise, (batch,) + tuple(latent_shape), jnp.float32)
    pair_index = jax.random.randint(k_pair, (batch,), 0, num_pairs, jnp.int32)
    return x_T, t_enc, t, pair_index


# The pure loss, compiled: the configs and the module are static (hashable), everything else arrays.
unguide_loss_jit = jax.jit(unguide_loss, static_argnums=(0, 1, 2, 3))
