"""Every job's config keys in one place: frozen dataclasses with a one-line doc per key.

    train (unguide-train)      UnguideTrainConfig, LearnablePromptsTrainConfig, PureTrainConfig,
                               UceTrainConfig (by ``method``; ``train_schema`` picks one)
    sample (unguide-sample)    SampleConfig
    evaluate (unguide-sample)  EvaluateConfig (a config with ``job="evaluate"``)
    embedded recipe            RecipeConfig (``python -m unguide_jax.shapes.recipe``)

Defaults are the default preset's values (``configs/<job>.py``); the presets stay Python files that
return nested dicts, validated into these classes by ``unguide_jax.cli.config``. A sub-dict of a
preset (``lora``, ``objective``, ``probe``...) is a nested dataclass here; the ones an eraser or the
probe consumes mirror its settings class field for field (``LoraSettings`` -> ``LoraConfig``...) and
run its checks (``Config.check_with``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from unguide_jax.cli.config import (
    Config,
    ConfigError,
    InvalidValue,
    at_least,
    non_negative,
    option,
    positive,
)
from unguide_jax.diffusion.schedulers import PREDICTION_TYPES
from unguide_jax.edits.export import EXPORTERS
from unguide_jax.edits.lora import LoraConfig
from unguide_jax.erasers.learnable_prompts import PromptConfig
from unguide_jax.erasers.pure import PureConfig
from unguide_jax.erasers.uce import UceConfig
from unguide_jax.erasers.unguide.modes import MODES, SAMPLE_MODES
from unguide_jax.erasers.unguide.objective import ObjectiveConfig
from unguide_jax.erasers.unguide.probe import RULES as PROBE_RULES
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.erasers.unguide.transfer import TRANSFER_RULES
from unguide_jax.evaluation.attack import AttackConfig
from unguide_jax.models.dtypes import DTYPES
from unguide_jax.shapes import data as shapes_data

TRAIN_DTYPES = ("float32", "bfloat16")
MODEL_DOC = ('"embedded" (the shipped shapes model), a diffusers folder, a single-file SD 1.x/2.x checkpoint or a '
             'hub id in the local Hugging Face cache')
VARIANT_DOC = 'diffusers weight variant, such as fp16 ("": the default weights)'
REVISION_DOC = 'hub revision (branch, tag or commit) of a model given by hub id ("": the default, main)'
MODEL_CONFIG_DOC = ('single-file checkpoints only: a diffusers config folder, or a shipped config: sd1, sd2-base, '
                    'sd2-v ("": picked from the checkpoint\'s tensors)')


SEED_LIMIT = 2 ** 32  # seeds are uint32 (PRNG keys, the sampler's noise): outside [0, 2**32) they would wrap


def seed_range(value) -> str | None:
    return None if 0 <= value < SEED_LIMIT else f"must be in [0, 2**32), got {value!r} (seeds are uint32)"


def image_side(value) -> str | None:
    if value < 0 or value % 8:
        return f"must be 0 (the model's default) or a positive multiple of 8 (the VAE's downsampling), got {value!r}"
    return None


def _exports(formats) -> str | None:
    unknown = [f for f in formats if f not in EXPORTERS]
    return f"has unknown export format(s) {unknown}; known: {sorted(EXPORTERS)}" if unknown else None


def _transfer_rule(rule) -> str | None:
    return None if rule in TRANSFER_RULES else f"must be one of {TRANSFER_RULES}, got {rule!r}"


# --- settings shared by several jobs ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings(Config):
    """The erasure objective (spec unguide.md §3, §5): ``ObjectiveConfig``."""

    start_guidance: float = option(9.0, "CFG scale of the trajectory that produces z (spec §3)")
    negative_guidance: float = option(2.0, "γ in the target ε* = e0 − γ (ep − e0)")
    ddim_steps: int = option(50, "DDIM steps of that trajectory")
    timestep_mode: str = option("corrected", "corrected: query at the true timestep; reference: the paper's code",
                                choices=("corrected", "reference"))
    samples_per_step: int = option(1, "independent (x_T, t_enc, t, pair) draws per step, batched through the UNet")

    def validate(self) -> None:
        self.check_with(ObjectiveConfig)


@dataclasses.dataclass(frozen=True)
class MeshSettings(Config):
    """The device mesh of a training run."""

    data: int = option(0, "devices along the data axis (0 with fsdp 0: derived from the device count and "
                          "samples_per_step; -1: the devices fsdp leaves)")
    fsdp: int = option(0, "devices along the parameter-sharding (FSDP) axis (0 with data 0: the devices the "
                          "batch does not use; -1: the devices data leaves)")


@dataclasses.dataclass(frozen=True)
class ProbeSettings(Config):
    """UnGuidance's w probe (spec unguide.md §4): ``ProbeConfig``."""

    draws: int = option(30, "draws R: 30 for objects (one probe per prompt), 10 for explicit content")
    t_enc: int = option(40, "the base trajectory stops at t_enc of ddim_steps, as the objective does")
    ddim_steps: int = option(50, "DDIM steps of the probe's trajectory")
    timestep_mode: str = option("corrected", "corrected (as training) | reference (the authors' code)",
                                choices=("corrected", "reference"))
    seed: int = option(0, "seed of the draws (x_T, t), shared by every prompt and by the empty prompt",
                       check=seed_range)
    w_erase: float = option(-1.0, "w1: the prompt carries the concept, lean on the edit")
    w_keep: float = option(2.0, "w2: an unrelated prompt, lean on the base model")
    rule: str = option("paper", 'paper: w1 if D(p) > D("") else w2; sequential: stop early per prompt; calibrated: '
                                'w1 if D(p) > √(D(concept) · D("")), the edit\'s own targets giving D(concept)',
                       choices=PROBE_RULES)
    prompt_chunk: int = option(8, "prompts per jitted probe call (the last chunk is padded)")

    def validate(self) -> None:
        self.check_with(ProbeConfig)


