"""One training run: config -> model, concept, eraser (``erasers.registry``) -> one run folder.

Run folder (``config.run_dir``):
    config.json            the resolved config (file preset + overrides)
    base_model.json        fingerprints of the base weights the edit adapts (``loading.base_model``): an
                           export or a resume on a model with other weights is refused by name
    metrics.jsonl          one line per step (loss, t_enc, t, seconds); closed form: one report line
    tensorboard/           the same scalars as TensorBoard event files (with tensorboardX installed;
                           ``training.event_files``); closed form: the report's numbers at step 0
    checkpoints/<step>/    Orbax: train state + config, every ``checkpoint_every`` steps and the last
    adapter.safetensors    unguide: the final LoRA (unguide_jax.loading.edit_files.load_adapter reads it)
    edit.safetensors       the other erasers: the final edit (adapter_file.load_edit_file);
                           learnable prompts also write edit_with_prompt.safetensors (tokens kept)
    export/                the edit for PyTorch users, in the formats config.export names
                           (unguide_jax.loading.exports: peft, kohya, partial_unet, merged_unet, prompt);
                           the train job (``unguide_jax.jobs.train``) adds unguide.json and the model card
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Mapping

import jax

from unguide_jax.edits.edit import check_edit_fits
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.json_files import write_json
from unguide_jax.loading.base_model import (
    BASE_MODEL_FILE,
    BaseModelMismatch,
    adapted_modules,
    base_model_record,
    describe_mismatch,
    fingerprint_mismatches,
    read_base_model_record,
)
from unguide_jax.loading.edit_files import save_edit
from unguide_jax.loading.exports import export_edit
from unguide_jax.loading.resolve import load_model, resolve_model_source
from unguide_jax.loading.weights import naming_the_folder
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.hosts import check_same_config, fetch_tree, is_main_process, watching_the_others
from unguide_jax.parallel.mesh import make_mesh, place, shard, shardings_for
from unguide_jax.settings import ConfigError, as_config, to_dict
from unguide_jax.training.checkpoints import RunCheckpoints
from unguide_jax.training.config import TrainConfig, train_schema
from unguide_jax.training.event_files import TensorBoardLog
from unguide_jax.training.loop import DivergenceGuard, MetricsLog, RunPaths, train_loop
from unguide_jax.training.run_folder import claim_run_folder_for_every_process
from unguide_jax.training.trainers import CLOSED_FORM, EDIT_FILE, TRAINED

# A resumed run must agree with its checkpoint on these; the rest (iterations, checkpointing,
# mesh, exports, run_dir) may change between sessions.
TRAINING_KEYS = ("method", "model", "concept", "lora", "prompt", "objective", "learning_rate", "seed", "dtype",
                 "param_dtype")


# What a multi-host run that lost a process can do next.
RESTART = ("Restart every process; --config.resume=true continues from the last complete checkpoint (with "
           "--config.overwrite=true too if this run was replacing another).")


def check_config(config: TrainConfig | Mapping) -> TrainConfig:
    """The typed config (a dict is validated: ``unguide_jax.training.config``), and the checks of keys a
    preset may leave empty for the user to fill (``model``, ``run_dir``); errors name the key."""
    config = as_config(config, train_schema)
    if not config.model:
        raise ConfigError("config.model is empty: give a diffusers-layout Stable Diffusion folder or 'embedded'")
    if not config.run_dir:
        raise ConfigError("config.run_dir is empty")
    return config


def check_resumable(saved: Mapping, config: TrainConfig | Mapping, where: Path,
                    keys: tuple[str, ...] = TRAINING_KEYS) -> None:
    config = to_dict(config) if isinstance(config, TrainConfig) else config
    changed = [k for k in keys if saved.get(k) != config.get(k)]
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        instead = (" Without resume=true, overwrite=true starts the replacement over (deleting those checkpoints)."
                   if where.name.endswith(".building") else "")
        raise ValueError(f"cannot resume {where}: its checkpoint was trained with other settings ({detail})."
                         f"{instead} Use another run_dir for a new run.")


def checkpoint_to_resume(checkpoints: RunCheckpoints, config: TrainConfig, record: dict, paths: RunPaths,
                         keys: tuple[str, ...] = TRAINING_KEYS) -> int | None:
    """The step a run continues from (None: a new run), checked against ``resume`` and, before the model
    loads, the checkpoint's training settings."""
    latest = checkpoints.latest_step()
    if latest is not None and not config.resume:
        raise FileExistsError(f"{paths.checkpoints} already holds checkpoints (latest: step {latest}): pass "
                              "--config.resume=true to continue that run, --config.overwrite=true to replace it, or "
                              "choose another run_dir")
    if latest is not None:
        check_resumable(checkpoints.saved_config(latest), record, paths.root, keys)
    elif config.resume:
        print(f"note: resume=true, but {paths.checkpoints} holds no complete checkpoint: starting a new run "
              "at step 0", file=sys.stderr)
    return latest


