"""The export job: edits that already exist (run folders, edit/adapter files, Orbax checkpoints) handed to
PyTorch users as PEFT/diffusers or kohya LoRAs, partial or merged UNet weights, with ``unguide.json`` beside
a PEFT LoRA (what ``UnGuidePipeline`` needs besides the LoRA) and a model card, ``README.md``.

``publish_export`` is the part a training run shares: after the train job has written its formats into
``export/``, it adds ``unguide.json`` and the card.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
from unguide_jax.loading.base_model import (
    BASE_MODEL_FILE,
    BaseModelMismatch,
    base_model_mismatches,
    describe_mismatch,
    read_base_model_record,
)
from unguide_jax.loading.exports import EXPORTERS, export_edit, single_lora, unknown_formats
from unguide_jax.loading.lora_formats import DIFFUSERS_LORA_FILE
from unguide_jax.loading.resolve import MODEL_DOC, load_model
from unguide_jax.loading.weights import naming_the_folder
from unguide_jax.publishing.model_card import check_card_inputs, write_model_card
from unguide_jax.publishing.unguide_json import empty_probe_record, unet_family, write_unguide_json
from unguide_jax.settings import Config, ConfigError, as_config, option
from unguide_jax.training.sources import classify_source, concept_targets, load_edit


def _formats(formats) -> str | None:
    return unknown_formats(formats) or (None if formats else "is empty: give at least one format")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """The export job (``unguide-export SOURCE ... --out FOLDER``)."""

    sources: tuple[str, ...] = option((), "run folders, edit files or Orbax checkpoint folders (they add up)")
    out: str = option("", "the export folder")
    model: str = option("embedded", "the base model the edits were made on: " + MODEL_DOC)
    formats: tuple[str, ...] = option(("peft",), f"of {', '.join(EXPORTERS)}", check=_formats)
    probe: ProbeConfig = option(ProbeConfig(), "peft: the w probe's settings written to unguide.json")
    cache_empty_probe: bool = option(False, 'peft: compute D("") (the probe of the empty prompt) now and store it '
                                            "in unguide.json")
    evaluation: str = option("", "an erasure evaluation's results.json that evaluated these sources: its table "
                                 "goes into the model card")
    overwrite: bool = option(False, "out holds files (another export): replace the folder as a whole (the new export "
                                    "is built beside it and swapped in when it is complete)")
    allow_other_base: bool = option(False, "export even where model's weights differ from those a source was trained "
                                           "on (its run folder's base_model.json): the edit is then described, and "
                                           "fingerprinted in unguide.json, for this other model")


def recorded_base_model(source: str | Path) -> tuple[Path, dict] | None:
    """(the file, the record) of the base model a source was trained on: its run folder's base_model.json
    (a run folder, an edit file in one, a checkpoint of one); None for edits that carry none."""
    found = classify_source(source)
    candidates = [found.run_folder]
    if found.checkpoint is not None:
        candidates.append(found.checkpoint.parent.parent)  # <run>/checkpoints/<step>
    if found.edit_file is not None:
        candidates.append(found.edit_file.parent)
    for folder in candidates:
        if folder is not None and (folder / BASE_MODEL_FILE).is_file():
            return folder / BASE_MODEL_FILE, read_base_model_record(folder)
    return None


def check_base_models(sources: Sequence[str | Path], unet_params: Mapping, model: str, allow_other: bool = False) -> None:
    """Each source against the base model it is exported for: refused, naming the modules and the model it was
    trained on, where the weights differ (``allow_other``: a warning); a note for sources without a record."""
    for source in sources:
        found = recorded_base_model(source)
        if found is None:
            print(f"note: {source} carries no record of the base model it was trained on (a run of an older version, "
                  f"or a LoRA from elsewhere): not checked against --model {model}", file=sys.stderr)
            continue
        path, record = found
        bad = base_model_mismatches(record, unet_params)
        if not bad:
            continue
        message = (f"{source} was trained on {record.get('model')!r} ({path}), and --model {model} has other weights: "
                   f"{describe_mismatch(bad, len(record['fingerprint']))}")
        if allow_other:
            print(f"warning: {message}; exported for {model} anyway (--allow-other-base)", file=sys.stderr)
            continue
        raise BaseModelMismatch(f"{message}. Export it with --model set to the model it was trained on, or pass "
                                "--allow-other-base to export it for this model anyway")


def write_unguide_settings(export_dir: Path, sd, edit, probe: ProbeConfig, concept_prompts: Sequence[str],
                           cache_empty_probe: bool = False, unet_params=None) -> Path:
    """``export_dir/unguide.json`` for the PEFT LoRA in ``export_dir/diffusers``: the probe's settings, the
    concept's target prompts (the calibrated rule's reference) and, when asked, D("") per draw computed with
    our probe at the model's default image size."""
    adapter, alpha = single_lora(edit)
    empty = None
    if cache_empty_probe:
        distances = WProbe(sd, edit, probe, concept_prompts=concept_prompts).empty_distances
        empty = empty_probe_record(distances, probe, sd.default_size, sd.default_size)
    unet_params = sd.params["unet"] if unet_params is None else unet_params  # the base weights it fingerprints
    return write_unguide_json(export_dir, export_dir / "diffusers" / DIFFUSERS_LORA_FILE, adapter, alpha,
                              unet_params, probe, empty, concept_prompts=list(concept_prompts))


