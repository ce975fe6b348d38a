"""The job behind ``train.py``: config -> model, concept, eraser -> one run folder.

``config.method`` picks the eraser:
    unguide            UnGuide's LoRA, trained (spec unguide.md §3)
    learnable_prompts  memory tokens + an ESD fine-tune, trained (spec erasers.md §1)
    pure, uce          closed-form K/V edits (spec erasers.md §2, §3): no iterations

Run folder (``config.run_dir``):
    config.json            the resolved config (file preset + overrides)
    metrics.jsonl          one line per step (loss, t_enc, t, seconds); closed form: one report line
    checkpoints/<step>/    Orbax: train state + config, every ``checkpoint_every`` steps and the last
    adapter.safetensors    unguide: the final LoRA (unguide_jax.adapter_file.load_adapter reads it)
    edit.safetensors       the other erasers: the final edit (adapter_file.load_edit_file);
                           learnable prompts also write edit_with_prompt.safetensors (tokens kept)
    export/                the edit for PyTorch users, in the formats config.export names
                           (unguide_jax.edit_export: peft, kohya, partial_unet, merged_unet, prompt)
"""
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

from .checkpoints import RunCheckpoints
from .weights import write_json

# A resumed run must agree with its checkpoint on these; the rest (iterations, checkpointing,
# mesh, exports, run_dir) may change between sessions.
TRAINING_KEYS = ("method", "model", "concept", "lora", "prompt", "objective", "learning_rate", "seed", "dtype",
                 "param_dtype")
METHODS = ("unguide", "learnable_prompts", "pure", "uce")
CLOSED_FORM = ("pure", "uce")
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
    def edit(self) -> Path:
        return self.root / "edit.safetensors"

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


# --- config checks ---------------------------------------------------------------------------------

def _positive(config: dict, key: str, allow_zero: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0
            or (value == 0 and not allow_zero)):
        raise ValueError(f"config.{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_config(config: dict) -> str:
    """Value checks that need no model; each error names the key. Returns the method."""
    from .edit_export import check_exports

    method = config.get("method", "unguide")
    if method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {method!r}")
    if not config["model"]:
        raise ValueError("config.model is empty: give a diffusers-layout Stable Diffusion folder or 'embedded'")
    if not config["run_dir"]:
        raise ValueError("config.run_dir is empty")
    for key in ("dtype", "param_dtype"):
        if config[key] not in DTYPES:
            raise ValueError(f"config.{key} must be one of {sorted(DTYPES)}, got {config[key]!r}")
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
    from .embedded import resolve_model_path

    folder = resolve_model_path(name_or_path)
    if name_or_path == "embedded" and not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder} (the embedded model is not built or installed)")
    if not folder.is_dir():
        raise FileNotFoundError(f"missing model folder: {folder}")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"missing model folder: {folder} has no model_index.json (not a diffusers folder)")
    return folder


# --- the trained erasers ----------------------------------------------------------------------------

class UnguideTrainer:
    """UnGuide: a LoRA adapter, the objective of spec §3, Adam on the adapter."""

    def __init__(self, config: dict):
        from .lora import LoraConfig
        from .unguide.objective import ObjectiveConfig
        from .unguide.train_step import make_optimizer

        self.lora = LoraConfig(rank=int(config["lora"]["rank"]), alpha=float(config["lora"]["alpha"]),
                               targets=str(config["lora"]["targets"]))
        self.objective = ObjectiveConfig(**config["objective"])
        self.optimizer = make_optimizer(float(config["learning_rate"]))

    def describe(self, unet_params) -> dict:
        from .lora import target_modules

        return {"lora_modules": len(target_modules(unet_params, self.lora.targets))}  # "matches no layer" fails here

    def init(self, key, unet_params):
        from .unguide.train_step import init_train_state

        return init_train_state(key, unet_params, self.lora, self.optimizer)

    def embeddings(self, sd, concept):
        from .unguide.objective import embed_concept

        return embed_concept(sd, concept)

    def step_fn(self, sd, mesh):
        from .unguide.train_step import make_train_step

        return make_train_step(sd.unet, sd.scheduler, self.lora, self.objective, self.optimizer, mesh=mesh)

    def parameters(self, state) -> int:
        from .lora import count_parameters

        return count_parameters(state.adapter)

    def save(self, state, paths: RunPaths, concept, config: dict):
        from .adapter_file import save_adapter
        from .edits import lora_edit

        adapter = jax.device_get(state.adapter)
        save_adapter(paths.adapter, adapter, self.lora, extra={
            "concept": concept.to_json(), "base_model": str(config["model"]), "steps": int(state.step),
            "objective": dataclasses.asdict(self.objective), "learning_rate": float(config["learning_rate"]),
            "seed": int(config["seed"]),
        })
        return lora_edit(adapter, self.lora.alpha)


