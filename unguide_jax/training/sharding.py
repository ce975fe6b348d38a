"""Device mesh ("data", "fsdp") and partition rules over parameter paths.

- Base UNet parameters: each array is split over "fsdp" along its largest axis that the fsdp size
  divides (replicated when none does). The frozen base is most of the memory; splitting it is what
  lets an SD-sized model train on small devices. XLA gathers each weight where it is used.
- Adapters and their Adam moments: replicated (SD1's object adapter is 49,536 numbers).
- Batch (the samples of a step): over "data".
The same code runs on one device (a 1×1 mesh) and many.

Paths are the pytree keys joined with "/", e.g. ``down_blocks.0.attentions.0/transformer_blocks.0/attn2/to_k/kernel``
(Linen module names contain dots) or ``adapter/down_blocks.0.attentions.0…attn2.to_k/lora_A``.

Multi-host: call ``maybe_initialize_distributed()`` before anything touches jax devices; see its docstring.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
FSDP = "fsdp-largest-divisible-axis"  # a rule value: see fsdp_spec

# First match wins (re.search over the path).
PARTITION_RULES: tuple[tuple[str, P | str], ...] = (
    (r"(^|/)lora_[AB]$", P()),   # adapter parameters and the optimizer moments that mirror them
    (r"(^|/)(step|key|count)$", P()),  # train-state scalars, PRNG key, Adam's step count
    (r".*", FSDP),               # everything else: base model weights
)


def auto_mesh_shape(devices: int, batch_size: int | None) -> tuple[int, int]:
    """(data, fsdp) for ``devices``: the batch over "data" as far as it divides (the largest divisor of
    the device count that also divides the batch), the remaining devices on "fsdp", which splits the
    frozen base weights."""
    batch = devices if batch_size is None else batch_size
    data = max(d for d in range(1, devices + 1) if devices % d == 0 and batch % d == 0)
    return data, devices // data


def make_mesh(data: int = 0, fsdp: int = 0, devices: Sequence[jax.Device] | None = None,
              batch_size: int | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default all, across hosts).

    ``data`` = ``fsdp`` = 0: derived from the device count and ``batch_size`` (``auto_mesh_shape``);
    -1 on one axis takes the devices the other leaves; explicit sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == 0 and fsdp == 0:
        data, fsdp = auto_mesh_shape(n, batch_size)
    elif data == 0 or fsdp == 0:
        raise ValueError(f"mesh data={data} x fsdp={fsdp}: give both as 0 (derived from the {n} devices and the "
                         "batch), or neither")
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if data < 1 or n % data:
            raise ValueError(f"mesh data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, there are {n}")
    if batch_size is not None and batch_size % data:
        raise ValueError(f"samples_per_step={batch_size} is not divisible by the mesh's data size {data} "
                         f"(mesh data={data} x fsdp={fsdp} on {n} devices; mesh.data=0, mesh.fsdp=0 fits any count)")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def path_name(path) -> str:
    """A pytree key path as 'a/b/c' (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """Shard the largest axis that ``fsdp_size`` divides (ties: the later axis, the output one of a kernel)."""
    if fsdp_size == 1:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis + ["fsdp"]))


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules=PARTITION_RULES) -> P:
    for pattern, rule in rules:
        if re.search(pattern, path):
            return fsdp_spec(shape, mesh.shape["fsdp"]) if rule == FSDP else rule
    raise ValueError(f"no partition rule matches parameter {path!r}")


def shardings_for(tree, mesh: Mesh, rules=PARTITION_RULES):
    """A NamedSharding for every leaf of ``tree`` (arrays or ShapeDtypeStructs), chosen by ``rules``."""
    def leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_name(path), shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Leading (sample) axis over "data" when the data size divides it, otherwise replicated."""
    data = mesh.shape["data"]
    if data > 1 and batch_size % data:
        raise ValueError(f"samples_per_step={batch_size} is not divisible by the mesh's data size {data}")
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def shard(tree, mesh: Mesh, rules=PARTITION_RULES):
    """Place ``tree`` on the mesh according to ``rules`` (a no-op for leaves already placed so)."""
    return jax.device_put(tree, shardings_for(tree, mesh, rules))


def maybe_initialize_distributed() -> bool:
    """Join a multi-host JAX job when the environment says so; return whether it did.

    Call it first thing in a training entry point, on every host, before jax.devices() is used:
      - JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=n, JAX_PROCESS_ID=i (set on each host):
        explicit cluster, e.g. several GPU machines or a localhost test with n processes;
      - UNGUIDE_DISTRIBUTED=1 without those: jax.distributed.initialize() auto-detects the cluster
        (Cloud TPU pods, SLURM, Open MPI).
    With neither set it does nothing (single host). After it, jax.devices() lists every host's devices
    and ``make_mesh`` spans them all; each host runs the same program (SPMD).
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    if os.environ.get("UNGUIDE_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        jax.distributed.initialize()
        return True
    return False


def jit_train_step(train_step, mesh: Mesh | None, rules=PARTITION_RULES):
    """``train_step(state, unet_params, embeddings) -> (state, metrics)`` jitted, donating the state.

    With a mesh, arguments are placed by ``rules`` (base weights over "fsdp", adapters replicated),
    embeddings and metrics replicated, and the jit carries explicit in/out shardings, built on the
    first call from the argument shapes; the compiled step is reused while the shapes stay the same.
    """
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    compiled: dict = {}

    def sharded_step(state, unet_params, embeddings):
        args = (state, unet_params, embeddings)
        signature = jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
        if signature not in compiled:
            state_sh = shardings_for(state, mesh, rules)
            in_sh = (state_sh, shardings_for(unet_params, mesh, rules), jax.tree.map(lambda _: replicated(mesh), embeddings))
            compiled[signature] = (in_sh, jax.jit(train_step, in_shardings=in_sh,
                                                  out_shardings=(state_sh, replicated(mesh)), donate_argnums=0))
        in_sh, jitted = compiled[signature]
        # A no-op for arguments already placed as the rules say (the usual case after the first step).
        return jitted(*jax.device_put(args, in_sh))

    return sharded_step
