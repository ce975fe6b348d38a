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

A process that dies (killed, crashed, its host lost) takes the job with it; the others should say so in
one line and stop. Each process listens on a small "watch" socket whose address it leaves in the
coordination service's key-value store; when a collective fails, ``explain_lost_process`` probes the
others' sockets (a refused connection: that process is gone) and names them (``LostProcess``). At exit,
a process whose peer is gone skips jax's shutdown barrier, which would wait for the dead one until the
heartbeat timeout (100 s) and then abort the process with a C++ stack dump (exit status 134).
When process 0, the coordinator, dies, jaxlib's coordination agent in every other process aborts it at once
from a C++ thread (``client.h: Terminating process because the JAX distributed service detected fatal
errors``, SIGABRT, a C++ stack dump); nothing in Python can catch that (jaxlib's replacement hook for it,
``missed_heartbeat_callback``, fails with std::bad_cast when given a Python function). So each process i != 0
runs under a supervising parent (``parallel/supervise.py``): the same program again as a child, whose abort
dump the parent holds back, printing instead one line naming the lost coordinator, and exiting with status 1
(the last completed step is not known to it). Not with ``--debug`` or UNGUIDE_DEBUG=1: the full dump then.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from unguide_jax.parallel.supervise import last_progress, supervise_if_needed, supervisor_pid

DEFAULT_TIMEOUT_S = 300


class DistributedStartError(RuntimeError):
    """The processes of a multi-host job could not join (coordinator unreachable, a process missing)."""


class LostProcess(RuntimeError):
    """Another process of the job is gone: the collectives cannot go on."""

    exit_code = 1


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
    supervise_if_needed()  # process i != 0: runs this program again as a watched child, and exits as it did
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
    _start_watch(timeout)
    return True


@dataclasses.dataclass
class _Watch:
    me: int
    count: int
    peers: dict[int, dict]      # process id -> {host, port, pid, hostname}
    listener: socket.socket
    lost: list[int] = dataclasses.field(default_factory=list)


_watch: _Watch | None = None


def _local_address(coordinator: str | None) -> str:
    """The address the others reach this host at: the one its route to the coordinator leaves from."""
    host, _, port = (coordinator or "").rpartition(":")
    if host:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host.strip("[]"), int(port or 1)))
                return probe.getsockname()[0]
        except OSError:
            pass
    return socket.gethostbyname(socket.gethostname())


def _start_watch(timeout: int) -> None:
    """Listen on this process's watch socket and learn the others' (see the module doc). Best effort: without
    it a lost process is reported by the collectives' own error."""
    global _watch
    state = jax_distributed.global_state
    if state.client is None or not state.num_processes or state.num_processes < 2 or _watch is not None:
        return
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("", 0))
        listener.listen(128)
        me = {"host": _local_address(state.coordinator_address), "port": listener.getsockname()[1],
              "pid": supervisor_pid() or os.getpid(), "hostname": socket.gethostname()}
        state.client.key_value_set(f"unguide/watch/{state.process_id}", json.dumps(me))
        peers = {i: json.loads(state.client.blocking_key_value_get(f"unguide/watch/{i}", timeout * 1000))
                 for i in range(state.num_processes) if i != state.process_id}
    except Exception as err:  # noqa: BLE001 -- the job runs without the watch
        print(f"note: process {state.process_id}: no watch on the other processes ({err}); a lost process will be "
              "reported by the collectives' own error", file=sys.stderr)
        return

    def answer() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=answer, name="unguide-watch", daemon=True).start()
    _watch = _Watch(state.process_id, state.num_processes, peers, listener)
    # Every process is alive now (each published its address after listening): a socket that does not answer
    # is one this host cannot reach (an address behind NAT, a firewall), never to be taken for a lost process.
    unreachable = lost_processes()
    if unreachable:
        print(f"note: process {state.process_id}: the watch sockets of processes {unreachable} cannot be reached "
              "from here; a loss of those is reported by the collectives' own error", file=sys.stderr)
        for i in unreachable:
            del peers[i]
    if not peers:
        _watch = None
        return
    atexit.register(_leave_without_the_lost)  # after jax's own atexit shutdown, so it runs before it


