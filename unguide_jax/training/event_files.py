"""TensorBoard event files of a run, in ``<run>/tensorboard/`` beside ``metrics.jsonl``, so a run on a
pod is watched in TensorBoard like other JAX training. Only process 0 writes them.

They are written through tensorboardX, an optional dependency (``pip install 'unguide-jax[tensorboard]'``);
without it a run prints one note and writes ``metrics.jsonl`` alone. Installed, the files are always
written (there is no config switch: the dependency is the switch).

Sessions follow ``MetricsLog``: a fresh run removes the events files of an earlier attempt in the same
folder; a resumed one adds its own events file that opens with a purge mark at the step after its
checkpoint. TensorBoard drops what the cut-off session logged from that step on (the lines ``MetricsLog``
drops from ``metrics.jsonl``), and a series' points from a step that is logged again, so every step is
shown once, with the resumed session's values.
"""
from __future__ import annotations

import numbers
import sys
import time
from pathlib import Path
from typing import Mapping

from unguide_jax.parallel.hosts import is_main_process

INSTALL_HINT = "pip install 'unguide-jax[tensorboard]'"
# TensorBoard rereads files every few seconds; a short flush interval keeps a live run's plots current.
FLUSH_SECONDS = 15
EVENTS_GLOB = "events.out.tfevents.*"

_told_missing = False  # the note about a missing tensorboardX: once per process


def scalars(record: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record by tag; a nested mapping gives ``outer/inner`` tags (TensorBoard
    groups by the part before the slash). Strings, lists, booleans and None are not scalars."""
    found = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(scalars(value, f"{tag}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            found[tag] = float(value)
    return found


def _summary_writer_class():
    try:
        # Imported here, not at module level: tensorboardX imports torch when it is installed (seconds),
        # which only the process that writes should pay.
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _note_missing(folder: Path) -> None:
    global _told_missing
    if not _told_missing:
        print(f"note: tensorboardX is not installed, so no TensorBoard event files are written ({folder}); "
              f"metrics.jsonl has every metric. {INSTALL_HINT} to get them.", file=sys.stderr)
        _told_missing = True


class TensorBoardLog:
    """Scalars of metric records into TensorBoard event files in ``folder``, from process 0 only; on other
    processes, or without tensorboardX, calls do nothing (``writing`` is False).

    ``resume_from_step`` None starts afresh (earlier events files in ``folder`` are removed); an int is
    the step of the checkpoint a resumed session starts from. Close it (or use it as a context manager)
    so the last records reach the file."""

    def __init__(self, folder: Path, resume_from_step: int | None = None):
        self.folder = Path(folder)
        self._writer = None
        if not is_main_process():
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            _note_missing(self.folder)
            return
        if resume_from_step is None:
            for stale in self.folder.glob(EVENTS_GLOB):
                stale.unlink()
        # tensorboardX names a file by the second it opened (and opens it "wb"): the nanoseconds in the
        # name keep two sessions opened within one second apart, in the order TensorBoard reads them.
        self._writer = writer_class(str(self.folder), flush_secs=FLUSH_SECONDS,
                                    filename_suffix=f".{time.time_ns() % 10**9:09d}",
                                    purge_step=None if resume_from_step is None else resume_from_step + 1)

    @property
    def writing(self) -> bool:
        return self._writer is not None

    def __call__(self, record: Mapping, step: int | None = None) -> None:
        """Every scalar of ``record`` (``scalars``) at ``step`` (default: the record's "step")."""
        if step is None:
            if "step" not in record:
                raise ValueError(f"a TensorBoard record needs a step: give step=..., or a 'step' key "
                                 f"(the record has {sorted(record)})")
            step = record["step"]
        if self._writer is None:
            return
        for tag, value in scalars(record).items():
            if tag != "step":
                self._writer.add_scalar(tag, value, int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
