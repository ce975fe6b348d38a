"""The train job's settings, one class per eraser (``method`` picks it: ``train_schema``).

Each eraser's own settings class (``LoraConfig``, ``ObjectiveConfig``, ``PromptConfig``, ``PureConfig``,
``UceConfig``) is a field here as is, so the Python API (``UnguideTrainConfig()``) and ``unguide-train``
(``configs/unguide.py``, which lists only what differs) start from the same defaults.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from unguide_jax.edits.lora import LoraConfig
from unguide_jax.erasers.learnable_prompts import PromptConfig
from unguide_jax.erasers.pure import PureConfig
from unguide_jax.erasers.uce import UceConfig
from unguide_jax.erasers.unguide.objective import ObjectiveConfig
from unguide_jax.erasers.unguide.transfer import TRANSFER_RULES
from unguide_jax.loading.exports import EXPORTERS, unknown_formats
from unguide_jax.loading.resolve import (
    MODEL_CONFIG_DOC,
    MODEL_DOC,
    REVISION_DOC,
    VARIANT_DOC,
)
from unguide_jax.settings import (
    Config,
    ConfigError,
    InvalidValue,
    non_negative,
    option,
    positive,
    seed_range,
)

TRAIN_DTYPES = ("float32", "bfloat16")


def _method(name: str):
    return option(name, "the eraser: unguide | learnable_prompts | pure | uce (each has its own keys)")


@dataclasses.dataclass(frozen=True)
class MeshSettings(Config):
    """The device mesh of a training run."""

    data: int = option(0, "devices along the data axis (0 with fsdp 0: derived from the device count and "
                          "samples_per_step; -1: the devices fsdp leaves)")
    fsdp: int = option(0, "devices along the parameter-sharding (FSDP) axis (0 with data 0: the devices the "
                          "batch does not use; -1: the devices data leaves)")
    concept: int = option(0, "several concepts in one run (unguide's concepts): device groups along the concept "
                             "axis, each training K/concept of the LoRAs (0: the largest that divides both the "
                             "concept count and the device count); data and fsdp then count one group's devices",
                          check=non_negative)


def _distinct(concepts) -> str | None:
    repeated = sorted({c for c in concepts if list(concepts).count(c) > 1})
    return f"names {repeated} more than once" if repeated else None


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """What every eraser's run shares; ``method`` selects the schema."""

    METHOD: ClassVar[str] = ""

    method: str = _method("unguide")
    model: str = option("embedded", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    concept: str = option("shapes-arrow", "a shipped concept name (configs/concepts/<name>.json) or a concept JSON file")
    dtype: str = option("float32", "compute dtype", choices=TRAIN_DTYPES)
    param_dtype: str = option("float32", "dtype of the stored base weights (trained parameters and optimizer state: "
                                         "float32)", choices=TRAIN_DTYPES)
    allow_pickle: bool = option(False, "load pickled .bin weights (torch.load weights_only=True)")
    run_dir: str = option("runs/unguide-shapes-arrow", "the run folder: config.json, metrics.jsonl, checkpoints/, "
                                                       "the edit, export/")
    overwrite: bool = option(False, "run_dir holds another run: replace it (the new run is built beside it and "
                                    "swapped in when it has finished; the old one stays until then)")
    export: tuple[str, ...] = option((), "also write the edit for PyTorch users in these formats: "
                                         f"{', '.join(EXPORTERS)}", check=unknown_formats)

    def validate(self) -> None:
        if self.method != self.METHOD:
            raise InvalidValue("method", f"must be {self.METHOD!r} in a {type(self).__name__}, got {self.method!r}")


@dataclasses.dataclass(frozen=True)
class DivergenceSettings(Config):
    """The divergence guard of the iterative erasers (``unguide_jax.training.loop.DivergenceGuard``)."""

    factor: float = option(20.0, "stop when the loss or the trained parameters' norm exceeds factor x its early range "
                                 "(0: off)", check=non_negative)
    warmup: int = option(10, "steps that set the early range", check=positive)


@dataclasses.dataclass(frozen=True)
class TrainedConfig(TrainConfig):
    """The iterative erasers' keys: iterations, checkpoints, the device mesh."""

    objective: ObjectiveConfig = option(ObjectiveConfig(), "the erasure objective (UnGuide, Sec. 3)")
    iterations: int = option(200, "training steps", check=positive)
    seed: int = option(0, "seed of the initialisation and of every per-step draw (x_T, t_enc, t)", check=seed_range)
    checkpoint_every: int = option(50, "an Orbax checkpoint every N steps (0: only the final one)", check=non_negative)
    keep: int = option(3, "checkpoints kept (the newest ones)", check=positive)
    resume: bool = option(False, "continue from run_dir's latest complete checkpoint (with overwrite=true: the "
                                 "checkpoints an interrupted overwrite left in .<run_dir>.building, swapped in at "
                                 "the end)")
    divergence: DivergenceSettings = option(DivergenceSettings(), "stop a diverging run (keeping the last good "
                                                                  "checkpoint)")
    mesh: MeshSettings = option(MeshSettings(), "the device mesh")
    remat: str = option("", "gradient checkpointing of the UNet's blocks: '' off, 'blocks' (least memory) or 'dots' "
                        "(keeps matmul outputs); the same result, less memory, more compute", choices=("", "blocks", "dots"))


@dataclasses.dataclass(frozen=True)
class UnguideTrainConfig(TrainedConfig):
    """UnGuide: a LoRA trained with the ESD-style negative-guidance objective (configs/unguide.py)."""

    METHOD: ClassVar[str] = "unguide"

    method: str = _method("unguide")
    lora: LoraConfig = option(LoraConfig(), "the LoRA adapter")
    learning_rate: float = option(3e-5, "Adam (0.9, 0.999, 1e-8) learning rate; no schedule, no clipping (with "
                                  "transfer=kv_scale: the SD 1.4 value the rule scales)", check=positive)
    concepts: tuple[str, ...] = option((), "several concepts in one run (instead of concept): K LoRAs trained "
                                           "together in one jitted step, each as its own single-concept run with "
                                           "this seed; run_dir gets concepts/<name>/ per concept and "
                                           "concepts.safetensors with all K", check=_distinct)
    transfer: str = option("kv_scale", "none: the settings as given | kv_scale: scale the learning rate from SD 1.4 to this "
                                   "model's K/V scale (erasers/unguide/transfer.py); config.json records the result",
                           choices=TRANSFER_RULES)
    export: tuple[str, ...] = option((), "also write the adapter for PyTorch users in these formats: "
                                         f"{', '.join(EXPORTERS)}", check=unknown_formats)


@dataclasses.dataclass(frozen=True)
class LearnablePromptsTrainConfig(TrainedConfig):
    """Learnable prompts on top of ESD (configs/learnable_prompts.py)."""

    METHOD: ClassVar[str] = "learnable_prompts"

    method: str = _method("learnable_prompts")
    objective: ObjectiveConfig = option(ObjectiveConfig(start_guidance=3.0, negative_guidance=1.0),
                                          "ESD's objective: the empty prompt as e0, η = negative_guidance")
    prompt: PromptConfig = option(PromptConfig(), "the memory tokens and the fine-tuned subset")
    iterations: int = option(1000, "training iterations", check=positive)
    checkpoint_every: int = option(100, "an Orbax checkpoint every N steps (0: only the final one)", check=non_negative)
    run_dir: str = option("runs/learnable-prompts-shapes-arrow", "the run folder: edit.safetensors (tokens dropped), "
                                                                 "edit_with_prompt.safetensors (tokens kept), ...")
    export: tuple[str, ...] = option(("partial_unet", "prompt"), "also write the edit for PyTorch users in these "
                                                                 f"formats: {', '.join(EXPORTERS)}", check=unknown_formats)


@dataclasses.dataclass(frozen=True)
class ClosedFormTrainConfig(TrainConfig):
    """What PURE and UCE share: one computation, no iterations; the run folder gets config.json, report.json,
    edit.safetensors and export/."""

    export: tuple[str, ...] = option(("peft", "partial_unet"), "also write the edit for PyTorch users in these "
                                                               f"formats: {', '.join(EXPORTERS)}", check=unknown_formats)


@dataclasses.dataclass(frozen=True)
class PureTrainConfig(ClosedFormTrainConfig):
    """PURE: closed-form K/V projectors (configs/pure.py)."""

    METHOD: ClassVar[str] = "pure"

    method: str = _method("pure")
    pure: PureConfig = option(PureConfig(), "PURE's settings")
    run_dir: str = option("runs/pure-shapes-arrow", "the run folder")


@dataclasses.dataclass(frozen=True)
class UceTrainConfig(ClosedFormTrainConfig):
    """UCE: the closed-form K/V edit baseline (configs/uce.py)."""

    METHOD: ClassVar[str] = "uce"

    method: str = _method("uce")
    uce: UceConfig = option(UceConfig(), "UCE's settings")
    run_dir: str = option("runs/uce-shapes-arrow", "the run folder")


TRAIN_SCHEMAS: dict[str, type[TrainConfig]] = {
    cls.METHOD: cls for cls in (UnguideTrainConfig, LearnablePromptsTrainConfig, PureTrainConfig, UceTrainConfig)}


def train_schema(raw: Mapping) -> type[TrainConfig]:
    """The train schema of a config dict, by its ``method`` (default unguide)."""
    method = raw.get("method", "unguide")
    if method not in TRAIN_SCHEMAS:
        raise ConfigError(f"config.method must be one of {tuple(TRAIN_SCHEMAS)}, got {method!r}")
    return TRAIN_SCHEMAS[method]
