"""Orbax checkpoints of a training run, and a guard against restoring a damaged one.

Each saved step holds two Orbax items: ``state`` (the train-state pytree: adapter, optimizer state,
step, RNG key) and ``config`` (the run's resolved config as JSON). Typed PRNG keys cannot be
serialised as such: they are stored as ``jax.random.key_data`` and wrapped again on restore with
the implementation recorded in the step's ``unguide_checkpoint.json``.

That file also lists a SHA-256 for every file of the step and is written only after Orbax has
finalised it. Orbax itself skips unfinalised ``*.orbax-checkpoint-tmp*`` directories, but it
restores a flipped byte in an array chunk without complaint, so:
- a step without the file (a crash between Orbax's commit and ours) counts as incomplete: it is
  skipped, and deleted when an older step is restored so that step can be saved again;
- a step whose files do not match their checksums raises ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from unguide_jax.json_files import write_json
from unguide_jax.loading.weights import WriteFailed, is_write_failure

STATE_ITEM, CONFIG_ITEM = "state", "config"
RECORD_FILE = "unguide_checkpoint.json"
RECORD_FORMAT = "unguide-jax-checkpoint/1"


class CheckpointError(RuntimeError):
    exit_code = 2  # a damaged or unfitting checkpoint is bad input to the command-line tools


class _OrbaxThreadErrors(logging.Filter):
    """Orbax logs the traceback of an exception in one of its writer threads, then raises it again in the
    caller; ``RunCheckpoints.save`` reports it there in one line naming the step, so the log record only
    repeats it (a full disk printed three tracebacks before the error line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in str(record.msg)


def _quiet_orbax_threads() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxThreadErrors) for f in logger.filters):
        logger.addFilter(_OrbaxThreadErrors())


