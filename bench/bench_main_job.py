#!/usr/bin/env python
"""The README's main job timed with and without the CPU levers (docs/benchmarks.md, "Levers"), side by side in one run.

    python bench/bench_main_job.py                  # before, after: one run each, cold compilation caches
    python bench/bench_main_job.py --rounds 2       # before, after, after, before
    python bench/bench_main_job.py --sides after    # the package as it is, alone

The main job is the README quickstart: ``unguide-train --config unguide.py`` (the arrow LoRA, 200
steps), then ``unguide-sample --config evaluate.py`` (the evaluation table), each run as its own
process in an empty working folder. ``before`` runs it with ``bench/levers_off`` on PYTHONPATH, whose
``sitecustomize`` undoes the three levers the package keeps (XLA's default CPU options with YNNPACK
fusions, ``jax.nn.dot_product_attention``, the whole batch in one UNet call); ``after`` is the package
as it is. Each run gets its own empty JAX compilation cache (compile time included, as a first run
has it). Printed per side: train, evaluate and total wall seconds (medians over the rounds); the last
line is one JSON object with ``after_over_before`` ratios (time after / time before: < 1 is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "train": [sys.executable, str(ROOT / "train.py"), "--config", "unguide.py"],
    "evaluate": [sys.executable, str(ROOT / "sample.py"), "--config", "evaluate.py"],
}


def run_job(side: str, folder: Path) -> dict:
    """The main job's two commands in ``folder``; wall seconds of each."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(folder / "jax-cache"), PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "bench" / "levers_off") if side == "before" else "", str(ROOT)])))
    env["UNGUIDE_BENCH_LEVERS_OFF"] = "1" if side == "before" else "0"
    times = {}
    for name, command in COMMANDS.items():
        start = time.perf_counter()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        times[name] = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"{side} {name} failed:\n{result.stderr[-3000:]}")
        print(f"  {side:6} {name:8} {times[name]:7.1f} s", flush=True)
        (folder / f"{name}.log").write_text(result.stdout)
    times["total"] = sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs per side, the order reversed every other round")
    parser.add_argument("--sides", default="before,after", help="comma-separated: before, after")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    sides = tuple(args.sides.split(","))
    if not sides or set(sides) - {"before", "after"}:
        parser.error(f"--sides takes before and/or after, got {args.sides!r}")
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="main-job-") as scratch:
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                folder = Path(scratch) / f"{side}-{r}"
                folder.mkdir()
                runs[side].append(run_job(side, folder))
                table = folder / "runs" / "evaluate-shapes-arrow" / "results.json"
                if table.is_file():
                    runs[side][-1]["unguide_h_o"] = json.loads(table.read_text())["average"]["UnGuide"]["mace"]["h_o"]
    summary = {"rounds": args.rounds, "cpu_count": os.cpu_count()}
    print(f"{'median wall (s)':16}" + "".join(f"{s:>10}" for s in sides))
    for part in ("train", "evaluate", "total"):
        medians = {s: float(np.median([t[part] for t in runs[s]])) for s in sides}
        summary.update({f"{s}_{part}_s": m for s, m in medians.items()})
        line = f"{part:16}" + "".join(f"{medians[s]:10.1f}" for s in sides)
        if len(sides) == 2:
            summary[f"{part}_after_over_before"] = medians["after"] / medians["before"]
            line += f"   after/before {medians['after'] / medians['before']:.2f}"
        print(line)
    summary["unguide_h_o"] = {s: [t.get("unguide_h_o") for t in runs[s]] for s in sides}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
