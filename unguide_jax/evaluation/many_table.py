"""The several-concept table (issue 38, ``configs/evaluate.py:many``): erase K of the shapes classes at once.

For every K of ``sizes``, ``subsets`` random subsets of the classes (K = 1: every class). Per subset S the
prompts are each erased class's target and synonyms and each other class's target, N images each (image j of
every prompt with seed ``seed + j``, paired across subsets and methods), scored by the shapes classifier with
MACE's protocol (per image the probability of the prompt's class, averaged per prompt):

    Acc_e  the erased classes' target prompts    (lower is better)
    Acc_g  the erased classes' synonym prompts   (lower is better)
    Acc_s  the other classes' target prompts     (higher is better)
    H_o    3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))

Rows (``many_config.MANY_METHODS``):
    base         the model itself (its images serve every subset)
    lora_merged  the K LoRAs as one edit, ranks side by side (``edits.merge.merge_loras``): "LoRA only" for K
    unguide      one probe for the K LoRAs (``ManyProbe``: each LoRA's own bar, the calibrated rule by default),
                 then UnGuidance with the LoRAs each prompt flags (``combine``: the flagged rule of
                 ``diffusion.many_guidance``; the sum rule one flag away)
    uce, pure    the closed-form erasers solved for the K concepts at once
The LoRAs are the per-class adapters of one several-concept run (``lora_run``, ``unguide.py:many``), each
equal to its class's own single run. A prompt's UnGuide image depends only on the LoRAs it applies and its
w, so the cache (``out_dir/cache``, as the erasure table's) makes it once for every subset where they agree.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from unguide_jax.diffusion.batching import ImageRequest
from unguide_jax.diffusion.many_guidance import FLAGGED_RULES, flagged_guidance
from unguide_jax.edits.edit import Edit
from unguide_jax.edits.merge import merge_loras
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.pure import pure_edit
from unguide_jax.erasers.uce import uce_edit
from unguide_jax.erasers.unguide.many_probe import ManyProbe
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.cache import digest, edit_digest, open_cache
from unguide_jax.evaluation.erasure import generate_cached, harmonic_overall, scores_cached
from unguide_jax.evaluation.evaluators import PromptSet, ShapesEvaluator
from unguide_jax.evaluation.many_config import METHOD_NAMES, ManyTableConfig
from unguide_jax.evaluation.plan import Plan, Stage, Training, measure_unet_step, probe_unet_rows
from unguide_jax.json_files import write_json
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import check_same_config, is_main_process
from unguide_jax.presets import load_config_file
from unguide_jax.settings import ConfigError, as_config, to_dict
from unguide_jax.shapes.data import CLASSES as SHAPES_CLASSES
from unguide_jax.shapes.data import class_named_in
from unguide_jax.training.sources import load_edit

METRICS = ("acc_e", "acc_s", "acc_g", "h_o")


def draw_subsets(config: ManyTableConfig) -> dict[int, list[tuple[str, ...]]]:
    """K -> its subsets of ``config.classes`` (each in the classes' order): every one where there are at most
    ``subsets`` (and for K = 1), else ``subsets`` distinct ones drawn with ``subset_seed``."""
    rng = np.random.default_rng(config.subset_seed)
    classes = list(config.classes)
    out = {}
    for k in config.sizes:
        if k == 1 or math.comb(len(classes), k) <= config.subsets:
            out[k] = [tuple(c) for c in itertools.combinations(classes, k)]
            continue
        drawn: list[tuple[str, ...]] = []
        while len(drawn) < config.subsets:
            pick = tuple(classes[i] for i in sorted(rng.choice(len(classes), k, replace=False)))
            if pick not in drawn:
                drawn.append(pick)
        out[k] = drawn
    return out


def table_prompts(concepts: Mapping) -> PromptSet:
    """Every class's target and synonyms, labelled by the class each names (the scores' texts)."""
    items = []
    for concept in concepts.values():
        label = class_named_in(concept.targets[0])
        if label is None or concept.kind != "object":
            raise ConfigError(f"class {concept.name!r}: the several-concept table scores the shapes classes; its "
                              f"target {concept.targets[0]!r} names none")
        items += [(concept.targets[0], "target", label)] + [(p, "synonym", label) for p in concept.synonyms]
    return PromptSet(-1, tuple(items), tuple(SHAPES_CLASSES))


def subset_prompts(concepts: Mapping, subset: tuple[str, ...]) -> list[tuple[str, str]]:
    """(prompt, role) of one subset: erased targets ("erased"), their synonyms ("synonym"), other targets ("kept")."""
    out = []
    for name, concept in concepts.items():
        if name in subset:
            out += [(concept.targets[0], "erased")] + [(p, "synonym") for p in concept.synonyms]
        else:
            out.append((concept.targets[0], "kept"))
    return out


def scores_of(per_prompt: dict[str, float], prompts: list[tuple[str, str]]) -> dict[str, float]:
    by_role = {role: [per_prompt[p] for p, r in prompts if r == role] for role in ("erased", "synonym", "kept")}
    acc_e, acc_g, acc_s = (float(np.mean(by_role[r])) for r in ("erased", "synonym", "kept"))
    return dict(acc_e=acc_e, acc_s=acc_s, acc_g=acc_g, h_o=harmonic_overall(acc_e, acc_s, acc_g))


def _lora_run(config: ManyTableConfig, train_runner: Callable | None) -> Path:
    run = Path(config.lora_run)
    missing = [c for c in config.classes if not (run / "concepts" / c / "adapter.safetensors").is_file()]
    if not missing:
        return run
    if not config.train_missing or train_runner is None or (run / "config.json").exists():
        raise FileNotFoundError(f"{run} has no LoRA for {missing}: train them with train.py --config "
                                f"configs/unguide.py:many --config.run_dir={run} (or set train_missing)")
    train_config = dict(load_config_file(config.train_missing), concepts=list(config.classes), run_dir=str(run),
                        model=config.model)
    print(f"training {len(config.classes)} LoRAs in one run first: {config.train_missing} -> {run}")
    train_runner(train_config)
    return run


def run_many_table(config: ManyTableConfig | Mapping, train_runner: Callable | None = None) -> Path:
    """Make the table; returns ``out_dir`` (results.json, results.md, cache/)."""
    config = as_config(config, ManyTableConfig)
    check_same_config(to_dict(config), "evaluation config")
    out_dir = Path(config.out_dir)
    run = _lora_run(config, train_runner)
    concepts = {name: load_concept(name) for name in config.classes}
    prompt_set = table_prompts(concepts)
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    unet = sd.params["unet"]
    loras = {name: load_edit(run / "concepts" / name, unet)[0] for name in config.classes}
    evaluator = ShapesEvaluator()
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    cache = open_cache(config, out_dir, evaluator)
    n = config.images_per_prompt
    probe_config = ProbeConfig(**dataclasses.asdict(config.probe))
    label = {p: c for p, _, c in prompt_set.items}

    def per_prompt_scores(prompts: list[str], ws: list, edits: list, desc: str) -> tuple[dict[str, float], float]:
        """Mean probability of each prompt's class over its n images; prompt i sampled with edits[i] and ws[i]."""
        started = time.perf_counter()
        images, keys = [], []
        groups: dict[str | None, list[int]] = {}
        ids = [edit_digest(e) for e in edits]
        for i, edit_id in enumerate(ids):
            groups.setdefault(edit_id, []).append(i)
        for edit_id, members in groups.items():
            requests = [ImageRequest(prompts[i], config.seed + j, config.guidance_scale, ws[i])
                        for i in members for j in range(n)]
            made, made_keys = generate_cached(sd, requests, edits[members[0]], edit_id, config, cache, desc=desc)
            images += made
            keys += made_keys
        class_probs, _ = scores_cached(evaluator, images, keys, prompt_set, cache)
        order = [prompts[i] for members in groups.values() for i in members for _ in range(n)]
        credit: dict[str, list[float]] = {}
        for row, prompt in enumerate(order):
            credit.setdefault(prompt, []).append(float(class_probs[row, label[prompt]]))
        return {p: float(np.mean(v)) for p, v in credit.items()}, time.perf_counter() - started

    results: dict[str, list[dict]] = {}
    base_prompts = prompt_set.prompts
    base_scores, _ = per_prompt_scores(base_prompts, [None] * len(base_prompts), [None] * len(base_prompts),
                                       "base model")
    for k, subsets in draw_subsets(config).items():
        for subset in subsets:
            prompts = subset_prompts(concepts, subset)
            texts = [p for p, _ in prompts]
            row = dict(k=k, classes=list(subset), methods={})
            for method in config.methods:
                info: dict = {}
                if method == "base":
                    scores = {p: base_scores[p] for p in texts}
                    seconds = 0.0
                elif method == "unguide":
                    scores, seconds, info = _unguide(sd, config, probe_config, concepts, loras, subset, texts, cache,
                                                     per_prompt_scores)
                else:
                    started = time.perf_counter()
                    edit, report = _edit_for(method, sd, concepts, loras, subset, config, cache)
                    scores, _ = per_prompt_scores(texts, [None] * len(texts), [edit] * len(texts),
                                                            f"K={k} {method}")
                    seconds = time.perf_counter() - started
                    info = {"edit_report": report} if report else {}
                row["methods"][method] = dict(scores_of(scores, prompts), seconds=round(seconds, 2), **info)
            results.setdefault(str(k), []).append(row)
            cache.save()
            if is_main_process():
                print(format_row(row))
    summary = summarize(results, config)
    record = dict(settings=dict(to_dict(config), lora_run=str(run), work=dict(cache.work)), subsets=results,
                  summary=summary)
    if is_main_process():
        write_json(out_dir / "results.json", record)
        (out_dir / "results.md").write_text(format_table(summary, config))
    return out_dir


