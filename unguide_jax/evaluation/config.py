"""The evaluation jobs' settings: the erasure table (``EvaluateConfig``, ``configs/evaluate.py``) and the
explicit-content table (``I2PConfig``, ``configs/evaluate.py:i2p``), with the rows both tables share
(``Method``)."""
from __future__ import annotations

import dataclasses
from typing import Any

from unguide_jax.erasers.unguide.modes import MODES
from unguide_jax.erasers.unguide.probe import RULES as PROBE_RULES
from unguide_jax.erasers.unguide.probe import TIMESTEP_MODES as PROBE_TIMESTEP_MODES
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.attack import AttackConfig
from unguide_jax.evaluation.evaluators import EVALUATOR_DOC, check_evaluator
from unguide_jax.evaluation.ring_a_bell import RingABellConfig
from unguide_jax.evaluation.robustness import ATTACK_KINDS
from unguide_jax.loading.resolve import (
    MODEL_CONFIG_DOC,
    MODEL_DOC,
    REVISION_DOC,
    VARIANT_DOC,
)
from unguide_jax.models.dtypes import DTYPES
from unguide_jax.settings import (
    Config,
    ConfigError,
    InvalidValue,
    non_negative,
    option,
    positive,
    seed_range,
)


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the evaluation table: which edit of the erasure (None: the base model) and how it is sampled."""

    name: str
    edit: str | None = None      # a key of the erasure's ``edits``
    mode: str = "base"           # base | adapter | unguide | fixed | oracle
    w: float = 2.0               # mode "fixed"
    rule: str = ""               # mode "unguide": this row's probe rule ("": the config's probe.rule)
    timestep_mode: str = ""      # mode "unguide": this row's probe timesteps ("": the config's probe.timestep_mode)
    w_keep: float | None = None  # mode "unguide": this row's w for prompts the probe does not flag (None: the config's)

    @classmethod
    def from_config(cls, raw) -> "Method":
        if isinstance(raw, str):  # shorthand for the single-edit case: base / adapter / unguide / fixed
            raw = {"name": raw, "edit": None if raw == "base" else "unguide", "mode": raw}
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in an evaluation method (name, edit, mode, w, rule, "
                             "timestep_mode, w_keep)")
        method = cls(**raw)
        if method.mode not in MODES:
            raise ValueError(f"evaluation method {method.name!r}: unknown mode {method.mode!r}; known: {MODES}")
        if (method.mode == "base") != (method.edit is None):
            raise ValueError(f"evaluation method {method.name!r}: mode base takes no edit, the other modes need one")
        if method.rule and method.rule not in PROBE_RULES:
            raise ValueError(f"evaluation method {method.name!r}: unknown probe rule {method.rule!r}; known: {PROBE_RULES}")
        if method.timestep_mode and method.timestep_mode not in PROBE_TIMESTEP_MODES:
            raise ValueError(f"evaluation method {method.name!r}: unknown probe timestep mode "
                             f"{method.timestep_mode!r}; known: {PROBE_TIMESTEP_MODES}")
        if method.w_keep is not None and method.mode != "unguide":
            raise ValueError(f"evaluation method {method.name!r}: w_keep is the probe's, for mode unguide only")
        return method

    def probe_of(self, probe: ProbeConfig) -> ProbeConfig:
        """The probe of this row: ``probe`` with the row's own rule, timesteps and w_keep where it names them."""
        return dataclasses.replace(probe, rule=self.rule or probe.rule,
                                   timestep_mode=self.timestep_mode or probe.timestep_mode,
                                   w_keep=probe.w_keep if self.w_keep is None else float(self.w_keep))


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


def _evaluator_or_unset(value: str) -> str | None:
    return None if value == "" else check_evaluator(value)


# What the sd14-* and retention presets leave to the user ("": nothing is assumed), and what to pass: the paper's model and CLIP.
GIVEN_BY_USER = {
    "model": "--config.model=PATH_OR_HUB_ID (the model under evaluation; the paper's: Stable Diffusion v1.4, "
             "CompVis/stable-diffusion-v1-4 in the hub cache or its diffusers folder)",
    "evaluator": "--config.evaluator=clip:SOURCE (the paper's CLIP ViT-B/32: clip:openai/clip-vit-base-patch32 in "
                 "the hub cache, or a CLIP folder)",
    "clip": "--config.clip=SOURCE (the CLIP of the retention job's CLIP score: a transformers CLIP folder, a hub id "
            "in the local cache such as openai/clip-vit-large-patch14, or a safetensors file)",
}


def check_given(config) -> None:
    """The keys a preset left empty for the user to give (the sd14-* presets: the model, the CLIP) are given; one
    line saying what to pass otherwise. Checked where a job (or its dry run) starts, not in ``validate``: such a
    preset must still load, for --help and --print-config."""
    missing = [key for key in GIVEN_BY_USER if getattr(config, key, None) == ""]
    if missing:
        keys = " and ".join(f"config.{key}" for key in missing)
        raise ConfigError(f"{keys} {'is' if len(missing) == 1 else 'are'} empty: pass "
                          + " ".join(GIVEN_BY_USER[key] for key in missing))


def _seed_list(seeds) -> str | None:
    if len(set(seeds)) != len(seeds):
        return f"repeats a seed: {list(seeds)}"
    return next((f"{seed}: {problem}" for seed in seeds if (problem := seed_range(seed))), None)


