"""The sample job's settings (``unguide-sample``, ``configs/sample.py``; the Python API: ``SampleConfig()``)."""
from __future__ import annotations

import dataclasses

from unguide_jax.diffusion.schedulers import SAMPLERS
from unguide_jax.diffusion.many_guidance import COMBINE_RULES
from unguide_jax.erasers.unguide.modes import SAMPLE_MODES
from unguide_jax.erasers.unguide.probe import ProbeConfig
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
    image_side,
    non_negative,
    option,
    positive,
    seed_range,
)

# "merged": the adapters as one edit, as before K edits existed; the others are generate_many's rules.
COMBINE_CHOICES = ("merged",) + COMBINE_RULES


@dataclasses.dataclass(frozen=True)
class SampleConfig(Config):
    """Text-to-image sampling, with or without edits and UnGuidance (configs/sample.py)."""

    model: str = option("", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    create_random_model: bool = option(False, "smoke runs: build a random tiny model at `model` if it is missing")
    prompt: str = option("", "one prompt (exactly one of prompt / prompts / prompt_file / csv)")
    prompts: tuple[str, ...] = option((), "a list of prompts")
    prompt_file: str = option("", "a text file, one prompt per line")
    csv: str = option("", "a CSV with a prompt column (evaluation_seed, evaluation_guidance...: the I2P layout)")
    negative_prompt: str = option("", "the negative prompt (CFG's unconditional branch)")
    images_per_prompt: int = option(1, "images per prompt", check=positive)
    seed: int = option(0, "image j of every prompt uses seed + j (CSV rows carry their own seeds); in [0, 2**32)",
                       check=seed_range)
    guidance_scale: float = option(7.5, "CFG scale (CSV rows may carry their own)")
    num_steps: int = option(50, "sampler steps", check=positive)
    sampler: str = option("ddim", "ddim | euler (diffusers' EulerDiscreteScheduler, SDXL's default; eta must be 0); "
                                  "the probe and training use DDIM whatever this says", choices=SAMPLERS)
    eta: float = option(0.0, "DDIM η (0: deterministic)", check=non_negative)
    height: int = option(0, "image height, a multiple of 8 (0: the model's default size)", check=image_side)
    width: int = option(0, "image width, a multiple of 8 (0: the model's default size)", check=image_side)
    batch_size: int = option(4, "images per jitted generation call", check=positive)
    dtype: str = option("float32", "compute dtype", choices=tuple(DTYPES))
    param_dtype: str = option("float32", "dtype of the stored weights", choices=tuple(DTYPES))
    allow_pickle: bool = option(False, "load pickled .bin weights (torch.load weights_only=True)")
    clip_skip: int = option(0, "skip the text encoder's last N layers", check=non_negative)
    grid_cols: int = option(0, "columns of grid.png (0: square-ish)", check=non_negative)
    evaluator: str = option("", '"embedded": classify the images with the shipped shapes classifier',
                            choices=("", "embedded"))
    adapters: tuple[str, ...] = option((), "edits (they add up, or are K edits: see combine): adapter/edit files, "
                                           "train run folders, Orbax checkpoints, PEFT/kohya LoRA files")
    combine: str = option("merged", "several adapters in mode unguide: merged (they add up into one edit, probed as "
                                    "one: one w per prompt); flagged-mean (K edits, one probe for all: a prompt "
                                    "applies the LoRAs of the concepts it carries with w_erase, or the K LoRAs' mean "
                                    "with w_keep when it carries none); flagged (all K then); sum (K edits, each "
                                    "edit's UnGuidance correction added up): diffusion/many_guidance.py",
                          choices=COMBINE_CHOICES)
    mode: str = option("auto", "auto: unguide with adapters, else base; fixed: config.w for every prompt",
                       choices=SAMPLE_MODES)
    w: float = option(2.0, "mode=fixed: w·CFG_base + (1 − w)·CFG_edit for every prompt")
    probe: ProbeConfig = option(ProbeConfig(), "mode=unguide: the w probe; every distinct prompt is probed once")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    overwrite: bool = option(False, "out_dir holds images made with other settings: replace them")
    out_dir: str = option("runs/sample", "PNGs, grid.png, manifest.json (and probe.json in unguide mode)")

    def validate(self) -> None:
        if self.seed + self.images_per_prompt - 1 >= SEED_LIMIT:
            raise InvalidValue("seed", f"+ images_per_prompt - 1 = {self.seed + self.images_per_prompt - 1} is past "
                                       "2**32 - 1 (seeds are uint32)")
        if self.combine != "merged":
            if self.mode in ("adapter", "fixed"):
                raise InvalidValue("combine", f"must be 'merged' with mode={self.mode}, got {self.combine!r}: "
                                              "flagged and sum make the adapters K edits for the probe of mode "
                                              "unguide (or auto)")
            if self.probe.rule == "sequential" and len(self.adapters) > 1:
                raise InvalidValue("combine", f"must be 'merged' with probe.rule=sequential, got {self.combine!r}: "
                                              "one probe of K edits decides by rule paper or calibrated (sequential "
                                              "stops per prompt and edit)")
