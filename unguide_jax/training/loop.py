"""What every trainer shares: the run folder's layout, its metrics log, and the step loop with
checkpoints and finite-value guards."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from unguide_jax.training.checkpoints import RunCheckpoints


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter.safetensors"

    @property
    def edit(self) -> Path:
        return self.root / "edit.safetensors"

    @property
    def export(self) -> Path:
        return self.root / "export"


class MetricsLog:
    """``metrics.jsonl``, one JSON line per record. ``resume_from_step`` None starts the file afresh;
    an int keeps the lines up to that step and drops later ones (they belong to the cut-off session,
    whose state was not kept) so each step appears once. ``append=True`` keeps every line as it is
    (a resumable multi-stage job). ``timestamps`` adds the wall time to every record."""

    def __init__(self, path: Path, resume_from_step: int | None = None, *, append: bool = False,
                 timestamps: bool = False):
        self.path = path
        self.timestamps = timestamps
        if append:
            pass
        elif resume_from_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, record: dict) -> None:
        if self.timestamps:
            record = {"time": round(time.time(), 2), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_loop(state, step_fn: Callable, *, iterations: int, checkpoint_every: int, checkpoints: RunCheckpoints | None,
               config: dict, log: Callable[[dict], None], progress: bool = True):
    """Run ``step_fn(state) -> (state, metrics)`` until ``state.step == iterations``.

    ``state.step`` counts finished updates. A checkpoint is saved after every ``checkpoint_every``-th
    update (0: none in between) and after the last. A non-finite loss stops the run with
    ``NonFiniteLoss`` before anything from that step is saved; a checkpoint whose adapter is not
    finite is never written either, so the newest checkpoint is always a good one.
    """
    start = int(state.step)
    if start > iterations:
        raise ValueError(f"the run is at step {start}, past iterations={iterations}")
    bar = tqdm(total=iterations, initial=start, desc=config.get("method", "unguide"), unit="step", disable=not progress)
    try:
        for _ in range(start, iterations):
            began = time.perf_counter()
            state, metrics = step_fn(state)
            metrics = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
            step = int(state.step)
            if not math.isfinite(metrics["loss"]):
                raise NonFiniteLoss(_nonfinite_message(f"loss is {metrics['loss']} at step {step}", checkpoints))
            log({"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()},
                 "seconds": round(time.perf_counter() - began, 4)})
            bar.set_postfix(loss=f"{metrics['loss']:.5f}")
            bar.update(1)
            if checkpoints is not None and (step == iterations or (checkpoint_every and step % checkpoint_every == 0)):
                if not bool(_all_finite(state.adapter)):
                    raise NonFiniteLoss(_nonfinite_message(f"the adapter is not finite after step {step}", checkpoints))
                checkpoints.save(step, state, config)
    finally:
        bar.close()
    return state


def _nonfinite_message(what: str, checkpoints: RunCheckpoints | None) -> str:
    latest = checkpoints.latest_step() if checkpoints is not None else None
    kept = (f"the last good checkpoint is step {latest} in {checkpoints.directory}" if latest is not None
            else "no checkpoint was saved before it")
    return f"{what}; training stopped ({kept}). Try a lower learning_rate."
