"""TensorBoard event files beside metrics.jsonl (``training.event_files``): the same scalars per step, a
resumed session shown once per step, a closed-form report, and runs without tensorboardX."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from unguide_jax.training import event_files
from unguide_jax.training.event_files import TensorBoardLog
from unguide_jax.training.loop import MetricsLog

REPO = Path(__file__).resolve().parent.parent


def train_args(preset, folder, run_dir, *extra):
    return ["--config", f"{REPO}/configs/{preset}.py:tiny", f"--config.model={folder}", f"--config.run_dir={run_dir}",
            *extra]


def read_event_files(folder: Path) -> list[list]:
    """The events of every events file in ``folder``, files in name order (TensorBoard's), each record's
    TFRecord framing and checksums checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    files = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at, events = path.read_bytes(), 0, []
        while at < len(data):
            header = data[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header), path
            payload = data[at + 12:at + 12 + length]
            assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(payload), path
            events.append(Event.FromString(payload))
            at += 16 + length
        files.append(events)
    return files


def shown(files: list[list]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows the files: a session-start mark at step p drops every
    series' points from p on; a point at a step its series already reached drops that series' points
    from that step on (a restarted session's values replace the cut-off one's)."""
    series: dict[str, dict[int, float]] = {}
    for events in files:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                series = {tag: {s: v for s, v in points.items() if s < event.step} for tag, points in series.items()}
            for value in event.summary.value:
                points = series.setdefault(value.tag, {})
                if points and event.step <= max(points):
                    points = series[value.tag] = {s: v for s, v in points.items() if s < event.step}
                points[event.step] = value.simple_value
    return series


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def shown_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """What TensorBoard shows from the events files in ``folder``."""
    return shown(read_event_files(folder))


def logged_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's step records (its first line describes the run) as tag -> {step: value}, compared
    as float32 (the events' precision)."""
    series: dict[str, dict[int, float]] = {}
    for record in metric_lines(run)[1:]:
        for tag, value in event_files.scalars({k: v for k, v in record.items() if k != "step"}).items():
            series.setdefault(tag, {})[record["step"]] = pytest.approx(value, rel=1e-6, abs=1e-8)
    return series


def test_resumed_logs_show_the_new_values(tmp_path):
    """run.py's two logs over three sessions: the second is cut off after step 4 with its checkpoint at 2,
    the third resumes from 2. TensorBoard shows what metrics.jsonl keeps, values of the last session."""
    pytest.importorskip("tensorboardX")
    sessions = [(None, range(1, 3)), (2, range(3, 5)), (2, range(3, 6))]  # (resumed from, steps logged)
    for number, (resumed_at, steps) in enumerate(sessions):
        log = MetricsLog(tmp_path / "metrics.jsonl", resume_from_step=resumed_at)
        with TensorBoardLog(tmp_path / "tensorboard", resume_from_step=resumed_at) as board:
            for step in steps:
                record = {"step": step, "loss": 1.0 / (step + 10 * number), "seconds": 0.25 * number}
                log(record)
                board(record)
    lines = metric_lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    files = read_event_files(tmp_path / "tensorboard")
    assert len(files) == 3
    series = shown(files)
    assert series == {tag: {r["step"]: pytest.approx(r[tag]) for r in lines} for tag in ("loss", "seconds")}
    # Without the session-start marks the re-logged steps alone replace the cut-off ones (TensorBoard's
    # newer loader honours only those) and give the same series.
    unmarked = [[e for e in events if not e.HasField("session_log")] for events in files]
    assert shown(unmarked) == series


def test_a_closed_form_run_writes_its_report_numbers_once(tiny_pipeline_dir, tmp_path):
    pytest.importorskip("tensorboardX")
    folder, _ = tiny_pipeline_dir("sd1")
    run = tmp_path / "uce"
    assert train.main(train_args("uce", folder, run)) == 0
    report = metric_lines(run)[0]
    (events,) = read_event_files(run / "tensorboard")
    series = shown([events])
    assert series == {tag: {0: pytest.approx(report[tag])} for tag in ("erase_rows", "preserve_rows", "seconds")}


def test_a_fresh_log_replaces_earlier_event_files_and_other_processes_write_none(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    folder = tmp_path / "tensorboard"
    with TensorBoardLog(folder) as board:
        assert board.writing
        board({"step": 1, "loss": 2.0, "note": "text", "nested": {"a": 3, "skip": None}, "flag": True,
               "rows": np.int64(7), "ranks": [1, 2]})
    assert shown(read_event_files(folder)) == {"loss": {1: 2.0}, "nested/a": {1: 3.0}, "rows": {1: 7.0}}
    with TensorBoardLog(folder) as board:  # a new run into the same folder: the old points are gone
        board({"step": 1, "loss": 5.0})
        with pytest.raises(ValueError, match="needs a step"):
            board({"loss": 1.0})
    assert shown(read_event_files(folder)) == {"loss": {1: 5.0}}

    monkeypatch.setattr(event_files, "is_main_process", lambda: False)
    with TensorBoardLog(tmp_path / "other") as board:
        assert not board.writing
        board({"step": 1, "loss": 2.0})
    assert not (tmp_path / "other").exists()


def test_without_tensorboardx_logs_write_nothing_and_the_note_comes_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setattr(event_files, "_told_missing", False)
    for name in ("first", "second"):
        with TensorBoardLog(tmp_path / name) as board:
            assert not board.writing
            board({"step": 1, "loss": 2.0})
            with pytest.raises(ValueError, match="needs a step"):  # bad records are caught all the same
                board({"loss": 1.0})
        assert not (tmp_path / name).exists()
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and "tensorboardX is not installed" in notes[0] and event_files.INSTALL_HINT in notes[0]
