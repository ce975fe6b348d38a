"""Sampling-side placement: a mesh with every device on "data", rows sharded over it, the rest replicated.

Sampling, the w probe and the evaluation shard their rows (prompts, latents, seeds, scales, w) over the
mesh's "data" axis and replicate the weights: each device computes rows / data of every call, with
``jax.jit`` following the inputs' NamedShardings (one compile per shape). A batch whose row count the
data size does not divide is padded by repeating its last row, and the padding is cut off afterwards.
Works across hosts: every process passes the same global values, each device takes its slice.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unguide_jax.parallel.hosts import to_numpy
from unguide_jax.parallel.mesh import make_mesh, place


def data_mesh(devices=None) -> Mesh:
    """Every device of the job (``job_devices()``, across hosts, by default) on the "data" axis."""
    return make_mesh(data=-1, fsdp=1, devices=devices)


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["data"])


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """``rows`` rounded up to a multiple of the mesh's data size."""
    data = data_size(mesh)
    return -(-rows // data) * data


def pad_rows(x, rows: int) -> np.ndarray:
    """``x`` (numpy or a jax array) with its last row repeated up to ``rows`` rows, as numpy."""
    x = to_numpy(x)
    if x.shape[0] > rows:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
    return x if x.shape[0] == rows else np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def put_rows(mesh: Mesh, x) -> jax.Array:
    """``x`` (the same global value on every process) sharded over "data" along its first axis."""
    x = to_numpy(x)
    if x.shape[0] % data_size(mesh):
        raise ValueError(f"{x.shape[0]} rows do not split over the mesh's data size {data_size(mesh)}: pad them first")
    return place(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))


def put_replicated(mesh: Mesh, tree):
    """Every leaf of ``tree`` (the same value on every process) replicated on the mesh's devices; leaves
    already placed so are kept as they are."""
    sharding = NamedSharding(mesh, P())
    return place(tree, jax.tree.map(lambda _: sharding, tree))
