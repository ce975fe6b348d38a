"""Learnable prompts (Bui et al., arXiv 2403.12326): erasure with extra memory tokens.

m learnable tokens (p_K, p_V), each (m, text_dim), are appended to the text tokens of the
cross-attention layers in a scope (``unguide_jax.edits.PromptMemory``). On top of ESD's objective
(empty prompt as e0, η = 1, start guidance 3) one iteration alternates:

    z     = DDIM (eta 0) with CFG ``start_guidance`` on c by the current fine-tuned model θ' (no tokens),
            stopped at t_enc (``unguide.objective``, either timestep mode)
    ε*    = ε₀(z,t,∅) − η (ε₀(z,t,c) − ε₀(z,t,∅))
    model step (θ'; Adam of its own):  L1 = 1.0·‖ε_θ'(z,t,c) − ε*‖² + 0.1·‖ε_θ',p(z,t,c) − ε*‖²
    prompt steps (p; Adam of its own, ``prompt_steps`` times after the model step):
                                       L2 = ‖ε_θ',p(z,t,c) − ε₀(z,t,c)‖²   (the tokens re-capture the concept)

θ' is the base plus a full delta on a parameter subset: ``xattn`` (every attn2 parameter; objects and
styles) or ``noxattn`` (everything but attn2, the time embedding and the output layers; nudity).
Both terms of L1 come out of one UNet call (two rows, the tokens masked out of the first).
Decisions where the paper is open (see README): each phase updates only its own parameter set; the
tokens start from the text encoder's output at the concept word (plus small noise); the deployed
edit drops the tokens by default (``edit.safetensors``), ``edit_with_prompt.safetensors`` keeps them.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits.edit import (
    Edit,
    PromptMemory,
    apply_unet,
    memory_layers,
    merge_weights,
)
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    draw_samples,
    sample_until,
)
from unguide_jax.settings import Config, non_negative, option, positive

# ESD's parameter subsets, as regexes over "module path.param" (re.search).
PARAMETER_SUBSETS = {
    "xattn": (r"\.attn2\.", None),
    "noxattn": (r".", r"(\.attn2\.|^time_embedding\.|^conv_norm_out\.|^conv_out\.)"),
}
INITS = ("concept", "random")


@dataclasses.dataclass(frozen=True)
class PromptConfig(Config):
    """Learnable prompts on top of ESD. The learning rates are this project's for the embedded model (1e-4,
    1000 iterations); the paper trains SD 1.4 at 1e-5 for both (the sd15 presets)."""

    tokens: int = option(10, "m learnable key/value memory tokens", check=non_negative)
    scope: str = option("mid", "the layers that get the tokens: mid | midout | inmidout")
    parameters: str = option("xattn", "fine-tuned subset: xattn (attn2: objects, styles) | noxattn (ESD-u: nudity)",
                             choices=tuple(PARAMETER_SUBSETS))
    init: str = option("concept", "concept (the encoder's output at the concept word, plus noise) | random (small "
                                  "noise)", choices=INITS)
    prompt_steps: int = option(2, "prompt updates per iteration", check=non_negative)
    model_weight: float = option(1.0, "weight of the loss without the tokens")
    prompt_weight: float = option(0.1, "weight of the loss with the tokens")
    model_learning_rate: float = option(1e-4, "Adam learning rate of the fine-tuned weights", check=positive)
    prompt_learning_rate: float = option(1e-4, "Adam learning rate of the tokens", check=positive)


@flax.struct.dataclass
class PromptTrainState:
    step: jax.Array
    adapter: dict          # {"delta": {module: {param: array}}, "memory": {"keys": (m, D), "values": (m, D)}}
    opt_state: dict        # {"model": Adam state of delta, "prompt": Adam state of memory}
    key: jax.Array


def trainable_parameters(unet_params, subset: str) -> list[tuple[str, str]]:
    """(module path, param name) of the subset; an error if it selects nothing."""
    include, exclude = PARAMETER_SUBSETS[subset]
    chosen = []
    for key in traverse_util.flatten_dict(unet_params):
        module, name = ".".join(key[:-1]), key[-1]
        path = f"{module}.{name}"
        if re.search(include, path) and not (exclude and re.search(exclude, path)):
            chosen.append((module, name))
    if not chosen:
        raise ValueError(f"parameter subset {subset!r} selects no parameter of the model")
    return sorted(chosen)


def make_optimizers(config: PromptConfig) -> dict[str, optax.GradientTransformation]:
    adam = lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # noqa: E731
    return {"model": adam(config.model_learning_rate), "prompt": adam(config.prompt_learning_rate)}


def init_state(key: jax.Array, unet_params, config: PromptConfig, concept_vector: jax.Array) -> PromptTrainState:
    """Zero delta on the subset, tokens around ``concept_vector`` (text_dim,) or small noise."""
    flat = traverse_util.flatten_dict(unet_params)
    index = {(".".join(k[:-1]), k[-1]): k for k in flat}
    delta: dict = {}
    for module, name in trainable_parameters(unet_params, config.parameters):
        leaf = flat[index[(module, name)]]
        delta.setdefault(module, {})[name] = jnp.zeros(leaf.shape, jnp.float32)
    memory_layers(unet_params, config.scope)  # an unknown scope, or one without layers, fails here
    init_key, step_key = jax.random.split(key)
    k_keys, k_values = jax.random.split(init_key)
    width = concept_vector.shape[-1]
    center = concept_vector.astype(jnp.float32) if config.init == "concept" else jnp.zeros((width,), jnp.float32)
    scale = 0.01 * (jnp.std(concept_vector) if config.init == "concept" else 1.0)
    memory = {"keys": center + scale * jax.random.normal(k_keys, (config.tokens, width)),
              "values": center + scale * jax.random.normal(k_values, (config.tokens, width))}
    adapter = {"delta": delta, "memory": memory}
    optimizers = make_optimizers(config)
    return PromptTrainState(step=jnp.zeros((), jnp.int32), adapter=adapter,
                            opt_state={"model": optimizers["model"].init(delta),
                                       "prompt": optimizers["prompt"].init(memory)},
                            key=step_key)


def to_edit(adapter: dict, config: PromptConfig, keep_prompt: bool) -> Edit:
    memory = PromptMemory(adapter["memory"]["keys"], adapter["memory"]["values"], config.scope) if keep_prompt else None
    return Edit(deltas=adapter["delta"], memory=memory)


def make_step(unet, scheduler_config: SchedulerConfig, objective: ObjectiveConfig, config: PromptConfig,
              latent_shape: tuple[int, int, int]) -> Callable:
    """-> step(state, unet_params, embeddings) -> (state, metrics), pure (jit it with
    ``unguide.sharding.jit_train_step``)."""
    optimizers = make_optimizers(config)

    def mse(a, b):
        return jnp.mean((a.astype(jnp.float32) - b) ** 2)

    def step(state: PromptTrainState, unet_params, embeddings: ConceptEmbeddings):
        key, draw_key = jax.random.split(state.key)
        x_T, t_enc, t, pair = draw_samples(draw_key, scheduler_config, objective, latent_shape, embeddings.num_pairs)
        n = x_T.shape[0]
        cond = embeddings.target[pair]
        uncond = jnp.broadcast_to(embeddings.uncond, (n,) + embeddings.uncond.shape[1:])
        delta, memory = state.adapter["delta"], state.adapter["memory"]

        model = jax.lax.stop_gradient(merge_weights(unet_params, Edit(deltas=delta)))
        z = jax.lax.stop_gradient(sample_until(unet, model, scheduler_config, objective, x_T, t_enc, cond, uncond))
        base = unet.apply({"params": unet_params}, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                          jnp.concatenate([uncond, cond])).astype(jnp.float32)
        e0, ep = jnp.split(base, 2)
        eps_star = jax.lax.stop_gradient(e0 - objective.negative_guidance * (ep - e0))

        def with_memory(params, mem, strength, context):
            rows = context.shape[0] // n
            return apply_unet(unet, params, Edit(memory=PromptMemory(mem["keys"], mem["values"], config.scope)),
                              jnp.concatenate([z] * rows), jnp.concatenate([t] * rows), context, strength=strength)

        def model_loss(d):
            params = merge_weights(unet_params, Edit(deltas=d))
            out = with_memory(params, jax.lax.stop_gradient(memory), jnp.concatenate([jnp.zeros(n), jnp.ones(n)]),
                              jnp.concatenate([cond, cond]))
            plain, prompted = jnp.split(out, 2)
            return config.model_weight * mse(plain, eps_star) + config.prompt_weight * mse(prompted, eps_star)

        model_loss_value, grads = jax.value_and_grad(model_loss)(delta)
        updates, model_opt = optimizers["model"].update(grads, state.opt_state["model"], delta)
        delta = optax.apply_updates(delta, updates)

        params = jax.lax.stop_gradient(merge_weights(unet_params, Edit(deltas=delta)))

        def prompt_loss(mem):
            return mse(with_memory(params, mem, None, cond), jax.lax.stop_gradient(ep))

        prompt_opt, prompt_loss_value = state.opt_state["prompt"], jnp.zeros(())
        for _ in range(config.prompt_steps):
            prompt_loss_value, g = jax.value_and_grad(prompt_loss)(memory)
            updates, prompt_opt = optimizers["prompt"].update(g, prompt_opt, memory)
            memory = optax.apply_updates(memory, updates)

        new_state = PromptTrainState(step=state.step + 1, adapter={"delta": delta, "memory": memory},
                                     opt_state={"model": model_opt, "prompt": prompt_opt}, key=key)
        metrics = dict(loss=model_loss_value, prompt_loss=prompt_loss_value, t_enc=t_enc[0], t=t[0])
        return new_state, metrics

    return step
