"""``export/unguide.json``: what a diffusers user needs beside the PEFT LoRA to sample with UnGuidance.

Written next to ``export/diffusers/pytorch_lora_weights.safetensors`` by every ``peft`` export (train.py's
``export``, ``unguide-export``); read by ``unguide_jax.pytorch.UnGuidePipeline.load_unguide`` (SDXL:
``UnGuideXLPipeline``). Keys:

    format        "unguide-jax-unguide/1"
    lora          file (relative to the JSON), alpha (ours: W + alpha A B; the file's lora_alpha is alpha * r),
                  rank, target_modules (diffusers module paths)
    probe         the w probe's settings (``ProbeConfig`` without its batching key): draws R, t_enc,
                  ddim_steps, timestep_mode, seed, w_erase, w_keep, rule (+ round_draws, z for "sequential")
    concept       {targets: [...]}: the target prompts of the edit's concept. Rule "calibrated" (the default)
                  needs them: w = w_erase if D(p) > √(D(concept) · D("")), D(concept) the mean D of these
                  prompts on the probe's draws. Absent in files written by older versions (read as [])
    empty_probe   null, or the cached D("") of this adapter: {height, width, draws, seed, distances}, the
                  per-draw ‖ε_lora − ε_base‖ of "" on the probe seed's draws at that image size (D("") is
                  their mean; the sequential rule needs each draw)
    base_model    {family, pipeline, fingerprint: {module: [‖W‖_F, <W, u>]}}: the model family, "sd" (SD 1.x/2.x)
                  or "sdxl" (absent in older files: "sd"), and the diffusers pipeline class it loads with
                  (``PIPELINE_CLASSES``); the fingerprint of each adapted module's base weight W (PyTorch
                  layout, float64; u a fixed pseudo-random direction per module), to catch a LoRA loaded onto
                  another model; identical up to a dtype cast (fp16/bf16 storage)
    draws         how the initial latents and the probe draws are made (jax.random), in words

The probe draws (x_T, t) and per-seed initial latents come from ``jax.random`` (threefry); a user with
this package installed has JAX, and ``unguide_jax.pytorch.jax_latents`` / ``jax_probe_draws`` make the
same arrays as our sampler, so the images are ours.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from unguide_jax.erasers.unguide.probe import ProbeConfig

# The fingerprint lives with the loaders (training records it too); these names stay importable from here.
from unguide_jax.loading.base_model import FINGERPRINT_TOLERANCE as FINGERPRINT_TOLERANCE
from unguide_jax.loading.base_model import base_fingerprint
from unguide_jax.loading.base_model import base_weights as base_weights
from unguide_jax.loading.base_model import fingerprint_mismatches as fingerprint_mismatches
from unguide_jax.loading.base_model import weight_fingerprint as weight_fingerprint
from unguide_jax.loading.lora_formats import is_sdxl_unet

UNGUIDE_JSON = "unguide.json"
UNGUIDE_FORMAT = "unguide-jax-unguide/1"
PROBE_BATCHING_KEYS = ("prompt_chunk",)  # how the JAX probe batches, not what it computes
DRAWS_NOTE = ("initial latents: jax.random.normal(jax.random.key(seed), (h, w, c)) per image seed, NHWC "
              "(unguide_jax.diffusion.sampler.initial_latents); probe draws: unguide_jax.erasers.unguide.probe."
              "probe_draws(probe seed); the PyTorch side transposes them to NCHW")


# Per base-model family: the diffusers pipeline class of its plain LoRA, and ours that samples with UnGuidance
# (``unguide_jax.pytorch``).
PIPELINE_CLASSES = {"sd": {"diffusers": "StableDiffusionPipeline", "unguide": "UnGuidePipeline"},
                    "sdxl": {"diffusers": "StableDiffusionXLPipeline", "unguide": "UnGuideXLPipeline"}}


def unet_family(unet_params: Mapping) -> str:
    """"sdxl" for an SDXL UNet (its text_time add-embedding), else "sd" (SD 1.x/2.x)."""
    return "sdxl" if is_sdxl_unet(unet_params) else "sd"


class UnguideExportError(ValueError):
    pass


def probe_settings(probe: ProbeConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(probe).items() if k not in PROBE_BATCHING_KEYS}


def empty_probe_record(distances: np.ndarray, probe: ProbeConfig, height: int, width: int) -> dict:
    distances = np.asarray(distances, np.float64)
    if distances.shape != (probe.draws,):
        raise UnguideExportError(f"D(\"\") needs one distance per probe draw ({probe.draws}), got shape {distances.shape}")
    return {"height": int(height), "width": int(width), "draws": probe.draws, "seed": probe.seed,
            "distances": [float(d) for d in distances]}


def concept_record(concept_prompts: Sequence[str]) -> dict:
    if isinstance(concept_prompts, str) or not all(isinstance(p, str) for p in concept_prompts):
        raise UnguideExportError(f"concept_prompts must be a list of strings, got {concept_prompts!r}")
    return {"targets": list(concept_prompts)}


def unguide_record(lora_file: str, adapter: Mapping, alpha: float, unet_params: Mapping,
                   probe: ProbeConfig | None = None, empty_probe: dict | None = None, *,
                   concept_prompts: Sequence[str] = ()) -> dict:
    """The JSON object (``lora_file`` relative to the JSON's folder; ``concept_prompts``: the edit's concept's
    target prompts, which the calibrated rule needs)."""
    probe = probe or ProbeConfig()
    concept = concept_record(concept_prompts)
    ranks = sorted({int(np.shape(ab["lora_A"])[1]) for ab in adapter.values()})
    modules = sorted(adapter)
    # Abstract parameters (shapes only, as export_peft accepts) leave nothing to fingerprint: None.
    fingerprint = base_fingerprint(unet_params, modules)
    family = unet_family(unet_params)
    return {
        "format": UNGUIDE_FORMAT,
        "lora": {"file": lora_file, "alpha": float(alpha), "rank": ranks[0] if len(ranks) == 1 else ranks,
                 "target_modules": modules},
        "probe": probe_settings(probe),
        "concept": concept,
        "empty_probe": empty_probe,
        "base_model": {"family": family, "pipeline": PIPELINE_CLASSES[family]["diffusers"],
                       "fingerprint": fingerprint, "tolerance": FINGERPRINT_TOLERANCE},
        "draws": DRAWS_NOTE,
    }


def write_unguide_json(export_dir: str | Path, lora_file: str | Path, adapter: Mapping, alpha: float,
                       unet_params: Mapping, probe: ProbeConfig | None = None,
                       empty_probe: dict | None = None, *, concept_prompts: Sequence[str] = ()) -> Path:
    """``export_dir/unguide.json`` for the LoRA file ``lora_file`` (inside ``export_dir``); ``concept_prompts``:
    the edit's concept's target prompts (the calibrated rule's reference)."""
    from unguide_jax.json_files import write_json

    export_dir = Path(export_dir)
    relative = Path(lora_file).resolve().relative_to(export_dir.resolve()).as_posix()
    return write_json(export_dir / UNGUIDE_JSON, unguide_record(relative, adapter, alpha, unet_params, probe,
                                                                empty_probe, concept_prompts=concept_prompts))


def find_unguide_json(folder: str | Path) -> Path:
    """The unguide.json of an export folder, or of a train.py run folder (its export/)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist (expected an export folder holding {UNGUIDE_JSON})")
    if folder.is_file():
        if folder.name == UNGUIDE_JSON:
            return folder
        raise UnguideExportError(f"{folder} is a file; give the export folder that holds {UNGUIDE_JSON}")
    for candidate in (folder / UNGUIDE_JSON, folder / "export" / UNGUIDE_JSON):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{folder} holds no {UNGUIDE_JSON} (nor export/{UNGUIDE_JSON}): export the edit with "
        f"`unguide-export RUN --formats peft --out FOLDER` (or train with export=['peft']), which writes it next to "
        "diffusers/pytorch_lora_weights.safetensors")


def read_unguide_json(folder: str | Path) -> tuple[dict, Path]:
    """(the checked record, the LoRA file's path). A file without ``concept`` (older versions) reads as
    ``concept: {targets: []}``."""
    path = find_unguide_json(folder)
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise UnguideExportError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != UNGUIDE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UnguideExportError(f"{path}: format {found!r}, this version reads {UNGUIDE_FORMAT!r}")
    for key in ("lora", "probe", "base_model"):
        if not isinstance(record.get(key), dict):
            raise UnguideExportError(f"{path}: missing or malformed {key!r}")
    for key in ("file", "alpha", "target_modules"):
        if key not in record["lora"]:
            raise UnguideExportError(f"{path}: lora.{key} is missing")
    family = record["base_model"].setdefault("family", "sd")  # older files: SD 1.x/2.x, the only family then
    if family not in PIPELINE_CLASSES:
        raise UnguideExportError(f"{path}: base_model.family {family!r}; this version knows {sorted(PIPELINE_CLASSES)}")
    concept = record.get("concept")
    if concept is None:
        record["concept"] = {"targets": []}
    else:
        targets = concept.get("targets", []) if isinstance(concept, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise UnguideExportError(f"{path}: concept must be {{\"targets\": [prompt, ...]}} (a list of strings), "
                                     f"got {concept!r}")
        record["concept"] = dict(concept, targets=targets)
    try:
        ProbeConfig(**record["probe"])
    except (TypeError, ValueError) as err:
        raise UnguideExportError(f"{path}: probe settings: {err}") from None
    lora_file = path.parent / record["lora"]["file"]
    if not lora_file.is_file():
        raise FileNotFoundError(f"{path} names the LoRA file {record['lora']['file']!r}, which is missing ({lora_file})")
    return record, lora_file
