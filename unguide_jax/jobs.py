"""The jobs, each callable from Python with its settings object (or a dict validated into one); the
commands (``unguide_jax.cli``) only turn argv into these settings and call them.

    from unguide_jax import jobs
    from unguide_jax.training.config import UnguideTrainConfig
    from unguide_jax.evaluation.config import EvaluateConfig

    run_dir = jobs.train(UnguideTrainConfig())      # the README's main job: erase the arrow
    out_dir = jobs.evaluate(EvaluateConfig())       # its table

    train     training.config.*TrainConfig   -> the run folder (with export=[...]: export/, unguide.json, README.md);
                                                unguide with concepts=[...]: K LoRAs in one run (training.many_run)
    sample    sampling.config.SampleConfig   -> the manifest
    evaluate  evaluation.config.EvaluateConfig -> the results folder (trains train_missing edits first)
    i2p       evaluation.config.I2PConfig    -> the results folder
    retention evaluation.retention_config.RetentionConfig -> the results folder (CLIP score, FID)
    many_table evaluation.many_config.ManyTableConfig -> the results folder (K classes erased at once)
    plan      an evaluation job's settings  -> its dry run (evaluation.plan.Plan: work and time, nothing done)
    export    publishing.export.ExportConfig -> the files written
    recipe    shapes.recipe_config.RecipeConfig -> the recipe's work folder
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from unguide_jax.evaluation.config import EvaluateConfig, I2PConfig
from unguide_jax.evaluation.erasure import plan_evaluation, run_evaluation
from unguide_jax.evaluation.i2p import plan_i2p, run_i2p
from unguide_jax.evaluation.many_config import ManyTableConfig
from unguide_jax.evaluation.many_table import plan_many_table, run_many_table
from unguide_jax.evaluation.plan import Plan
from unguide_jax.evaluation.retention import plan_retention, run_retention
from unguide_jax.evaluation.retention_config import RetentionConfig
from unguide_jax.publishing.export import ExportConfig, publish_export, run_export
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.sampling.run import run_sampling
from unguide_jax.settings import ConfigError
from unguide_jax.shapes.recipe import run_recipe
from unguide_jax.shapes.recipe_config import RecipeConfig
from unguide_jax.training.config import TrainConfig
from unguide_jax.training.many_run import run_many
from unguide_jax.training.run import check_config, run_training


def train(config: TrainConfig | Mapping, progress: bool = True) -> Path:
    """Train (or resume) one eraser; with ``export`` formats, the export folder also gets unguide.json (with a
    PEFT LoRA) and its model card."""
    config = check_config(config)

    def publish(export_dir: Path, sd, edit, unet_params, concept) -> None:
        publish_export(export_dir, config.export, [export_dir.parent], sd, edit, list(concept.targets),
                       unet_params=unet_params)

    if getattr(config, "concepts", ()):
        return run_many(config, progress=progress, publish=publish)
    return run_training(config, progress=progress, publish=publish)


def sample(config: SampleConfig | Mapping) -> Path:
    """Sample images (with or without edits, UnGuidance); returns the manifest."""
    return run_sampling(config)


def evaluate(config: EvaluateConfig | Mapping) -> Path:
    """The erasure table; an edit named in ``train_missing`` whose run folder is missing is trained first."""
    return run_evaluation(config, train_runner=lambda train_config: train(train_config, progress=False))


def i2p(config: I2PConfig | Mapping) -> Path:
    """The explicit-content table: I2P prompts, NudeNet counts per method."""
    return run_i2p(config, train_runner=lambda train_config: train(train_config, progress=False))


def many_table(config: ManyTableConfig | Mapping) -> Path:
    """The several-concept table: K classes erased at once by the merged LoRAs, UnGuide, UCE and PURE; the LoRA run
    is trained first when it is missing."""
    return run_many_table(config, train_runner=lambda train_config: train(train_config, progress=False))


def retention(config: RetentionConfig | Mapping) -> Path:
    """Retention: CLIP score (and FID) on captions for the base model, the LoRA alone and UnGuide."""
    return run_retention(config)


# An evaluation job's dry run, by its settings class: (config, measure) -> Plan. A job adds its planner here.
PLANNERS = {EvaluateConfig: plan_evaluation, I2PConfig: plan_i2p, RetentionConfig: plan_retention,
            ManyTableConfig: plan_many_table}


def plan(config, measure: bool = True) -> Plan:
    """The dry run of an evaluation job (``--dry-run``): what it would generate, probe, score and train, and the
    time estimated from one UNet step measured here (``measure``); it generates, scores and trains nothing."""
    planner = next((p for cls, p in PLANNERS.items() if isinstance(config, cls)), None)
    if planner is None:
        jobs = ", ".join(cls.__name__ for cls in PLANNERS)
        raise ConfigError(f"--dry-run plans the evaluation jobs ({jobs}), not a {type(config).__name__}")
    return planner(config, measure=measure)


def export(config: ExportConfig | Mapping) -> list[Path]:
    """Export existing edits for PyTorch users (formats, unguide.json, model card)."""
    return run_export(config)


def recipe(config: RecipeConfig | Mapping) -> Path:
    """The embedded shapes model's pretraining recipe."""
    return run_recipe(config)
