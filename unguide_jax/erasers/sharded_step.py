"""The jitted train step over a mesh: arguments placed by the partition rules, the state donated."""
from __future__ import annotations

import jax
from jax.sharding import Mesh

from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS
from unguide_jax.parallel.hosts import barrier
from unguide_jax.parallel.mesh import PARTITION_RULES, place, replicated, shardings_for


def jit_train_step(train_step, mesh: Mesh | None, rules=PARTITION_RULES):
    """``train_step(state, unet_params, embeddings) -> (state, metrics)`` jitted, donating the state.

    With a mesh, arguments are placed by ``rules`` (base weights over "fsdp", adapters replicated),
    embeddings and metrics replicated, and the jit carries explicit in/out shardings, built on the
    first call from the argument shapes; the compiled step is reused while the shapes stay the same.
    Compiled with the samplers' XLA options (``XLA_CPU_OPTIONS``: on the CPU the shipped model's UnGuide
    step ran 1.8x faster per iteration without YNNPACK fusions; docs/benchmarks.md).
    """
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0, compiler_options=XLA_CPU_OPTIONS)

    def jitted_for(args):
        state, unet_params, embeddings = args
        state_sh = shardings_for(state, mesh, rules)
        in_sh = (state_sh, shardings_for(unet_params, mesh, rules), jax.tree.map(lambda _: replicated(mesh), embeddings))
        return in_sh, jax.jit(train_step, in_shardings=in_sh, out_shardings=(state_sh, replicated(mesh)),
                              donate_argnums=0, compiler_options=XLA_CPU_OPTIONS)

    return compiled_per_shapes(jitted_for, "train step")


def compiled_per_shapes(jitted_for, what: str):
    """The step that ``jitted_for(args) -> (in_shardings, jitted)`` builds, compiled once per argument shapes and
    called on arguments placed as those shardings say. ``what`` names the multi-process barrier."""
    compiled: dict = {}

    def sharded_step(*args):
        signature = jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
        if signature not in compiled:
            in_sh, jitted = jitted_for(args)
            if jax.process_count() > 1:  # compiled ahead, so that the processes start the step together
                jitted = jitted.lower(*place(args, in_sh)).compile()
                barrier(f"{what} compiled")
            compiled[signature] = (in_sh, jitted)
        in_sh, jitted = compiled[signature]
        # A no-op for arguments already placed as the rules say (the usual case after the first step).
        return jitted(*place(args, in_sh))

    # For memory and cost analysis: arrays or ShapeDtypeStructs -> jax.stages.Lowered, allocating nothing.
    sharded_step.lower = lambda *args: jitted_for(args)[1].lower(*args)
    return sharded_step
