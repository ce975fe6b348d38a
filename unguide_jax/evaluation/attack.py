"""A prefix-token attack in the style of UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned
Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024).

UnlearnDiffAtk attacks an unlearned (here: edited) model with the diffusion-classifier view of the model itself:
for one target image of the erased concept (its clean latent x0, drawn by the base model) it learns k prefix
tokens placed right after the start token of the concept prompt so that the *edited* model denoises x0 well again,

    min_p  E_{t, ε} ‖ε_edit(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, text([BOS, p, prompt])) − ε‖²

(a prompt under which the edited model explains the concept's image), the token embeddings optimised by
projected gradient descent: the forward pass uses the nearest vocabulary tokens and the gradient updates the
continuous embeddings (straight-through, as PEZ, Wen et al., NeurIPS 2023). The attacked prompt is then sampled
with the target image's seed, and a classifier decides whether the concept came back.

Ours: Adam on the prefix embeddings, started at random vocabulary tokens, for ``iterations`` steps of one
(t, ε) draw each, t uniform over the training timesteps, and the result returned as token ids (``project``, the
default) or as the raw embeddings. Where the authors' code (github.com/OPTML-Group/Diffusion-MU-Attack,
src/attackers/hard_prompt_.py and src/tasks/classifier_.py) differs: it walks a fixed grid of timesteps in order,
running several Adam steps (weight decay 0.1) at each with fresh noise, projects by cosine similarity where we
take the nearest token in L2, and samples and classifies the attacked prompt after every timestep of the grid to
stop at the first success; we run a fixed number of steps and classify once, after.

``prefix_attack`` runs all N target images in one jitted call (``jax.vmap`` over images of ``attack_one``, the
image axis split over the model's "data" mesh axis). With a ``PipelineTarget`` it attacks the whole UnGuide
pipeline instead of the edit alone, the attacker knowing the probe (UnGuide: Polowczyk et al., arXiv 2508.05755;
the probe in ``unguide_jax/erasers/unguide/probe.py``). UnGuidance samples from

    ε = w·CFG_base + (1 − w)·CFG_edit = CFG of ε_w,   ε_w(x, t, c) = w(c)·ε_base(x, t, c) + (1 − w(c))·ε_edit(x, t, c)

(w mixes linearly and is the prompt's in both branches, so the two CFGs fold into one), with w = w_erase where the probe's D(c) passes its bar and
w_keep elsewhere. The attack's denoising error is then that of ε_w, with the probe's step replaced by a
sigmoid so that the attacker gets a gradient through it (ours, not UnlearnDiffAtk's):

    w(c) = w_keep + (w_erase − w_keep)·sigmoid((D̂(c) − bar) / (temperature·bar))

D̂(c) is the probe's D on a few of its own draws. A prompt that slips past the probe (D̂ below the bar) makes
UnGuidance lean on the base model (w_keep = 2), which still knows the concept: the attack can win either by
making the edit forget its erasure or by hiding the concept from the probe.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unguide_jax.diffusion.schedulers import NoiseSchedule, SchedulerConfig, add_noise
from unguide_jax.edits.edit import Edit, apply_unet
from unguide_jax.erasers.unguide.objective import ObjectiveConfig, sample_until
from unguide_jax.erasers.unguide.probe import ProbeConfig, base_and_edited, probe_draws
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy
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


@dataclasses.dataclass(frozen=True)
class PipelineTarget:
    """Attack the whole UnGuide pipeline (the edit *and* its w probe) instead of the edit alone.

    ``bar``: the probe's threshold for this edit (rule paper: D(""); rule calibrated: √(D(concept)·D(""))).
    ``draws``: how many of the probe's own draws (x_T, t) the attacker evaluates D̂ on, every iteration.
    ``temperature``: the sigmoid's width standing in for the probe's step, as a fraction of ``bar``.
    """

    bar: float
    w_erase: float
    w_keep: float
    probe: ProbeConfig
    draws: int = 2
    temperature: float = 0.1

    def __post_init__(self):
        if not self.bar > 0:
            raise ValueError(f"the probe's bar must be > 0, got {self.bar}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 1 <= self.draws <= self.probe.draws:
            raise ValueError(f"draws must be in [1, probe.draws={self.probe.draws}], got {self.draws}")

    @classmethod
    def from_probe(cls, probe, guidance_scale: float = 7.5, draws: int = 2, temperature: float = 0.1) -> "PipelineTarget":
        """The target for a ``WProbe`` (erasers/unguide/probe.py): its bar as its rule sets it, its w values."""
        threshold = probe.threshold(guidance_scale)
        bar = probe.d_empty if threshold is None else threshold
        return cls(bar=float(bar), w_erase=probe.config.w_erase, w_keep=probe.config.w_keep, probe=probe.config,
                   draws=draws, temperature=temperature)


@flax.struct.dataclass
class PipelineInputs:
    """What the jitted attack needs of a ``PipelineTarget``: the probe's draws and empty prompt as arrays, the
    numbers as traced scalars (a new bar or w does not compile again), the trajectory's shape as static fields."""

    x_T: jax.Array            # (R, h, w, c): the probe's first R draws
    t: jax.Array              # (R,): their query timesteps
    uncond: jax.Array         # (1, L, D): "" for the trajectory's CFG
    guidance_scale: jax.Array
    bar: jax.Array
    w_erase: jax.Array
    w_keep: jax.Array
    temperature: jax.Array
    objective: ObjectiveConfig = flax.struct.field(pytree_node=False)
    t_enc: int = flax.struct.field(pytree_node=False)
    # w_erase == w_keep (a fixed-w or oracle row): w does not depend on the prompt, so the probe is not run
    constant_w: bool = flax.struct.field(pytree_node=False, default=False)