def _edit_for(method: str, sd, concepts, loras, subset, config: ManyTableConfig, cache):
    """The merged LoRA, UCE's or PURE's edit for the subset."""
    if method == "lora_merged":
        return merge_loras([loras[c] for c in subset]), None
    settings = config.uce if method == "uce" else config.pure
    compute = uce_edit if method == "uce" else pure_edit
    edit, report = compute(sd, [concepts[c] for c in subset], settings)  # seconds: computed again, not kept
    cache.work[f"{method}_edits"] += 1
    return edit, {k: v for k, v in report.items() if k != "config"}


def _unguide(sd, config: ManyTableConfig, probe_config: ProbeConfig, concepts, loras, subset, texts, cache,
             per_prompt_scores):
    started = time.perf_counter()
    edits = [loras[c] for c in subset]
    key = digest(dict(model=cache.model_id, edits=[edit_digest(e) for e in edits], prompts=texts,
                      guidance=config.guidance_scale, probe={k: v for k, v in dataclasses.asdict(probe_config).items()
                                                             if k != "prompt_chunk"},
                      concepts=[list(concepts[c].targets) for c in subset]))
    found = cache.record("many-probes", key)
    if found is None:
        result = ManyProbe(sd, edits, probe_config, [list(concepts[c].targets) for c in subset]).run(
            texts, config.guidance_scale)
        found = dict(w=result.w.tolist(), flags=result.flags.tolist(), d=result.d.tolist())
        cache.put_record("many-probes", key, found)
        cache.work["probes_run"] += 1
    else:
        cache.work["probes_found"] += 1
    w, flags = np.asarray(found["w"], np.float32), np.asarray(found["flags"], bool)
    if config.combine not in FLAGGED_RULES:
        raise ConfigError(f"the several-concept table samples the flagged rules {FLAGGED_RULES}; the sum rule is "
                          "generate_many(..., combine='sum')")
    per_prompt, mix = flagged_guidance(w, flags, config.combine)
    # Each prompt's LoRAs at their strengths, as one edit: the same images as the per-row mix of generate_many,
    # and a prompt that applies one LoRA at strength 1 shares its images with that LoRA's own row.
    prompt_edits = [Edit(loras=tuple((adapter, alpha * strength) for e, strength in zip(edits, row) if strength > 0
                                     for adapter, alpha in e.loras)) for row in mix]
    ws = per_prompt.tolist()
    scores, _ = per_prompt_scores(texts, ws, prompt_edits, f"K={len(subset)} unguide")
    own = [{c} if (c := _class_of(p, concepts, subset)) else set() for p in texts]
    flagged_sets = [{subset[i] for i in np.flatnonzero(row)} for row in flags]
    info = dict(flags_equal_oracle=float(np.mean([a == b for a, b in zip(flagged_sets, own)])),
                prompts_flagging_none=int(sum(not f for f in flagged_sets)))
    return scores, time.perf_counter() - started, info


