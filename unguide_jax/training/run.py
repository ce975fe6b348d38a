"""One training run: config -> model, concept, eraser (``erasers.registry``) -> one run folder.

Run folder (``config.run_dir``):
    config.json            the resolved config (file preset + overrides)
    metrics.jsonl          one line per step (loss, t_enc, t, seconds); closed form: one report line
    checkpoints/<step>/    Orbax: train state + config, every ``checkpoint_every`` steps and the last
    adapter.safetensors    unguide: the final LoRA (unguide_jax.edits.files.load_adapter reads it)
    edit.safetensors       the other erasers: the final edit (adapter_file.load_edit_file);
                           learnable prompts also write edit_with_prompt.safetensors (tokens kept)
    export/                the edit for PyTorch users, in the formats config.export names
                           (unguide_jax.edits.export: peft, kohya, partial_unet, merged_unet, prompt)
"""
from __future__ import annotations

import math
from pathlib import Path

import jax

from unguide_jax.edits.edit import check_edit_fits
from unguide_jax.edits.export import check_exports, export_edit
from unguide_jax.edits.files import save_edit
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.registry import CLOSED_FORM, EDIT_FILE, ERASERS, TRAINED
from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.loading.weights import write_json
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.shapes import resolve_model_path
from unguide_jax.training.checkpoints import RunCheckpoints
from unguide_jax.training.loop import MetricsLog, RunPaths, train_loop
from unguide_jax.training.sharding import make_mesh, shard, shardings_for

# A resumed run must agree with its checkpoint on these; the rest (iterations, checkpointing,
# mesh, exports, run_dir) may change between sessions.
TRAINING_KEYS = ("method", "model", "concept", "lora", "prompt", "objective", "learning_rate", "seed", "dtype",
                 "param_dtype")
TRAIN_DTYPES = ("float32", "bfloat16")


def _positive(config: dict, key: str, allow_zero: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0
            or (value == 0 and not allow_zero)):
        raise ValueError(f"config.{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_config(config: dict) -> str:
    """Value checks that need no model; each error names the key. Returns the method."""
    method = config.get("method", "unguide")
    if method not in ERASERS:
        raise ValueError(f"config.method must be one of {ERASERS}, got {method!r}")
    if not config["model"]:
        raise ValueError("config.model is empty: give a diffusers-layout Stable Diffusion folder or 'embedded'")
    if not config["run_dir"]:
        raise ValueError("config.run_dir is empty")
    for key in ("dtype", "param_dtype"):
        dtype_named(config[key], key, TRAIN_DTYPES)
    check_exports(config["export"])
    if method in CLOSED_FORM:
        return method
    for key in ("iterations", "keep"):
        _positive(config, key)
    _positive(config, "checkpoint_every", allow_zero=True)
    if method == "unguide":
        _positive(config, "learning_rate")
        _positive(config, "lora.rank")
    else:
        _positive(config, "prompt.model_learning_rate")
        _positive(config, "prompt.prompt_learning_rate")
    return method


def check_resumable(saved: dict, config: dict, where: Path) -> None:
    changed = [k for k in TRAINING_KEYS if saved.get(k) != config.get(k)]
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {where}: its checkpoint was trained with other settings ({detail}). "
                         "Use another run_dir for a new run.")


def resolve_model_folder(name_or_path: str) -> Path:
    folder = resolve_model_path(name_or_path)
    if name_or_path == "embedded" and not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder} (the embedded model is not built or installed)")
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"missing model folder: {folder} has no model_index.json (not a diffusers folder)")
    return folder


def run_training(config: dict, progress: bool = True) -> Path:
    """Train (or resume) one eraser as ``config`` says; returns the run folder."""
    method = check_config(config)
    concept = load_concept(config["concept"])
    if method in CLOSED_FORM:
        return run_closed_form(config, method, concept)
    trainer = TRAINED[method](config)  # config values are checked here (ObjectiveConfig, LoraConfig, ...)
    model_folder = resolve_model_folder(config["model"])
    paths = RunPaths(Path(config["run_dir"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    checkpoints = RunCheckpoints(paths.checkpoints, keep=int(config["keep"]))
    try:
        latest = checkpoints.latest_step()
        if latest is not None and not config["resume"]:
            raise FileExistsError(f"{paths.checkpoints} already holds checkpoints (latest: step {latest}): pass "
                                  "--config.resume=true to continue that run, or choose another run_dir")
        if latest is not None:
            check_resumable(checkpoints.saved_config(latest), config, paths.root)  # before loading the model

        sd = load_pipeline(model_folder, dtype=dtype_named(config["dtype"]), param_dtype=dtype_named(config["param_dtype"], "param_dtype"),
                           allow_pickle=bool(config["allow_pickle"]))
        described = trainer.describe(sd.params["unet"])
        mesh = make_mesh(**config["mesh"])
        unet_params = shard(sd.params["unet"], mesh)
        embeddings = trainer.embeddings(sd, concept)
        key = jax.random.key(int(config["seed"]))
        abstract = jax.eval_shape(trainer.init, key, unet_params)
        state_shardings = shardings_for(abstract, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                state_shardings)

        if latest is not None:
            state, _ = checkpoints.restore(abstract)
            print(f"resuming {paths.root} from step {int(state.step)}")
        else:
            # Eager: a jitted init would take the UNet as an argument only to read kernel shapes.
            state = jax.device_put(trainer.init(key, unet_params), state_shardings)
        write_json(paths.config, config)
        log = MetricsLog(paths.metrics, resume_from_step=int(state.step) if latest is not None else None)
        if latest is None:
            log({"step": 0, "method": method, **described, "trained_parameters": trainer.parameters(state),
                 "concept": concept.name, "model": str(model_folder)})

        train_step = trainer.step_fn(sd, mesh)
        state = train_loop(state, lambda s: train_step(s, unet_params, embeddings),
                           iterations=int(config["iterations"]), checkpoint_every=int(config["checkpoint_every"]),
                           checkpoints=checkpoints, config=config, log=log, progress=progress)
    finally:
        checkpoints.close()

    edit = trainer.save(state, paths.root, concept, config)
    export_edit(config["export"], paths.export, edit, sd.unet, jax.device_get(unet_params))
    return paths.root


def run_closed_form(config: dict, method: str, concept) -> Path:
    """PURE or UCE: one computation, no checkpoints; the run folder gets edit.safetensors and a report."""
    eraser = CLOSED_FORM[method]
    settings = eraser.settings_cls(**config[eraser.settings_key])
    model_folder = resolve_model_folder(config["model"])
    paths = RunPaths(Path(config["run_dir"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    sd = load_pipeline(model_folder, dtype=dtype_named(config["dtype"]),
                       param_dtype=dtype_named(config["param_dtype"], "param_dtype"),
                       allow_pickle=bool(config["allow_pickle"]))
    write_json(paths.config, config)
    edit, report = eraser.compute(sd, concept, settings)
    check_edit_fits(sd.params["unet"], edit, what=method)
    MetricsLog(paths.metrics, resume_from_step=None)({"method": method, "concept": concept.name, **report})
    write_json(paths.root / "report.json", report)
    save_edit(paths.root / EDIT_FILE, edit, method, {"concept": concept.to_json(), "base_model": str(config["model"]),
                                                     "report": report})
    export_edit(config["export"], paths.export, edit, sd.unet, sd.params["unet"])
    return paths.root
