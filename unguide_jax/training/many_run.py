"""Several concepts in one training run (``unguide.py:many``, ``config.concepts``): K UnGuide LoRAs trained together
in one jitted step (``erasers.unguide.many``), each exactly its own single-concept run with the run's seed.

Run folder (``config.run_dir``):
    config.json                the resolved config
    base_model.json            as a single run's (the K LoRAs adapt the same modules)
    metrics.jsonl              one line per step: seconds, the concepts still training, their mean loss
    checkpoints/<step>/        Orbax: the K stacked train states + the config, and which concepts stopped
    concepts/<name>/           one single-run folder per concept, usable alone wherever a run folder is
                               (sample.py adapters, evaluate.py edits, unguide-export): config.json (the
                               single-concept config that trains the same LoRA), base_model.json, metrics.jsonl,
                               tensorboard/, adapter.safetensors, export/
    concepts.safetensors       all K LoRAs in one edit file (``loading.edit_files.load_edit_file``: LoRA i is
                               concept i, metadata ``concepts``); ``split_concepts`` gives them back one by one

Per concept: its own learning rate (``transfer`` derives it from the concept's tokens; it lives in the optimizer
state), its own A initialisation (``lora.init=concept``), its own metrics and divergence guard. A concept whose
loss is not finite or that diverges stops alone, at its state before that step; the others train on. Its
folder then gets no adapter (as a single run that stops writes none), the checkpoints record it, so a resume
does not train it again, and the run ends with ``Diverged`` naming it once the others are written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from unguide_jax.edits.edit import Edit, combine
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.unguide.many import (
    concept_slice,
    make_many_train_step,
    stack,
    stack_embeddings,
    stacked_shardings,
)
from unguide_jax.erasers.unguide.train_step import TrainState
from unguide_jax.json_files import write_json
from unguide_jax.loading.base_model import BASE_MODEL_FILE, adapted_modules
from unguide_jax.loading.edit_files import load_edit_file, save_edit
from unguide_jax.loading.exports import export_edit
from unguide_jax.loading.resolve import resolve_model_source
from unguide_jax.loading.weights import naming_the_folder
from unguide_jax.parallel.hosts import (
    check_same_config,
    fetch_tree,
    is_main_process,
    to_numpy,
    watching_the_others,
)
from unguide_jax.parallel.mesh import make_mesh, place, shard
from unguide_jax.parallel.supervise import report_progress
from unguide_jax.settings import ConfigError, to_dict
from unguide_jax.training.checkpoints import RunCheckpoints
from unguide_jax.training.config import UnguideTrainConfig
from unguide_jax.training.event_files import TensorBoardLog
from unguide_jax.training.loop import (
    Diverged,
    DivergenceGuard,
    DivergenceWatch,
    MetricsLog,
    RunPaths,
    nonfinite_message,
)
from unguide_jax.training.run import (
    RESTART,
    TRAINING_KEYS,
    PublishHook,
    _load,
    base_model_of_run,
    check_config,
    checkpoint_to_resume,
)
from unguide_jax.training.run_folder import claim_run_folder_for_every_process
from unguide_jax.training.trainers import UnguideTrainer

CONCEPTS_DIR, CONCEPTS_FILE = "concepts", "concepts.safetensors"
MANY_TRAINING_KEYS = TRAINING_KEYS + ("concepts",)
STOPPED_KEY = "stopped_concepts"  # in each checkpoint's config record: concept name -> why it stopped


def concept_config(config: UnguideTrainConfig, name: str, run_dir: Path) -> UnguideTrainConfig:
    """The single-concept config that trains the same LoRA as concept ``name`` of this run."""
    return dataclasses.replace(config, concepts=(), concept=name, run_dir=str(run_dir),
                               mesh=dataclasses.replace(config.mesh, concept=0), overwrite=False, resume=False)


def concept_groups(config: UnguideTrainConfig, devices: int) -> int:
    """The concept axis's size: as configured, or the largest that divides both K and the device count."""
    k = len(config.concepts)
    if config.mesh.concept:
        if k % config.mesh.concept or devices % config.mesh.concept:
            raise ConfigError(f"mesh.concept={config.mesh.concept} must divide both the {k} concepts and the "
                              f"{devices} devices (0 picks the largest that does)")
        return config.mesh.concept
    return max(g for g in range(1, min(k, devices) + 1) if k % g == 0 and devices % g == 0)


