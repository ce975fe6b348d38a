"""Several hosts (processes) as one JAX job: start-up, who writes, and the few values they exchange.

Every process runs the same program (SPMD): the same config, the same requests, the same calls. Arrays
span all processes' devices; each process computes its devices' share. Files are written once, by
the main process (``is_main_process``); what the others must agree with (the config, which images are
already done) is checked or broadcast here.

Start-up (``maybe_initialize_distributed``), from the environment:
  - JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=n, JAX_PROCESS_ID=i (set on each host):
    an explicit cluster, e.g. several GPU machines or a localhost test with n processes;
  - UNGUIDE_DISTRIBUTED=1 without those: ``jax.distributed.initialize()`` auto-detects the cluster
    (Cloud TPU pods, SLURM, Open MPI);
  - JAX_COORDINATOR_TIMEOUT=seconds (default 300): how long to wait for the coordinator and the other
    processes before giving up with an error.
On the CPU the cross-process collectives go through gloo (jax's default).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sys
import time
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

DEFAULT_TIMEOUT_S = 300


class DistributedStartError(RuntimeError):
    """The processes of a multi-host job could not join (coordinator unreachable, a process missing)."""


def maybe_initialize_distributed() -> bool:
    """Join a multi-host JAX job when the environment says so (see the module doc); return whether it did.

    Call it first thing, on every host, before anything touches jax devices. Afterwards
    ``jax.devices()`` lists every host's devices, and meshes span them all.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    auto = os.environ.get("UNGUIDE_DISTRIBUTED", "").lower() in ("1", "true", "yes")
    if not address and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    timeout = int(os.environ.get("JAX_COORDINATOR_TIMEOUT", DEFAULT_TIMEOUT_S))
    kwargs: dict[str, Any] = {"initialization_timeout": timeout}
    if address:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        kwargs.update(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    if address and int(os.environ["JAX_PROCESS_ID"]) != 0:
        # jaxlib aborts the whole process when it cannot reach the coordinator: check first, and say so.
        _wait_for_coordinator(address, timeout)
    elif address:
        print(f"process 0 of {os.environ['JAX_NUM_PROCESSES']}: coordinating at {address}, waiting up to {timeout} s "
              "for the other processes", file=sys.stderr)
    try:
        jax.distributed.initialize(**kwargs)
    # jaxlib raises XlaRuntimeError and friends: name what failed, whatever the type.
    except Exception as err:  # noqa: BLE001
        where = f"the coordinator at {address}" if address else "the auto-detected cluster"
        raise DistributedStartError(
            f"could not join {where} within {timeout} s as process {os.environ.get('JAX_PROCESS_ID', '?')} of "
            f"{os.environ.get('JAX_NUM_PROCESSES', '?')}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            "Is the coordinator (process 0) running and reachable, and did every process start?") from err
    return True


_barriers = itertools.count()


def barrier(name: str, timeout_s: int | None = None) -> None:
    """Wait until every process reaches this point (through the coordination service, not a device
    collective). Before a process's first collective: gloo, the CPU collectives, gives up when the
    processes arrive more than 30 s apart, as uneven compile times easily make them; a barrier after
    compiling and before running lets them start together. No-op with one process."""
    if jax.process_count() == 1:
        return
    timeout = timeout_s or int(os.environ.get("JAX_COORDINATOR_TIMEOUT", DEFAULT_TIMEOUT_S))
    client = jax_distributed.global_state.client  # jax's own tests use this barrier; no public API has a timeout
    client.wait_at_barrier(f"unguide:{name}:{next(_barriers)}", timeout * 1000)


def _wait_for_coordinator(address: str, timeout: int) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedStartError(
                    f"could not reach the coordinator at {address} within {timeout} s (process "
                    f"{os.environ.get('JAX_PROCESS_ID')} of {os.environ.get('JAX_NUM_PROCESSES')}: {err}). Start "
                    "process 0 there, check the address and the firewall, or raise JAX_COORDINATOR_TIMEOUT") from None
            time.sleep(0.5)


def is_main_process() -> bool:
    """The process that writes files and draws progress bars."""
    return jax.process_index() == 0


def process_count() -> int:
    return jax.process_count()


def to_numpy(x) -> np.ndarray:
    """The whole value of ``x`` as numpy on this process. Arrays that other processes hold parts of are
    gathered (a collective: every process must call it for the same array); replicated ones are read
    from a local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        barrier("gather")
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def fetch_tree(tree):
    """``to_numpy`` on every leaf but typed PRNG keys (kept): a train state ready for writing. Call it on
    every process."""
    def fetch(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        return to_numpy(x)
    return jax.tree.map(fetch, tree)


def broadcast_json(value: Any) -> Any:
    """The main process's JSON-able ``value`` on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return value
    barrier("broadcast")
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8) if is_main_process() else None
    size = multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else data.size))
    buffer = np.zeros(int(size), np.uint8) if data is None else data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def config_digest(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(config: Any, what: str = "config") -> None:
    """Every process was started with the same ``config`` (a JSON-able value); otherwise a clear error on
    every process, before any work: processes that disagree would compute different shares of one job."""
    if jax.process_count() == 1:
        return
    barrier("config")
    digest = config_digest(config)
    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    digests = [bytes(row).hex() for row in every]
    if len(set(digests)) > 1:
        differing = [i for i, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"the {jax.process_count()} processes were started with different {what}s (hash of process "
                         f"0: {digests[0]}; processes {differing} differ: {[digests[i] for i in differing]}); start "
                         "every process with the same config and overrides")
