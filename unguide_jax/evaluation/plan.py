"""The dry run of an evaluation job (``--dry-run``): what the job would do, and about how long it would take on
this machine, before anything long starts. Nothing is generated, scored or trained.

A job's planner (``erasure.plan_evaluation``, ``i2p.plan_i2p``; ``unguide_jax.jobs.plan`` picks it by the
config's type) fills a ``Plan``: one ``Stage`` per row of the table (images to generate and images already
made, DDIM steps, UNet rows per image and step, the w probe's UNet rows, evaluator calls), the runs to train
first (``Training``), and a ``Timing`` measured here: one compiled CFG step of the UNet at the job's batch
size (``measure_unet_step``) and, where the job has one, one evaluator call (``measure_evaluator``).

How UNet work is counted:
    UNet calls  batched calls as the sampler makes them: one per batch and DDIM step, CFG's two halves in
                the same call, and UnGuidance's four (base and edit, each with CFG) too when ``fused``
                (unfused: two calls of two halves)
    UNet rows   latents through the UNet: per image and step 2 (CFG) or 4 (UnGuidance); the probe's as
                ``WProbe.unet_calls`` counts them (R draws of a CFG trajectory to t_enc, then the base and
                the edited prediction); what the time estimate scales with
The estimate: UNet rows × (the measured step's seconds / its rows) + images scored × the evaluator's
measured seconds per image; a run to train ≈ iterations × samples_per_step × (2 · ddim_steps / 2 + 5) rows
(ESD's objective: a CFG trajectory to a t_enc drawn in [0, ddim_steps), three predictions at t, a backward
pass counted as two), a rough figure. The measured step runs on every device the job uses, as the sampler
does, so the estimates are wall times of this machine; "per device" divides the images.
"""
from __future__ import annotations

import dataclasses
import math
import time
import jax
import numpy as np

from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS, guided_prediction
from unguide_jax.erasers.unguide.objective import num_sampling_steps
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy

MEASURED_TIMESTEP = 500  # any timestep costs the same
TRAIN_EXTRA_ROWS = 5     # per ESD sample: three predictions at t, a backward pass counted as two


@dataclasses.dataclass
class Stage:
    """One row of the table: its images, their UNet work, its probe and its evaluator calls."""

    name: str
    images: int = 0           # to generate
    batches: int = 0          # sampler calls they take (``add_images``: one job call at a time)
    found: int = 0            # already made (cache, folder, or earlier in this run): not generated again
    steps: int = 0            # DDIM steps per image
    branches: int = 2         # UNet rows per image and step: 2 (CFG), 4 (UnGuidance)
    calls_per_step: int = 1   # 2 for unfused UnGuidance
    batch: int = 1            # images per sampler call (padded to the devices)
    probe_rows: int = 0       # UNet rows of the probes still to run
    probes_found: int = 0     # probes already there (the erasure table: per concept; I2P: per prompt)
    scores: int = 0           # images the evaluator still scores
    scores_found: int = 0     # images whose scores are already there

    def add_images(self, count: int) -> None:
        """``count`` images that one call of the sampler's batching loop makes (each call pads its last batch)."""
        self.images += count
        self.batches += math.ceil(count / self.batch)

    @property
    def unet_calls(self) -> int:
        return self.batches * self.steps * self.calls_per_step

    @property
    def unet_rows(self) -> int:
        return self.batches * self.batch * self.steps * self.branches


@dataclasses.dataclass
class Training:
    """A run to train before the table (``train_missing``)."""

    what: str
    run_dir: str
    spec: str
    iterations: int
    rows_per_iteration: float  # 0: not estimated (an eraser without iterations)