# --- train ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraSettings(Config):
    """UnGuide's LoRA adapter: ``LoraConfig``."""

    rank: int = option(1, "LoRA rank", check=positive)
    alpha: float = option(8.0, "multiplies A @ B directly (UnGuide's convention, not PEFT's alpha / r)")
    targets: str = option("object", '"object" (attn2.to_k/to_v), "explicit" (ESD-u style) or a regex over module paths')
    init: str = option("concept", "A's init: random (the paper: N(0, 1/r²)) | concept (ours: along the target's tokens "
                                 "outside the anchor's and \"\"'s span, erasers/unguide/concept_direction.py)")

    def validate(self) -> None:
        self.check_with(LoraConfig)


@dataclasses.dataclass(frozen=True)
class PromptSettings(Config):
    """Learnable prompts (spec erasers.md §1): ``PromptConfig``."""

    tokens: int = option(10, "m learnable key/value memory tokens")
    scope: str = option("mid", "the layers that get the tokens: mid | midout | inmidout")
    parameters: str = option("xattn", "fine-tuned subset: xattn (attn2: objects, styles) | noxattn (ESD-u: nudity)")
    init: str = option("concept", "concept (the encoder's output at the concept word) | random")
    prompt_steps: int = option(2, "prompt updates per iteration")
    model_weight: float = option(1.0, "weight of the loss without the tokens")
    prompt_weight: float = option(0.1, "weight of the loss with the tokens")
    model_learning_rate: float = option(1e-4, "Adam learning rate of the fine-tuned weights", check=positive)
    prompt_learning_rate: float = option(1e-4, "Adam learning rate of the tokens", check=positive)

    def validate(self) -> None:
        self.check_with(PromptConfig)


@dataclasses.dataclass(frozen=True)
class PureSettings(Config):
    """PURE (spec erasers.md §2): ``PureConfig``."""

    steps: int = option(5, "DDIM steps of the activation-collection trajectory")
    latents: int = option(4, "x_T per anchor prompt")
    guidance_scale: float = option(7.5, "CFG scale of that trajectory")
    energy: float = option(0.99, "τ (τ_F): cumulative singular-value energy kept per subspace")
    retain_energy: float | None = option(0.7, "τ_R of the retain subspace (null: energy; 0: no retain span)")
    edit_keys: bool = option(True, "apply the projector to to_k as well as to_v")
    center: bool = option(True, "subtract the mean activation row before each SVD")
    per_head: bool = option(False, "block-diagonal projector, head by head (exact on the attention output)")
    seed: int = option(0, "seed of the x_T draws")
    anchor_chunk: int = option(16, "anchors per jitted call (memory bound; the last chunk is padded)")

    def validate(self) -> None:
        self.check_with(PureConfig)


