"""The retention job's settings (``RetentionConfig``, ``configs/evaluate.py:retention``): what an erasure keeps
of everything else, as a CLIP score on captions the user gives and, optionally, an FID against reference images
(``unguide_jax.evaluation.retention``)."""
from __future__ import annotations

import dataclasses
from typing import Any

from unguide_jax.erasers.unguide.modes import MODES
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.config import UNGUIDE_TABLE_ROWS, Method, parse_methods
from unguide_jax.loading.resolve import (
    MODEL_CONFIG_DOC,
    MODEL_DOC,
    REVISION_DOC,
    VARIANT_DOC,
)
from unguide_jax.models.dtypes import DTYPES
from unguide_jax.settings import (
    SEED_LIMIT,
    Config,
    InvalidValue,
    non_negative,
    option,
    positive,
    seed_range,
)

CAPTIONS_DOC = ("the captions, a file you give: COCO's captions_val2014.json / captions_val2017.json (the first "
                "caption of each image, images in id order), a .csv with a 'caption' column, or a .txt with one "
                "caption per line")
CLIP_DOC = ("the CLIP model of the CLIP score (required): a transformers CLIP folder, a hub id in the local cache "
            "(torchmetrics' CLIPScore: openai/clip-vit-large-patch14; Hessel et al.: openai/clip-vit-base-patch32) "
            "or a safetensors file beside its config")
INCEPTION_DOC = ("the Inception weights of the FID, a file you give (torch-fidelity's "
                 "weights-inception-2015-12-05-6726825d.pth; nothing is downloaded); needed with fid_reference")


@dataclasses.dataclass(frozen=True)
class RetentionConfig(Config):
    """Retention: CLIP score (and FID) on captions for the base model, the LoRA alone and UnGuide."""

    job: str = option("retention", "retention: this schema", choices=("retention",))
    model: str = option("", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    captions: str = option("", CAPTIONS_DOC)
    limit: int = option(1000, "the first N captions (0: every caption of the file)", check=non_negative)
    seed: int = option(2024, "caption i: seed + i (paired across methods)", check=seed_range)
    guidance_scale: float = option(7.5, "CFG scale")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(16, "images per jitted generation call", check=positive)
    edits: dict[str, tuple[str, ...]] = option({"unguide": ("runs/unguide-sd15-cat",)},
                                               "edit name -> its sources (adapter files, run folders, checkpoints, "
                                               "PEFT/kohya LoRAs); the default: train.py --config "
                                               "configs/unguide.py:sd15-object")
    methods: tuple[str | dict[str, Any], ...] = option(
        UNGUIDE_TABLE_ROWS,
        f"rows of the table: {{name, edit (a key of edits; none for base), mode ({' | '.join(MODES)}), w}}")
    probe: ProbeConfig = option(ProbeConfig(), "the w probe of the unguide rows (each caption probed once)")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    clip: str = option("", CLIP_DOC)
    fid_reference: str = option("", 'a folder of reference images for the FID (e.g. COCO val2014); "": no FID')
    inception: str = option("", INCEPTION_DOC)
    dtype: str = option("float32", "compute dtype", choices=tuple(DTYPES))
    overwrite: bool = option(False, "a method's folder holds images made with other settings: replace them")
    out_dir: str = option("runs/evaluate-retention", "results.json, results.md; per method its PNGs and "
                                                     "manifest.json")

    def validate(self) -> None:
        missing = sorted({m.edit for m in parse_methods(self.methods) if m.edit and m.edit not in self.edits})
        if missing:
            raise InvalidValue("edits", f": the methods use edits {missing} that it does not name (it has "
                                        f"{sorted(self.edits)})")
        if self.limit and self.seed + self.limit - 1 >= SEED_LIMIT:
            raise InvalidValue("seed", f"+ limit - 1 = {self.seed + self.limit - 1} is past 2**32 - 1 (seeds are "
                                       "uint32)")

    def method_rows(self) -> list[Method]:
        return [Method.from_config(m) for m in self.methods]
