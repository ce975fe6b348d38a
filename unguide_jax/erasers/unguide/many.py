"""K concepts in one run: K UnGuide adapters trained together in one jitted step over a concept axis.

Concept k's slice of every stacked value is what its own single-concept run holds: its state starts as
``init_train_state(keys[k], ...)`` and each step computes ``train_step_body``'s step on that slice (the same
draws from the same key, the same trajectory, loss and Adam update), so its adapter follows the single run with
the same seed (to rounding: a batched matmul may sum in another order). The base UNet is shared, not vmapped:
one copy of the frozen weights serves every concept.

The step has three phases: the draws (vmapped over K), the trajectories that produce each sample's z, and the
loss, gradient and Adam update at z (vmapped over K, ``objective.loss_at_latent``). The trajectories are
*packed*: each concept draws its own t_enc, so its trajectory runs its own number of DDIM steps, and a vmapped
loop would run every one of them as long as the longest (K·max UNet evaluations instead of Σ). Instead the
K·S trajectories of a step share ``trajectory_slots`` UNet rows: each iteration advances by one DDIM step the
slots with the most steps left (each with its concept's adapter merged into the weights), in
max(longest, ceil(Σ steps / slots)) iterations.

``trajectory_slots = 0`` takes about half the trajectories (``default_slots``): with t_enc uniform, Σ/slots
is then about the longest trajectory, so the loop runs about as many iterations as the longest one and its
rows do about Σ steps of work. Measured on the 2-core CPU (embedded model, K = 10, 50 DDIM steps, 2026-12-07,
other jobs running; bench/bench_many_concepts.py --concepts 10 --slots 2,5,10): slots 2 ran 105 iterations
(work 1.00× Σ) at 12.6 concept-steps/s, slots 5 ran 44 (1.06×) at 12.8, slots 10 (= no packing) 42
(2.01×) at 7.4. On this CPU a UNet row costs the same in any batch, so fewer slots lose nothing but
latency per iteration; on an accelerator, where wider batches are nearly free, more slots may pay: set it.

On a mesh with a "concept" axis (``parallel.mesh.make_mesh(concept=...)``) the leading K axis of the
states, the embeddings and the metrics is split over it, and the packing stays inside each concept group
(K -> groups × K/groups, the packed loop vmapped over the groups): no latent moves between groups. Inside
a group the single step's own placement holds (samples over "data", base weights over "fsdp"; the slots
over "data" when its size divides them). K must be a multiple of the concept axis size: padding with dummy
concepts would spend a device group's time on adapters nobody keeps.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS, guided_prediction
from unguide_jax.diffusion.schedulers import NoiseSchedule, SchedulerConfig, ddim_step
from unguide_jax.edits import lora
from unguide_jax.erasers.sharded_step import compiled_per_shapes
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    draw_samples,
    loss_at_latent,
    num_sampling_steps,
    sampling_table,
)
from unguide_jax.erasers.unguide.train_step import TrainState, init_train_state, latent_shape_of
from unguide_jax.parallel.mesh import (
    CONCEPT_AXIS,
    PARTITION_RULES,
    batch_sharding,
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


def default_slots(trajectories: int, data: int = 1) -> int:
    """``trajectory_slots = 0``: about half the trajectories of a concept group, a multiple of the mesh's
    data size (the slots are the UNet batch, split over "data"), at least 1 (module docstring: why half)."""
    slots = max(1, -(-trajectories // 2))
    return min(trajectories, -(-slots // data) * data)


def packed_trajectories(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig,
                        objective: ObjectiveConfig, base_params, adapters, embeddings: ConceptEmbeddings, x_T, t_enc,
                        pair_index, slots: int, slot_sharding=None):
    """Each concept's ``trajectory_latent`` for its own draws, the K·S trajectories packed into ``slots`` UNet rows.

    adapters, embeddings: stacked over K concepts; x_T (K, S, h, w, c); t_enc, pair_index (K, S).
    -> (z (K, S, h, w, c), iterations of the packed loop). Each iteration advances by one DDIM step (CFG with
    its own concept's adapter) the ``slots`` trajectories with the most steps left; one with none left keeps
    its latent. Longest-remaining-first is optimal for chains of unit steps: the loop runs
    max(max steps, ceil(Σ steps / slots)) iterations. ``slot_sharding``: placement of the slot batch.
    """
    concepts, per_concept = t_enc.shape
    n = concepts * per_concept
    if not 1 <= slots <= n:
        raise ValueError(f"trajectory_slots={slots} is not in [1, {n}] (the {concepts} concepts' {n} trajectories)")
    schedule = NoiseSchedule.from_config(scheduler_config)
    timesteps, prev, start = sampling_table(scheduler_config, objective)
    last = len(timesteps) - 1
    timesteps, prev = jnp.asarray(timesteps), jnp.asarray(prev)
    flat = lambda x: x.reshape((n,) + x.shape[2:])  # noqa: E731
    steps = flat(num_sampling_steps(objective, jnp.asarray(t_enc, jnp.int32)))
    pair_index = jnp.asarray(pair_index, jnp.int32)
    cond = flat(jax.vmap(lambda e, p: e.target[p])(embeddings, pair_index))
    uncond = flat(jnp.broadcast_to(embeddings.uncond, (concepts, per_concept) + embeddings.uncond.shape[2:]))
    owner = jnp.arange(n, dtype=jnp.int32) // per_concept
    frozen = jax.lax.stop_gradient(adapters)

    def cfg_row(adapter, z, t, c, u):
        # The adapter merged into the weights as ``trajectory_latent`` does, so that each row computes what
        # its own run computes; only the adapted K/V kernels become per-slot copies.
        params = lora.merge(base_params, [(adapter, lora_config.alpha)])
        return guided_prediction(unet, params, z[None], t, c[None], u[None], objective.start_guidance)[0]

    def body(carry):
        z, done, iterations = carry
        # Every trajectory has a slot (one concept, one sample): nothing to choose.
        idx = jnp.arange(n) if slots == n else jax.lax.top_k(steps - done, slots)[1]
        j = done[idx]
        running = j < steps[idx]
        at = jnp.minimum(start + j, last)  # a stopped slot's index may run past the table; its result is dropped
        t, t_prev = timesteps[at], prev[at]
        z_slot = z[idx]
        if slot_sharding is not None:
            z_slot = jax.lax.with_sharding_constraint(z_slot, slot_sharding)
        adapter = jax.tree.map(lambda a: a[owner[idx]], frozen)
        out = jax.vmap(cfg_row)(adapter, z_slot, t, cond[idx], uncond[idx])
        z_next, _ = ddim_step(schedule, scheduler_config, out, t, t_prev, z_slot)
        keep = running.reshape((slots,) + (1,) * (z.ndim - 1))
        z = z.at[idx].set(jnp.where(keep, z_next, z_slot), unique_indices=True)
        return z, done.at[idx].add(running.astype(jnp.int32), unique_indices=True), iterations + 1

    carry = (flat(x_T).astype(jnp.float32), jnp.zeros((n,), jnp.int32), jnp.zeros((), jnp.int32))
    z, _, iterations = jax.lax.while_loop(lambda c: jnp.any(c[1] < steps), body, carry)
    return jax.lax.stop_gradient(z.reshape(x_T.shape)), iterations


def make_many_train_step(unet, scheduler_config: SchedulerConfig, lora_config: lora.LoraConfig,
                         objective: ObjectiveConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                         *, latent_size: int | None = None, rules=PARTITION_RULES,
                         trajectory_slots: int = 0) -> Callable:
    """-> step(states, unet_params, stacked_embeddings) -> (states, metrics), jitted, donating ``states``.

    ``states`` from ``init_many_states``, embeddings from ``stack_embeddings``; metrics are the single
    step's, each with a leading K axis, and trajectory_iterations (the packed loop's iterations, the same for
    the concepts of a group). ``mesh``: as ``make_train_step``'s, optionally with a "concept" axis (then K
    must be a multiple of its size). ``trajectory_slots``: trajectories advanced per iteration in each concept
    group (0: ``default_slots``). Compiled on the first call for the argument shapes.
    """
    if trajectory_slots < 0:
        raise ValueError(f"trajectory_slots={trajectory_slots}: give a positive number of slots, or 0 for automatic")
    latent_shape = latent_shape_of(unet, latent_size)
    groups = concept_axis_size(mesh)
    data = mesh.shape["data"] if mesh is not None else 1
    # spmd_axis_name: the per-concept constraints (samples over "data") then keep K over "concept" too,
    # instead of asking for K replicated.
    spmd = CONCEPT_AXIS if groups > 1 else None

    def samples_sharded(x):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, x.shape[0]))

    def draw(state: TrainState, embeddings: ConceptEmbeddings):
        # The single step's draws from the same key.
        key, draw_key = jax.random.split(state.key)
        x_T, t_enc, t, pair_index = draw_samples(draw_key, scheduler_config, objective, latent_shape,
                                                 embeddings.num_pairs)
        return key, samples_sharded(x_T), t_enc, t, pair_index

    def update(state: TrainState, key, unet_params, embeddings: ConceptEmbeddings, z, t_enc, t, pair_index):
        def loss_of(adapter):
            return loss_at_latent(unet, scheduler_config, lora_config, objective, unet_params, adapter, embeddings,
                                  samples_sharded(z), t_enc, t, pair_index)

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state.adapter)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
        adapter = optax.apply_updates(state.adapter, updates)
        new_state = TrainState(step=state.step + 1, adapter=adapter, opt_state=opt_state, key=key)
        return new_state, dict(loss=loss, grad_norm=optax.global_norm(grads), t_enc=t_enc[0], t=t[0])

    def many(states: TrainState, unet_params, embeddings: ConceptEmbeddings):
        k = states.step.shape[0]
        per_group = k // groups
        trajectories = per_group * objective.samples_per_step
        slots = trajectory_slots or default_slots(trajectories, data)
        slot_sharding = None
        if mesh is not None and slots % data == 0:
            slot_sharding = batch_sharding(mesh, 1 + len(latent_shape), slots)
        keys, x_T, t_enc, t, pair_index = jax.vmap(draw, spmd_axis_name=spmd)(states, embeddings)

        def pack(adapters, embeddings, x_T, t_enc, pair_index):
            return packed_trajectories(unet, scheduler_config, lora_config, objective, unet_params, adapters,
                                       embeddings, x_T, t_enc, pair_index, slots, slot_sharding)

        # Packing stays within a concept group (K -> groups x K/groups): no latent moves between groups.
        grouped = jax.tree.map(lambda x: x.reshape((groups, per_group) + x.shape[1:]),
                               (states.adapter, embeddings, x_T, t_enc, pair_index))
        z, iterations = jax.vmap(pack, spmd_axis_name=spmd)(*grouped)
        z = z.reshape(x_T.shape)
        new_states, metrics = jax.vmap(update, in_axes=(0, 0, None, 0, 0, 0, 0, 0), spmd_axis_name=spmd)(
            states, keys, unet_params, embeddings, z, t_enc, t, pair_index)
        metrics["trajectory_iterations"] = jnp.repeat(iterations, per_group)
        return new_states, metrics

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
