"""A run folder belongs to one run: who may write into ``run_dir``, and how it is replaced.

``claim_run_folder`` is taken by every trainer (iterative and closed-form) before anything is written:

- **Lock.** ``.<name>.lock`` beside the folder holds the writer's pid, host and start time (created
  atomically, with its content). A second writer is refused with a message naming the holder. A lock
  left by a dead process on this host is taken over with a warning; one from another host is never
  guessed about (delete it by hand if that run is gone).
- **Ownership.** A folder that holds another run (its ``config.json`` differs in the keys that make
  a run what it is, or it holds files but no ``config.json``) is refused unless ``overwrite=true``.
  The same run is the trainer's to continue (``resume=true``) or refuse (checkpoints without resume).
- **Atomic replacement.** With ``overwrite=true`` (and for a closed-form rerun into a non-empty
  folder) the new run is built in ``.<name>.building`` beside the folder and swapped in only when it
  has finished: until then the old run stays whole; a failed run leaves it untouched.
- **Interrupted replacement.** A replacement that stopped after a checkpoint (killed, failed) leaves its
  building folder. ``overwrite=true resume=true`` continues those checkpoints and swaps the folder in at
  the end; ``overwrite=true`` alone starts over. Checkpoints are never deleted silently: removing a
  building folder that holds some, or an old run at the swap, prints a line naming them.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from unguide_jax.parallel.hosts import broadcast_json, is_main_process, process_count
from unguide_jax.settings import ConfigError

# What a run leaves in its folder, besides config.json and metrics.jsonl.
RUN_OUTPUTS = ("adapter.safetensors", "edit.safetensors", "edit_with_prompt.safetensors", "report.json",
               "checkpoints", "export")
# Keys that may change without making a closed-form run another run.
NOT_IDENTITY = ("run_dir", "export", "overwrite", "resume", "allow_pickle", "iterations", "checkpoint_every", "keep",
                "mesh", "divergence")


class RunFolderBusy(FileExistsError):
    """Another live process holds the run folder's lock."""


class RunFolderTaken(FileExistsError):
    """The run folder holds another run, and ``overwrite`` was not given."""


def lock_path(root: Path) -> Path:
    return root.parent / f".{root.name}.lock"


def building_path(root: Path) -> Path:
    return root.parent / f".{root.name}.building"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_folder_lock(root: Path, key: str = "run_dir") -> Iterator[Path]:
    """Hold ``root``'s lock for the ``with`` block; ``RunFolderBusy`` (naming the setting ``key`` to change) if a
    live process holds it."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "run_dir": str(root)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{root.name}.lock.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and the lock is never seen empty
                break
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None:
                    raise RunFolderBusy(f"{root} is locked by {path}, which cannot be read: if no run is using "
                                        f"{root}, delete {path}") from None
                same_host = holder.get("host") == mine["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    warnings.warn(f"taking over the stale lock {path} of process {holder['pid']} on "
                                  f"{holder['host']} (no longer running; started {holder.get('started')})",
                                  stacklevel=3)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                raise RunFolderBusy(
                    f"{root} is in use by another run: process {holder.get('pid')} on {holder.get('host')} (since "
                    f"{holder.get('started')}) holds {path}. Wait for it to finish, or choose another {key}"
                    + ("" if same_host else f"; if that run is gone, delete {path}")) from None
        else:
            raise RunFolderBusy(f"could not take the lock {path}: another process keeps taking it")
    finally:
        os.unlink(tmp)
    try:
        yield path
    finally:
        if (_read_lock(path) or {}).get("pid") == mine["pid"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _checkpoint_steps(folder: Path) -> list[int]:
    """The step folders under ``folder/checkpoints`` (complete or not: what a deletion would lose)."""
    ckpt = folder / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _describe_steps(steps: Sequence[int]) -> str:
    shown = ", ".join(map(str, steps[-5:]))
    return f"checkpoint{'s' if len(steps) > 1 else ''} {'..., ' if len(steps) > 5 else ''}{shown}"


def _remove_unfinished(work: Path, root: Path) -> None:
    """Delete an earlier replacement's building folder, saying so when it holds checkpoints."""
    steps = _checkpoint_steps(work)
    if steps:
        saved = _saved_config(work) or {}
        what = f" ({_describe(saved)})" if _describe(saved) else ""
        print(f"note: deleting {work}: the unfinished replacement of {root}{what} that an earlier overwrite=true run "
              f"left, with its {_describe_steps(steps)}. To continue it instead, pass --config.overwrite=true "
              "--config.resume=true", file=sys.stderr)
    shutil.rmtree(work)