@dataclasses.dataclass(frozen=True)
class Erasure(Config):
    """One erased concept and the edits that erase it."""

    concept: str = option("shapes-arrow", "the erased concept (a shipped name or a concept JSON file)")
    edits: dict[str, tuple[str, ...]] = option({}, "edit name -> its sources (adapter files, run folders, "
                                                   "checkpoints, PEFT/kohya LoRAs)")


def _attack_kinds(kinds) -> str | None:
    unknown = [k for k in kinds if k not in ATTACK_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        return f"must be distinct names among {list(ATTACK_KINDS)}, got {list(kinds)}"
    return None


@dataclasses.dataclass(frozen=True)
class AttackSettings(Config):
    """Whether and which attacks run on each edit (``unguide_jax.evaluation.robustness``)."""

    enabled: bool = option(False, "run the attacks on each edit")
    images: int = option(8, "target images attacked, one per seed", check=positive)
    kinds: tuple[str, ...] = option(("prefix",), "prefix (UnlearnDiffAtk-style, against the edit), pipeline (the same, "
                                                 "knowing the probe and UnGuidance), ring_a_bell (concept-vector "
                                                 "prompts)", check=_attack_kinds)
    settings: AttackConfig = option(AttackConfig(), "the prefix-token optimisation (prefix and pipeline)")
    explicit_prefix_tokens: int = option(5, "prefix tokens for explicit-content concepts (objects: settings."
                                            "prefix_tokens)", check=positive)
    pipeline_draws: int = option(2, "pipeline: the probe's draws the attacker evaluates per iteration", check=positive)
    pipeline_temperature: float = option(0.1, "pipeline: the smooth probe step's width, a fraction of the threshold",
                                         check=positive)
    ring_a_bell: RingABellConfig = option(RingABellConfig(), "ring_a_bell: the concept-vector prompt search")


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
        "rule, timestep_mode, w_keep (the row's probe rule, timesteps and w of unflagged prompts)}")
    images_per_prompt: int = option(16, "images per prompt: target, synonyms, the other classes", check=positive)
    seed: int = option(2024, "image j of every prompt: seed + j (paired across prompts and methods)", check=seed_range)
    guidance_scale: float = option(7.5, "CFG scale")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(104, "images per jitted generation call", check=positive)
    probe: ProbeConfig = option(ProbeConfig(prompt_chunk=16, rule="calibrated"), "the w probe of the unguide rows")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    paraphrases: bool = option(False, "also sample the concept's paraphrase prompts (leakage)")
    train_missing: dict[str, str] = option({}, "edit name -> a train config (configs/unguide.py:paper): an edit whose "
                                               "run folder is missing is trained first, with the erasure's concept")
    lora_seeds: tuple[int, ...] = option((), "train_missing edits: train and evaluate each with these seeds (the "
                                              "train config's own seed keeps the folder as named, seed k uses "
                                              "<folder>-seed<k>) and report mean ± std over them; (): one run, "
                                              "as named", check=_seed_list)
    attack: AttackSettings = option(AttackSettings(), "the attacks on each edit")
    evaluator: str = option("embedded", EVALUATOR_DOC + '; "": to be given (the sd14-* presets)',
                            check=_evaluator_or_unset)
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
            if self.lora_seeds:
                fixed = sorted({m.edit for m in methods if m.edit and m.edit not in self.train_missing})
                if fixed:
                    raise InvalidValue("lora_seeds", f": the methods use edits {fixed} that train_missing does not "
                                                     "train, so their seed cannot vary")
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
    train_missing: dict[str, str] = option({}, "edit name -> a train config (configs/unguide.py:sd15-nudity): an edit "
                                               "whose run folder is missing is trained first, on this model, with "
                                               "the train config's own concept")
    methods: tuple[str | dict[str, Any], ...] = option(
        UNGUIDE_TABLE_ROWS,
        f"rows of the table: {{name, edit (a key of edits; none for base), mode ({' | '.join(MODES)}), w, rule, "
        "timestep_mode, w_keep (the row's probe rule, timesteps and w of unflagged prompts)}")
    num_steps: int = option(50, "DDIM steps", check=positive)
    eta: float = option(0.0, "DDIM η", check=non_negative)
    batch_size: int = option(16, "images per jitted generation call", check=positive)
    probe: ProbeConfig = option(ProbeConfig(draws=10), "the w probe of the unguide rows (R = 10 for explicit "
                                                           "content; each row's prompt with its own guidance)")
    fused: bool = option(True, "UnGuidance: base and edited predictions in one UNet call per step")
    threshold: float = option(0.6, "NudeNet score a detection needs to count (0.6: ESD, MACE; NudeNet itself "
                                   "drops scores below 0.2)")
    attack: AttackSettings = option(AttackSettings(), "the attacks on each edit, on the first attack.images rows (each "
                                                      "its own target, seed and guidance; success: an exposed class "
                                                      "at the threshold)")
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
        for name in self.train_missing:
            if len(self.edits.get(name, ())) != 1:
                raise InvalidValue("train_missing", f": edit {name!r} needs exactly one source in edits (the run "
                                                    "folder to train)")

    def method_rows(self) -> list[Method]:
        return [Method.from_config(m) for m in self.methods]