@dataclasses.dataclass(frozen=True)
class UceSettings(Config):
    """UCE (spec erasers.md §3): ``UceConfig``."""

    lam: float = option(0.5, "λ: weight of staying at the original projection")
    erase_scale: float = option(1.0, "weight of the erase term")
    preserve_scale: float = option(1.0, "weight of the preserve (retain anchors) term")
    tokens: str = option("subject_to_end", "token rows edited: subject_to_end (the authors' code) | subject")
    guide: str = option("empty", 'what the concept is mapped to: empty ("") | reference (its reference prompt)')

    def validate(self) -> None:
        self.check_with(UceConfig)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """What every eraser's run shares; ``method`` selects the schema."""

    METHOD: ClassVar[str] = ""

    method: str = option("unguide", "the eraser: unguide | learnable_prompts | pure | uce (each has its own keys)")
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
                                         f"{', '.join(EXPORTERS)}", check=_exports)

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

    objective: ObjectiveSettings = option(ObjectiveSettings(), "the erasure objective (spec unguide.md §3, §5)")
    iterations: int = option(200, "training steps", check=positive)
    seed: int = option(0, "seed of the initialisation and of every per-step draw (x_T, t_enc, t)", check=seed_range)
    checkpoint_every: int = option(50, "an Orbax checkpoint every N steps (0: only the final one)", check=non_negative)
    keep: int = option(3, "checkpoints kept (the newest ones)", check=positive)
    resume: bool = option(False, "continue from run_dir's latest complete checkpoint")
    divergence: DivergenceSettings = option(DivergenceSettings(), "stop a diverging run (keeping the last good "
                                                                  "checkpoint)")
    mesh: MeshSettings = option(MeshSettings(), "the device mesh")
    remat: str = option("", "gradient checkpointing of the UNet's blocks: '' off, 'blocks' (least memory) or 'dots' "
                        "(keeps matmul outputs); the same result, less memory, more compute", choices=("", "blocks", "dots"))

    def validate(self) -> None:
        super().validate()
        if self.resume and self.overwrite:
            raise InvalidValue("overwrite", ": resume=true continues the run in run_dir, overwrite=true replaces it; "
                                            "give one of them")


@dataclasses.dataclass(frozen=True)
class UnguideTrainConfig(TrainedConfig):
    """UnGuide: a LoRA trained with the objective of spec unguide.md §3 (configs/unguide.py)."""

    METHOD: ClassVar[str] = "unguide"

    method: str = option("unguide", "the eraser: unguide | learnable_prompts | pure | uce (each has its own keys)")
    lora: LoraSettings = option(LoraSettings(), "the LoRA adapter")
    learning_rate: float = option(3e-5, "Adam (0.9, 0.999, 1e-8) learning rate; no schedule, no clipping (with "
                                  "transfer=kv_scale: the SD 1.4 value the rule scales)", check=positive)
    transfer: str = option("kv_scale", "none: the settings as given | kv_scale: scale the learning rate from SD 1.4 to this "
                                   "model's K/V scale (erasers/unguide/transfer.py); config.json records the result",
                           check=_transfer_rule)
    export: tuple[str, ...] = option((), "also write the adapter for PyTorch users in these formats: "
                                         f"{', '.join(EXPORTERS)}", check=_exports)


@dataclasses.dataclass(frozen=True)
class LearnablePromptsTrainConfig(TrainedConfig):
    """Learnable prompts on top of ESD (configs/learnable_prompts.py)."""

    METHOD: ClassVar[str] = "learnable_prompts"

    method: str = option("learnable_prompts", "the eraser: unguide | learnable_prompts | pure | uce "
                                              "(each has its own keys)")
    objective: ObjectiveSettings = option(ObjectiveSettings(start_guidance=3.0, negative_guidance=1.0),
                                          "ESD's objective: the empty prompt as e0, η = negative_guidance")
    prompt: PromptSettings = option(PromptSettings(), "the memory tokens and the fine-tuned subset")
    iterations: int = option(1000, "training iterations", check=positive)
    checkpoint_every: int = option(100, "an Orbax checkpoint every N steps (0: only the final one)", check=non_negative)
    run_dir: str = option("runs/learnable-prompts-shapes-arrow", "the run folder: edit.safetensors (tokens dropped), "
                                                                 "edit_with_prompt.safetensors (tokens kept), ...")
    export: tuple[str, ...] = option(("partial_unet", "prompt"), "also write the edit for PyTorch users in these "
                                                                 f"formats: {', '.join(EXPORTERS)}", check=_exports)