class _AbandonedWrites(logging.Filter):
    """asyncio's "Task (or _GatheringFuture) exception was never retrieved" for the writes Orbax abandons when one
    of them fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in str(record.msg) and err is not None and is_write_failure(err))


def _quiet_abandoned_writes() -> None:
    """When one write of a save fails, ``save`` reports it; the writes still in flight end on Orbax's closed
    event loop, each printing a traceback (asyncio's log, the unraisable hook) around the one-line error."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedWrites) for f in logger.filters):
        logger.addFilter(_AbandonedWrites())
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiet_closed_loop = True
    sys.unraisablehook = hook


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl_names(state) -> dict[str, str]:
    """``keystr(path) -> PRNG implementation name`` for every typed-key leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): str(jax.random.key_impl(x)) for p, x in leaves if _is_typed_key(x)}


def storable(state):
    """The state with every typed PRNG key replaced by its raw ``key_data`` (uint32)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def abstract_like(state):
    """ShapeDtypeStructs carrying each leaf's current sharding: a restore target that reproduces the placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _key_paths(tree) -> set[str]:
    return {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_typed_key(x)}


def _storable_abstract(abstract_state):
    def convert(x):
        if not _is_typed_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        # A key array's sharding partitions its leading dims; the trailing key-data dim stays whole.
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)

    return jax.tree.map(convert, abstract_state)


def _missing_shardings(abstract_state) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return [jax.tree_util.keystr(p) for p, x in leaves if getattr(x, "sharding", None) is None]


def _path_name(path) -> str:
    """A key path as 'a/b/0/c' whatever the node types (dict keys, dataclass fields, sequence indices);
    Orbax's metadata tree turns dataclasses and namedtuples into dicts and lists, so only names compare."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_signatures(tree) -> dict[str, tuple]:
    return {_path_name(p): (tuple(x.shape), str(np.dtype(x.dtype)))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _file_digests(step_dir: Path) -> dict[str, str]:
    digests = {}
    for file in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(step_dir).as_posix()
        if rel != RECORD_FILE:
            digests[rel] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


class RunCheckpoints:
    """The ``checkpoints/`` folder of one run: save a step, list the complete ones, restore one.

    Saves are synchronous: the state is an adapter and its optimizer moments (megabytes), and the
    integrity record can only be written once Orbax has committed the step.
    """

    def __init__(self, directory: str | Path, keep: int | None = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoints (or None for all), got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        _quiet_orbax_threads()
        _quiet_abandoned_writes()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _has_record(self, step: int) -> bool:
        return (self.step_dir(step) / RECORD_FILE).is_file()

    def steps(self) -> list[int]:
        """Complete steps (committed by Orbax and carrying our record), oldest first."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._has_record(s))

    def incomplete_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if not self._has_record(s))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, config: dict) -> Path:
        if step in self._manager.all_steps():
            raise CheckpointError(f"checkpoint step {step} already exists in {self.directory}")
        key_impls = _key_impl_names(state)
        step_dir = self.step_dir(step)
        try:
            self._manager.save(step, force=True, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(storable(state)),
                CONFIG_ITEM: ocp.args.JsonSave(config),
            }))
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                write_json(step_dir / RECORD_FILE, {"format": RECORD_FORMAT, "step": int(step),
                                                    "key_impls": key_impls, "sha256": _file_digests(step_dir)})
        except Exception as err:
            # Orbax (TensorStore) and the JSON writer name no path, or a temporary one: name the step.
            if is_write_failure(err):
                raise WriteFailed(step_dir, err, "write checkpoint") from err
            raise
        return step_dir

    def verify(self, step: int) -> dict:
        """The step's record, after checking every file against it; ``CheckpointError`` names what is wrong."""
        step_dir = self.step_dir(step)
        if not self._has_record(step):
            raise CheckpointError(f"checkpoint {step_dir} is incomplete (no {RECORD_FILE}): the save was cut off")
        try:
            record = json.loads((step_dir / RECORD_FILE).read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint {step_dir}: {RECORD_FILE} is unreadable ({err})") from None
        if record.get("format") != RECORD_FORMAT:
            raise CheckpointError(f"checkpoint {step_dir}: unknown record format {record.get('format')!r}")
        actual = _file_digests(step_dir)
        for rel, digest in record["sha256"].items():
            if rel not in actual:
                raise CheckpointError(f"checkpoint {step_dir} is damaged: {rel} is missing. Delete {step_dir} "
                                      "to resume from the previous checkpoint.")
            if actual[rel] != digest:
                raise CheckpointError(f"checkpoint {step_dir} is damaged: {rel} does not match its checksum "
                                      f"(truncated or overwritten). Delete {step_dir} to resume from the previous "
                                      "checkpoint.")
        return record

    def saved_config(self, step: int) -> dict:
        """The config stored with ``step``, after the integrity check (reads no arrays)."""
        self.verify(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return restored[CONFIG_ITEM]

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, config) of ``step`` (default: the latest complete one), placed by ``abstract_state``'s shardings.

        ``abstract_state`` has the train state's structure with ``jax.ShapeDtypeStruct`` leaves that
        carry explicit target shardings (e.g. ``abstract_like(fresh_state)``, or ``jax.eval_shape``
        of the init with shardings attached); typed-key leaves keep their key dtype.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            newer = [s for s in self.incomplete_steps() if s > step]
            for s in newer:
                # Incomplete saves newer than the one we resume from would block saving those steps again.
                warnings.warn(f"deleting incomplete checkpoint {self.step_dir(s)} (its save was cut off)")
                self._manager.delete(s)
        missing = _missing_shardings(abstract_state)
        if missing:
            raise ValueError(f"restore target has no sharding for {missing[:3]}: give every leaf a target sharding")
        record = self.verify(step)
        key_paths = _key_paths(abstract_state)
        if key_paths != set(record["key_impls"]):
            raise CheckpointError(f"checkpoint {self.step_dir(step)} stores PRNG keys at "
                                  f"{sorted(record['key_impls'])}, "
                                  f"the restore target has them at {sorted(key_paths)}")
        target = _storable_abstract(abstract_state)
        self._check_fits(step, target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            CONFIG_ITEM: ocp.args.JsonRestore(),
        }))

        def rewrap(path, target, x):
            if not _is_typed_key(target):
                return x
            name = jax.tree_util.keystr(path)
            key = jax.random.wrap_key_data(x, impl=record["key_impls"][name])
            if key.dtype != target.dtype:
                raise CheckpointError(f"checkpoint {self.step_dir(step)}: PRNG key {name} is {key.dtype}, "
                                      f"the run uses {target.dtype}")
            return key

        state = jax.tree_util.tree_map_with_path(rewrap, abstract_state, restored[STATE_ITEM])
        return state, restored[CONFIG_ITEM]

    def _check_fits(self, step: int, target) -> None:
        """Compare leaf paths, shapes and dtypes with Orbax's metadata before reading any array: a
        mismatch is named here instead of surfacing as a TensorStore error mid-restore."""
        stored = _leaf_signatures(self._manager.item_metadata(step)[STATE_ITEM])
        wanted = _leaf_signatures(target)
        problems = [f"{p}: stored {stored[p]}, expected {wanted[p]}" for p in sorted(stored.keys() & wanted.keys())
                    if stored[p] != wanted[p]]
        problems += [f"{p}: not in the checkpoint" for p in sorted(wanted.keys() - stored.keys())]
        problems += [f"{p}: in the checkpoint, not in the train state" for p in sorted(stored.keys() - wanted.keys())]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError(f"checkpoint {self.step_dir(step)} does not fit this run's train state: "
                                  + "; ".join(problems[:5]) + more)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
