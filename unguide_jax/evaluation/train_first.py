"""The runs an evaluation trains first (``train_missing``): each missing edit's run folder, per LoRA seed
(``lora_seeds``), trained with its train config on the model under evaluation; and their cost for the dry run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from unguide_jax.evaluation.config import EvaluateConfig
from unguide_jax.evaluation.plan import Training, train_rows_per_iteration
from unguide_jax.parallel.hosts import is_main_process
from unguide_jax.settings import as_config


def _train_config(spec: str) -> dict:
    from unguide_jax.presets import load_config_file

    return dict(load_config_file(spec))


def _own_seed(spec: str) -> int | None:
    """The seed a train config trains with; None for a closed-form eraser (PURE, UCE), which draws nothing."""
    from unguide_jax.training.config import train_schema

    raw = _train_config(spec)
    return raw.get("seed", getattr(train_schema(raw), "seed", None))


def seeded_folder(config: EvaluateConfig, name: str, folder: str, seed: int | None) -> str:
    """The run folder of train_missing edit ``name`` trained with ``seed`` (None: as the config names it): the
    train config's own seed keeps the folder's name, another seed k is ``<folder>-seed<k>``; a closed-form
    eraser's folder is the same for every seed."""
    if seed is None:
        return folder
    own_seed = _own_seed(config.train_missing[name])
    return folder if own_seed is None or seed == own_seed else f"{folder}-seed{seed}"


def seeded_erasures(config: EvaluateConfig, seed: int | None) -> list:
    """``config.erasures`` with each train_missing edit's folder for ``seed``."""
    if seed is None:
        return list(config.erasures)
    return [dataclasses.replace(erasure, edits={
        name: (seeded_folder(config, name, sources[0], seed),) if name in config.train_missing else sources
        for name, sources in erasure.edits.items()}) for erasure in config.erasures]


def run_is_missing(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` lacks a finished run (its config.json and an edit file)."""
    run_dir = Path(run_dir)
    return not ((run_dir / "config.json").is_file() and any(run_dir.glob("*.safetensors")))


def missing_train_config(spec: str, run_dir: str | Path, config, concept: str | None = None,
                         seed: int | None = None) -> dict:
    """The train config ``spec`` for ``run_dir``, trained on the model under evaluation (``config``'s model keys,
    whatever model the train config names), with ``concept`` and ``seed`` when given."""
    train_config = dict(_train_config(spec), run_dir=str(run_dir), overwrite=True, model=config.model,
                        variant=config.variant, revision=config.revision, model_config=config.model_config)
    if concept is not None:
        train_config["concept"] = concept
    if seed is not None:
        train_config["seed"] = seed
    return train_config


def planned_training(what: str, spec: str, train_config: dict) -> Training:
    """A run to train, for the dry run: its iterations and a rough UNet cost per iteration."""
    from unguide_jax.training.config import train_schema

    settings = as_config(train_config, train_schema)
    return Training(what=what, run_dir=train_config["run_dir"], spec=spec,
                    iterations=int(getattr(settings, "iterations", 0) or 0),
                    rows_per_iteration=train_rows_per_iteration(settings))


def seed_label(train_config: dict) -> str:
    """" (seed k)" for a run trained with a seed other than its config's, "" otherwise (closed-form erasers)."""
    return f" (seed {train_config['seed']})" if "seed" in train_config else ""


def missing_edits(config: EvaluateConfig, seed: int | None):
    """(edit name, erasure, run folder, train config) of every train_missing edit not trained yet for ``seed``."""
    for erasure in seeded_erasures(config, seed):
        for name, spec in config.train_missing.items():
            run_dir = Path(erasure.edits[name][0])
            if run_is_missing(run_dir):
                seeded = None if _own_seed(spec) is None else seed
                yield name, erasure, run_dir, missing_train_config(spec, run_dir, config, erasure.concept, seeded)


def train_missing_edits(config: EvaluateConfig, train_runner=None, seed: int | None = None) -> list[str]:
    """Train every ``train_missing`` edit whose run folder is missing (its train config, the erasure's concept,
    the evaluated model; ``seed``: the LoRA's seed, None: the train config's); returns the folders trained.
    ``train_runner``: ``run_training`` unless given."""
    from unguide_jax.training.run import run_training

    train_runner = train_runner or (lambda c: run_training(c, progress=False))
    trained = []
    for name, erasure, run_dir, train_config in list(missing_edits(config, seed)):
        if is_main_process():
            print(f"training {name} for {erasure.concept}: {config.train_missing[name]}{seed_label(train_config)} "
                  f"-> {run_dir}", flush=True)
        train_runner(train_config)
        trained.append(str(run_dir))
    return trained