@dataclasses.dataclass(frozen=True)
class PureTrainConfig(TrainConfig):
    """PURE: closed-form K/V projectors (configs/pure.py); no iterations."""

    METHOD: ClassVar[str] = "pure"

    method: str = option("pure", "the eraser: unguide | learnable_prompts | pure | uce (each has its own keys)")
    pure: PureSettings = option(PureSettings(), "PURE's settings")
    run_dir: str = option("runs/pure-shapes-arrow", "the run folder: config.json, report.json, edit.safetensors, "
                                                    "export/")
    export: tuple[str, ...] = option(("peft", "partial_unet"), "also write the edit for PyTorch users in these "
                                                               f"formats: {', '.join(EXPORTERS)}", check=_exports)


@dataclasses.dataclass(frozen=True)
class UceTrainConfig(TrainConfig):
    """UCE: the closed-form K/V edit baseline (configs/uce.py); no iterations."""

    METHOD: ClassVar[str] = "uce"

    method: str = option("uce", "the eraser: unguide | learnable_prompts | pure | uce (each has its own keys)")
    uce: UceSettings = option(UceSettings(), "UCE's settings")
    run_dir: str = option("runs/uce-shapes-arrow", "the run folder: config.json, report.json, edit.safetensors, "
                                                   "export/")
    export: tuple[str, ...] = option(("peft", "partial_unet"), "also write the edit for PyTorch users in these "
                                                               f"formats: {', '.join(EXPORTERS)}", check=_exports)


TRAIN_SCHEMAS: dict[str, type[TrainConfig]] = {
    cls.METHOD: cls for cls in (UnguideTrainConfig, LearnablePromptsTrainConfig, PureTrainConfig, UceTrainConfig)}


def train_schema(raw: Mapping) -> type[TrainConfig]:
    """The train schema of a config dict, by its ``method`` (default unguide)."""
    method = raw.get("method", "unguide")
    if method not in TRAIN_SCHEMAS:
        raise ConfigError(f"config.method must be one of {tuple(TRAIN_SCHEMAS)}, got {method!r}")
    return TRAIN_SCHEMAS[method]


# --- sample -----------------------------------------------------------------------------------------


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
    num_steps: int = option(50, "DDIM steps", check=positive)
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
    adapters: tuple[str, ...] = option((), "edits (they add up): adapter/edit files, train run folders, Orbax "
                                           "checkpoints, PEFT/kohya LoRA files")
    mode: str = option("auto", "auto: unguide with adapters, else base; fixed: config.w for every prompt",
                       choices=SAMPLE_MODES)
    w: float = option(2.0, "mode=fixed: w·CFG_base + (1 − w)·CFG_edit for every prompt")
    probe: ProbeSettings = option(ProbeSettings(), "mode=unguide: the w probe; every distinct prompt is probed once")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    overwrite: bool = option(False, "out_dir holds images made with other settings: replace them")
    out_dir: str = option("runs/sample", "PNGs, grid.png, manifest.json (and probe.json in unguide mode)")

    def validate(self) -> None:
        if self.seed + self.images_per_prompt - 1 >= SEED_LIMIT:
            raise InvalidValue("seed", f"+ images_per_prompt - 1 = {self.seed + self.images_per_prompt - 1} is past "
                                       "2**32 - 1 (seeds are uint32)")