def _class_of(prompt: str, concepts, subset) -> str | None:
    """The erased class a prompt carries (its target or a synonym), None for a kept class's prompt."""
    for name in subset:
        c = concepts[name]
        if prompt == c.targets[0] or prompt in c.synonyms:
            return name
    return None


def summarize(results: dict[str, list[dict]], config: ManyTableConfig) -> dict:
    """Per K and method: mean and std over subsets of each metric; with K = 1 in the table, each subset's mean
    single-concept UnGuide H_o over its classes (the target's reference)."""
    single = {}
    for row in results.get("1", []):
        if "unguide" in row["methods"]:
            single[row["classes"][0]] = row["methods"]["unguide"]["h_o"]
    out = {}
    for k, rows in results.items():
        entry = {"subsets": len(rows)}
        for method in config.methods:
            values = {m: [r["methods"][method][m] for r in rows] for m in METRICS}
            entry[method] = {m: float(np.mean(v)) for m, v in values.items()}
            entry[method]["std"] = {m: float(np.std(v)) for m, v in values.items()}
            entry[method]["seconds"] = float(sum(r["methods"][method]["seconds"] for r in rows))
        if single and all(c in single for r in rows for c in r["classes"]):
            entry["single_concept_unguide_h_o"] = float(np.mean([np.mean([single[c] for c in r["classes"]])
                                                                 for r in rows]))
        out[k] = entry
    return out


