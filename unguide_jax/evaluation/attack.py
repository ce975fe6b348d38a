"""A prefix-token attack in the style of UnlearnDiffAtk (Zhang et al., ECCV 2024).

For one target image of the erased concept (its clean latent x0, drawn by the base model) the attack
learns k prefix tokens placed right after the start token of the concept prompt so that the *edited*
model denoises x0 well again:

    min_p  E_{t, ε} ‖ε_edit(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, text([BOS, p, prompt])) − ε‖²

(the diffusion-classifier view: a prompt under which the edited model explains the concept's image).
Adam on the prefix embeddings, ``iterations`` steps of one (t, ε) draw each. With ``project`` (default)
the forward pass uses the nearest vocabulary tokens (straight-through, as PEZ and UnlearnDiffAtk),
so the result is a real token sequence; it is returned as token ids. The attacked prompt is then
sampled with the same seed as the target image and the classifier decides whether the concept
came back.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unguide_jax.diffusion.schedulers import NoiseSchedule, SchedulerConfig, add_noise
from unguide_jax.edits.edit import Edit, apply_unet
from unguide_jax.settings import Config, at_least, option, positive

TOKEN_EMBEDDING = "embeddings.token_embedding"


@dataclasses.dataclass(frozen=True)
class AttackConfig(Config):
    """The prefix-token attack (UnlearnDiffAtk-style)."""

    prefix_tokens: int = option(3, "adversarial tokens after the start token (3 for objects, 5 for nudity)",
                                check=at_least(1))
    iterations: int = option(40, "optimisation steps per image", check=at_least(1))
    learning_rate: float = option(0.01, "Adam learning rate of the token embeddings", check=positive)
    project: bool = option(True, "forward with the nearest vocabulary tokens (straight-through)")
    seed: int = option(0, "seed of the attack's draws")


def prefixed_ids(sd, prompt: str, k: int) -> np.ndarray:
    """Token ids (L,) of ``prompt`` with k placeholder slots after the start token (the end token kept)."""
    ids = list(sd.tokenizer(prompt).input_ids)  # [BOS, ..., EOS]
    length = sd.tokenizer.model_max_length
    body = ids[1:-1][: max(0, length - 2 - k)]
    sequence = [ids[0]] + [ids[-1]] * k + body + [ids[-1]]
    pad = sd.tokenize([""])[0][-1]  # the model's padding id (EOS for SD1, 0 for SD2)
    return np.asarray(sequence + [pad] * (length - len(sequence)), np.int32)


def encode_with_prefix(text_encoder, text_params, ids: jax.Array, prefix: jax.Array) -> jax.Array:
    """Encoder output for ids (B, L) whose positions 1..k get the embeddings ``prefix`` (k, D)."""
    k = prefix.shape[0]

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and ".".join(context.module.path) == TOKEN_EMBEDDING:
            out = out.at[:, 1:1 + k].set(jnp.broadcast_to(prefix.astype(out.dtype), (out.shape[0],) + prefix.shape))
        return out

    with nn.intercept_methods(intercept):
        hidden, _ = text_encoder.apply({"params": text_params}, ids)
    return hidden


def token_table(text_params) -> jax.Array:
    return text_params[TOKEN_EMBEDDING]["embedding"]


def nearest_tokens(embeddings: jax.Array, table: jax.Array) -> jax.Array:
    """Vocabulary ids of the nearest (L2) token embeddings, (k,)."""
    d2 = jnp.sum(table**2, axis=1)[None] - 2 * embeddings @ table.T
    return jnp.argmin(d2, axis=1)


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "scheduler_config", "config"))
def run_attack(unet, text_encoder, scheduler_config: SchedulerConfig, config: AttackConfig, unet_params, text_params,
               edit: Edit, ids: jax.Array, x0: jax.Array, key: jax.Array):
    """-> (token ids (L,) with the learnt prefix, loss per iteration). x0 (1, h, w, c): the target latent."""
    schedule = NoiseSchedule.from_config(scheduler_config)
    table = token_table(text_params)
    optimizer = optax.adam(config.learning_rate)
    k_init, key = jax.random.split(key)
    start = jax.random.randint(k_init, (config.prefix_tokens,), 0, table.shape[0])
    prefix = table[start].astype(jnp.float32)

    def loss_fn(p, t, noise):
        used = p + jax.lax.stop_gradient(table[nearest_tokens(p, table)] - p) if config.project else p
        context = encode_with_prefix(text_encoder, text_params, ids[None], used)
        x_t = add_noise(schedule, x0, noise, t)
        eps = apply_unet(unet, unet_params, edit, x_t, t, context)
        return jnp.mean((eps.astype(jnp.float32) - noise) ** 2)

    def step(carry, step_key):
        p, opt_state = carry
        k_t, k_noise = jax.random.split(step_key)
        t = jax.random.randint(k_t, (1,), 0, scheduler_config.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        loss, grad = jax.value_and_grad(loss_fn)(p, t, noise)
        updates, opt_state = optimizer.update(grad, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (prefix, _), losses = jax.lax.scan(step, (prefix, optimizer.init(prefix)),
                                       jax.random.split(key, config.iterations))
    chosen = nearest_tokens(prefix, table) if config.project else jnp.zeros((config.prefix_tokens,), jnp.int32)
    return ids.at[1:1 + config.prefix_tokens].set(chosen.astype(ids.dtype)), prefix, losses


def attacked_context(sd, ids: jax.Array, prefix: jax.Array, config: AttackConfig) -> jax.Array:
    """The encoder output the attacked prompt gives: its projected tokens, or the raw prefix embeddings."""
    table = token_table(sd.params["text_encoder"])
    used = table[ids[1:1 + config.prefix_tokens]] if config.project else prefix
    return encode_with_prefix(sd.text_encoder, sd.params["text_encoder"], jnp.asarray(ids)[None], used)