def _saved_config(root: Path) -> dict | None:
    try:
        return json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _outputs(root: Path) -> list[str]:
    found = []
    for name in RUN_OUTPUTS:
        p = root / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _differences(saved: Mapping, record: Mapping, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        keys = sorted((set(saved) | set(record)) - set(NOT_IDENTITY))
    return [k for k in keys if saved.get(k) != record.get(k)]


class RunFolder:
    """A claimed run folder: the run writes into ``work`` and ends up in ``root`` (the same folder, or a
    building folder swapped in when the run has finished: ``replacing``)."""

    def __init__(self, root: Path, work: Path, replacing: bool):
        self.root, self.work, self.replacing = root, work, replacing


def _describe(saved: Mapping) -> str:
    parts = [f"{k} {saved[k]!r}" for k in ("method", "concept") if k in saved]
    return ", ".join(parts)


@contextlib.contextmanager
def claim_run_folder(root: str | Path, record: Mapping, *, identity_keys: Sequence[str] | None = None,
                     resume: bool = False, overwrite: bool = False, trained: bool = True) -> Iterator[RunFolder]:
    """Lock ``root`` and decide where this run (``record``: its config as JSON) writes; see the module doc.

    ``identity_keys``: the keys on which the saved config.json must agree for it to be this run (None:
    every key but ``NOT_IDENTITY``). ``trained``: an iterative run (the caller handles its checkpoints
    and ``resume``); a closed-form run into a non-empty folder of the same run is rebuilt and swapped in.
    """
    # The real path: a symlink to a run folder (or a folder reached through one) takes the same lock and swaps
    # the same folder as its target, so two spellings of one folder cannot both write it.
    root = Path(root).resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"config.run_dir: {root} is a file, not a folder")
    with run_folder_lock(root):
        entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        replacing = False
        if entries:
            saved = _saved_config(root)
            if saved is None:
                other = f"files ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}) but no config.json of a run"
            else:
                changed = _differences(saved, record, identity_keys)
                other = (f"another run ({_describe(saved)}; its config.json differs in {', '.join(changed)})"
                         if changed else None)
            if other and resume and not overwrite and saved is not None:
                detail = "; ".join(f"{k}: {saved.get(k)!r} -> {record.get(k)!r}" for k in changed)
                raise RunFolderTaken(f"cannot resume {root}: it was trained with other settings ({detail})."
                                     + _unfinished_hint(root) + " Use another run_dir for a new run (or, without "
                                     "resume, --config.overwrite=true to replace it)")
            if other and not overwrite:
                raise RunFolderTaken(f"{root} holds {other}: choose another run_dir, or pass --config.overwrite=true "
                                     "to replace it")
            outputs = _outputs(root)
            if overwrite or not trained:
                replacing = True
            elif not resume and "checkpoints" not in outputs and outputs:
                raise RunFolderTaken(f"{root} already holds this run, finished ({', '.join(outputs)}): pass "
                                     "--config.overwrite=true to train it again, or choose another run_dir")
        building = building_path(root)
        continuing = trained and overwrite and resume and bool(_checkpoint_steps(building))
        if continuing:
            replacing = True  # even into an emptied run_dir: those checkpoints are this run's
            print(f"continuing the interrupted replacement of {root} in {building} "
                  f"({_describe_steps(_checkpoint_steps(building))})", file=sys.stderr)
        if replacing:
            work = building
            if work.exists() and not continuing:
                _remove_unfinished(work, root)  # left by a failed or killed run: we hold the lock
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = root
            root.mkdir(parents=True, exist_ok=True)
        try:
            yield RunFolder(root, work, replacing)
        except BaseException:
            if replacing:
                if "checkpoints" in _outputs(work):
                    print(f"note: the unfinished run is kept in {work} ({_describe_steps(_checkpoint_steps(work))}); "
                          f"{root} is untouched. Continue it with --config.overwrite=true --config.resume=true "
                          "(overwrite=true alone deletes it and starts over)", file=sys.stderr)
                else:
                    shutil.rmtree(work, ignore_errors=True)
            raise
        if replacing:
            _swap(work, root)


def _unfinished_hint(root: Path) -> str:
    steps = _checkpoint_steps(building_path(root))
    if not steps:
        return ""
    return (f" An interrupted overwrite=true run left its {_describe_steps(steps)} in {building_path(root)}: "
            "--config.overwrite=true --config.resume=true continues it.")


def _swap(work: Path, root: Path) -> None:
    """``work`` becomes ``root``: the old run is renamed aside, the new one renamed into place, then the old one
    removed (renames within one folder; the lock keeps other writers out meanwhile)."""
    old = root.parent / f".{root.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if root.exists():
        steps = _checkpoint_steps(root)
        if steps:
            print(f"note: {root} replaced by the new run; deleted with the previous one: its {_describe_steps(steps)}",
                  file=sys.stderr)
        os.rename(root, old)
    os.rename(work, root)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def claim_run_folder_for_every_process(root: str | Path, record: Mapping, **kwargs) -> Iterator[RunFolder]:
    """``claim_run_folder`` in a multi-host job: the main process claims (and locks) the folder, the
    others learn where it writes, or why it could not claim it. Only the main process writes files
    there; the others take part in the collective Orbax checkpoints. One process: the plain claim."""
    if process_count() == 1:
        with claim_run_folder(root, record, **kwargs) as folder:
            yield folder
        return
    if not is_main_process():
        claimed = broadcast_json(None)
        if "error" in claimed:
            raise RunFolderTaken(f"process 0 could not claim the run folder {root}: {claimed['error']}")
        yield RunFolder(Path(claimed["root"]), Path(claimed["work"]), claimed["replacing"])
        return
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(claim_run_folder(root, record, **kwargs))
        except Exception as err:
            broadcast_json({"error": str(err)})
            raise
        broadcast_json({"root": str(folder.root), "work": str(folder.work), "replacing": folder.replacing})
        yield folder
