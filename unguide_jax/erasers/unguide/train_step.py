"""The jitted UnGuide train step: random draws, the objective, Adam on the LoRA adapter only.

The step is a thin layer over ``objective.unguide_loss``: it draws (x_T, t_enc, t, pair) from the
state's key and differentiates the loss with respect to the adapter. The base UNet parameters are an
argument (never copied into the state, never differentiated).
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits import lora
from unguide_jax.erasers.sharded_step import jit_train_step
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    draw_samples,
    unguide_loss,
)
from unguide_jax.parallel.mesh import PARTITION_RULES, batch_sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar
    adapter: dict         # lora.Adapter: {module path: {"lora_A", "lora_B"}}
    opt_state: optax.OptState
    key: jax.Array        # typed PRNG key; split once per step


def make_optimizer(learning_rate: float, rate_in_state: bool = False) -> optax.GradientTransformation:
    """Adam as the reference (β 0.9/0.999, eps 1e-8; no clipping, no schedule, no weight decay).

    ``rate_in_state``: the learning rate lives in the optimizer state (the same updates, bitwise), so that K
    concepts trained in one vmapped step (``many.py``) each keep the rate derived for them."""
    if rate_in_state:
        adam = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps", "eps_root", "nesterov"))
        return adam(learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def init_train_state(key: jax.Array, unet_params, lora_config: lora.LoraConfig,
                     optimizer: optax.GradientTransformation, directions=None) -> TrainState:
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError("init_train_state needs a typed PRNG key (jax.random.key), not a raw uint32 key")
    init_key, step_key = jax.random.split(key)
    adapter = lora.init_lora(init_key, unet_params, lora_config, directions=directions)
    return TrainState(step=jnp.zeros((), jnp.int32), adapter=adapter, opt_state=optimizer.init(adapter), key=step_key)


def latent_shape_of(unet, latent_size: int | None = None) -> tuple[int, int, int]:
    size = latent_size or unet.config.sample_size
    if not size:
        raise ValueError("the UNet config has no sample_size: pass latent_size to make_train_step")
    return size, size, unet.config.in_channels


def make_train_step(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig, objective: ObjectiveConfig,
                    optimizer: optax.GradientTransformation, mesh=None, *, latent_size: int | None = None,
                    rules=PARTITION_RULES) -> Callable:
    """-> step(state, unet_params, embeddings) -> (state, metrics), jitted, donating ``state``.

    metrics: loss, grad_norm, and the draws of sample 0 (t_enc, t). With a mesh, arguments are placed
    by ``rules`` (base weights over "fsdp", adapter replicated), samples go over "data", and
    the jit carries explicit in/out shardings; they are built on the first call from the argument
    shapes and the compiled step is reused while the shapes stay the same.
    """
    body = train_step_body(unet, scheduler_config, lora_config, objective, optimizer, mesh, latent_size=latent_size)
    return jit_train_step(body, mesh, rules)


def train_step_body(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig, objective: ObjectiveConfig,
                    optimizer: optax.GradientTransformation, mesh=None, *,
                    latent_size: int | None = None) -> Callable:
    """The step of ``make_train_step`` before it is jitted, so that ``many.py`` can vmap it over concepts."""
    latent_shape = latent_shape_of(unet, latent_size)

    def train_step(state: TrainState, unet_params, embeddings: ConceptEmbeddings):
        key, draw_key = jax.random.split(state.key)
        x_T, t_enc, t, pair_index = draw_samples(draw_key, scheduler_config, objective, latent_shape,
                                                 embeddings.num_pairs)
        if mesh is not None:
            x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding(mesh, x_T.ndim, x_T.shape[0]))

        def loss_of(adapter):
            return unguide_loss(unet, scheduler_config, lora_config, objective, unet_params, adapter, embeddings,
                                x_T, t_enc, t, pair_index)

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state.adapter)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
        adapter = optax.apply_updates(state.adapter, updates)
        new_state = TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state, key=key)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), t_enc=t_enc[0], t=t[0])
        return new_state, metrics

    return train_step
