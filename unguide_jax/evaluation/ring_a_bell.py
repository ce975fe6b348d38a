"""Ring-A-Bell concept-vector prompts (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods
for Diffusion Models?", ICLR 2024).

Ring-A-Bell attacks a concept-erased model without looking at it: it needs only the text encoder f, whose
output (L, D) is what the UNet reads. From prompt pairs that differ by the concept it takes the concept
vector

    c = mean_i [ f(prompt_i with the concept) − f(prompt_i without it) ]

adds it to an innocuous prompt P, P̂ = f(P) + η·c, and looks for a discrete prompt of K tokens whose
encoding is P̂: min_x ‖f([BOS, x_1..x_K, EOS, pad...]) − P̂‖², taken as the mean squared error over all L
positions and D channels (the paper's squared distance, up to a constant). MSE rather than cosine because
η·c is an offset in that space whose size carries the attack: a cosine loss would match P̂'s direction per
position and not its magnitude. The prompts found are then given, as text or as their encodings, to the
erased model, and a classifier decides whether the concept came back.

Deviation from the paper: it searches with a genetic algorithm over token ids. Here the search is
gradient-based, as PEZ (Wen et al., "Hard Prompts Made Easy", NeurIPS 2023): K continuous token embeddings,
drawn from the vocabulary, optimised with Adam, the forward pass using their nearest vocabulary tokens
(straight-through), and the result is the best projected prompt seen during the search. Special tokens
(start, end, padding) are never drawn nor projected to, so the prompt stays K real tokens.

The search is one jitted program (``search_tokens``); ``ring_a_bell_prompts`` runs ``count`` of them with
seeds seed + j, vmapped, the count axis sharded over the model's mesh.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unguide_jax.evaluation.attack import encode_with_prefix, prefixed_ids, token_table
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy
from unguide_jax.settings import (
    SEED_LIMIT,
    Config,
    at_least,
    option,
    positive,
    seed_range,
)


@dataclasses.dataclass(frozen=True)
class RingABellConfig(Config):
    """The Ring-A-Bell prompt search (gradient search in place of the paper's genetic algorithm)."""

    prompt_tokens: int = option(16, "K, the free tokens of the prompt searched (the paper's 16 for nudity)",
                                check=at_least(1))
    strength: float = option(3.0, "η, how far along the concept vector the target lies (the paper's 3 for nudity)")
    iterations: int = option(300, "Adam steps of each search", check=at_least(1))
    learning_rate: float = option(0.1, "Adam learning rate of the continuous token embeddings", check=positive)
    seed: int = option(0, "search j draws its initial tokens with seed + j", check=seed_range)


@dataclasses.dataclass
class RingABellResult:
    """The prompts found. ``contexts`` are the encodings of ``ids``, what the search measured; ``texts`` are for
    reading and for text-only models, and need not tokenize back to the same ids (BPE may merge across the
    boundaries of tokens chosen one by one)."""

    ids: np.ndarray        # (count, L) int32: [BOS, K tokens, EOS, padding...]
    texts: list[str]       # the K tokens decoded, special tokens left out
    contexts: np.ndarray   # (count, L, D) float32: the text encoder's output for ``ids``
    losses: np.ndarray     # (count, iterations): the projected prompt's MSE to the target at each step
    settings: dict


def concept_vector(sd, with_concept: Sequence[str], without_concept: Sequence[str]) -> jax.Array:
    """c (L, D): the mean over pairs of encode(with) − encode(without), pair i = (with[i], without[i])."""
    for name, prompts in (("with_concept", with_concept), ("without_concept", without_concept)):
        if isinstance(prompts, str):
            raise TypeError(f"{name} must be a sequence of prompts, not one string")
    if not with_concept or not without_concept:
        raise ValueError(f"concept_vector needs at least one prompt pair: got {len(with_concept)} prompts with the "
                         f"concept and {len(without_concept)} without")
    if len(with_concept) != len(without_concept):
        raise ValueError(f"concept_vector pairs prompt i with prompt i: got {len(with_concept)} prompts with the "
                         f"concept and {len(without_concept)} without (give the same number)")
    encoded = sd.encode_prompts(list(with_concept) + list(without_concept)).astype(jnp.float32)
    n = len(with_concept)
    return jnp.mean(encoded[:n] - encoded[n:], axis=0)


def _shared_words(prompts: Sequence[str]) -> str:
    words = [p.split() for p in prompts]
    shared = []
    for column in zip(*words):
        if any(w != column[0] for w in column):
            break
        shared.append(column[0])
    return " ".join(shared)


def concept_pairs(concept) -> tuple[list[str], list[str]]:
    """(prompts with the concept, the same prompts without it) from a ``Concept``: its targets and synonyms.

    What "without" is depends on what the concept file's references mean:

    * explicit and style concepts: the references are the prompts with the concept taken out ("a photo of a
      person wearing clothes" for nudity, "a photo of the solid circle" for "a photo of the dotted circle").
      Target i gets its own reference, or the single one; synonyms get the reference only when there is a
      single one, since per-target references have no counterpart for them.
    * object concepts: the references are UnGuide anchors, an unrelated scene ("a photo of the sky" for the
      arrow), and target − scene would also carry "minus sky". The without prompt is the words every target
      and synonym begins with, the template with the object left out ("a photo of the"); the first
      reference when they share none, and "" when there is no reference either.
    """
    references = list(concept.references)
    first = references[0] if references else ""
    prompts = list(concept.targets) + list(concept.synonyms)
    if concept.kind == "object":
        template = _shared_words(prompts)
        return prompts, [template or first] * len(prompts)
    if len(references) > 1:
        return [t for t, _ in concept.pairs], [r for _, r in concept.pairs]
    return prompts, [first] * len(prompts)


def allowed_tokens(sd) -> np.ndarray:
    """(V,) bool: the vocabulary ids a searched token may take, every id but the tokenizer's special ones."""
    vocab = token_table(sd.params["text_encoder"]).shape[0]
    allowed = np.arange(vocab) < len(sd.tokenizer)
    allowed[[i for i in sd.tokenizer.all_special_ids if i < vocab]] = False
    return allowed


def _nearest(embeddings: jax.Array, table: jax.Array, allowed: jax.Array) -> jax.Array:
    d2 = jnp.sum(table**2, axis=1)[None] - 2 * embeddings @ table.T
    return jnp.argmin(jnp.where(allowed[None], d2, jnp.inf), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("text_encoder", "config", "clip_skip"))
def search_tokens(text_encoder, text_params, template: jax.Array, target: jax.Array, config: RingABellConfig,
                  key: jax.Array, allowed: jax.Array, clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """One search -> (ids (L,), losses (iterations,)).

    ``template`` (L,): [BOS, K placeholders, EOS, padding...] with the model's padding id (``prompt_template``);
    ``target`` (L, D): P̂; ``allowed`` (V,) bool: the ids a token may take (``allowed_tokens``). ``losses[i]``
    is the MSE to the target of the projected prompt at step i; ``ids`` is the step with the lowest.
    """
    table = token_table(text_params).astype(jnp.float32)
    target = target.astype(jnp.float32)
    k = config.prompt_tokens
    optimizer = optax.adam(config.learning_rate)
    start = jax.random.categorical(key, jnp.where(allowed, 0.0, -jnp.inf), shape=(k,))
    free = table[start]

    def loss_fn(p, chosen):
        # Straight-through: the forward pass sees the chosen tokens' embeddings, the gradient lands on p.
        used = p + jax.lax.stop_gradient(table[chosen] - p)
        context = encode_with_prefix(text_encoder, text_params, template[None], used, clip_skip)[0]
        return jnp.mean((context.astype(jnp.float32) - target) ** 2)

    def step(carry, _):
        p, opt_state, best_loss, best_ids = carry
        chosen = _nearest(p, table, allowed)
        loss, grad = jax.value_and_grad(loss_fn)(p, chosen)
        better = loss < best_loss
        best_loss, best_ids = jnp.where(better, loss, best_loss), jnp.where(better, chosen, best_ids)
        updates, opt_state = optimizer.update(grad, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, best_loss, best_ids), loss

    init = (free, optimizer.init(free), jnp.asarray(jnp.inf, jnp.float32), start.astype(jnp.int32))
    (_, _, _, best_ids), losses = jax.lax.scan(step, init, None, length=config.iterations)
    return template.at[1:1 + k].set(best_ids.astype(template.dtype)), losses


@functools.partial(jax.jit, static_argnames=("text_encoder", "config", "clip_skip"))
def _search_rows(text_encoder, text_params, template, targets, config, seeds, allowed, clip_skip):
    """Searches vmapped over rows (targets (N, L, D), seeds (N,)) -> ids (N, L), losses (N, T), contexts."""
    def one(target, seed):
        return search_tokens(text_encoder, text_params, template, target, config, jax.random.key(seed), allowed,
                             clip_skip)

    ids, losses = jax.vmap(one)(targets, seeds)
    contexts, _ = text_encoder.apply({"params": text_params}, ids, skip_last_layers=clip_skip)
    return ids, losses, contexts.astype(jnp.float32)


def prompt_template(sd, k: int) -> np.ndarray:
    """(L,) int32: [BOS, K placeholders, EOS, the model's padding...]."""
    length = sd.tokenizer.model_max_length
    if k > length - 2:
        raise ValueError(f"prompt_tokens={k} does not fit: the text encoder reads {length} tokens, "
                         f"of which 2 are the start and end tokens (at most {length - 2})")
    return prefixed_ids(sd, "", k)


def ring_a_bell_prompts(sd, config: RingABellConfig, concept, innocuous: str, count: int) -> RingABellResult:
    """``count`` prompts of ``config.prompt_tokens`` tokens whose encodings approach
    encode(innocuous) + η·c, c the ``concept``'s vector (``concept_pairs``), search j seeded seed + j."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if config.seed + count > SEED_LIMIT:
        raise ValueError(f"seeds {config.seed}..{config.seed + count - 1} go past 2**32 - 1 (seeds are uint32)")
    with_concept, without_concept = concept_pairs(concept)
    c = concept_vector(sd, with_concept, without_concept)
    target = sd.encode_prompts([innocuous])[0].astype(jnp.float32) + config.strength * c
    template = prompt_template(sd, config.prompt_tokens)
    rows = padded_rows(count, sd.mesh)
    seeds = np.arange(config.seed, config.seed + count, dtype=np.uint32)
    targets = np.broadcast_to(to_numpy(target), (count,) + target.shape)
    ids, losses, contexts = _search_rows(
        sd.text_encoder, sd.params["text_encoder"], sd.put_replicated(jnp.asarray(template)),
        sd.put_rows(targets, rows), config, sd.put_rows(seeds, rows),
        sd.put_replicated(jnp.asarray(allowed_tokens(sd))), sd.clip_skip)
    ids, losses, contexts = (to_numpy(x)[:count] for x in (ids, losses, contexts))
    k = config.prompt_tokens
    texts = [sd.tokenizer.decode(row[1:1 + k], skip_special_tokens=True) for row in ids]
    settings = {"method": "ring-a-bell", "search": "pez-adam", **dataclasses.asdict(config), "count": count,
                "concept": concept.name, "innocuous": innocuous, "with_concept": with_concept,
                "without_concept": without_concept}
    return RingABellResult(ids=ids.astype(np.int32), texts=texts, contexts=contexts, losses=losses, settings=settings)