class PromptTrainer:
    """Learnable prompts: memory tokens and an ESD fine-tune of a parameter subset, trained alternately."""

    def __init__(self, config: dict):
        from .erasers.learnable_prompts import PromptConfig
        from .unguide.objective import ObjectiveConfig

        self.prompt = PromptConfig(**config["prompt"])
        self.objective = ObjectiveConfig(**config["objective"])
        self._concept_vector = None

    def describe(self, unet_params) -> dict:
        from .edits import memory_layers
        from .erasers.learnable_prompts import trainable_parameters

        return {"trained_tensors": len(trainable_parameters(unet_params, self.prompt.parameters)),
                "prompt_layers": len(memory_layers(unet_params, self.prompt.scope)), "prompt_tokens": self.prompt.tokens}

    def embeddings(self, sd, concept):
        from .erasers.uce import last_subject_index
        from .unguide.objective import ConceptEmbeddings

        targets = [t for t, _ in concept.pairs]
        target = jnp.asarray(sd.encode_prompts(targets))
        # The tokens start at the encoder's output at the concept word of the first target.
        self._concept_vector = target[0, last_subject_index(sd, targets[0])]
        # ESD: the empty prompt is e0's condition; the references are not used.
        return ConceptEmbeddings(target=target, reference=target, uncond=jnp.asarray(sd.encode_prompts([""])))

    def init(self, key, unet_params):
        from .erasers.learnable_prompts import init_state

        if self._concept_vector is None:
            raise RuntimeError("PromptTrainer.embeddings() must run before init(): the tokens start at the concept")
        return init_state(key, unet_params, self.prompt, self._concept_vector)

    def step_fn(self, sd, mesh):
        from .erasers.learnable_prompts import make_step
        from .unguide.sharding import jit_train_step
        from .unguide.train_step import latent_shape_of

        return jit_train_step(make_step(sd.unet, sd.scheduler, self.objective, self.prompt, latent_shape_of(sd.unet)),
                              mesh)

    def parameters(self, state) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(state.adapter))

    def save(self, state, paths: RunPaths, concept, config: dict):
        from .adapter_file import save_edit
        from .erasers.learnable_prompts import to_edit

        adapter = jax.device_get(state.adapter)
        extra = {"concept": concept.to_json(), "base_model": str(config["model"]), "steps": int(state.step),
                 "prompt": dataclasses.asdict(self.prompt), "objective": dataclasses.asdict(self.objective)}
        save_edit(paths.root / "edit_with_prompt.safetensors", to_edit(adapter, self.prompt, True),
                  "learnable_prompts", dict(extra, keep_prompt=True))
        save_edit(paths.edit, to_edit(adapter, self.prompt, False), "learnable_prompts", dict(extra, keep_prompt=False))
        return to_edit(adapter, self.prompt, True)  # exports: the delta as weights, the tokens as their own file


TRAINERS = {"unguide": UnguideTrainer, "learnable_prompts": PromptTrainer}


# --- the job ----------------------------------------------------------------------------------------

def run_training(config: dict, progress: bool = True) -> Path:
    """Train (or resume) one eraser as ``config`` says; returns the run folder."""
    from .edit_export import export_edit
    from .loading import load_pipeline
    from .unguide.concepts import load_concept
    from .unguide.sharding import make_mesh, shard, shardings_for

    method = check_config(config)
    concept = load_concept(config["concept"])
    if method in CLOSED_FORM:
        return run_closed_form(config, method, concept)
    trainer = TRAINERS[method](config)  # config values are checked here (ObjectiveConfig, LoraConfig, ...)
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

    edit = trainer.save(state, paths, concept, config)
    export_edit(config["export"], paths.export, edit, sd.unet, jax.device_get(unet_params))
    return paths.root


def run_closed_form(config: dict, method: str, concept) -> Path:
    """PURE or UCE: one computation, no checkpoints; the run folder gets edit.safetensors and a report."""
    from .adapter_file import save_edit
    from .edit_export import export_edit
    from .loading import load_pipeline

    model_folder = resolve_model_folder(config["model"])
    if method == "pure":
        from .erasers.pure import PureConfig, pure_edit

        settings = PureConfig(**config["pure"])
        compute = pure_edit
    else:
        from .erasers.uce import UceConfig, uce_edit

        settings = UceConfig(**config["uce"])
        compute = uce_edit
    paths = RunPaths(Path(config["run_dir"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    sd = load_pipeline(model_folder, dtype=DTYPES[config["dtype"]], param_dtype=DTYPES[config["param_dtype"]],
                       allow_pickle=bool(config["allow_pickle"]))
    write_json(paths.config, config)
    edit, report = compute(sd, concept, settings)
    from .edits import check_edit_fits

    check_edit_fits(sd.params["unet"], edit, what=method)
    MetricsLog(paths.metrics, resume_from_step=None)({"method": method, "concept": concept.name, **report})
    write_json(paths.root / "report.json", report)
    save_edit(paths.edit, edit, method, {"concept": concept.to_json(), "base_model": str(config["model"]),
                                         "report": report})
    export_edit(config["export"], paths.export, edit, sd.unet, sd.params["unet"])
    return paths.root