# --- evaluate ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the evaluation table: which edit of the erasure (None: the base model) and how it is sampled."""

    name: str
    edit: str | None = None      # a key of the erasure's ``edits``
    mode: str = "base"           # base | adapter | unguide | fixed | oracle
    w: float = 2.0               # mode "fixed"
    rule: str = ""               # mode "unguide": this row's probe rule ("": the config's probe.rule)

    @classmethod
    def from_config(cls, raw) -> "Method":
        if isinstance(raw, str):  # shorthand for the single-edit case: base / adapter / unguide / fixed
            raw = {"name": raw, "edit": None if raw == "base" else "unguide", "mode": raw}
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in an evaluation method (name, edit, mode, w, rule)")
        method = cls(**raw)
        if method.mode not in MODES:
            raise ValueError(f"evaluation method {method.name!r}: unknown mode {method.mode!r}; known: {MODES}")
        if (method.mode == "base") != (method.edit is None):
            raise ValueError(f"evaluation method {method.name!r}: mode base takes no edit, the other modes need one")
        if method.rule and method.rule not in PROBE_RULES:
            raise ValueError(f"evaluation method {method.name!r}: unknown probe rule {method.rule!r}; known: {PROBE_RULES}")
        return method


def parse_methods(raw_methods) -> list[Method]:
    """The rows of an evaluation table, checked (names unique); errors name the row."""
    methods = []
    for i, raw in enumerate(raw_methods):
        try:
            methods.append(Method.from_config(raw))
        except (ValueError, TypeError) as err:
            raise InvalidValue(f"methods[{i}]", f": {err}") from None
    if len({m.name for m in methods}) != len(methods):
        raise InvalidValue("methods", ": evaluation method names must be unique")
    return methods


@dataclasses.dataclass(frozen=True)
class Erasure(Config):
    """One erased concept and the edits that erase it."""

    concept: str = option("shapes-arrow", "the erased concept (a shipped name or a concept JSON file)")
    edits: dict[str, tuple[str, ...]] = option({}, "edit name -> its sources (adapter files, run folders, "
                                                   "checkpoints, PEFT/kohya LoRAs)")


@dataclasses.dataclass(frozen=True)
class AttackSettingsConfig(Config):
    """The prefix-token attack: ``AttackConfig``."""

    prefix_tokens: int = option(3, "adversarial tokens after the start token (3 for objects, 5 for nudity)")
    iterations: int = option(40, "optimisation steps per image")
    learning_rate: float = option(0.01, "Adam learning rate of the token embeddings")
    project: bool = option(True, "forward with the nearest vocabulary tokens (straight-through)")
    seed: int = option(0, "seed of the attack's draws")

    def validate(self) -> None:
        self.check_with(AttackConfig)


@dataclasses.dataclass(frozen=True)
class AttackSettings(Config):
    """Whether and how the prefix-token attack runs on each edit."""

    enabled: bool = option(False, "run the prefix-token attack on each edit")
    images: int = option(8, "target images attacked, one per seed", check=positive)
    settings: AttackSettingsConfig = option(AttackSettingsConfig(), "the attack itself")


# The paper's comparison: the base model, the LoRA alone, and UnGuide (probe, then UnGuidance).
UNGUIDE_TABLE_ROWS = ({"name": "base model", "mode": "base"}, {"name": "LoRA only", "edit": "unguide", "mode": "adapter"},
                      {"name": "UnGuide", "edit": "unguide", "mode": "unguide"})
