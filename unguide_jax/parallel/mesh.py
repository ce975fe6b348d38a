"""Device mesh ("data", "fsdp") and partition rules over parameter paths.

- Base UNet parameters: each array is split over "fsdp" along its largest axis that the fsdp size
  divides (replicated when none does). The frozen base is most of the memory; splitting it is what
  lets an SD-sized model train on small devices. XLA gathers each weight where it is used.
- Adapters and their Adam moments: replicated (SD1's object adapter is 49,536 numbers).
- Batch (the samples of a step): over "data".
The same code runs on one device (a 1×1 mesh) and many.

Paths are the pytree keys joined with "/", e.g. ``down_blocks.0.attentions.0/transformer_blocks.0/attn2/to_k/kernel``
(Linen module names contain dots) or ``adapter/down_blocks.0.attentions.0…attn2.to_k/lora_A``.

Which devices a job uses: ``job_devices`` (every device, except on XLA:CPU with several devices in one
process, where one per process: docs/xla-cpu-concurrent-devices.md).

Multi-host: ``unguide_jax.parallel.hosts``.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# A third, leading axis for K concepts trained in one run (erasers/unguide/many.py): each concept group of
# devices holds its own data x fsdp mesh, and the stacked adapters are split over the groups.
CONCEPT_AXIS = "concept"
FSDP = "fsdp-largest-divisible-axis"  # a rule value: see fsdp_spec

# First match wins (re.search over the path).
PARTITION_RULES: tuple[tuple[str, P | str], ...] = (
    (r"(^|/)lora_[AB]$", P()),   # adapter parameters and the optimizer moments that mirror them
    (r"(^|/)(step|key|count)$", P()),  # train-state scalars, PRNG key, Adam's step count
    (r".*", FSDP),               # everything else: base model weights
)


# Set to 1 to let one CPU process use all its devices anyway: for tests of the placement logic (partition
# rules, resharding a checkpoint). The values such a run computes may be wrong (job_devices).
ALL_CPU_DEVICES_ENV = "UNGUIDE_ALL_CPU_DEVICES"
_warned_cpu_devices = False


def job_devices() -> list[jax.Device]:
    """The devices a job spreads over: every device of every process, except on the CPU backend with more
    than one device in a process, where only each process's first device.

    Why: XLA:CPU (jaxlib 0.10.2) computes wrong values, differently from run to run, when programs run on
    two devices of one process at the same time. With --xla_force_host_platform_device_count=2, the
    sampler's rows at the edges of each device's batch came out wrong by up to 4 (latents) while the
    others were bit-identical; with one core, one device per process, or one program at a time, every
    row matches one device (docs/xla-cpu-concurrent-devices.md). CPU devices of one process share the
    same cores, so using one of them costs no speed; several processes (hosts) keep their parallelism.
    """
    devices = jax.devices()
    if jax.default_backend() != "cpu" or jax.local_device_count() == 1 or os.environ.get(ALL_CPU_DEVICES_ENV) == "1":
        return devices
    first = {}
    for d in devices:
        first.setdefault(d.process_index, d)
    global _warned_cpu_devices
    if not _warned_cpu_devices:
        _warned_cpu_devices = True
        print(f"note: using 1 of the {jax.local_device_count()} CPU devices of each process: XLA:CPU computes wrong "
              "values when several devices of one process run at once (docs/xla-cpu-concurrent-devices.md)",
              file=sys.stderr)
    return [first[p] for p in sorted(first)]


def auto_mesh_shape(devices: int, batch_size: int | None) -> tuple[int, int]:
    """(data, fsdp) for ``devices``: the batch over "data" as far as it divides (the largest divisor of
    the device count that also divides the batch), the remaining devices on "fsdp", which splits the
    frozen base weights."""
    batch = devices if batch_size is None else batch_size
    data = max(d for d in range(1, devices + 1) if devices % d == 0 and batch % d == 0)
    return data, devices // data


def make_mesh(data: int = 0, fsdp: int = 0, devices: Sequence[jax.Device] | None = None,
              batch_size: int | None = None, concept: int | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default ``job_devices()``: all, across hosts).

    ``data`` = ``fsdp`` = 0: derived from the device count and ``batch_size`` (``auto_mesh_shape``);
    -1 on one axis takes the devices the other leaves; explicit sizes must multiply to the device count.
    ``concept``: a ("concept", "data", "fsdp") mesh instead, ``concept`` groups of devices, each a data x fsdp
    mesh over the devices of its group (the sizes above then count the devices of one group).
    """
    guarded = devices is None
    devices = list(job_devices() if devices is None else devices)
    n = len(devices)
    guarded = guarded and n < jax.device_count()
    why = (f" (a CPU process uses one of its {jax.local_device_count()} devices: docs/xla-cpu-concurrent-devices.md)"
           if guarded else "")
    groups = 1 if concept is None else concept
    if groups < 1 or n % groups:
        raise ValueError(f"mesh concept={concept} does not divide the {n} devices{why}")
    n //= groups
    if data == 0 and fsdp == 0:
        data, fsdp = auto_mesh_shape(n, batch_size)
    elif data == 0 or fsdp == 0:
        raise ValueError(f"mesh data={data} x fsdp={fsdp}: give both as 0 (derived from the {n} devices and the "
                         "batch), or neither")
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices{why}")
        data = n // fsdp
    elif fsdp == -1:
        if data < 1 or n % data:
            raise ValueError(f"mesh data={data} does not divide the {n} devices{why}")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, there are {n}{why}")
    if batch_size is not None and batch_size % data:
        raise ValueError(f"samples_per_step={batch_size} is not divisible by the mesh's data size {data} "
                         f"(mesh data={data} x fsdp={fsdp} on {n} devices; mesh.data=0, mesh.fsdp=0 fits any count)")
    if concept is None:
        return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(groups, data, fsdp), (CONCEPT_AXIS, *MESH_AXES))


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


def place(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works across hosts for typed PRNG keys (whose
    ``device_put`` onto devices of other processes jax refuses): each key goes as its raw data. Every
    process must pass the same values. A no-op for leaves already placed so."""
    def put(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            if x.sharding == sharding:
                return x
            data = jax.device_put(np.asarray(jax.device_get(jax.random.key_data(x))) if x.is_fully_addressable
                                  else jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)
    return jax.tree.map(put, tree, shardings)


def shard(tree, mesh: Mesh, rules=PARTITION_RULES):
    """Place ``tree`` on the mesh according to ``rules`` (a no-op for leaves already placed so)."""
    return place(tree, shardings_for(tree, mesh, rules))