def split_concepts(path: str | Path) -> list[tuple[str, Edit]]:
    """(concept name, its LoRA as an edit) for each concept of a ``concepts.safetensors``."""
    edit, metadata = load_edit_file(path)
    names = [c["name"] for c in metadata.get("concepts", [])]
    if len(names) != len(edit.loras):
        raise ValueError(f"{path}: {len(edit.loras)} LoRAs but {len(names)} concept names in its metadata (not a "
                         "concepts.safetensors of a several-concept run?)")
    return [(name, Edit(loras=(pair,))) for name, pair in zip(names, edit.loras)]


def run_many(config: UnguideTrainConfig | Mapping, progress: bool = True, publish: PublishHook | None = None) -> Path:
    """Train (or resume) the K LoRAs of ``config.concepts`` in one run; returns the run folder."""
    config = check_config(config)
    if config.method != "unguide" or not config.concepts:
        raise ConfigError("run_many trains UnGuide LoRAs for config.concepts (a non-empty list)")
    concepts = [load_concept(name) for name in config.concepts]  # an unknown concept fails before anything
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.concepts: two entries are the same concept ({names})")
    source = resolve_model_source(config.model, revision=config.revision)
    record = to_dict(config)
    check_same_config(record, "training config")
    with claim_run_folder_for_every_process(config.run_dir, record, identity_keys=MANY_TRAINING_KEYS,
                                            resume=config.resume, overwrite=config.overwrite) as folder:
        with naming_the_folder(folder.work, "the run folder"), watching_the_others(RESTART):
            _train_many(config, concepts, source, record, RunPaths(folder.work), progress, publish)
    return Path(config.run_dir)


@jax.jit
def _norms(adapters) -> jax.Array:
    """Each concept's adapter global norm, (K,)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
                        for x in jax.tree.leaves(adapters)))


@jax.jit
def _copy(tree):
    """A copy of the stacked states in one dispatch (not one per leaf)."""
    return jax.tree.map(jnp.copy, tree)


@jax.jit
def _keep_stopped(states, previous, stopped):
    """``states`` with the stopped concepts' slices put back to ``previous`` (their state before this step)."""
    def keep(new, old):
        mask = stopped.reshape((-1,) + (1,) * (new.ndim - 1))
        return jnp.where(mask, old, new)
    return jax.tree.map(keep, states, previous)


class _ConceptLogs:
    """Concept k's metrics.jsonl and TensorBoard in its folder."""

    def __init__(self, folders: list[Path], resumed_at: int | None, main: bool):
        self.metrics = [MetricsLog(f / "metrics.jsonl", resume_from_step=resumed_at) if main else None
                        for f in folders]
        self.boards = [TensorBoardLog(f / "tensorboard", resume_from_step=resumed_at) for f in folders]

    def __call__(self, k: int, record: dict) -> None:
        if self.metrics[k] is not None:
            self.metrics[k](record)
        if "step" in record and not isinstance(record.get("stopped"), str):
            self.boards[k](record)

    def close(self) -> None:
        for board in self.boards:
            with contextlib.suppress(Exception):
                board.close()


