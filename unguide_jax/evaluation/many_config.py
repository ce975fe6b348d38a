"""The several-concept table's settings (``ManyTableConfig``, ``configs/evaluate.py:many``; the job:
``unguide_jax.evaluation.many_table``)."""
from __future__ import annotations

import dataclasses

from unguide_jax.diffusion.many_guidance import COMBINE_RULES
from unguide_jax.erasers.pure import PureConfig
from unguide_jax.erasers.uce import UceConfig
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.loading.resolve import MODEL_CONFIG_DOC, MODEL_DOC, REVISION_DOC, VARIANT_DOC
from unguide_jax.models.dtypes import DTYPES
from unguide_jax.settings import Config, InvalidValue, non_negative, option, positive, seed_range

SHAPES_CLASSES = tuple(f"shapes-{c}" for c in ("arrow", "circle", "crescent", "cross", "diamond", "heart", "ring",
                                               "square", "star", "triangle"))
# Rows: the base model, the K LoRAs merged into one edit (rank concatenated: "LoRA only" for K concepts),
# UnGuide with one probe for the K LoRAs, and the two closed-form erasers solved for the K concepts at once.
MANY_METHODS = ("base", "lora_merged", "unguide", "uce", "pure")
METHOD_NAMES = {"base": "base model", "lora_merged": "LoRA only (K LoRAs merged)", "unguide": "UnGuide (one probe, K LoRAs)",
                "uce": "UCE (K concepts)", "pure": "PURE (K concepts)"}


def _methods(values) -> str | None:
    unknown = [v for v in values if v not in MANY_METHODS]
    if unknown:
        return f"has unknown rows {unknown}; known: {list(MANY_METHODS)}"
    return "repeats a row" if len(set(values)) != len(values) else None


def _sizes(values) -> str | None:
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        return f"needs positive numbers of concepts, got {list(values)}"
    return None


@dataclasses.dataclass(frozen=True)
class ManyTableConfig(Config):
    """Erasing K classes at once on the embedded shapes model (issue 38): for K in ``sizes``, ``subsets`` random
    subsets of ``classes``; Acc_e over the erased classes' target prompts, Acc_g over their synonyms, Acc_s over
    the other classes' target prompts (MACE's protocol: the mean probability of the prompt's class)."""

    job: str = option("many", "many: this schema", choices=("many",))
    model: str = option("embedded", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    classes: tuple[str, ...] = option(SHAPES_CLASSES, "the shapes concepts the erased subsets are drawn from (the "
                                                     "shapes classifier scores them)")
    sizes: tuple[int, ...] = option((1, 2, 5, 9), "K: how many classes are erased at once", check=_sizes)
    subsets: int = option(3, "random subsets per K (each drawn once; every subset where there are fewer; K = 1: "
                             "every class, so that each class's single-concept row is there)", check=positive)
    subset_seed: int = option(0, "seed of the subset draws", check=seed_range)
    lora_run: str = option("runs/unguide-many", "the several-concept run whose concepts/<class>/adapter.safetensors "
                                                "are the LoRAs (train.py --config configs/unguide.py:many)")
    train_missing: str = option("unguide.py:many", "a train config that makes lora_run when it is missing, with "
                                                   "concepts = classes ('': refuse)")
    methods: tuple[str, ...] = option(MANY_METHODS, f"rows: {', '.join(MANY_METHODS)}", check=_methods)
    combine: str = option("flagged-mean", "how UnGuide combines the K probes' answers (diffusion/many_guidance.py)",
                          choices=COMBINE_RULES)
    images_per_prompt: int = option(8, "images per prompt", check=positive)
    seed: int = option(2024, "image j of every prompt: seed + j (paired across prompts, subsets and methods)",
                       check=seed_range)
    guidance_scale: float = option(7.5, "CFG scale")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(104, "images per jitted generation call", check=positive)
    probe: ProbeConfig = option(ProbeConfig(prompt_chunk=16, rule="calibrated"), "the probe of the UnGuide rows")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    uce: UceConfig = option(UceConfig(), "UCE's settings (its retain anchors: the concepts' own, less the erased)")
    pure: PureConfig = option(PureConfig(), "PURE's settings")
    dtype: str = option("float32", "compute dtype", choices=tuple(DTYPES))
    out_dir: str = option("runs/evaluate-many", "results.json, results.md, the image cache")

    def validate(self) -> None:
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise InvalidValue("classes", f"needs at least two distinct concepts, got {list(self.classes)}")
        too_many = [k for k in self.sizes if k >= len(self.classes)]
        if too_many:
            raise InvalidValue("sizes", f"{too_many}: erasing every class leaves none to retain (Acc_s): at most "
                                        f"{len(self.classes) - 1} of the {len(self.classes)} classes")