def format_row(row: dict) -> str:
    cells = ", ".join(f"{m} H_o {v['h_o']:.1%}" for m, v in row["methods"].items())
    return f"K={row['k']} {'+'.join(c.removeprefix('shapes-') for c in row['classes'])}: {cells}"


def format_table(summary: dict, config: ManyTableConfig) -> str:
    lines = [f"Several concepts erased at once on {config.model} ({config.images_per_prompt} images per prompt, "
             f"MACE's protocol; mean ± std over subsets)", "",
             "| K | subsets | method | Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ |", "|---|---|---|---|---|---|---|"]
    for k, entry in summary.items():
        for method in config.methods:
            v = entry[method]
            cells = " | ".join(f"{100 * v[m]:.1f} ± {100 * v['std'][m]:.1f}" for m in METRICS)
            lines.append(f"| {k} | {entry['subsets']} | {METHOD_NAMES[method]} | {cells} |")
        if "single_concept_unguide_h_o" in entry:
            lines.append(f"| {k} | | UnGuide's single-concept H_o, same classes | | | | "
                         f"{100 * entry['single_concept_unguide_h_o']:.1f} |")
    return "\n".join(lines) + "\n"


def plan_many_table(config: ManyTableConfig | Mapping, measure: bool = True) -> Plan:
    """The job's dry run: images per row (the cache's found), the probes, the LoRA run to train first."""
    config = as_config(config, ManyTableConfig)
    concepts = {name: load_concept(name) for name in config.classes}
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    batch = padded_rows(config.batch_size, sd.mesh)
    stages = {m: Stage(METHOD_NAMES[m], steps=config.num_steps, batch=batch, branches=4 if m == "unguide" else 2,
                       calls_per_step=2 if m == "unguide" and not config.fused else 1) for m in config.methods}
    n = config.images_per_prompt
    if "base" in stages:
        stages["base"].add_images(len(table_prompts(concepts).items) * n)
        stages["base"].scores += len(table_prompts(concepts).items) * n
    for k, subsets in draw_subsets(config).items():
        for subset in subsets:
            prompts = len(subset_prompts(concepts, subset))
            for method, stage in stages.items():
                if method == "base":
                    continue
                stage.add_images(prompts * n)
                stage.scores += prompts * n
                if method == "unguide":
                    stage.probe_rows += probe_unet_rows(config.probe, prompts, len(subset), sd.mesh)
    trainings = []
    run = Path(config.lora_run)
    if not all((run / "concepts" / c / "adapter.safetensors").is_file() for c in config.classes):
        raw = load_config_file(config.train_missing) if config.train_missing else {}
        iterations = int(raw.get("iterations", 200))
        trainings.append(Training(f"{len(config.classes)} LoRAs in one run", str(run), config.train_missing,
                                  iterations * len(config.classes), 2 * 50 / 2 + 5))
    timing = measure_unet_step(sd, batch) if measure else None
    notes = ["counted as if nothing were made yet: a rerun takes what out_dir/cache holds and makes none of it again",
             "UnGuide's images are made once per (prompt, flagged LoRAs, w): subsets that agree share them"]
    return Plan("many", f"{sum(len(s) for s in draw_subsets(config).values())} subsets of "
                        f"{len(config.classes)} classes, K in {list(config.sizes)}", list(stages.values()),
                trainings, timing, "shapes classifier", notes)