def publish_export(export_dir: Path, formats: Sequence[str], sources: Sequence[str | Path], sd, edit,
                   concept_prompts: Sequence[str], *, probe: ProbeConfig | None = None,
                   cache_empty_probe: bool = False, base_model: str | None = None,
                   evaluation: str | Path | None = None, unet_params=None,
                   location: str | Path | None = None) -> list[Path]:
    """What goes beside the exported formats: unguide.json with a PEFT LoRA, and the model card."""
    written = []
    if "peft" in formats:
        written.append(write_unguide_settings(Path(export_dir), sd, edit, probe or ProbeConfig(), concept_prompts,
                                              cache_empty_probe, unet_params))
    # The family names the usage examples' pipeline classes (SDXL: StableDiffusionXLPipeline, UnGuideXLPipeline).
    family = sd.family if sd is not None else None if unet_params is None else unet_family(unet_params)
    written.append(write_model_card(export_dir, list(sources), formats=list(formats), base_model=base_model,
                                    evaluation=evaluation, location=location, family=family))
    return written


def run_export(config: ExportConfig | dict) -> list[Path]:
    """The export job; returns the files written. An ``out`` folder that holds files is another export's: it is
    refused unless ``overwrite``, and then replaced as a whole, never mixed with the new files."""
    config = as_config(config, ExportConfig)
    if not config.sources:
        raise ConfigError("config.sources is empty: give the run folders, edit files or checkpoints to export")
    if not config.out:
        raise ConfigError("config.out is empty: give the export folder")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not config.overwrite:
        raise FileExistsError(f"--out {out} already holds files (another export?): choose another folder, or pass "
                              "--overwrite to replace it as a whole")
    evaluation = config.evaluation or None
    check_card_inputs(config.sources, evaluation)  # before anything is written
    sd = load_model(config.model)
    check_base_models(config.sources, sd.params["unet"], config.model, config.allow_other_base)
    edit, info = load_edit(list(config.sources), sd.params["unet"])
    work = out.parent / f".{out.name}.building" if replacing else out
    if work != out and work.exists():
        shutil.rmtree(work)  # left by an export that did not finish
    with naming_the_folder(work, "the export folder"):
        written = export_edit(list(config.formats), work, edit, sd.unet, sd.params["unet"])
        written += publish_export(work, config.formats, config.sources, sd, edit, concept_targets(info),
                                  probe=config.probe, cache_empty_probe=config.cache_empty_probe,
                                  base_model=config.model, evaluation=evaluation, location=out)
    if replacing:
        old = out.parent / f".{out.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
        written = [out / Path(path).relative_to(work) for path in written]
    return written