def _train_many(config: UnguideTrainConfig, concepts, source, record: dict, paths: RunPaths, progress: bool,
                publish: PublishHook | None) -> Path:
    k_count = len(concepts)
    folders = [paths.root / CONCEPTS_DIR / c.name for c in concepts]
    checkpoints = RunCheckpoints(paths.checkpoints, keep=config.keep)
    logs = None
    try:
        latest = checkpoint_to_resume(checkpoints, config, record, paths, MANY_TRAINING_KEYS)
        stopped: dict[str, str] = dict(checkpoints.saved_config(latest).get(STOPPED_KEY, {})) if latest else {}
        sd = _load(config)
        if config.remat:
            sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=config.remat))
        trainers = [UnguideTrainer(concept_config(config, c.name, f), rate_in_state=True)
                    for c, f in zip(concepts, folders)]
        described = trainers[0].describe(sd.params["unet"])
        groups = concept_groups(config, len(jax.devices()))
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, batch_size=config.objective.samples_per_step,
                         concept=groups)
        unet_params = shard(sd.params["unet"], mesh)
        embeddings = stack_embeddings([t.embeddings(sd, c) for t, c in zip(trainers, concepts)])
        if is_main_process():
            for c, t in zip(concepts, trainers):
                print(f"{c.name}: {t.derived_note}")
        key = jax.random.key(config.seed)  # every concept's run has this seed: the same draws, step by step
        init = lambda key, params: stack([t.init(key, params) for t in trainers])  # noqa: E731
        abstract = jax.eval_shape(init, key, unet_params)
        state_shardings = stacked_shardings(abstract, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                state_shardings)
        one_adapter = jax.eval_shape(lambda a: concept_slice(a, 0), abstract.adapter)
        base_model = base_model_of_run(config, sd.params["unet"], adapted_modules(trainers[0].to_edit(one_adapter)),
                                       paths.root, resuming=latest is not None)
        if latest is not None:
            states, _ = checkpoints.restore(abstract)
            print(f"resuming {paths.root} from step {run_step(states)}"
                  + (f" ({len(stopped)} stopped concept(s): {', '.join(stopped)})" if stopped else ""))
        else:
            states = place(init(key, unet_params), state_shardings)
        main = is_main_process()
        if main:
            write_json(paths.config, record)
            write_json(paths.root / BASE_MODEL_FILE, base_model)
            for c, t, f in zip(concepts, trainers, folders):
                f.mkdir(parents=True, exist_ok=True)
                write_json(f / "config.json", {**to_dict(concept_config(config, c.name, f)), "derived": t.derived,
                                               "trained_in": str(Path(config.run_dir))})
                write_json(f / BASE_MODEL_FILE, base_model)
        resumed_at = run_step(states) if latest is not None else None
        log = MetricsLog(paths.metrics, resume_from_step=resumed_at) if main else lambda r: None
        logs = _ConceptLogs(folders, resumed_at, main)
        if latest is None:
            log({"step": 0, "method": "unguide", "concepts": [c.name for c in concepts], **described,
                 "trained_parameters_per_concept": trainers[0].parameters(concept_slice(states, 0)),
                 "model": str(source.path), "devices": int(mesh.devices.size), "processes": jax.process_count(),
                 "mesh": dict(mesh.shape)})
            for k, (c, t) in enumerate(zip(concepts, trainers)):
                logs(k, {"step": 0, "method": "unguide", **described, "concept": c.name,
                         "learning_rate": t.learning_rate, "trained_in": str(Path(config.run_dir))})

        # The concepts share the seed, so at every step their trajectories have the same length: every slot
        # advances every iteration (packing trajectories of different lengths has nothing to gain here).
        slots = len(concepts) // groups * config.objective.samples_per_step
        step_fn = make_many_train_step(sd.unet, sd.scheduler, config.lora, config.objective, trainers[0].optimizer,
                                       mesh=mesh, trajectory_slots=slots)
        states = _loop(states, lambda s: step_fn(s, unet_params, embeddings), config, concepts, stopped, checkpoints,
                       record, log, logs, progress and main)
    except BaseException:
        with contextlib.suppress(Exception):
            checkpoints.close()
        if logs is not None:
            logs.close()
        raise
    try:
        checkpoints.close()
    finally:
        logs.close()

    # Collectives, on every process: the steps and adapters whole (the PRNG keys stay behind, split over the
    # processes: slicing them on the main process alone would be a collective only it joins).
    steps, adapters = fetch_tree((states.step, states.adapter))
    base = fetch_tree(unet_params) if config.export else None
    if is_main_process():
        finished = []
        for k, (c, t, f) in enumerate(zip(concepts, trainers, folders)):
            if c.name in stopped:
                continue
            single = concept_config(config, c.name, f)
            state = TrainState(step=steps[k], adapter=concept_slice(adapters, k), opt_state=None, key=None)
            edit = t.save(state, f, c, single)
            export_edit(list(config.export), f / "export", edit, sd.unet, base)
            if config.export and publish is not None:
                publish(f / "export", sd, edit, base, c)
            finished.append((c, edit))
        if finished:
            save_edit(paths.root / CONCEPTS_FILE, combine([e for _, e in finished]), "unguide", {
                "concepts": [c.to_json() for c, _ in finished], "base_model": config.model,
                "steps": int(np.max(steps)), "seed": config.seed,
                "learning_rates": {c.name: t.learning_rate for c, t in zip(concepts, trainers)}})
    if stopped:
        raise Diverged(f"{len(stopped)} of {k_count} concepts stopped and have no adapter: "
                       + "; ".join(f"{name}: {why}" for name, why in stopped.items())
                       + (f". The other {k_count - len(stopped)} are written in {config.run_dir}" if
                          len(stopped) < k_count else "")
                       + ". Train the stopped ones again with a lower learning_rate (or raise divergence.factor).")
    return paths.root


