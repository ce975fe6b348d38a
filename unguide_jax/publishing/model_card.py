"""A model card (``README.md``) with every export: the front matter the Hugging Face hub reads (library_name,
base_model, tags) and, in prose, what was erased, by which method and settings, how it was trained, what the
erasure evaluation measured, and how to use each exported file.

``write_model_card(export_dir, sources, formats=...)`` reads the edit's sources as ``unguide-export`` takes them:

- a train.py run folder: its ``config.json`` (every setting) and its edit file's metadata (steps trained, the
  concept's prompts as trained);
- an Orbax checkpoint (a step folder, or ``checkpoints/``): the config it saved and its step;
- a bare edit file of ours (``adapter.safetensors``, ``edit.safetensors``): what its metadata records; the card
  says what is unknown;
- a PEFT/kohya LoRA from elsewhere: a LoRA, nothing more.

A run folder holds no evaluation (the evaluation command writes ``results.json`` to its own ``out_dir``), so a
card written by train.py says none was recorded; ``unguide-export RUN --evaluation OUT/results.json`` writes the
card again with the measured table of that run's edit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

from unguide_jax.loading.edit_files import ADAPTER_FORMAT, EDIT_FORMAT
from unguide_jax.loading.weights import read_safetensors_with_metadata
from unguide_jax.publishing.unguide_json import PIPELINE_CLASSES
from unguide_jax.training.sources import classify_source

CARD_FILE = "README.md"
UNGUIDE_JSON = "unguide.json"  # written beside the PEFT LoRA (unguide_jax.publishing.unguide_json)

METHOD_NAMES = {"unguide": "UnGuide", "learnable_prompts": "learnable prompts", "pure": "PURE", "uce": "UCE"}
METHOD_TAGS = {"unguide": "unguide", "learnable_prompts": "learnable-prompts", "pure": "pure", "uce": "uce"}
METHOD_DESCRIPTIONS = {
    "unguide": (
        "UnGuide (Polowczyk et al., *UnGuide: Learning to Forget with LoRA-Guided Diffusion Models*, arXiv "
        "2508.05755): a LoRA trained with an ESD-style objective that steers the UNet's noise prediction for the "
        "target prompt towards that of the reference prompt, ε* = ε(reference) − γ·(ε(target) − ε(reference)), on "
        "latents from a partial DDIM trajectory of the LoRA model. At sampling, *UnGuidance* mixes per prompt "
        "w·CFG_base + (1 − w)·CFG_LoRA, with w picked by a probe of how far the LoRA moves that prompt's prediction "
        "(w_erase where the prompt carries the concept, w_keep elsewhere). Loaded as a plain LoRA, the edit acts on "
        "every prompt (the paper's \"LoRA only\")."),
    "learnable_prompts": (
        "Learnable prompts on top of ESD (Bui et al., arXiv 2403.12326): an ESD fine-tune of a subset of the UNet's "
        "weights, trained alternately with m learnable key/value tokens appended to the text tokens of the "
        "cross-attention layers in scope, which take up the concept's knowledge so that erasing it damages other "
        "concepts less."),
    "pure": (
        "PURE (Moon et al., arXiv 2605.25765), closed form: per cross-attention layer, the forget and retain "
        "subspaces of the attention outputs collected along short denoising trajectories of the concept's forget "
        "and retain anchor prompts, and one projector E = I − P_F (I − P_R) applied to W_K and W_V. No gradient "
        "steps; a low-rank edit."),
    "uce": (
        "UCE (Gandikota et al., WACV 2024), closed form: W_K and W_V of every cross-attention layer solved so that "
        "the concept's token embeddings map to the guide's outputs while the retain prompts' outputs stay. No "
        "gradient steps; a low-rank edit."),
}
# Keys of a train config that say where and how a run was kept, not what the edit is.
BOOKKEEPING_KEYS = ("method", "model", "concept", "run_dir", "overwrite", "resume", "export", "checkpoint_every",
                    "keep", "mesh", "divergence", "allow_pickle", "remat", "variant", "revision", "model_config")
TRAINED_METHODS = ("unguide", "learnable_prompts")
FORMAT_FILES = {"peft": "diffusers/pytorch_lora_weights.safetensors", "kohya": "kohya.safetensors",
                "partial_unet": "unet_edited.safetensors", "merged_unet": "unet/", "prompt": "prompt_tokens.safetensors"}


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """What one source of the edit says about it (None: not recorded)."""

    source: str                  # how the card names it: a run's run_dir, else the path given
    kind: str                    # run folder | checkpoint | adapter file | edit file | LoRA file
    method: str | None
    concept: dict | None         # Concept.to_json() as trained, or the concept file as it is now
    concept_name: str | None
    config: dict | None          # the run's train config
    metadata: dict               # the edit file's metadata, JSON-decoded
    steps: int | None            # training steps done
    base_model: str | None
    paths: tuple[Path, ...]      # resolved folder/files of the source (to find it in an evaluation)


# --- reading the sources -----------------------------------------------------------------------------------------


def describe_source(source: str | Path) -> EditRecord:
    """An ``EditRecord`` of one source of an export, classified as the loader classifies it
    (``training.sources.classify_source``)."""
    found = classify_source(source)
    if found.kind == "run folder":
        return _run_folder(found.run_folder, found.edit_file, found.checkpoint)
    if found.kind == "checkpoint":
        return _checkpoint(found.checkpoint.parent, int(found.checkpoint.name))
    if found.kind in ("adapter file", "edit file"):
        return _edit_file(found.edit_file)
    return _foreign_lora(found.path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _file_metadata(path: Path) -> tuple[str | None, dict]:
    """(format tag, metadata with our JSON-encoded values decoded) of a safetensors file."""
    _, raw = read_safetensors_with_metadata(path, names=False)
    decoded = {}
    for key, value in raw.items():
        if key in ("format", "kind", "memory_scope", "targets"):
            decoded[key] = value
            continue
        try:
            decoded[key] = json.loads(value)
        except ValueError:
            decoded[key] = value
    return raw.get("format"), decoded


def _concept(metadata: Mapping, config: Mapping | None) -> tuple[dict | None, str | None]:
    """The concept as the edit file recorded it, else the concept the config names, read now."""
    concept = metadata.get("concept")
    if isinstance(concept, dict) and concept.get("name"):
        return concept, concept["name"]
    name = config.get("concept") if config else concept if isinstance(concept, str) else None
    if not name:
        return None, None
    from unguide_jax.erasers.concepts import load_concept

    try:
        concept = load_concept(name)
    except (OSError, ValueError, TypeError):
        return None, str(name)  # the concept file is gone or changed: its name is still known
    return concept.to_json(), concept.name


def _method_of_file(file_format: str | None, metadata: Mapping) -> str | None:
    if file_format == ADAPTER_FORMAT:
        return "unguide"  # only UnGuide's trainer writes this LoRA format (training.trainers)
    if file_format == EDIT_FORMAT:
        return metadata.get("kind")
    return None


def _run_folder(folder: Path, edit_file: Path | None, latest_checkpoint: Path | None) -> EditRecord:
    config = _read_json(folder / "config.json")
    file_format, metadata = _file_metadata(edit_file) if edit_file else (None, {})
    steps = metadata.get("steps")
    if steps is None and config.get("method") in TRAINED_METHODS and latest_checkpoint is not None:
        steps = int(latest_checkpoint.name)
    concept, concept_name = _concept(metadata, config)
    paths = (folder.resolve(),) + ((edit_file.resolve(),) if edit_file else ())
    return EditRecord(str(config.get("run_dir") or folder), "run folder",
                      config.get("method") or _method_of_file(file_format, metadata), concept, concept_name, config,
                      metadata, steps, config.get("model") or metadata.get("base_model"), paths)


def _checkpoint(checkpoints_dir: Path, step: int) -> EditRecord:
    from unguide_jax.training.checkpoints import RunCheckpoints

    with RunCheckpoints(checkpoints_dir) as checkpoints:
        config = dict(checkpoints.saved_config(step))
    concept, concept_name = _concept({}, config)
    step_dir = (checkpoints_dir / str(step)).resolve()
    return EditRecord(str(checkpoints_dir / str(step)), "checkpoint", config.get("method", "unguide"), concept,
                      concept_name, config, {}, step, config.get("model"), (step_dir,))


def _edit_file(path: Path) -> EditRecord:
    file_format, metadata = _file_metadata(path)
    concept, concept_name = _concept(metadata, None)
    return EditRecord(str(path), "adapter file" if file_format == ADAPTER_FORMAT else "edit file",
                      _method_of_file(file_format, metadata), concept, concept_name, None, metadata,
                      metadata.get("steps"), metadata.get("base_model"), (path.resolve(),))


def _foreign_lora(path: Path) -> EditRecord:
    return EditRecord(str(path), "LoRA file", None, None, None, None, {}, None, None, (path.resolve(),))


# --- the base model ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseModel:
    spec: str
    kind: str        # embedded | hub | folder | single_file | unknown
    revision: str = ""
    family: str = "sd"  # sd (SD 1.x/2.x) | sdxl: which pipeline classes load it (PIPELINE_CLASSES)

    @property
    def pipeline(self) -> str:
        """diffusers' pipeline class for this base model."""
        return PIPELINE_CLASSES[self.family]["diffusers"]

    @property
    def unguide_pipeline(self) -> str:
        """Ours, that samples with UnGuidance (``unguide_jax.pytorch``)."""
        return PIPELINE_CLASSES[self.family]["unguide"]

    @classmethod
    def from_spec(cls, spec: str | None, revision: str = "", family: str = "sd") -> "BaseModel":
        from unguide_jax.loading.resolve import (
            NAMED_MODELS,
            SINGLE_FILE_SUFFIXES,
            looks_like_hub_id,
        )

        if family not in PIPELINE_CLASSES:
            raise ValueError(f"base model family {family!r}; known: {sorted(PIPELINE_CLASSES)}")
        if not spec:
            return cls("", "unknown", family=family)
        if spec in NAMED_MODELS and not Path(spec).exists():
            return cls(spec, "embedded", family=family)
        if spec.endswith(SINGLE_FILE_SUFFIXES):
            return cls(spec, "single_file", family=family)
        if looks_like_hub_id(spec) and not Path(spec).exists():
            return cls(spec, "hub", revision, family)
        return cls(spec, "folder", family=family)

    def short(self) -> str:
        return {"embedded": "the embedded shapes model of unguide-jax", "single_file": f"a local file: {self.spec}",
                "folder": f"a local folder: {self.spec}", "hub": self.spec}.get(self.kind, "not recorded")

    def describe(self) -> str:
        if self.kind == "embedded":
            return ("the embedded shapes model shipped with unguide-jax (`unguide_jax/assets/shapes-sd`: a small "
                    "Stable-Diffusion-architecture model of procedural shapes, 32×32 images, trained by the project's "
                    "own recipe; it is not on the Hugging Face hub)")
        if self.kind == "hub":
            return f"`{self.spec}`" + (f" at revision `{self.revision}`" if self.revision else "") + \
                " from the Hugging Face hub"
        if self.kind == "single_file":
            return f"the single-file checkpoint `{self.spec}` (a local file, not a hub id)"
        if self.kind == "folder":
            return f"the diffusers folder `{self.spec}` (a local folder, not a hub id)"
        return "a base model that its source does not record (unknown)"

    def python_setup(self) -> list[str]:
        """Lines that set ``base`` (what ``from_pretrained`` / ``from_single_file`` takes)."""
        if self.kind == "embedded":
            return ["from unguide_jax.resources import EMBEDDED_MODEL  # pip install unguide-jax",
                    "base = str(EMBEDDED_MODEL)"]
        if self.kind == "unknown":
            return ['base = "<the base model>"  # not recorded: the model this edit was made on']
        return [f"base = {json.dumps(self.spec)}"]

    def load(self, cls: str, extra: str = "") -> str:
        """The call that builds ``cls`` from ``base`` (``extra``: more keyword arguments)."""
        method = "from_single_file" if self.kind == "single_file" else "from_pretrained"
        revision = f", revision={json.dumps(self.revision)}" if self.kind == "hub" and self.revision else ""
        return f"{cls}.{method}(base{revision}{extra})"