def base_model_of_run(config: TrainConfig, unet_params, modules, where: Path, resuming: bool) -> dict:
    """``base_model.json`` of this run; resuming, the weights must be those the checkpoints were trained on
    (a model replaced at the same path is another model)."""
    record = base_model_record(config.model, unet_params, modules)
    saved = read_base_model_record(where) if resuming else None
    if saved is not None:
        bad = fingerprint_mismatches(saved["fingerprint"], record["fingerprint"], float(saved["tolerance"]))
        if bad:
            raise BaseModelMismatch(
                f"cannot resume {where}: its checkpoints were trained on {saved['model']}, and the weights of "
                f"{config.model} now differ: {describe_mismatch(bad, len(saved['fingerprint']))}. Resume with the "
                "model it was trained on, or use another run_dir for a new run")
    return record


def _load(config: TrainConfig):
    return load_model(config.model, dtype=dtype_named(config.dtype), param_dtype=dtype_named(config.param_dtype),
                      allow_pickle=config.allow_pickle, variant=config.variant, revision=config.revision,
                      config_folder=config.model_config or None)


# Called on the main process once the exports are written: (export folder, the model, the edit, the base UNet
# parameters on the host, the concept). The train job passes the publishing step (unguide.json, model card).
PublishHook = Callable[..., None]


def run_training(config: TrainConfig | Mapping, progress: bool = True, publish: PublishHook | None = None) -> Path:
    """Train (or resume) one eraser as ``config`` says (a train schema, or a dict validated into one);
    returns the run folder."""
    config = check_config(config)
    if getattr(config, "concepts", ()):
        raise ConfigError("config.concepts trains several concepts in one run: call "
                          "unguide_jax.training.many_run.run_many (unguide-train does)")
    if config.method in TRAINED and config.mesh.concept > 1:
        raise ConfigError(f"mesh.concept={config.mesh.concept} is for several concepts in one run (config.concepts)")
    concept = load_concept(config.concept)
    if config.method in CLOSED_FORM:
        return run_closed_form(config, config.method, concept, publish)
    trainer = TRAINED[config.method](config)
    source = resolve_model_source(config.model, revision=config.revision)  # a missing model fails before anything
    record = to_dict(config)  # config.json and every checkpoint's config
    check_same_config(record, "training config")  # several processes: all of them with the same one
    with claim_run_folder_for_every_process(config.run_dir, record, identity_keys=TRAINING_KEYS, resume=config.resume,
                                            overwrite=config.overwrite) as folder:  # locked; another run's is refused
        with naming_the_folder(folder.work, "the run folder"), watching_the_others(RESTART):
            _train(config, trainer, concept, source, record, RunPaths(folder.work), progress, publish)
    return Path(config.run_dir)


