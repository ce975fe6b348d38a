"""The embedded model's pretraining recipe, stage by stage, resumable.

    python -m unguide_jax.cli.recipe --config configs/embedded.py

Stages (each writes its output under ``work_dir`` and is skipped when that output exists):
tokenizer -> evaluator -> vae -> vae_decoder -> text_encoder -> diffusion -> quality (``vae_decoder``, the
decoder tuned on with the encoder frozen, only when ``stages`` names it). ``metrics.jsonl`` logs every stage;
``recipe.json`` holds the resolved config. The shipped copies live in ``unguide_jax/assets/``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from unguide_jax.diffusion.images import save_png
from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.json_files import write_json
from unguide_jax.loading.diffusers_folder import (
    load_component,
    load_pipeline,
    load_tokenizer,
    save_component,
    save_pipeline,
)
from unguide_jax.loading.tokenizer import open_clip_merges, write_clip_tokenizer
from unguide_jax.models.vae import AutoencoderKL
from unguide_jax.resources import ASSETS
from unguide_jax.settings import as_config, to_dict
from unguide_jax.shapes import data as shapes
from unguide_jax.shapes import pretrain
from unguide_jax.shapes.classifier import (
    ClassifierConfig,
    load_classifier,
    save_classifier,
    train_classifier,
)
from unguide_jax.shapes.quality import format_quality_table, run_quality_gate
from unguide_jax.shapes.recipe_config import RECIPE_STAGES, RecipeConfig
from unguide_jax.training.loop import MetricsLog

STAGES = RECIPE_STAGES  # tokenizer, evaluator, vae, vae_decoder, text_encoder, diffusion, quality
MODEL_DIR, EVALUATOR_DIR = "shapes-sd", "shapes-classifier"


def _stage_tokenizer(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    bpe = config.tokenizer.bpe_file or None
    write_clip_tokenizer(work / "tokenizer.tmp", open_clip_merges(bpe), max_length=config.tokenizer.max_length)
    shutil.rmtree(work / "tokenizer", ignore_errors=True)
    (work / "tokenizer.tmp").rename(work / "tokenizer")
    log({"stage": "tokenizer", "vocab_size": len(load_tokenizer(work / "tokenizer"))})


def _stage_evaluator(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    cfg = config.evaluator
    clf_config = ClassifierConfig(image_size=config.image_size, channels=cfg.channels)
    params, metrics = train_classifier(clf_config, steps=cfg.steps, batch_size=cfg.batch_size,
                                       learning_rate=cfg.learning_rate, seed=config.seed, eval_images=cfg.eval_images,
                                       data_seed=cfg.data_seed, eval_seed=cfg.eval_seed,
                                       blur_sigma_max=cfg.blur_sigma_max, log=log)
    save_classifier(work / f"{EVALUATOR_DIR}.tmp", clf_config, params, metrics)
    (work / f"{EVALUATOR_DIR}.tmp").rename(work / EVALUATOR_DIR)
    log({"stage": "evaluator", "done": True, **{k: v for k, v in metrics.items() if k != "per_class_accuracy"}})


def _loop_checkpoint(config: RecipeConfig, work: Path, stage: str) -> pretrain.LoopCheckpoint:
    return pretrain.LoopCheckpoint(work / CHECKPOINTS[stage], config.checkpoint_every)


def _stage_vae(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    checkpoint = _loop_checkpoint(config, work, "vae")
    # pretrain takes each stage's settings as the recipe.json dict they are recorded as
    vae_config, params, metrics = pretrain.train_vae(to_dict(config.vae), config.image_size, config.seed + 10, log,
                                                     checkpoint)
    _write_component(work, "vae", vae_config, params, metrics)
    checkpoint.remove()
    log({"stage": "vae", "done": True, **metrics})


def _stage_vae_decoder(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    cfg = config.vae_decoder
    vae, params = load_component(work / "vae", "vae")
    evaluator = load_classifier(work / EVALUATOR_DIR)
    images, _, labels, styles = shapes.batch(cfg.eval_seed, 0, cfg.eval_images, config.image_size,
                                             layout=cfg.eval_layout)
    before = pretrain.round_trip_accuracy(vae, params, evaluator, images, labels, styles)
    log({"stage": "vae_decoder", "round_trip_before": before})
    checkpoint = _loop_checkpoint(config, work, "vae_decoder")
    params, metrics = pretrain.train_decoder(to_dict(cfg), vae, params, config.image_size, config.seed + 40, log,
                                             checkpoint)
    after = pretrain.round_trip_accuracy(vae, params, evaluator, images, labels, styles)
    metrics.update(round_trip_before=before, round_trip_after=after)
    _write_component(work, "vae_decoder", vae.config, params, metrics, kind="vae")
    checkpoint.remove()
    log({"stage": "vae_decoder", "done": True, **metrics})


def _shipped_vae(config: RecipeConfig) -> str:
    """The stage whose VAE the model ships: the tuned decoder's when the recipe runs that stage."""
    return "vae_decoder" if "vae_decoder" in config.stages else "vae"


