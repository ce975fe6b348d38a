"""K concepts in one run: K UnGuide adapters trained together, one jitted step vmapped over a concept axis.

Concept k's slice of every stacked value is what its own single-concept run holds: its state starts as
``init_train_state(keys[k], ...)`` and each step is ``train_step_body`` on that slice, so its adapter follows
the single run with the same seed (to rounding: a batched matmul may sum in another order). The base UNet is
shared, not vmapped: one copy of the frozen weights serves every concept.

On a mesh with a "concept" axis (``parallel.mesh.make_mesh(concept=...)``) the leading K axis of the
states, the embeddings and the metrics is split over it; inside each concept group the single step's own
placement holds (samples over "data", base weights over "fsdp"). K must be a multiple of the concept
axis size: padding with dummy concepts would spend a device group's time on adapters nobody keeps.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits import lora
from unguide_jax.erasers.sharded_step import compiled_per_shapes
from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig
from unguide_jax.erasers.unguide.train_step import TrainState, init_train_state, train_step_body
from unguide_jax.parallel.mesh import (
    CONCEPT_AXIS,
    PARTITION_RULES,
    partition_spec,
    path_name,
    shardings_for,
)


def stack(trees: Sequence):
    """Equal-shaped pytrees -> one pytree whose leaves have a leading axis of len(trees)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def concept_slice(stacked, k: int):
    """Concept k's own pytree (a state, embeddings, metrics) out of a stacked one."""
    return jax.tree.map(lambda x: x[k], stacked)


def init_many_states(keys, unet_params, lora_config: lora.LoraConfig, optimizer: optax.GradientTransformation,
                     directions_per_concept: Sequence | None = None) -> TrainState:
    """K single-concept states stacked: concept k's is exactly ``init_train_state(keys[k], ...)``.

    ``keys``: K typed PRNG keys (a (K,) key array or a sequence). ``directions_per_concept``: K directions
    for ``lora.init = "concept"`` (each as ``init_train_state`` takes it; None entries start random)."""
    keys = list(keys)
    directions = [None] * len(keys) if directions_per_concept is None else list(directions_per_concept)
    if len(directions) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(directions)} concept directions")
    if not keys:
        raise ValueError("init_many_states needs at least one key (one per concept)")
    return stack([init_train_state(key, unet_params, lora_config, optimizer, directions=d)
                  for key, d in zip(keys, directions)])


def stack_embeddings(per_concept: Sequence[ConceptEmbeddings]) -> ConceptEmbeddings:
    """K concepts' embeddings as one ConceptEmbeddings with a leading K axis (target (K, P, L, D), ...).

    Every concept needs the same number of (target, reference) pairs: the step draws the pair index from
    the static pair count, so padding a concept with repeated pairs would change its draws."""
    per_concept = list(per_concept)
    if not per_concept:
        raise ValueError("stack_embeddings needs at least one concept")
    shapes = {tuple(x.shape for x in jax.tree.leaves(e)) for e in per_concept}
    if len(shapes) > 1:
        pairs = [e.num_pairs for e in per_concept]
        raise ValueError(f"the concepts' embeddings differ in shape (pairs per concept: {pairs}); one run of "
                         "several concepts needs the same number of pairs and the same text encoder for all")
    return stack(per_concept)


def concept_axis_size(mesh: Mesh | None) -> int:
    return mesh.shape[CONCEPT_AXIS] if mesh is not None and CONCEPT_AXIS in mesh.axis_names else 1


def stacked_shardings(tree, mesh: Mesh, rules=PARTITION_RULES):
    """Shardings for a stacked pytree: each leaf's slice placed as ``rules`` place a single concept's, the
    leading K axis over "concept" (replicated when the mesh has no such axis)."""
    lead = CONCEPT_AXIS if CONCEPT_AXIS in mesh.axis_names else None

    def leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, P(lead, *partition_spec(path_name(path), shape[1:], mesh, rules)))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def make_many_train_step(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig,
                         objective: ObjectiveConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                         *, latent_size: int | None = None, rules=PARTITION_RULES) -> Callable:
    """-> step(states, unet_params, stacked_embeddings) -> (states, metrics), jitted, donating ``states``.

    ``states`` from ``init_many_states``, embeddings from ``stack_embeddings``; metrics are the single
    step's, each with a leading K axis. ``mesh``: as ``make_train_step``'s, optionally with a "concept" axis
    (then K must be a multiple of its size). Compiled on the first call for the argument shapes.
    """
    body = train_step_body(unet, scheduler_config, lora_config, objective, optimizer, mesh, latent_size=latent_size)
    groups = concept_axis_size(mesh)
    # spmd_axis_name: the body's own constraints (samples over "data") then keep K over "concept" too,
    # instead of asking for K replicated.
    many = jax.vmap(body, in_axes=(0, None, 0), spmd_axis_name=CONCEPT_AXIS if groups > 1 else None)

    def check(states):
        k = jax.tree.leaves(states)[0].shape[0]
        if k % groups:
            raise ValueError(f"{k} concepts do not split over the mesh's concept axis of {groups}: use a concept "
                             f"axis size that divides {k}")

    if mesh is None:
        return jax.jit(many, donate_argnums=0, compiler_options=XLA_CPU_OPTIONS)

    per_concept = NamedSharding(mesh, P(CONCEPT_AXIS if groups > 1 else None))

    def jitted_for(args):
        states, unet_params, embeddings = args
        states_sh = stacked_shardings(states, mesh, rules)
        in_sh = (states_sh, shardings_for(unet_params, mesh, rules), jax.tree.map(lambda _: per_concept, embeddings))
        return in_sh, jax.jit(many, in_shardings=in_sh, out_shardings=(states_sh, per_concept), donate_argnums=0,
                              compiler_options=XLA_CPU_OPTIONS)

    step = compiled_per_shapes(jitted_for, "many-concept train step")

    def sharded_step(states, unet_params, embeddings):
        check(states)
        return step(states, unet_params, embeddings)

    sharded_step.lower = step.lower
    return sharded_step
