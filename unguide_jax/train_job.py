"""The job behind ``train.py``: config -> model, concept, LoRA -> jitted UnGuide steps -> one run folder.

Run folder (``config.run_dir``):
    config.json            the resolved config (file preset + overrides)
    metrics.jsonl          one line per step (loss, t_enc, t, seconds)
    checkpoints/<step>/    Orbax: train state + config, every ``checkpoint_every`` steps and the last
    adapter.safetensors    the final adapter (unguide_jax.adapter_file layout: load_adapter reads it)
    export/                the final adapter for PyTorch users, in the formats config.export names
                           (diffusers/ for "peft", kohya.safetensors, unet/ for "merged_unet")
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from .checkpoints import RunCheckpoints
from .weights import write_json

# A resumed run must agree with its checkpoint on these; the rest (iterations, checkpointing,
# mesh, exports, run_dir) may change between sessions.
TRAINING_KEYS = ("model", "concept", "lora", "objective", "learning_rate", "seed", "dtype", "param_dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    def export(self) -> Path:
        return self.root / "export"


class MetricsLog:
    """``metrics.jsonl``, one JSON line per step. Resuming from step s drops the lines of later steps
    (they belong to the cut-off session, whose state was not kept) so each step appears once."""

    def __init__(self, path: Path, resume_from_step: int | None):
        self.path = path
        if resume_from_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, record: dict) -> None:
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
    bar = tqdm(total=iterations, initial=start, desc="unguide", unit="step", disable=not progress)
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


# --- config checks ---------------------------------------------------------------------------------

def check_config(config: dict) -> None:
    """Value checks that need no model; each error names the key."""
    def positive(key, value, allow_zero=False):
        if (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                or (value == 0 and not allow_zero)):
            raise ValueError(f"config.{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    positive("iterations", config["iterations"])
    positive("learning_rate", config["learning_rate"])
    positive("checkpoint_every", config["checkpoint_every"], allow_zero=True)
    positive("keep", config["keep"])
    positive("lora.rank", config["lora"]["rank"])
    if not config["model"]:
        raise ValueError("config.model is empty: give a diffusers-layout Stable Diffusion folder or 'embedded'")
    if not config["run_dir"]:
        raise ValueError("config.run_dir is empty")
    for key in ("dtype", "param_dtype"):
        if config[key] not in DTYPES:
            raise ValueError(f"config.{key} must be one of {sorted(DTYPES)}, got {config[key]!r}")
    if not isinstance(config["export"], (list, tuple)):
        raise ValueError(f"config.export must be a list of formats, got {config['export']!r}")


def check_resumable(saved: dict, config: dict, where: Path) -> None:
    changed = [k for k in TRAINING_KEYS if saved.get(k) != config.get(k)]
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {where}: its checkpoint was trained with other settings ({detail}). "
                         "Use another run_dir for a new run.")


def resolve_model_folder(name_or_path: str) -> Path:
    from .embedded import resolve_model_path

    folder = resolve_model_path(name_or_path)
    if name_or_path == "embedded" and not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder} (the embedded model is not built or installed)")
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"missing model folder: {folder} has no model_index.json (not a diffusers folder)")
    return folder


def _export_peft(export_dir: Path, adapter, alpha: float, unet, unet_params) -> Path:
    from .lora_io import export_peft
    return export_peft(export_dir / "diffusers", adapter, alpha, unet_params)


def _export_kohya(export_dir: Path, adapter, alpha: float, unet, unet_params) -> Path:
    from .lora_io import export_kohya
    return export_kohya(export_dir / "kohya.safetensors", adapter, alpha, unet_params)


def _export_merged_unet(export_dir: Path, adapter, alpha: float, unet, unet_params) -> Path:
    from .lora_io import export_merged_unet
    return export_merged_unet(export_dir / "unet", unet.config, jax.device_get(unet_params), [(adapter, alpha)])


# config.export names -> writers (unguide_jax.lora_io) and where their output lands under export/:
#   peft         diffusers/PEFT: export/diffusers/pytorch_lora_weights.safetensors (load_lora_weights(folder))
#   kohya        kohya/A1111:    export/kohya.safetensors
#   merged_unet  the adapter merged into a diffusers unet/ folder: export/unet/ (as large as the UNet)
EXPORTERS: dict[str, Callable] = {"peft": _export_peft, "kohya": _export_kohya, "merged_unet": _export_merged_unet}


def check_exports(formats) -> None:
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown} in config.export; known: {sorted(EXPORTERS)}")


def export_adapter(formats, export_dir: Path, adapter, alpha: float, unet, unet_params) -> list[Path]:
    return [EXPORTERS[name](export_dir, adapter, alpha, unet, unet_params) for name in formats]


# --- the job ----------------------------------------------------------------------------------------

def run_training(config: dict, progress: bool = True) -> Path:
    """Train (or resume) one UnGuide adapter as ``config`` says; returns the run folder."""
    from .adapter_file import save_adapter
    from .loading import load_pipeline
    from .lora import LoraConfig, count_parameters, target_modules
    from .unguide.concepts import load_concept
    from .unguide.objective import ObjectiveConfig, embed_concept
    from .unguide.sharding import make_mesh, shard, shardings_for
    from .unguide.train_step import init_train_state, make_optimizer, make_train_step

    check_config(config)
    check_exports(config["export"])
    concept = load_concept(config["concept"])
    objective = ObjectiveConfig(**config["objective"])
    lora_config = LoraConfig(rank=int(config["lora"]["rank"]), alpha=float(config["lora"]["alpha"]),
                             targets=str(config["lora"]["targets"]))
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

        sd = load_pipeline(model_folder, dtype=DTYPES[config["dtype"]], param_dtype=DTYPES[config["param_dtype"]],
                           allow_pickle=bool(config["allow_pickle"]))
        modules = target_modules(sd.params["unet"], lora_config.targets)  # "matches no layer" fails here
        mesh = make_mesh(**config["mesh"])
        unet_params = shard(sd.params["unet"], mesh)
        embeddings = embed_concept(sd, concept)
        optimizer = make_optimizer(float(config["learning_rate"]))
        init = functools.partial(init_train_state, lora_config=lora_config, optimizer=optimizer)
        key = jax.random.key(int(config["seed"]))
        abstract = jax.eval_shape(init, key, unet_params)
        state_shardings = shardings_for(abstract, mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                state_shardings)

        if latest is not None:
            state, _ = checkpoints.restore(abstract)
            print(f"resuming {paths.root} from step {int(state.step)}")
        else:
            # Eager: a jitted init would take the UNet as an argument only to read kernel shapes.
            state = jax.device_put(init(key, unet_params), state_shardings)
        write_json(paths.config, config)
        log = MetricsLog(paths.metrics, resume_from_step=int(state.step) if latest is not None else None)
        if latest is None:
            log({"step": 0, "lora_modules": len(modules), "lora_parameters": count_parameters(state.adapter),
                 "concept": concept.name, "model": str(model_folder)})

        train_step = make_train_step(sd.unet, sd.scheduler, lora_config, objective, optimizer, mesh=mesh)
        state = train_loop(state, lambda s: train_step(s, unet_params, embeddings),
                           iterations=int(config["iterations"]), checkpoint_every=int(config["checkpoint_every"]),
                           checkpoints=checkpoints, config=config, log=log, progress=progress)
    finally:
        checkpoints.close()

    adapter = jax.device_get(state.adapter)
    save_adapter(paths.adapter, adapter, lora_config, extra={
        "concept": concept.to_json(), "base_model": str(config["model"]), "steps": int(state.step),
        "objective": dataclasses.asdict(objective), "learning_rate": float(config["learning_rate"]),
        "seed": int(config["seed"]),
    })
    export_adapter(config["export"], paths.export, adapter, lora_config.alpha, sd.unet, unet_params)
    return paths.root