def _train(config: TrainConfig, trainer, concept, source, record: dict, paths: RunPaths, progress: bool,
           publish: PublishHook | None) -> Path:
    """``run_training`` in its claimed folder (``paths.root``: where it writes; a building folder when replacing)."""
    checkpoints = RunCheckpoints(paths.checkpoints, keep=config.keep)
    board = None
    try:
        latest = checkpoint_to_resume(checkpoints, config, record, paths)

        sd = _load(config)
        if config.remat:
            sd = dataclasses.replace(sd, unet=sd.unet.clone(remat=config.remat))
        described = trainer.describe(sd.params["unet"])
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, batch_size=config.objective.samples_per_step)
        unet_params = shard(sd.params["unet"], mesh)
        embeddings = trainer.embeddings(sd, concept)
        if getattr(trainer, "derived", None):
            record = {**record, "derived": trainer.derived}  # config.json: what the settings became on this model
            if is_main_process():
                print(trainer.derived_note)
        key = jax.random.key(config.seed)
        abstract = jax.eval_shape(trainer.init, key, unet_params)
        state_shardings = shardings_for(abstract, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                state_shardings)
        base_model = base_model_of_run(config, sd.params["unet"], adapted_modules(trainer.to_edit(abstract.adapter)),
                                       paths.root, resuming=latest is not None)

        if latest is not None:
            state, _ = checkpoints.restore(abstract)
            print(f"resuming {paths.root} from step {int(state.step)}")
        else:
            # Eager: a jitted init would take the UNet as an argument only to read kernel shapes.
            state = place(trainer.init(key, unet_params), state_shardings)
        main = is_main_process()  # the one that writes files and draws the progress bar
        if main:
            write_json(paths.config, record)
            write_json(paths.root / BASE_MODEL_FILE, base_model)
        resumed_at = int(state.step) if latest is not None else None
        log = MetricsLog(paths.metrics, resume_from_step=resumed_at) if main else lambda record: None
        board = TensorBoardLog(paths.tensorboard, resume_from_step=resumed_at)  # writes on process 0 only

        def log_step(record: dict) -> None:
            log(record)
            board(record)

        if latest is None:
            log({"step": 0, "method": config.method, **described, "trained_parameters": trainer.parameters(state),
                 "concept": concept.name, "model": str(source.path), "devices": int(mesh.devices.size),
                 "processes": jax.process_count(), "mesh": dict(mesh.shape)})

        train_step = trainer.step_fn(sd, mesh)
        state = train_loop(state, lambda s: train_step(s, unet_params, embeddings),
                           iterations=config.iterations, checkpoint_every=config.checkpoint_every,
                           checkpoints=checkpoints, config=record, log=log_step, progress=progress and main,
                           divergence=DivergenceGuard(**dataclasses.asdict(config.divergence)))
    except BaseException:
        # The first error is the one to report: closing writers after a full disk fails again, and that
        # failure would replace it.
        with contextlib.suppress(Exception):
            checkpoints.close()
        if board is not None:
            with contextlib.suppress(Exception):
                board.close()
        raise
    try:
        checkpoints.close()
    finally:
        if board is not None:
            board.close()

    # Collectives: every process gathers what the main one writes.
    state = fetch_tree(state)
    base = fetch_tree(unet_params) if config.export else None
    if is_main_process():
        edit = trainer.save(state, paths.root, concept, config)
        export_edit(list(config.export), paths.export, edit, sd.unet, base)
        if config.export and publish is not None:
            publish(paths.export, sd, edit, base, concept)
    return paths.root


def run_closed_form(config: TrainConfig | Mapping, method: str, concept, publish: PublishHook | None = None) -> Path:
    """PURE or UCE: one computation, no checkpoints; the run folder gets edit.safetensors and a report."""
    config = check_config(config)
    resolve_model_source(config.model, revision=config.revision)  # a missing model fails before the run folder
    check_same_config(to_dict(config), "training config")
    with claim_run_folder_for_every_process(config.run_dir, to_dict(config), trained=False,
                                            overwrite=config.overwrite) as folder:
        # Built beside a non-empty run_dir, swapped in.
        with naming_the_folder(folder.work, "the run folder"), watching_the_others("Restart every process."):
            _closed_form(config, method, concept, RunPaths(folder.work), publish)
    return Path(config.run_dir)


def _closed_form(config: TrainConfig, method: str, concept, paths: RunPaths, publish: PublishHook | None) -> Path:
    """Every process computes the edit on its own default device (seconds); the main one writes it."""
    eraser = CLOSED_FORM[method]
    settings = getattr(config, eraser.settings_key)
    sd = _load(config)
    edit, report = eraser.compute(sd, concept, settings)
    check_edit_fits(sd.params["unet"], edit, what=method)
    if not is_main_process():
        return paths.root
    write_json(paths.config, to_dict(config))
    write_json(paths.root / BASE_MODEL_FILE, base_model_record(config.model, sd.params["unet"], adapted_modules(edit)))
    MetricsLog(paths.metrics, resume_from_step=None)({"method": method, "concept": concept.name, **report})
    with TensorBoardLog(paths.tensorboard) as board:
        board({k: v for k, v in report.items() if k != "config"}, step=0)  # the settings are in config.json
    write_json(paths.root / "report.json", report)
    save_edit(paths.root / EDIT_FILE, edit, method, {"concept": concept.to_json(), "base_model": config.model,
                                                     "report": report})
    export_edit(list(config.export), paths.export, edit, sd.unet, sd.params["unet"])
    if config.export and publish is not None:
        publish(paths.export, sd, edit, sd.params["unet"], concept)
    return paths.root