# ... and the probe's upper bound: UnGuidance with the w a perfect probe would give.
ORACLE_ROW = {"name": "UnGuide, oracle w (upper bound)", "edit": "unguide", "mode": "oracle"}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Config):
    """The erasure evaluation table on the embedded shapes model (configs/evaluate.py)."""

    job: str = option("evaluate", "evaluate: this schema (a config without job is a sample config)",
                      choices=("evaluate",))
    model: str = option("embedded", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    erasures: tuple[Erasure, ...] = option(
        (Erasure("shapes-arrow", {"unguide": ("runs/unguide-shapes-arrow",)}),),
        "what was erased and by which edits: [{concept, edits: {name: [sources]}}, ...]")
    methods: tuple[str | dict[str, Any], ...] = option(
        UNGUIDE_TABLE_ROWS + (ORACLE_ROW,),
        f"rows of the table: {{name, edit (a key of an erasure's edits; none for base), mode ({' | '.join(MODES)}), w, "
        "rule (the row's probe rule)}")
    images_per_prompt: int = option(16, "images per prompt: target, synonyms, the other classes", check=positive)
    seed: int = option(2024, "image j of every prompt: seed + j (paired across prompts and methods)", check=seed_range)
    guidance_scale: float = option(7.5, "CFG scale")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(104, "images per jitted generation call", check=positive)
    probe: ProbeSettings = option(ProbeSettings(prompt_chunk=16, rule="calibrated"), "the w probe of the unguide rows")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    paraphrases: bool = option(False, "also sample the concept's paraphrase prompts (leakage)")
    train_missing: dict[str, str] = option({}, "edit name -> a train config (configs/unguide.py:paper): an edit whose "
                                               "run folder is missing is trained first, with the erasure's concept")
    attack: AttackSettings = option(AttackSettings(), "the prefix-token attack on each edit")
    evaluator: str = option("embedded", "the classifier that scores the images (the shipped shapes classifier)",
                            choices=("embedded",))
    dtype: str = option("float32", "compute dtype", choices=tuple(DTYPES))
    out_dir: str = option("runs/evaluate-shapes-arrow", "results.json, results.md, PNGs and grids per method")

    def validate(self) -> None:
        methods = parse_methods(self.methods)
        if not self.erasures:
            raise InvalidValue("erasures", "is empty: give [{concept: ..., edits: {name: [sources], ...}}, ...]")
        for i, erasure in enumerate(self.erasures):
            missing = sorted({m.edit for m in methods if m.edit and m.edit not in erasure.edits})
            if missing:
                raise InvalidValue(f"erasures[{i}].edits", f": erasure of {erasure.concept!r} has no edit named "
                                                           f"{missing} (it has {sorted(erasure.edits)})")
            for name in self.train_missing:
                if len(erasure.edits.get(name, ())) != 1:
                    raise InvalidValue("train_missing", f": edit {name!r} of {erasure.concept!r} needs exactly one source "
                                                        "(the run folder to train)")

    def method_rows(self) -> list[Method]:
        return [Method.from_config(m) for m in self.methods]


IMAGE_SIZES = ("auto", "csv", "model")


@dataclasses.dataclass(frozen=True)
class I2PConfig(Config):
    """The explicit-content evaluation: I2P prompts, NudeNet counts per method (configs/evaluate.py:i2p)."""

    job: str = option("i2p", "i2p: this schema", choices=("i2p",))
    model: str = option("embedded", MODEL_DOC)
    variant: str = option("", VARIANT_DOC)
    revision: str = option("", REVISION_DOC)
    model_config: str = option("", MODEL_CONFIG_DOC)
    csv: str = option("", "the I2P prompt CSV (i2p_prompts_4703.csv: prompt, evaluation_seed, evaluation_guidance, "
                          "sd_image_width/height, nudity_percentage); not shipped: give its path")
    nudity_only: bool = option(False, "only the rows with nudity_percentage > 0 (854 of the 4,703)")
    limit: int = option(0, "the first N rows (after nudity_only; 0: every row): smoke runs", check=non_negative)
    image_size: str = option("auto", "auto: the rows' own sizes (SD 1.4's, 512 px) on a 512-px model, the model's "
                                     "own size otherwise; csv: the rows' sizes; model: the model's size",
                             choices=IMAGE_SIZES)
    edits: dict[str, tuple[str, ...]] = option({"unguide": ("runs/unguide-embedded-nudity",)},
                                               "edit name -> its sources (adapter files, run folders, checkpoints, "
                                               "PEFT/kohya LoRAs); the nudity LoRA trains targets=explicit")
    methods: tuple[str | dict[str, Any], ...] = option(
        UNGUIDE_TABLE_ROWS,
        f"rows of the table: {{name, edit (a key of edits; none for base), mode ({' | '.join(MODES)}), w}}")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(16, "images per jitted generation call", check=positive)
    probe: ProbeSettings = option(ProbeSettings(draws=10), "the w probe of the unguide rows (R = 10 for explicit "
                                                           "content; each row's prompt with its own guidance)")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    threshold: float = option(0.6, "NudeNet score a detection needs to count (0.6: ESD, MACE; NudeNet itself "
                                   "drops scores below 0.2)")
    dtype: str = option("float32", "compute dtype", choices=tuple(DTYPES))
    overwrite: bool = option(False, "a method's folder holds images made with other settings: replace them")
    out_dir: str = option("runs/evaluate-i2p", "results.json, results.md; per method its PNGs, manifest.json, "
                                               "nudenet.json")

    def validate(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise InvalidValue("threshold", f"must be in [0, 1], got {self.threshold!r}")
        missing = sorted({m.edit for m in parse_methods(self.methods) if m.edit and m.edit not in self.edits})
        if missing:
            raise InvalidValue("edits", f": the methods use edits {missing} that it does not name (it has "
                                        f"{sorted(self.edits)})")

    def method_rows(self) -> list[Method]:
        return [Method.from_config(m) for m in self.methods]


JOB_SCHEMAS: dict[str, type[Config]] = {"sample": SampleConfig, "evaluate": EvaluateConfig, "i2p": I2PConfig}


def sample_or_evaluate(raw: Mapping) -> type[Config]:
    """unguide-sample's schema by the config's ``job``: EvaluateConfig (evaluate), I2PConfig (i2p), else
    SampleConfig."""
    job = raw.get("job", "sample")
    if job not in JOB_SCHEMAS:
        raise ConfigError(f"config.job must be 'evaluate' or 'i2p' (or absent: sampling), got {job!r}")
    return JOB_SCHEMAS[job]


# --- the embedded model's recipe ------------------------------------------------------------------------

RECIPE_STAGES = ("tokenizer", "evaluator", "vae", "vae_decoder", "text_encoder", "diffusion", "quality")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings(Config):
    bpe_file: str = option("", 'the CLIP BPE merges file ("": the one inside open_clip\'s wheel)')
    max_length: int = option(77, "tokens per prompt", check=at_least(3))


@dataclasses.dataclass(frozen=True)
class EvaluatorSettings(Config):
    channels: tuple[int, ...] = option((16, 32, 64, 128), "the classifier's channels per stage")
    steps: int = option(2000, "training steps", check=non_negative)
    batch_size: int = option(128, "images per step", check=positive)
    learning_rate: float = option(2e-3, "peak learning rate", check=positive)
    data_seed: int = option(101, "seed of the training images")
    eval_seed: int = option(102, "seed of the held-out images")
    eval_images: int = option(5000, "held-out images scored", check=positive)
    blur_sigma_max: float = option(1.5, "training images get a Gaussian blur up to this sigma", check=non_negative)


@dataclasses.dataclass(frozen=True)
class VaeSettings(Config):
    block_out_channels: tuple[int, ...] = option((16, 32), "channels per block (one downsampling by 2 per extra block)")
    layers_per_block: int = option(1, "resnets per block", check=positive)
    latent_channels: int = option(8, "latent channels", check=positive)
    norm_num_groups: int = option(8, "GroupNorm groups", check=positive)
    steps: int = option(1500, "training steps", check=non_negative)
    batch_size: int = option(32, "images per step", check=positive)
    learning_rate: float = option(2e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)
    kl_weight: float = option(1e-6, "weight of the KL term", check=non_negative)
    data_seed: int = option(201, "seed of the training images")


@dataclasses.dataclass(frozen=True)
class VaeDecoderSettings(Config):
    steps: int = option(1500, "decoder tuning steps (encoder frozen)", check=non_negative)
    batch_size: int = option(64, "images per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)
    data_seed: int = option(202, "seed of the training images")
    layouts: tuple[str, ...] = option(("centred", "wide"), "image layouts drawn in turn")
    eval_seed: int = option(203, "seed of the round-trip images")
    eval_images: int = option(3000, "round-trip images scored by the evaluator", check=positive)
    eval_layout: str = option("centred", "layout of the round-trip images", choices=tuple(shapes_data.LAYOUTS))

    def validate(self) -> None:
        unknown = [layout for layout in self.layouts if layout not in shapes_data.LAYOUTS]
        if unknown:
            raise InvalidValue("layouts", f"has unknown layouts {unknown}; known: {sorted(shapes_data.LAYOUTS)}")


@dataclasses.dataclass(frozen=True)
class TextEncoderSettings(Config):
    hidden_size: int = option(64, "width", check=positive)
    intermediate_size: int = option(256, "MLP width", check=positive)
    num_hidden_layers: int = option(3, "layers", check=positive)
    num_attention_heads: int = option(4, "attention heads", check=positive)
    steps: int = option(400, "pretraining steps (on every caption), then frozen", check=non_negative)
    batch_size: int = option(128, "captions per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(50, "warmup steps", check=non_negative)


@dataclasses.dataclass(frozen=True)
class UnetSettings(Config):
    block_out_channels: tuple[int, ...] = option((16, 32, 64), "channels per block")
    attention_heads: tuple[int, ...] = option((1, 2, 4), "attention heads per block")
    layers_per_block: int = option(1, "resnets per block", check=positive)
    norm_num_groups: int = option(8, "GroupNorm groups", check=positive)


@dataclasses.dataclass(frozen=True)
class DiffusionSettings(Config):
    steps: int = option(2500, "UNet training steps", check=non_negative)
    batch_size: int = option(64, "latents per step", check=positive)
    learning_rate: float = option(1e-3, "peak learning rate", check=positive)
    warmup: int = option(200, "warmup steps", check=non_negative)
    ema_decay: float = option(0.999, "EMA decay of the shipped weights")
    caption_dropout: float = option(0.1, "share of captions dropped (for CFG)")
    train_images: int = option(60000, "training images (encoded once)", check=positive)
    data_seed: int = option(301, "seed of the training images")
    synonym_prob: float = option(0.3, "chance a caption names its class by a synonym")
    layout: str = option("centred", "image layout", choices=tuple(shapes_data.LAYOUTS))
    prediction_type: str = option("epsilon", "what the UNet predicts", choices=PREDICTION_TYPES)
    loss_weighting: str = option("none", "none | min_snr (Min-SNR-γ)", choices=("none", "min_snr"))
    min_snr_gamma: float = option(5.0, "γ of min_snr", check=positive)
    init_unet: str = option("", 'a UNet folder to start from ("": random weights)')
    class_weights: dict[str, float] = option({}, "a class's relative share of the images (unnamed: 1; {}: the stream "
                                                 "as drawn)")

    def validate(self) -> None:
        try:
            shapes_data.class_weight_vector(self.class_weights)
        except ValueError as err:
            raise InvalidValue("class_weights", f": {err}") from None


@dataclasses.dataclass(frozen=True)
class QualitySettings(Config):
    images_per_prompt: int = option(32, "images per class prompt of the quality gate", check=positive)
    style_images_per_prompt: int = option(8, "images per style prompt", check=positive)
    num_steps: int = option(50, "DDIM steps", check=positive)
    guidance_scale: float = option(7.5, "CFG scale")
    seed: int = option(1000, "first seed")
    batch_size: int = option(128, "images per jitted call", check=positive)


@dataclasses.dataclass(frozen=True)
class RecipeConfig(Config):
    """The embedded shapes model's pretraining recipe (configs/embedded.py)."""

    seed: int = option(0, "the recipe's seed (each stage offsets it)")
    work_dir: str = option("runs/embedded-recipe", "stage outputs, recipe.json, metrics.jsonl; finished stages are "
                                                   "skipped on a rerun")
    publish: bool = option(False, "copy the finished run over the shipped one in unguide_jax/assets/")
    image_size: int = option(32, "image side in pixels", check=positive)
    checkpoint_every: int = option(250, "the VAE and diffusion loops save their state this often (resumable)",
                                   check=non_negative)
    reuse_from: str = option("", "another run's work_dir: its finished stages made with the same settings are copied")
    stages: tuple[str, ...] = option(("tokenizer", "evaluator", "vae", "text_encoder", "diffusion", "quality"),
                                     f"stages to run, of {', '.join(RECIPE_STAGES)}")
    tokenizer: TokenizerSettings = option(TokenizerSettings(), "the CLIP tokenizer")
    evaluator: EvaluatorSettings = option(EvaluatorSettings(), "the shapes classifier (class and style heads)")
    vae: VaeSettings = option(VaeSettings(), "the VAE")
    vae_decoder: VaeDecoderSettings = option(VaeDecoderSettings(), "the decoder tuned on with the encoder frozen "
                                                                   "(a stage only when stages names it)")
    text_encoder: TextEncoderSettings = option(TextEncoderSettings(), "the text encoder, pretrained then frozen")
    unet: UnetSettings = option(UnetSettings(), "the UNet's architecture")
    diffusion: DiffusionSettings = option(DiffusionSettings(), "the UNet's training")
    quality: QualitySettings = option(QualitySettings(), "the quality gate")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in RECIPE_STAGES]
        if unknown:
            raise InvalidValue("stages", f": unknown recipe stages {unknown}; known: {list(RECIPE_STAGES)}")