@dataclasses.dataclass
class AttackResult:
    """One attacked prompt per target image."""

    ids: np.ndarray          # (N, L): token ids with the learnt prefix
    texts: list[str]         # decoded, special tokens dropped
    contexts: np.ndarray     # (N, L, D): the encoder output the attacked prompt gives (``attacked_context``)
    losses: np.ndarray       # (N, iterations)
    settings: dict
    prefixes: np.ndarray | None = None  # (N, k, D): the learnt embeddings before projection


def prefixed_ids(sd, prompt: str, k: int) -> np.ndarray:
    """Token ids (L,) of ``prompt`` with k placeholder slots after the start token (the end token kept)."""
    ids = list(sd.tokenizer(prompt).input_ids)  # [BOS, ..., EOS]
    length = sd.tokenizer.model_max_length
    body = ids[1:-1][: max(0, length - 2 - k)]
    sequence = [ids[0]] + [ids[-1]] * k + body + [ids[-1]]
    pad = sd.tokenize([""])[0][-1]  # the model's padding id (EOS for SD1, 0 for SD2)
    return np.asarray(sequence + [pad] * (length - len(sequence)), np.int32)


def encode_with_prefix(text_encoder, text_params, ids: jax.Array, prefix: jax.Array,
                       skip_last_layers: int = 0) -> jax.Array:
    """Encoder output for ids (B, L) whose positions 1..k get the embeddings ``prefix`` (k, D); ``skip_last_layers``:
    the model's clip skip, as ``StableDiffusion.encode_prompts`` applies it."""
    k = prefix.shape[0]

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and ".".join(context.module.path) == TOKEN_EMBEDDING:
            out = out.at[:, 1:1 + k].set(jnp.broadcast_to(prefix.astype(out.dtype), (out.shape[0],) + prefix.shape))
        return out

    with nn.intercept_methods(intercept):
        hidden, _ = text_encoder.apply({"params": text_params}, ids, skip_last_layers=skip_last_layers)
    return hidden


def token_table(text_params) -> jax.Array:
    return text_params[TOKEN_EMBEDDING]["embedding"]


def nearest_tokens(embeddings: jax.Array, table: jax.Array) -> jax.Array:
    """Vocabulary ids of the nearest (L2) token embeddings, (k,)."""
    d2 = jnp.sum(table**2, axis=1)[None] - 2 * embeddings @ table.T
    return jnp.argmin(d2, axis=1)


def smooth_w(d: jax.Array, bar, w_erase, w_keep, temperature) -> jax.Array:
    """The probe's step w = w_erase if D > bar else w_keep, as a sigmoid of width ``temperature``·bar."""
    return w_keep + (w_erase - w_keep) * jax.nn.sigmoid((d - bar) / (temperature * bar))