def _gone(peer: dict, timeout: float) -> bool:
    try:
        with socket.create_connection((peer["host"], int(peer["port"])), timeout=timeout):
            return False
    except OSError:
        return True


def lost_processes(timeout: float = 2.0) -> list[int]:
    """The other processes of the job that no longer answer on their watch socket (none: one process, or no
    watch)."""
    if _watch is None:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(_watch.peers))) as pool:
        gone = dict(zip(_watch.peers, pool.map(lambda p: _gone(p, timeout), _watch.peers.values())))
    return sorted(i for i, lost in gone.items() if lost)


def explain_lost_process(err: BaseException, then: str = "") -> BaseException:
    """``err`` as a ``LostProcess`` naming the processes that are gone, when some are (a failed collective
    names only a socket); else ``err`` itself. ``then``: what to do next, for the message."""
    if _watch is None or isinstance(err, (LostProcess, KeyboardInterrupt)):
        return err
    lost = lost_processes()
    for _ in range(4):
        if lost:
            break
        # A killed process's connections can drop a moment before the kernel closes its watch socket.
        time.sleep(0.25)
        lost = lost_processes()
    if not lost:
        return err
    _watch.lost = lost
    who = ", ".join(f"{i} (pid {_watch.peers[i].get('pid')} on {_watch.peers[i].get('hostname')})" for i in lost)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    done = last_progress()
    return LostProcess(f"process{'es' if len(lost) > 1 else ''} {who} of {_watch.count} stopped (killed, crashed or "
                       f"unreachable; its own output says why), and process {_watch.me} cannot go on without it"
                       f"{f' after {done}' if done else ''} ({type(err).__name__}: {first})."
                       f"{(' ' + then) if then else ''}")


@contextlib.contextmanager
def watching_the_others(then: str = "") -> Iterator[None]:
    """Collectives inside the block that fail because another process is gone raise ``LostProcess`` naming it
    (``then``: what the user can do next)."""
    try:
        yield
    except Exception as err:
        explained = explain_lost_process(err, then)
        if explained is err:
            raise
        raise explained from err


def _leave_without_the_lost() -> None:
    """At exit: with a process gone, jax's shutdown barrier would wait for it until the heartbeat timeout and
    then abort this one (status 134); leave now instead, with the failed run's status."""
    if _watch is None:
        return
    try:
        lost = _watch.lost or lost_processes(timeout=1.0)
    except RuntimeError:  # too late to probe (the interpreter is shutting its thread pools): assume nothing lost
        lost = False
    if lost:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # The watch socket stays open until the process ends: a peer probing it before its own shutdown barrier
    # must not take this process for lost.


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
    done = threading.Event()
    if _watch is not None:
        # A barrier waits for a dead process until the heartbeat timeout, then jaxlib aborts this one; the
        # call holds the main thread, so a helper watches the others meanwhile.
        threading.Thread(target=_watch_during, args=(name, done), daemon=True).start()
    try:
        with watching_the_others():
            client.wait_at_barrier(f"unguide:{name}:{next(_barriers)}", timeout * 1000)
    finally:
        done.set()


def _watch_during(name: str, done: threading.Event, every_s: float = 2.0) -> None:
    while not done.wait(every_s):
        if lost_processes():
            explained = explain_lost_process(RuntimeError(f"waiting at the barrier {name!r}"))
            if done.is_set():
                return
            print(f"error: {explained}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)


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
        with watching_the_others():
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
    with watching_the_others():
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
    with watching_the_others():
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    digests = [bytes(row).hex() for row in every]
    if len(set(digests)) > 1:
        differing = [i for i, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"the {jax.process_count()} processes were started with different {what}s (hash of process "
                         f"0: {digests[0]}; processes {differing} differ: {[digests[i] for i in differing]}); start "
                         "every process with the same config and overrides")