# --- the card ----------------------------------------------------------------------------------------------------


def _yaml_scalar(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def front_matter(records: Sequence[EditRecord], base: BaseModel, formats: Sequence[str]) -> str:
    methods = sorted({r.method for r in records if r.method})
    tags = ["concept-erasure", "unguide-jax"]
    if any(f in formats for f in ("peft", "kohya")) or any(r.kind == "LoRA file" for r in records):
        tags.insert(0, "lora")
    tags += [METHOD_TAGS[m] for m in methods if m in METHOD_TAGS]
    tags += ["text-to-image", "stable-diffusion", *(["stable-diffusion-xl"] if base.family == "sdxl" else []),
             "diffusers"]
    lines = ["---", f"library_name: {_yaml_scalar('diffusers')}", f"pipeline_tag: {_yaml_scalar('text-to-image')}"]
    if base.kind == "hub":
        lines.append(f"base_model: {_yaml_scalar(base.spec)}")
    else:  # base_model takes hub ids only: a local or embedded model is named in the text below
        lines.append(f"# base_model: none on the Hugging Face hub ({base.short()}); see the text")
    lines.append("tags:")
    lines += [f"- {_yaml_scalar(tag)}" for tag in dict.fromkeys(tags)]
    lines.append("---")
    return "\n".join(lines)


def _inline(values: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(f"“{v}”" if v else "“” (the empty prompt)" for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def _concept_section(record: EditRecord) -> list[str]:
    concept = record.concept
    if concept is None:
        if record.concept_name:
            return [f"Concept: **{record.concept_name}**; its prompts are not recorded in this edit's source, and "
                    "its concept file could not be read."]
        return ["Concept: **unknown** (the source records none)."]
    targets, references = list(concept.get("targets", [])), list(concept.get("references", []))
    lines = [f"Concept: **{concept.get('name')}** ({concept.get('kind', 'object')})."]
    if targets:
        pairs = references * len(targets) if len(references) == 1 else references
        lines.append("")
        lines.append("| target prompt (erased) | reference prompt (what it turns into) |")
        lines.append("|---|---|")
        lines += [f"| {t} | {r} |" for t, r in zip(targets, pairs)]
    anchors = record.method not in ("unguide", "learnable_prompts")  # the prompts the closed-form erasers use
    for key, label in (("synonyms", "Synonyms (should be erased too)"),
                       ("other", "Other prompts (should stay as they were)"),
                       ("forget", "Forget anchors (the prompts the edit was computed to erase)"),
                       ("retain", "Retain anchors (the prompts the edit was computed to keep)"),
                       ("paraphrases", "Paraphrases (evaluation only: evoke the concept without naming it)")):
        if concept.get(key) and (anchors or key not in ("forget", "retain")):
            lines += ["", f"{label}: {_inline(list(concept[key]))}."]
    return lines


def _flatten(settings: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _settings_table(settings: Mapping) -> list[str]:
    rows = _flatten(settings)
    if not rows:
        return []
    return ["| setting | value |", "|---|---|"] + [f"| `{k}` | `{json.dumps(v, ensure_ascii=False)}` |"
                                                   for k, v in rows]


def _method_section(record: EditRecord) -> list[str]:
    method = record.method
    lines = [METHOD_DESCRIPTIONS.get(method, "The method that made this edit is not recorded in its source: "
                                             "a LoRA of unknown origin.")]
    if record.config is not None:
        settings = {k: v for k, v in record.config.items() if k not in BOOKKEEPING_KEYS}
        lines += ["", f"Settings (the run's `config.json`; the method's defaults are in "
                      f"`configs/{method}.py` of unguide-jax):", ""] + _settings_table(settings)
    else:
        known = {k: v for k, v in record.metadata.items() if k not in ("format", "concept", "base_model", "report")}
        report = record.metadata.get("report")
        if isinstance(report, Mapping) and isinstance(report.get("config"), Mapping):
            known[method or "settings"] = report["config"]
        lines += ["", f"Settings: this card was written from the {record.kind} `{record.source}` alone, without the "
                      "run folder's `config.json`. What the file records:", ""]
        lines += _settings_table(known) or ["(nothing)"]
        lines += ["", "Every other setting is unknown."]
    return lines


def _training_section(record: EditRecord) -> list[str]:
    config, metadata = record.config or {}, record.metadata
    if record.method in ("pure", "uce"):
        seconds = (metadata.get("report") or {}).get("seconds") if isinstance(metadata.get("report"), Mapping) else None
        return ["Computed in closed form: no training steps, no learning rate"
                + (f"; {seconds} s on the machine that made it." if seconds is not None else ".")]
    if record.method not in TRAINED_METHODS:
        return ["How this edit was trained is not recorded in its source (unknown)."]
    derived = config.get("derived") or metadata.get("derived") or {}
    lr = derived.get("learning_rate", config.get("learning_rate", metadata.get("learning_rate")))
    if record.method == "learnable_prompts":
        prompt = config.get("prompt") or metadata.get("prompt") or {}
        lr = {k: prompt[k] for k in ("model_learning_rate", "prompt_learning_rate") if k in prompt} or None
    seed = config.get("seed", metadata.get("seed"))
    iterations = config.get("iterations")
    parts = []
    steps = record.steps
    if steps is not None:
        parts.append(f"{steps} step{'' if steps == 1 else 's'}"
                     + (f" (of {iterations} configured)" if iterations not in (None, steps) else ""))
    elif iterations is not None:
        parts.append(f"{iterations} steps configured (the number done is not recorded)")
    else:
        parts.append("steps: unknown")
    if isinstance(lr, Mapping):
        parts.append("Adam learning rates " + ", ".join(f"{k} {v}" for k, v in lr.items()))
    elif derived.get("transfer", "none") != "none":
        parts.append(f"Adam learning rate {lr:.3g} (the paper's {derived.get('paper_learning_rate')} transferred to this "
                     f"model by the {derived['transfer']} rule)")
    else:
        parts.append(f"Adam learning rate {lr}" if lr is not None else "learning rate: unknown")
    parts.append(f"seed {seed}" if seed is not None else "seed: unknown")
    if derived.get("lora_init"):
        parts.append(f"LoRA A initialised along the concept ({derived['lora_init']})")
    if config.get("dtype"):
        parts.append(f"compute dtype {config['dtype']}")
    lines = ["Trained with unguide-jax (JAX/Flax): " + "; ".join(parts) + "."]
    objective = config.get("objective") or metadata.get("objective")
    if objective:
        lines.append("Objective: " + ", ".join(f"{k} {v}" for k, v in objective.items()) + ".")
    return lines


# --- the evaluation ----------------------------------------------------------------------------------------------


def _is_ours(source: str, paths: Sequence[Path]) -> bool:
    resolved = Path(source).resolve()
    return any(resolved == p or p in resolved.parents for p in paths)


def evaluation_rows(results: Mapping, records: Sequence[EditRecord], where: str) -> tuple[dict, dict]:
    """(the concept's entry of an erasure evaluation's results.json, the names of its methods that ran this
    edit or the base model); an error naming what the file evaluated when this edit is not among it."""
    if "concepts" not in results:
        raise ValueError(f"{where} is not the results.json of the erasure evaluation (unguide_jax.evaluation."
                         "erasure: it has no 'concepts'); only that evaluation's table goes into a model card")
    paths = [p for r in records for p in r.paths]
    seen = []
    for entry in results["concepts"]:
        mine = [name for name, infos in (entry.get("edits") or {}).items()
                if infos and all(_is_ours(str(i.get("source", "")), paths) for i in infos)]
        seen += [f"{entry.get('concept')}: {name} = {[i.get('source') for i in infos]}"
                 for name, infos in (entry.get("edits") or {}).items()]
        if mine:
            rows = [name for name, row in entry["methods"].items() if row.get("edit") in mine or row.get("mode") == "base"]
            return entry, {"names": rows, "edits": mine}
    raise ValueError(f"{where} does not evaluate this edit ({', '.join(r.source for r in records)}); its edits are: "
                     + ("; ".join(seen) or "none") + ". (Sources are compared as paths resolved from the current "
                                                     "folder.)")


def _evaluation_section(evaluation: Path | None, results: Mapping | None, records: Sequence[EditRecord]) -> list[str]:
    if results is None:
        return ["No evaluation was recorded for this edit when this card was written. For a concept of the embedded "
                "shapes model, measure it with unguide-jax's erasure evaluation (`python sample.py --config "
                "configs/evaluate.py`, with this run among `erasures`), then write the card again with the table: "
                "`unguide-export <run> --evaluation <out_dir>/results.json --out <this folder>`."]
    from unguide_jax.evaluation.erasure import average, format_table

    entry, chosen = evaluation_rows(results, records, str(evaluation))
    summary = average([entry], chosen["names"])
    settings = results.get("settings", {})
    probe = settings.get("probe") or {}
    lines = [f"Measured by unguide-jax's erasure evaluation (`{evaluation}`) for the concept "
             f"**{entry.get('concept')}** (erased class: {entry.get('erased_class')}): "
             f"{settings.get('images_per_prompt', '?')} images per prompt, seeds {settings.get('seed', '?')}+j, CFG "
             f"{settings.get('guidance_scale', '?')}, {settings.get('num_steps', '?')} DDIM steps; images scored by "
             f"the shipped shapes classifier. UnGuide rows use the w probe with R = {probe.get('draws', '?')} draws, "
             f"rule {probe.get('rule', '?')}.",
             "", "Acc_e: target-prompt images still showing the erased class (lower is better); Acc_s: other classes "
             "drawn as themselves (higher is better); Acc_g: synonym prompts showing the erased class (lower is "
             "better); H_o: the harmonic mean of 1 − Acc_e, Acc_s and 1 − Acc_g. Protocol `mace`: per image, the "
             "classifier's softmax probability of the class in question, averaged (MACE's; the reference-code and "
             "top-1 protocols are in the results file).", ""]
    lines += format_table(summary, "mace").splitlines()
    return lines


# --- usage -------------------------------------------------------------------------------------------------------


def _usage_section(records: Sequence[EditRecord], formats: Sequence[str], base: BaseModel, location: str,
                   export_dir: Path, example_prompts: Sequence[str]) -> list[str]:
    setup = base.python_setup() + [f"export = {json.dumps(location)}  # this folder"]
    prompt = json.dumps(example_prompts[0])
    lines: list[str] = []

    def block(title: str, text: str, code: list[str]) -> None:
        lines.extend([f"### {title}", "", text, "", "```python", *code, "```", ""])

    unguide_lora = all(r.method == "unguide" for r in records) and (export_dir / UNGUIDE_JSON).is_file()
    if "peft" in formats and unguide_lora:
        both = ", ".join(json.dumps(p) for p in example_prompts[:2])
        block(f"UnGuidance (`{base.unguide_pipeline}`)",
              "The method as the paper samples it: per prompt, w from the probe mixes the base model's and the LoRA's "
              "guided predictions (`unguide.json` holds alpha and the probe's settings).",
              [f"from unguide_jax.pytorch import {base.unguide_pipeline}", "", *setup,
               f"pipe = {base.load(base.unguide_pipeline)}",
               "pipe.load_unguide(export)",
               f"out = pipe([{both}], seeds=[0, 1])",
               "images, w = out.images, out.w  # w per prompt: w_erase where the concept is present, w_keep elsewhere"])
    if "peft" in formats:
        block("Plain LoRA (diffusers `load_lora_weights`)",
              "The edit at full strength on every prompt" + (" (the paper's \"LoRA only\")." if unguide_lora else "."),
              [f"from diffusers import {base.pipeline}", "", *setup,
               f"pipe = {base.load(base.pipeline)}",
               'pipe.load_lora_weights(f"{export}/diffusers")',
               f"image = pipe({prompt}).images[0]"])
    if "kohya" in formats:
        block("kohya / A1111 LoRA",
              "The same LoRA in kohya's naming (A1111, ComfyUI: copy `kohya.safetensors` into their LoRA folder); "
              "diffusers reads it too:",
              [f"from diffusers import {base.pipeline}", "", *setup,
               f"pipe = {base.load(base.pipeline)}",
               'pipe.load_lora_weights(export, weight_name="kohya.safetensors")'])
    if "partial_unet" in formats:
        block("Edited UNet weights (partial state dict)",
              "Every parameter of the modules the edit changes, edited, under diffusers' names:",
              [f"from diffusers import {base.pipeline}", "from safetensors.torch import load_file", "",
               *setup, f"pipe = {base.load(base.pipeline)}",
               'missing, unexpected = pipe.unet.load_state_dict(load_file(f"{export}/unet_edited.safetensors"), '
               'strict=False)',
               "assert not unexpected"])
    if "merged_unet" in formats:
        block("Merged UNet folder",
              "A whole diffusers `unet/` folder with the edit merged in:",
              [f"from diffusers import {base.pipeline}, UNet2DConditionModel", "", *setup,
               'unet = UNet2DConditionModel.from_pretrained(f"{export}/unet")',
               f"pipe = {base.load(base.pipeline, ', unet=unet')}"])
    if "prompt" in formats:
        lines += ["### Learnable prompt tokens", "",
                  "`prompt_tokens.safetensors` holds `prompt_keys` and `prompt_values` (m × text width). diffusers has "
                  "no loader for them: in every cross-attention layer its metadata lists (`layers`), append "
                  "`prompt_keys` to the text tokens before `to_k` and `prompt_values` before `to_v`, in both CFG "
                  "branches (the file's `usage` metadata says the same). The edited UNet weights above are the "
                  "deployed edit without the tokens.", ""]
    if not lines:
        lines = ["This export holds no format with a usage example here.", ""]
    return lines


def _files_section(export_dir: Path, base: BaseModel) -> list[str]:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in export_dir.iterdir() if p.name != CARD_FILE)
    notes = {"diffusers/": "the diffusers/PEFT LoRA (`pytorch_lora_weights.safetensors`)",
             UNGUIDE_JSON: f"UnGuidance's settings for `{base.unguide_pipeline}.load_unguide` (alpha, w probe, "
                           "base-model family and fingerprint)",
             "kohya.safetensors": "the LoRA in kohya/A1111 naming",
             "unet_edited.safetensors": "the edited UNet parameters (diffusers names)",
             "unet/": "a diffusers UNet folder with the edit merged in",
             "prompt_tokens.safetensors": "the learnable key/value tokens"}
    return [f"- `{name}`" + (f": {notes[name]}" if name in notes else "") for name in names]


def model_card(export_dir: str | Path, records: Sequence[EditRecord], formats: Sequence[str], base: BaseModel,
               location: str, evaluation: Path | None = None, results: Mapping | None = None) -> str:
    """The card's text (``location``: how the usage examples name the export folder)."""
    export_dir = Path(export_dir)
    methods = [METHOD_NAMES.get(r.method, "unknown method") for r in records]
    concepts = [r.concept_name or "an unrecorded concept" for r in records]
    title = (f"{' + '.join(dict.fromkeys(methods))} erasing “{' + '.join(dict.fromkeys(concepts))}”")
    targets = [p for r in records if r.concept for p in r.concept.get("targets", [])]
    others = [p for r in records if r.concept for p in r.concept.get("other", []) if p]
    examples = (targets[:1] + others[:1]) or ["a photo of ..."]
    examples = examples + ["a photo of ..."] * (2 - len(examples))
    lines = [front_matter(records, base, formats), "", f"# {title}", "",
             f"A concept-erasure edit of {base.describe()}, made with unguide-jax (the `unguide-jax` Python package) and "
             f"exported"
             f" for PyTorch users ({', '.join(f'`{f}`' for f in formats)}).", ""]
    trained_on = {r.base_model for r in records if r.base_model}
    if trained_on and trained_on != {base.spec}:
        lines += [f"Note: the source records the base model {', '.join(sorted(map(str, trained_on)))}; this export "
                  f"was made against `{base.spec}`.", ""]
    several = len(records) > 1
    if several:
        lines += [f"The export adds up {len(records)} edits (their LoRAs folded into one, deltas summed):", ""]
    for i, record in enumerate(records):
        heading = "##" if not several else "###"
        if several:
            lines += [f"## Edit {i + 1}: `{record.source}` ({record.kind})", ""]
        else:
            lines += [f"Source: `{record.source}` ({record.kind}).", ""]
        lines += [f"{heading} Concept", "", *_concept_section(record), ""]
        lines += [f"{heading} Method and settings", "", *_method_section(record), ""]
        lines += [f"{heading} Training", "", *_training_section(record), ""]
    lines += ["## Evaluation", "", *_evaluation_section(evaluation, results, records), ""]
    lines += ["## How to use", "", *_usage_section(records, formats, base, location, export_dir, examples)]
    lines += ["## Files", "", *_files_section(export_dir, base), ""]
    return "\n".join(lines)


def _location(export_dir: Path, records: Sequence[EditRecord]) -> str:
    """The export folder as users will find it: a train.py run's export/ under its run_dir (the run may be
    written in a building folder that is renamed when it finishes)."""
    parent = export_dir.resolve().parent
    for record in records:
        if record.kind == "run folder" and record.paths[0] == parent and record.config:
            return str(Path(record.config.get("run_dir") or parent) / export_dir.name)
    return str(export_dir)


def write_model_card(export_dir: str | Path, sources: Sequence[str | Path], *, formats: Sequence[str],
                     base_model: str | None = None, revision: str = "", evaluation: str | Path | None = None,
                     location: str | Path | None = None, family: str | None = None) -> Path:
    """Write ``export_dir/README.md`` for the edit read from ``sources`` (the run folders, checkpoints or edit files
    the export came from). ``base_model``: the model the export was made against (default: the one the source
    records); ``evaluation``: an erasure evaluation's results.json that evaluated this edit; ``location``: where
    users will find the folder, when it is written elsewhere first (default: read from the sources); ``family``:
    the base model's, "sd" or "sdxl", which names the pipeline classes of the usage examples (default: unguide.json's
    base_model.family when the export has one, else "sd")."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"{export_dir}: no export folder to write a model card into")
    if family is None:
        written = export_dir / UNGUIDE_JSON
        family = (_read_json(written).get("base_model") or {}).get("family", "sd") if written.is_file() else "sd"
    if not sources:
        raise ValueError("a model card needs the edit's sources (run folders, checkpoints or edit files)")
    records = [describe_source(s) for s in sources]
    recorded = next((r for r in records if r.base_model), None)
    if not base_model and recorded is not None:
        base_model = recorded.base_model
        revision = revision or (recorded.config or {}).get("revision", "")
    results = None
    if evaluation is not None:
        evaluation = Path(evaluation)
        if not evaluation.is_file():
            raise FileNotFoundError(f"missing evaluation results: {evaluation}")
        results = _read_json(evaluation)
    text = model_card(export_dir, records, list(formats), BaseModel.from_spec(base_model, revision, family),
                      str(location) if location else _location(export_dir, records), evaluation, results)
    path = export_dir / CARD_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def check_card_inputs(sources: Sequence[str | Path], evaluation: str | Path | None) -> None:
    """Fail before an export is written when its card could not be: a source it cannot read, or an evaluation
    that is missing, of another kind, or of other edits."""
    records = [describe_source(s) for s in sources]
    if evaluation is not None:
        if not Path(evaluation).is_file():
            raise FileNotFoundError(f"missing evaluation results: {evaluation}")
        evaluation_rows(_read_json(Path(evaluation)), records, str(evaluation))
