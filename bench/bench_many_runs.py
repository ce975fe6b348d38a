#!/usr/bin/env python
"""Whole training commands: K concepts in one run (``unguide.py:many``) against K separate runs, on this machine.

    python bench/bench_many_runs.py                  # K = 10: the ten shapes classes, the default settings
    python bench/bench_many_runs.py --concepts 2,5 --iterations 50

Each side is timed as a user runs it, from the command's start to its exit: process start, model load, compile,
the steps, checkpoints and the adapters. The separate runs are ``train.py --config configs/unguide.py
--config.concept=<class>``, one after another; the several-concept run is one ``train.py --config
configs/unguide.py:many --config.concepts=[...]``, whose adapters equal the separate runs' (tests/test_many_run.py).
The runs write to a temporary folder. Prints one line per K and side, the ratio, then one JSON line.
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

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("arrow", "circle", "crescent", "cross", "diamond", "heart", "ring", "square", "star", "triangle")


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"train.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="10", help="the K values, comma-separated (the first K classes)")
    parser.add_argument("--iterations", type=int, default=0, help="training steps (0: the preset's, 200)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    extra = [f"--config.iterations={args.iterations}"] if args.iterations else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.concepts.split(",")):
            names = [f"shapes-{c}" for c in CLASSES[:k]]
            many = timed(["--config", "configs/unguide.py:many", f"--config.concepts={json.dumps(names)}",
                          f"--config.run_dir={tmp}/many-{k}", *extra])
            print(f"K={k}: one run of {k} concepts {many:.1f} s", flush=True)
            separate = []
            for name in names:
                separate.append(timed(["--config", "configs/unguide.py", f"--config.concept={name}",
                                       f"--config.run_dir={tmp}/{k}-{name}", *extra]))
                print(f"       {name} alone {separate[-1]:.1f} s", flush=True)
            total = sum(separate)
            print(f"K={k}: {k} separate runs {total:.1f} s, one run {many:.1f} s: {total / many:.2f}x faster", flush=True)
            results[k] = dict(one_run_s=round(many, 2), separate_runs_s=round(total, 2),
                              separate_each_s=[round(s, 2) for s in separate], speedup=round(total / many, 3),
                              loras_per_s_one_run=round(k / many, 4), loras_per_s_separate=round(k / total, 4))
    record = dict(bench="many_runs", cpus=os.cpu_count(), iterations=args.iterations or 200, results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
