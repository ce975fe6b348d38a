"""What every trainer shares: the run folder's layout, its metrics log, and the step loop with
checkpoints and finite-value guards."""
from __future__ import annotations

import collections
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

from unguide_jax.json_files import dumps_json
from unguide_jax.parallel.supervise import report_progress
from unguide_jax.training.checkpoints import RunCheckpoints


class NonFiniteLoss(RuntimeError):
    pass


class Diverged(RuntimeError):
    """The loss or the trained parameters' norm left ``factor`` times its early range."""


@dataclasses.dataclass(frozen=True)
class DivergenceGuard:
    """Stop a run whose loss or trained-parameter norm (the adapter's global L2 norm) leaves
    ``factor`` x its early range. The norm is compared from the first step with the largest norm seen
    so far (the initial one included) over the first ``warmup`` steps of the session, then with that
    range frozen; the loss is compared once ``warmup`` steps have set its range (max |loss|), and as the
    mean |loss| of the last ``warmup`` steps: a single loss varies with the drawn timestep (a learnable-prompts
    run on the shipped model has a step at 24 x the early range among ordinary ones), a diverging run stays
    high. ``factor`` 0 turns the guard off."""

    factor: float = 20.0
    warmup: int = 10

    def __post_init__(self):
        if self.factor < 0 or self.warmup < 1:
            raise ValueError(f"divergence guard: factor must be >= 0 (0: off) and warmup >= 1, got {self}")


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
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"  # event files (training.event_files)

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
            f.write(dumps_json(record, what=str(self.path)) + "\n")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.jit
def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class DivergenceWatch:
    """One run's (one concept's) divergence guard state."""

    def __init__(self, guard: DivergenceGuard, adapter, start: int, norm: float | None = None):
        self.guard, self.start = guard, start
        self.norm_range = (float(_global_norm(adapter)) if norm is None else float(norm)) if guard.factor else 0.0
        self.loss_range = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=guard.warmup)

    def problem(self, step: int, loss: float, adapter=None, norm: float | None = None) -> str | None:
        """What left its range at ``step`` (None: nothing); updates the early ranges. ``norm``: the adapter's
        global norm when the caller has it (else measured on ``adapter``)."""
        factor, warm = self.guard.factor, step - self.start <= self.guard.warmup
        if not factor:
            return None
        norm = float(_global_norm(adapter)) if norm is None else float(norm)
        if not math.isfinite(norm) or (self.norm_range > 0 and norm > factor * self.norm_range):
            return (f"the trained parameters' norm is {norm:.4g} after step {step}, more than divergence.factor="
                    f"{factor:g} x its early value {self.norm_range:.4g}")
        self.recent.append(abs(loss))
        if warm:
            self.norm_range = max(self.norm_range, norm)
            self.loss_range = max(self.loss_range, abs(loss))
        elif self.loss_range > 0 and (mean := sum(self.recent) / len(self.recent)) > factor * self.loss_range:
            return (f"the loss averages {mean:.4g} over steps {step - len(self.recent) + 1}-{step} (last {loss:.4g}), "
                    f"more than divergence.factor={factor:g} x its early range (max {self.loss_range:.4g} over steps "
                    f"{self.start + 1}-{self.start + self.guard.warmup})")
        return None


def train_loop(state, step_fn: Callable, *, iterations: int, checkpoint_every: int, checkpoints: RunCheckpoints | None,
               config: dict, log: Callable[[dict], None], progress: bool = True,
               divergence: DivergenceGuard | None = DivergenceGuard()):
    """Run ``step_fn(state) -> (state, metrics)`` until ``state.step == iterations``.

    ``state.step`` counts finished updates. A checkpoint is saved after every ``checkpoint_every``-th
    update (0: none in between) and after the last. A non-finite loss stops the run with
    ``NonFiniteLoss`` before anything from that step is saved; a checkpoint whose adapter is not
    finite is never written either, so the newest checkpoint is always a good one. ``divergence`` (None:
    off) stops a run whose loss or adapter norm leaves its early range with ``Diverged``, also before
    anything from that step is logged or saved.
    """
    start = int(state.step)
    if start > iterations:
        raise ValueError(f"the run is at step {start}, past iterations={iterations}")
    watch = DivergenceWatch(divergence, state.adapter, start) if divergence is not None else None
    bar = tqdm(total=iterations, initial=start, desc=config.get("method", "unguide"), unit="step", disable=not progress)
    try:
        for _ in range(start, iterations):
            began = time.perf_counter()
            state, metrics = step_fn(state)
            metrics = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
            step = int(state.step)
            if not math.isfinite(metrics["loss"]):
                raise NonFiniteLoss(nonfinite_message(f"loss is {metrics['loss']} at step {step}", checkpoints))
            if watch is not None and (problem := watch.problem(step, metrics["loss"], state.adapter)):
                raise Diverged(nonfinite_message(f"training diverged: {problem}", checkpoints,
                                                  "Try a lower learning_rate (or raise divergence.factor; 0 turns "
                                                  "the guard off)."))
            log({"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()},
                 "seconds": round(time.perf_counter() - began, 4)})
            bar.set_postfix(loss=f"{metrics['loss']:.5f}")
            bar.update(1)
            report_progress(f"train step {step}/{iterations}")
            if checkpoints is not None and (step == iterations or (checkpoint_every and step % checkpoint_every == 0)):
                if not bool(_all_finite(state.adapter)):
                    raise NonFiniteLoss(nonfinite_message(f"the adapter is not finite after step {step}", checkpoints))
                checkpoints.save(step, state, config)
    finally:
        bar.close()
    return state


def nonfinite_message(what: str, checkpoints: RunCheckpoints | None, advice: str = "Try a lower learning_rate.") -> str:
    latest = checkpoints.latest_step() if checkpoints is not None else None
    kept = (f"the last good checkpoint is step {latest} in {checkpoints.directory}" if latest is not None
            else "no checkpoint was saved before it")
    return f"{what}; training stopped ({kept}). {advice}"