def _write_component(work: Path, name: str, component_config, params, metrics: dict, kind: str = "") -> None:
    """A trained component's folder (``kind``: vae, text_encoder...; default ``name``) with its metrics,
    renamed into place only once complete."""
    save_component(work / f"{name}.tmp", kind or name, component_config, params)
    write_json(work / f"{name}.tmp" / "metrics.json", metrics)
    (work / f"{name}.tmp").rename(work / name)


def _stage_text_encoder(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    tokenizer = load_tokenizer(work / "tokenizer")
    settings = to_dict(config.text_encoder)
    text_cfg = pretrain.text_config(settings, len(tokenizer), tokenizer.model_max_length)
    params, metrics = pretrain.train_text_encoder(settings, text_cfg, tokenizer, config.seed + 30, log)
    _write_component(work, "text_encoder", text_cfg, params, metrics)
    log({"stage": "text_encoder", "done": True, **metrics})


def _stage_diffusion(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    cfg = config.diffusion
    # Both VAEs encode alike (vae_decoder keeps the encoder): the latents, and so the UNet, do not depend on which.
    vae, vae_params = load_component(work / _shipped_vae(config), "vae")
    tokenizer = load_tokenizer(work / "tokenizer")
    started = time.perf_counter()
    indices = (shapes.indices_for_class_weights(cfg.data_seed, cfg.train_images, cfg.class_weights)
               if cfg.class_weights else range(cfg.train_images))
    images, captions, _, _ = shapes.batch_at(cfg.data_seed, indices, config.image_size, cfg.synonym_prob,
                                             layout=cfg.layout)
    mean, logvar = pretrain.encode_dataset(vae, vae_params, images)
    vae_config = dataclasses.replace(vae.config, scaling_factor=round(pretrain.latent_scaling_factor(mean, logvar), 5))
    data = pretrain.DiffusionData(mean, logvar, pretrain.tokenize_captions(tokenizer, captions),
                                  pretrain.tokenize_captions(tokenizer, [""])[0])
    log({"stage": "diffusion", "data_seconds": round(time.perf_counter() - started, 1),
         "scaling_factor": vae_config.scaling_factor, "train_images": len(images)})
    text_encoder_module, text_params = load_component(work / "text_encoder", "text_encoder")
    text_cfg = text_encoder_module.config
    unet_cfg = pretrain.unet_config(to_dict(config.unet), mean.shape[1], mean.shape[-1], text_cfg.hidden_size)
    # SD's schedule (scaled_linear 0.00085..0.012, leading, steps_offset 1); the prediction type is the recipe's.
    scheduler = SchedulerConfig(prediction_type=cfg.prediction_type)
    init_params = load_component(cfg.init_unet, "unet")[1] if cfg.init_unet else None
    checkpoint = _loop_checkpoint(config, work, "diffusion")
    unet, text_encoder, unet_params, metrics = pretrain.train_diffusion(
        to_dict(cfg), unet_cfg, text_cfg, vae_config, scheduler, data, text_params, config.seed + 20, log, checkpoint,
        init_params)
    sd = StableDiffusion(unet=unet, text_encoder=text_encoder, vae=AutoencoderKL(vae_config), tokenizer=tokenizer,
                         scheduler=scheduler,
                         params={"unet": unet_params, "text_encoder": text_params, "vae": vae_params})
    tmp = work / f"{MODEL_DIR}.tmp"
    # fp32 on disk: diffusers loads UNet and VAE in fp32 by default while transformers 5 loads the text encoder
    # in its stored dtype, so fp16 files made a plain from_pretrained mix dtypes and fail.
    save_pipeline(sd, tmp, dtype=np.float32)
    write_json(tmp / "training_metrics.json", {"diffusion": metrics, **{
        part: json.loads((work / part / "metrics.json").read_text())
        for part in ("vae", _shipped_vae(config), "text_encoder")}})
    tmp.rename(work / MODEL_DIR)
    checkpoint.remove()
    log({"stage": "diffusion", "done": True, **metrics})


def _stage_quality(config: RecipeConfig, work: Path, log: MetricsLog) -> None:
    sd = load_pipeline(work / MODEL_DIR)
    evaluator = load_classifier(work / EVALUATOR_DIR)
    metrics, grid = run_quality_gate(sd, evaluator, **to_dict(config.quality))
    save_png(work / "quality_grid.png", grid)
    write_json(work / "quality.json", metrics)
    (work / "quality.md").write_text(format_quality_table(metrics) + "\n")
    log({"stage": "quality", "done": True, **{k: v for k, v in metrics.items() if k != "per_prompt"}})


STAGE_FUNCTIONS = {"tokenizer": _stage_tokenizer, "evaluator": _stage_evaluator, "vae": _stage_vae,
                   "vae_decoder": _stage_vae_decoder,
                   "text_encoder": _stage_text_encoder, "diffusion": _stage_diffusion, "quality": _stage_quality}
# The config keys each stage's output depends on (its own and its inputs'): a finished stage is
# reused on a rerun only if these are unchanged.
_DATA = ("seed", "image_size")
STAGE_INPUTS = {
    "tokenizer": ("tokenizer",),
    "evaluator": _DATA + ("evaluator",),
    "vae": _DATA + ("vae",),
    "vae_decoder": _DATA + ("evaluator", "vae", "vae_decoder"),
    "text_encoder": ("seed", "tokenizer", "text_encoder"),
    "diffusion": _DATA + ("tokenizer", "vae", "text_encoder", "unet", "diffusion"),
    "quality": _DATA + ("tokenizer", "evaluator", "vae", "text_encoder", "unet", "diffusion", "quality"),
}
STAGE_OUTPUTS = {"tokenizer": "tokenizer", "evaluator": EVALUATOR_DIR, "vae": "vae", "vae_decoder": "vae_decoder",
                 "text_encoder": "text_encoder",
                 "diffusion": MODEL_DIR,
                 "quality": "quality.json"}
# Mid-stage state of the long training loops (removed once the stage's output is written).
CHECKPOINTS = {"vae": "vae.loop.safetensors", "vae_decoder": "vae_decoder.loop.safetensors",
               "diffusion": "diffusion.loop.safetensors"}
# Stages whose output holds the shipped VAE: they depend on the decoder's settings only when it is tuned.
_SHIPS_THE_VAE = ("diffusion", "quality")


def run_recipe(config: RecipeConfig | Mapping) -> Path:
    """Run the recipe's stages (``config``: a RecipeConfig, or a dict validated into one, which checks the
    stage names and class weights before any stage runs); returns the work folder."""
    config = as_config(config, RecipeConfig)
    record = {k: v for k, v in to_dict(config).items() if k != "publish"}  # recipe.json; stages compare with it
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work / "recipe.json"
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    for stage in STAGES:
        made = [work / name for name in (STAGE_OUTPUTS[stage], CHECKPOINTS.get(stage)) if name and (work / name).exists()]
        if stage in config.stages and made and previous is not None:
            changed = _changed_settings(stage, previous, record)
            if changed:
                raise ValueError(f"{made[0]} was made with other settings of {changed}: "
                                 f"delete it (and what follows) or use another work_dir")
    source = _reuse_source(config)
    write_json(recipe_file, record)
    log = MetricsLog(work / "metrics.jsonl", append=True, timestamps=True)
    for stage in STAGES:
        if stage not in config.stages:
            continue
        if source is not None and not (work / STAGE_OUTPUTS[stage]).exists():
            _reuse_stage(*source, stage, record, work, log)
        if (work / STAGE_OUTPUTS[stage]).exists():
            print(f"[recipe] {stage}: done already ({work / STAGE_OUTPUTS[stage]})")
            continue
        shutil.rmtree(work / f"{STAGE_OUTPUTS[stage]}.tmp", ignore_errors=True)  # a stage cut off midway
        started = time.perf_counter()
        print(f"[recipe] {stage} ...")
        STAGE_FUNCTIONS[stage](config, work, log)
        seconds = round(time.perf_counter() - started, 1)
        log({"stage": stage, "stage_seconds": seconds})
        print(f"[recipe] {stage}: {seconds} s")
    return work


def _changed_settings(stage: str, made_with: dict, config: dict) -> list[str]:
    """The config keys a stage depends on that differ between the run that made it and ``config``."""
    made, now = _stage_settings(stage, made_with), _stage_settings(stage, config)
    return [k for k in now if made[k] != now[k]]


def _stage_settings(stage: str, config: dict) -> dict:
    settings = {k: config.get(k) for k in STAGE_INPUTS[stage]}
    if stage in _SHIPS_THE_VAE:  # None for a run without the stage, as for runs made before it existed
        settings["vae_decoder"] = config.get("vae_decoder") if "vae_decoder" in config.get("stages", ()) else None
    return settings


def _reuse_source(config: RecipeConfig) -> tuple[Path, dict] | None:
    """(work_dir, resolved config) of the run named by ``reuse_from``, or None."""
    if not config.reuse_from:
        return None
    source = Path(config.reuse_from)
    source_recipe = source / "recipe.json"
    if not source_recipe.is_file():
        raise FileNotFoundError(f"reuse_from={str(source)!r} is not a recipe run: no {source_recipe}")
    return source, json.loads(source_recipe.read_text())


def _reuse_stage(source: Path, made_with: dict, stage: str, config: dict, work: Path, log: MetricsLog) -> None:
    """Copy a finished stage from another run of the recipe when it was made with the same settings
    (its STAGE_INPUTS), so that a recipe that changes only a late stage does not redo the early ones."""
    if not (source / STAGE_OUTPUTS[stage]).exists() or _changed_settings(stage, made_with, config):
        return
    output = source / STAGE_OUTPUTS[stage]
    (shutil.copytree if output.is_dir() else shutil.copy2)(output, work / STAGE_OUTPUTS[stage])
    log({"stage": stage, "reused_from": str(output)})


RECORD_FILES = ("recipe.json", "metrics.jsonl", "quality.json", "quality.md", "quality_grid.png")


def publish(work: Path, assets: Path) -> None:
    """Copy a finished run's model, evaluator and record over the shipped ones (what ``publish=True`` does)."""
    missing = [n for n in (MODEL_DIR, EVALUATOR_DIR, *RECORD_FILES) if not (work / n).exists()]
    if missing:
        raise FileNotFoundError(f"{work} is not a finished recipe run: missing {missing}")
    for name in (MODEL_DIR, EVALUATOR_DIR):
        shutil.rmtree(assets / name, ignore_errors=True)
        shutil.copytree(work / name, assets / name)
    (assets / "recipe").mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copy2(work / name, assets / "recipe" / name)


def unpack_shipped(work: str | Path, assets: Path | None = None) -> Path:
    """Lay the shipped model out as a finished recipe run in ``work`` (tokenizer, evaluator, VAE, text
    encoder, model, record), so that the next phase can ``reuse_from`` it and train on from its UNet on
    a checkout that lacks the local run which made it. Its weights are the shipped ones. A model made
    with the ``vae_decoder`` stage ships one VAE, laid out as both stages' output: its encoder is the
    ``vae`` stage's, its decoder the tuned one (so a phase that changes ``vae_decoder``'s settings tunes on
    from the tuned decoder)."""

    assets, work = Path(assets or ASSETS), Path(work)
    if (work / "recipe.json").exists():
        raise FileExistsError(f"{work} holds a recipe run already; unpack into a new work_dir")
    model = assets / MODEL_DIR
    metrics = json.loads((model / "training_metrics.json").read_text())
    tmp = work.with_name(work.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp / MODEL_DIR)
    shutil.copytree(assets / EVALUATOR_DIR, tmp / EVALUATOR_DIR)
    # stage output -> the model's folder it comes from; the tuned VAE also stands for the vae stage's
    sources = {"tokenizer": "tokenizer", "vae": "vae", "text_encoder": "text_encoder"}
    if "vae_decoder" in metrics:  # a model made with that stage
        sources["vae_decoder"] = "vae"
    for part, source in sources.items():
        shutil.copytree(model / source, tmp / part)
        if part != "tokenizer":
            write_json(tmp / part / "metrics.json", metrics[part])
    for name in RECORD_FILES:
        shutil.copy2(assets / "recipe" / name, tmp / name)
    work.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        work.rmdir()  # an empty folder; anything else and rmdir refuses, nothing lost
    tmp.rename(work)
    return work