def pipeline_prediction(unet, scheduler_config: SchedulerConfig, unet_params, edit: Edit, pipeline: PipelineInputs,
                        x_t: jax.Array, t: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ε_w at (x_t, t, c), w(c), D̂(c)) for one context c (1, L, D): the model UnGuidance samples from.
    With a constant w, D̂ is not measured (NaN)."""
    if pipeline.constant_w:
        base, edited = base_and_edited(unet, unet_params, edit, x_t.astype(jnp.float32), t, context)
        return pipeline.w_keep * base + (1 - pipeline.w_keep) * edited, pipeline.w_keep, jnp.float32(jnp.nan)
    draws = pipeline.x_T.shape[0]
    c_r = jnp.broadcast_to(context, (draws,) + context.shape[1:])
    # The probe's trajectory without a gradient: backpropagating through its CFG steps would cost twice as many
    # UNet calls again, each step's activations kept (and its while loop cannot be reversed); the prompt's
    # gradient still reaches D̂ through ε at (z, t, c), where the probe measures the edit.
    z = jax.lax.stop_gradient(sample_until(
        unet, unet_params, scheduler_config, pipeline.objective, pipeline.x_T,
        jnp.full((draws,), pipeline.t_enc, jnp.int32), jax.lax.stop_gradient(c_r),
        jnp.broadcast_to(pipeline.uncond, c_r.shape), pipeline.guidance_scale))
    # The probe's rows and the attack's in one UNet call.
    base, edited = base_and_edited(unet, unet_params, edit, jnp.concatenate([z, x_t.astype(jnp.float32)]),
                                   jnp.concatenate([pipeline.t, t]), jnp.concatenate([c_r, context]))
    diff = (edited[:draws] - base[:draws]).reshape(draws, -1)
    d = jnp.mean(jnp.sqrt(jnp.sum(diff**2, axis=-1)))
    w = smooth_w(d, pipeline.bar, pipeline.w_erase, pipeline.w_keep, pipeline.temperature)
    return w * base[draws:] + (1 - w) * edited[draws:], w, d


def attack_loss(unet, text_encoder, scheduler_config: SchedulerConfig, config: AttackConfig, unet_params,
                text_params, edit: Edit, ids: jax.Array, x0: jax.Array, prefix: jax.Array, t: jax.Array,
                noise: jax.Array, pipeline: PipelineInputs | None = None) -> jax.Array:
    """The denoising error of the attacked model on x0 (1, h, w, c) at one draw (t (1,), noise): the edit's
    (``pipeline`` None) or UnGuidance's effective model's. Differentiable in ``prefix`` (k, D)."""
    table = token_table(text_params)
    used = prefix + jax.lax.stop_gradient(table[nearest_tokens(prefix, table)] - prefix) if config.project else prefix
    context = encode_with_prefix(text_encoder, text_params, ids[None], used)
    x_t = add_noise(NoiseSchedule.from_config(scheduler_config), x0, noise, t)
    if pipeline is None:
        eps = apply_unet(unet, unet_params, edit, x_t, t, context).astype(jnp.float32)
    else:
        eps, _, _ = pipeline_prediction(unet, scheduler_config, unet_params, edit, pipeline, x_t, t, context)
    return jnp.mean((eps - noise) ** 2)


def attack_one(unet, text_encoder, scheduler_config: SchedulerConfig, config: AttackConfig, unet_params, text_params,
               edit: Edit, ids: jax.Array, x0: jax.Array, key: jax.Array, pipeline: PipelineInputs | None = None):
    """The attack on one target latent x0 (1, h, w, c) -> (ids (L,) with the learnt prefix, its embeddings
    (k, D), loss per iteration). Pure: ``run_attack`` jits it, ``prefix_attack`` vmaps it over images."""
    table = token_table(text_params)
    optimizer = optax.adam(config.learning_rate)
    k_init, key = jax.random.split(key)
    start = jax.random.randint(k_init, (config.prefix_tokens,), 0, table.shape[0])
    prefix = table[start].astype(jnp.float32)
    loss_fn = functools.partial(attack_loss, unet, text_encoder, scheduler_config, config, unet_params, text_params,
                                edit, ids, x0, pipeline=pipeline)

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


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "scheduler_config", "config"))
def run_attack(unet, text_encoder, scheduler_config: SchedulerConfig, config: AttackConfig, unet_params, text_params,
               edit: Edit, ids: jax.Array, x0: jax.Array, key: jax.Array, pipeline: PipelineInputs | None = None):
    """-> (token ids (L,) with the learnt prefix, the prefix embeddings (k, D), loss per iteration).
    x0 (1, h, w, c): the target latent. One image; ``prefix_attack`` runs many in one call."""
    return attack_one(unet, text_encoder, scheduler_config, config, unet_params, text_params, edit, ids, x0, key,
                      pipeline)


def _context(text_encoder, config: AttackConfig, text_params, ids: jax.Array, prefix: jax.Array) -> jax.Array:
    table = token_table(text_params)
    used = table[ids[1:1 + config.prefix_tokens]] if config.project else prefix
    return encode_with_prefix(text_encoder, text_params, ids[None], used)


def attacked_context(sd, ids: jax.Array, prefix: jax.Array, config: AttackConfig) -> jax.Array:
    """The encoder output the attacked prompt gives: its projected tokens, or the raw prefix embeddings."""
    return _context(sd.text_encoder, config, sd.params["text_encoder"], jnp.asarray(ids), prefix)


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "scheduler_config", "config"))
def _attack_images(unet, text_encoder, scheduler_config: SchedulerConfig, config: AttackConfig, unet_params,
                   text_params, edit: Edit, ids: jax.Array, x0: jax.Array, key_data: jax.Array,
                   pipeline: PipelineInputs | None):
    """``attack_one`` on every row of x0 (N, h, w, c), the rows' keys as raw key data (N, ...), plus each row's
    attacked context. The rows are independent, so they split over whatever devices x0 is sharded on."""

    def one(x, k):
        adv_ids, prefix, losses = attack_one(unet, text_encoder, scheduler_config, config, unet_params, text_params,
                                             edit, ids, x[None], jax.random.wrap_key_data(k), pipeline)
        return adv_ids, prefix, losses, _context(text_encoder, config, text_params, adv_ids, prefix)[0]

    return jax.vmap(one)(x0, key_data)


def pipeline_inputs(sd, target: PipelineTarget, latent_shape: tuple[int, int, int],
                    guidance_scale: float = 7.5) -> PipelineInputs:
    """The jitted attack's view of ``target``: the probe's first ``target.draws`` draws, as the probe makes them."""
    x_T, t = probe_draws(target.probe, sd.scheduler, tuple(latent_shape))
    scalar = functools.partial(jnp.asarray, dtype=jnp.float32)
    return PipelineInputs(x_T=x_T[:target.draws], t=t[:target.draws], uncond=jnp.asarray(sd.encode_prompts([""])),
                          guidance_scale=scalar(guidance_scale), bar=scalar(target.bar),
                          w_erase=scalar(target.w_erase), w_keep=scalar(target.w_keep),
                          temperature=scalar(target.temperature), objective=target.probe.objective,
                          t_enc=int(target.probe.t_enc), constant_w=target.w_erase == target.w_keep)


def prefix_attack(sd, edit: Edit, config: AttackConfig, prompt: str, x0: np.ndarray, seeds: Sequence[int],
                  target: PipelineTarget | None = None, guidance_scale: float = 7.5) -> AttackResult:
    """The prefix attack on ``prompt`` against each target latent x0 (N, h, w, c), all N in one jitted call.

    Image j draws from ``jax.random.key(config.seed + seeds[j])``, so it gets what ``run_attack`` gives it alone.
    The images are padded to a multiple of the mesh's data size and split over it (the padding repeats the last
    image and is dropped after). ``target``: attack the UnGuide pipeline (its probe at ``guidance_scale``, the CFG
    scale the prompts are sampled with) instead of the edit alone."""
    x0 = np.asarray(x0)
    seeds = [int(s) for s in seeds]
    n = x0.shape[0]
    if len(seeds) != n:
        raise ValueError(f"one seed per target image: {n} images, {len(seeds)} seeds")
    ids = prefixed_ids(sd, prompt, config.prefix_tokens)
    rows = padded_rows(n, sd.mesh)
    key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(config.seed + s))) for s in seeds])
    pipeline = None if target is None else sd.put_replicated(pipeline_inputs(sd, target, x0.shape[1:], guidance_scale))
    adv_ids, prefixes, losses, contexts = _attack_images(
        sd.unet, sd.text_encoder, sd.scheduler, config, sd.put_replicated(sd.params["unet"]),
        sd.put_replicated(sd.params["text_encoder"]), sd.put_replicated(edit), sd.put_replicated(jnp.asarray(ids)),
        sd.put_rows(x0, rows), sd.put_rows(key_data, rows), pipeline)
    adv_ids, prefixes, losses, contexts = (to_numpy(a)[:n] for a in (adv_ids, prefixes, losses, contexts))
    special = set(sd.tokenizer.all_special_ids)
    texts = [sd.tokenizer.decode([int(i) for i in row if int(i) not in special]) for row in adv_ids]
    settings = dict(dataclasses.asdict(config), target=None if target is None else
                    dict(dataclasses.asdict(target), guidance_scale=float(guidance_scale)))
    return AttackResult(ids=adv_ids, texts=texts, contexts=contexts, losses=losses, settings=settings,
                        prefixes=prefixes)