@dataclasses.dataclass
class Timing:
    """Measured on this machine: one compiled CFG step of the UNet, and one evaluator call."""

    devices: int
    backend: str
    device_kind: str
    step_rows: int
    step_seconds: float
    compile_seconds: float
    evaluator_images: int = 0
    evaluator_seconds: float | None = None

    @property
    def row_seconds(self) -> float:
        return self.step_seconds / self.step_rows

    @property
    def image_score_seconds(self) -> float | None:
        return None if self.evaluator_seconds is None else self.evaluator_seconds / self.evaluator_images


@dataclasses.dataclass
class Plan:
    """What a job would do (``text`` for the dry run's printout, ``to_dict`` for a record)."""

    job: str
    summary: str
    stages: list[Stage]
    trainings: list[Training] = dataclasses.field(default_factory=list)
    timing: Timing | None = None
    evaluator: str = "evaluator"
    notes: list[str] = dataclasses.field(default_factory=list)

    def seconds(self) -> dict[str, float | None]:
        """Estimated seconds per part (None: not estimated) and their total."""
        if self.timing is None:
            return {}
        row = self.timing.row_seconds
        out = {"sampling": sum(s.unet_rows for s in self.stages) * row,
               "probes": sum(s.probe_rows for s in self.stages) * row,
               "training": sum(t.iterations * t.rows_per_iteration for t in self.trainings) * row}
        per_image = self.timing.image_score_seconds
        out["scoring"] = None if per_image is None else sum(s.scores for s in self.stages) * per_image
        out["total"] = sum(v for v in out.values() if v is not None)
        return out

    def to_dict(self) -> dict:
        stages = [dict(dataclasses.asdict(s), unet_calls=s.unet_calls, unet_rows=s.unet_rows) for s in self.stages]
        return dict(job=self.job, summary=self.summary, stages=stages,
                    trainings=[dataclasses.asdict(t) for t in self.trainings],
                    timing=None if self.timing is None else dataclasses.asdict(self.timing),
                    seconds=self.seconds(), notes=list(self.notes))

    def text(self) -> str:
        seconds = self.seconds()
        row = self.timing.row_seconds if self.timing else None
        per_image = self.timing.image_score_seconds if self.timing else None
        lines = [f"Dry run of the {self.job} job: nothing is generated, scored or trained.", self.summary, "",
                 f"| row | images to generate | already made | UNet calls | UNet rows | probe UNet rows | "
                 f"{self.evaluator} calls (already scored) | ≈ time |", "|---" * 8 + "|"]
        for s in self.stages:
            estimate = None
            if row is not None:
                estimate = (s.unet_rows + s.probe_rows) * row + (s.scores * per_image if per_image else 0.0)
            probe = f"{s.probe_rows:,}" + (f" ({s.probes_found} found)" if s.probes_found else "")
            lines.append(f"| {s.name} | {s.images:,} | {s.found:,} | {s.unet_calls:,} | {s.unet_rows:,} | {probe} | "
                         f"{s.scores:,} ({s.scores_found:,}) | {duration(estimate)} |")
        images = sum(s.images for s in self.stages)
        lines.append(f"| total | {images:,} | {sum(s.found for s in self.stages):,} | "
                     f"{sum(s.unet_calls for s in self.stages):,} | {sum(s.unet_rows for s in self.stages):,} | "
                     f"{sum(s.probe_rows for s in self.stages):,} | {sum(s.scores for s in self.stages):,} "
                     f"({sum(s.scores_found for s in self.stages):,}) | {duration(seconds.get('total'))} |")
        lines.append("")
        if self.trainings:
            lines.append(f"Trained first ({len(self.trainings)} run(s), not there yet):")
            for t in self.trainings:
                rough = "" if not (row and t.rows_per_iteration) else \
                    f", ≈ {duration(t.iterations * t.rows_per_iteration * row)}"
                lines.append(f"  {t.what}: {t.spec}, {t.iterations:,} iterations -> {t.run_dir}{rough}")
        else:
            lines.append("Nothing to train first.")
        if self.timing is not None:
            t = self.timing
            measured = (f"Measured here ({t.devices} × {t.device_kind}, {t.backend}): one CFG step of {t.step_rows} "
                        f"UNet rows in {t.step_seconds:.3g} s (compiled in {t.compile_seconds:.1f} s), "
                        f"{1e3 * t.row_seconds:.3g} ms per row")
            if per_image is not None:
                measured += f"; the {self.evaluator}: {1e3 * per_image:.3g} ms per image"
            lines.append(measured + ".")
            parts = ", ".join(f"{k} {duration(v)}" for k, v in seconds.items() if k != "total" and v)
            lines.append(f"Estimated wall time here: {duration(seconds['total'])} ({parts or 'nothing to do'}); "
                         f"per device: {math.ceil(images / t.devices):,} images to generate.")
        lines += self.notes
        return "\n".join(lines)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else (f"{seconds:.2f} s" if seconds else "0 s")
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def probe_unet_rows(probe: ProbeConfig, prompts: int, references: int, mesh=None) -> int:
    """UNet rows of one probe over ``prompts`` prompts and ``references`` reference prompts (D(""), and the
    concept's own prompts for the calibrated rule), in padded chunks as ``WProbe`` runs them (the sequential
    rule may stop earlier: an upper bound)."""
    rows = prompts + references
    if not prompts:
        return 0
    chunk = padded_rows(min(probe.prompt_chunk, rows), mesh)
    steps = int(num_sampling_steps(probe.objective, probe.t_enc))
    return math.ceil(rows / chunk) * chunk * probe.draws * (2 * steps + 2)