def _loop(states, step_fn, config: UnguideTrainConfig, concepts, stopped: dict[str, str],
          checkpoints: RunCheckpoints, record: dict, log, logs: _ConceptLogs, progress: bool):
    """``train_loop`` for K stacked states: per-concept finite-loss and divergence checks, stopping a concept
    alone; a checkpoint every ``checkpoint_every`` steps and after the last, recording the stopped concepts."""
    names = [c.name for c in concepts]
    start, iterations = run_step(states), config.iterations
    step = start
    if start > iterations:
        raise ValueError(f"the run is at step {start}, past iterations={iterations}")
    guard = DivergenceGuard(**dataclasses.asdict(config.divergence))
    norms = on_this_process(_norms(states.adapter))
    watches = [DivergenceWatch(guard, None, start, norm=n) for n in norms]
    is_stopped = np.array([n in stopped for n in names])
    bar = tqdm(total=iterations, initial=start, desc=f"unguide x{len(names)}", unit="step", disable=not progress)
    try:
        for _ in range(start, iterations):
            began = time.perf_counter()
            previous = _copy(states)  # the step donates states; a stopping concept goes back to it
            states, metrics = step_fn(states)
            metrics, norms = on_this_process((metrics, _norms(states.adapter)))
            step += 1
            for k, name in enumerate(names):
                if is_stopped[k]:
                    continue
                loss = float(metrics["loss"][k])
                problem = (f"the loss is {loss} at step {step}" if not math.isfinite(loss)
                           else watches[k].problem(step, loss, norm=float(norms[k])))
                if problem:
                    stopped[name] = problem
                    is_stopped[k] = True
                    logs(k, {"step": step, "stopped": problem})
                    print(f"{name}: stopped at step {step}: {problem}", file=sys.stderr)
                    continue
                logs(k, {"step": step, **{m: _plain(v[k]) for m, v in metrics.items()},
                         "seconds": round(time.perf_counter() - began, 4)})
            if is_stopped.any():
                states = _keep_stopped(states, previous, jnp.asarray(is_stopped))
            del previous
            active = int((~is_stopped).sum())
            log({"step": step, "concepts_training": active,
                 "loss_mean": round(float(np.mean(metrics["loss"][~is_stopped])), 8) if active else None,
                 "seconds": round(time.perf_counter() - began, 4)})
            bar.update(1)
            report_progress(f"train step {step}/{iterations}")
            if not active:
                break
            if step == iterations or (config.checkpoint_every and step % config.checkpoint_every == 0):
                if not np.all(np.isfinite(on_this_process(_norms(states.adapter)))):
                    raise Diverged(nonfinite_message(f"an adapter is not finite after step {step}", checkpoints))
                checkpoints.save(step, states, {**record, STOPPED_KEY: dict(stopped)})
    finally:
        bar.close()
    return states


def run_step(states) -> int:
    """The run's step: the concepts still training are all at it (a stopped one stays where it stopped)."""
    return int(np.max(on_this_process(states.step)))


_GATHERS: dict = {}


def on_this_process(tree):
    """Per-concept values (split over the concept axis, possibly across processes) whole on every process: an
    all-gather inside XLA rather than a host-side one per step."""
    leaves = jax.tree.leaves(tree)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    if mesh is not None:
        if mesh not in _GATHERS:
            _GATHERS[mesh] = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
        tree = _GATHERS[mesh](tree)
    return jax.tree.map(to_numpy, tree)


def _plain(value):
    value = np.asarray(value).item()
    return round(value, 8) if isinstance(value, float) else value