def train_rows_per_iteration(train_config) -> float:
    """Rough UNet rows of one iteration of an ESD-style eraser (0 for one without an objective)."""
    objective = getattr(train_config, "objective", None)
    if objective is None or not getattr(train_config, "iterations", 0):
        return 0.0
    return objective.samples_per_step * (2 * objective.ddim_steps / 2 + TRAIN_EXTRA_ROWS)


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure_unet_step(sd, batch_size: int, height: int | None = None, width: int | None = None,
                      repeats: int = 3) -> Timing:
    """One CFG step of the UNet over ``batch_size`` images (padded to the devices, 2 rows each), compiled as
    the sampler compiles its steps and run on the model's devices; the median of ``repeats`` after a warm-up."""
    rows = padded_rows(batch_size, sd.mesh)
    latents = sd.put_rows(np.zeros((rows, *sd.latent_shape(height, width)), np.float32))
    context = sd.put_rows(np.repeat(to_numpy(sd.encode_prompts([""])), rows, axis=0))
    scale = sd.put_rows(np.full((rows,), 7.5, np.float32))
    groups = sd.data_size

    def step(params, z, cond, uncond, guidance):
        return guided_prediction(sd.unet, params, z, MEASURED_TIMESTEP, cond, uncond, guidance, None, groups)

    started = time.perf_counter()
    compiled = jax.jit(step, compiler_options=XLA_CPU_OPTIONS).lower(
        sd.params["unet"], latents, context, context, scale).compile()
    run = lambda: compiled(sd.params["unet"], latents, context, context, scale)  # noqa: E731
    jax.block_until_ready(run())
    compile_seconds = time.perf_counter() - started
    placement = sd.placement()
    device = jax.devices()[0]
    return Timing(devices=placement["devices"], backend=placement["backend"],
                  device_kind=getattr(device, "device_kind", device.platform), step_rows=2 * rows,
                  step_seconds=_timed(run, repeats), compile_seconds=compile_seconds)


def measure_evaluator(timing: Timing, evaluator, prompt_set, size: int, images: int = 16, repeats: int = 2) -> Timing:
    """``timing`` with one call of the evaluator on ``images`` random images of ``size`` px (after a warm-up)."""
    pixels = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    run = lambda: evaluator.class_probabilities(pixels, prompt_set)  # noqa: E731
    run()
    return dataclasses.replace(timing, evaluator_images=images, evaluator_seconds=_timed(run, repeats))

