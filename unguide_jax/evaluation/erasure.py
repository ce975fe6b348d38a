"""Object-erasure evaluation (the UnGuide paper's Table 1 protocol), as one command.

Per erased concept: N images for the target prompt, each synonym and each other class prompt, image j
of every prompt with seed ``seed + j`` (paired across prompts and methods). An evaluator scores every
image (``unguide_jax.evaluation.evaluators``): the shipped shapes classifier, or zero-shot CLIP. A method is an edit of the erasure (UnGuide's LoRA, learnable
prompts, PURE, UCE, ...: anything ``sample.py`` loads) and a mode (base, adapter alone, UnGuide with
the probe's w, a fixed w):

    Acc_e  target-prompt images recognised as the erased class          (lower is better)
    Acc_s  other-class images recognised as their own class             (higher is better)
    Acc_g  synonym images recognised as the erased class                (lower is better)
    H_o    3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))

Scoring protocols (docs/results.md, "The protocols"):
    mace       MACE's ``metrics/evaluate_clip_accuracy.py``: per image the softmax probability of the
               prompt's class among the table's classes (CLIP: their texts, "a photo of the {class}"), averaged over a prompt's images (a mean
               probability, not a top-1 count); synonym prompts are scored against the erased class.
               The comparable default, as in the paper's Table 1.
    reference  the UnGuide authors' ``compute_metrics.py`` and ``merge_metrics_results.py``: a softmax over
               all the table's prompt texts (target, synonyms, others), an image credited with its own
               prompt's text. CLIP scores the texts themselves. The shapes classifier scores classes, not
               wordings, so there each text's logit is its class's logit: the four texts of the erased class
               tie, and an image of class c credits p_c / Σ_c' n_c' p_c' (n_c' texts of class c'); an
               erased-class image therefore credits at most 1/4.
    top1       an extra, named as such: top-1 among the 10 classes, synonyms credited to the erased class.
Averages over several concepts are means of the per-concept values. Optional columns:
    paraphrases  images of prompts that evoke the class without naming it (the concept file's
                 ``paraphrases``) recognised as the erased class: leakage (compare with the base row)
    attacks      the attacks of ``attack.kinds`` on each edit (``unguide_jax.evaluation.robustness``: prefix tokens,
                 prefix tokens knowing the probe, Ring-A-Bell), one target image per seed: how often the erased
                 class comes back, before → after each attack

Reruns (``EvaluationCache``, ``out_dir/cache``): every image is kept by what it depends on (the model's content
fingerprint, the edit's tensors, prompt, seed, guidance, w, steps, η, dtype), every score by the image, the
evaluator's weights and the texts scored against, every probe and attack by their inputs; a rerun of the same
command loads them instead of generating, probing or scoring again, and an interrupted run keeps every batch
it finished. ``results.json`` (``settings.work``) says what the run made and what it found. The per-method
PNGs are links to the cached files. ``plan_evaluation`` is the job's dry run (``unguide_jax.evaluation.plan``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.batching import ImageRequest, generate_images
from unguide_jax.diffusion.images import image_grid, save_png, slug, versions
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.unguide.modes import weights_for
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe, weights_at
from unguide_jax.evaluation.cache import (
    CACHE_FOLDER,
    EvaluationCache,
    digest,
    edit_digest,
    open_cache,
)
from unguide_jax.evaluation.config import (
    GIVEN_BY_USER,
    EvaluateConfig,
    Method,
    check_given,
)
from unguide_jax.evaluation.evaluators import PromptSet, load_image_evaluator
from unguide_jax.evaluation.plan import (
    Plan,
    Stage,
    measure_evaluator,
    measure_unet_step,
    probe_unet_rows,
)
from unguide_jax.evaluation.robustness import (
    ATTACK_KINDS,
    ATTACK_LABELS,
    attack_settings,
    concept_ring_prompts,
    run_attacks,
)
from unguide_jax.evaluation.train_first import (
    missing_edits,
    planned_training,
    run_is_missing,
    seed_label,
    seeded_erasures,
    train_missing_edits,
)
from unguide_jax.json_files import write_json
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import check_same_config, is_main_process
from unguide_jax.settings import ConfigError, as_config, to_dict
from unguide_jax.shapes.data import class_named_in
from unguide_jax.training.sources import load_edit

PROTOCOLS = ("mace", "reference", "top1")
METRIC_KEYS = ("acc_e", "acc_s", "acc_g", "h_o")


def harmonic_overall(acc_e: float, acc_s: float, acc_g: float) -> float:
    terms = (1 - acc_e, acc_s, 1 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / x for x in terms)


def score(prompt_set: PromptSet, class_probs: np.ndarray, owners: np.ndarray,
          text_probs: np.ndarray | None = None) -> dict[str, dict]:
    """Acc_e / Acc_s / Acc_g / H_o under every protocol; class_probs (n_images, classes), owners: prompt index per
    image; text_probs (n_images, prompts): each image's probability of every prompt text of the table (None: a
    class's probability stands in for each of its texts, which then tie)."""
    kinds = np.asarray([k for _, k, _ in prompt_set.items])
    labels = np.asarray([c for _, _, c in prompt_set.items])
    own = labels[owners]
    rows = np.arange(len(owners))
    if text_probs is not None:
        own_text = text_probs[rows, owners].astype(np.float64)
    else:
        texts_per_class = np.bincount(labels, minlength=class_probs.shape[1]).astype(np.float64)
        own_text = class_probs[rows, own] / (class_probs * texts_per_class).sum(axis=1)
    per_image = {
        "mace": class_probs[rows, own].astype(np.float64),
        "reference": own_text,
        "top1": (class_probs.argmax(axis=1) == own).astype(np.float64),
    }
    out = {}
    for protocol, credit in per_image.items():
        per_prompt = np.asarray([credit[owners == i].mean() for i in range(len(prompt_set.items))])
        acc_e = float(per_prompt[kinds == "target"].mean())
        acc_s = float(per_prompt[kinds == "other"].mean())
        acc_g = float(per_prompt[kinds == "synonym"].mean())
        out[protocol] = dict(acc_e=acc_e, acc_s=acc_s, acc_g=acc_g, h_o=harmonic_overall(acc_e, acc_s, acc_g),
                             per_prompt={p: float(a) for p, a in zip(prompt_set.prompts, per_prompt)})
    return out


def _probe_settings(config: EvaluateConfig, method: Method | None) -> dict:
    return dataclasses.asdict(config.probe if method is None else method.probe_of(config.probe))


def probe_key(cache: EvaluationCache, edit_id: str | None, config: EvaluateConfig, prompts, concept_prompts,
              method: Method | None = None) -> str:
    """What a probe's w depends on (the chunking does not change it)."""
    settings = {k: v for k, v in _probe_settings(config, method).items() if k != "prompt_chunk"}
    return digest(dict(model=cache.model_id, edit=edit_id, prompts=list(prompts), guidance=config.guidance_scale,
                        probe=settings, concept=list(concept_prompts)))


def _probe(sd, edit, config: EvaluateConfig, prompts, concept_prompts, embeddings=None, method: Method | None = None,
           cache: EvaluationCache | None = None, edit_id: str | None = None):
    """The w per prompt and the probe's record; with ``cache`` (and no ``embeddings``), a probe already run on
    the same inputs is read instead of run."""
    key = None
    if cache is not None and embeddings is None:
        key = probe_key(cache, edit_id, config, prompts, concept_prompts, method)
        found = cache.record("probes", key)
        if found is not None:
            cache.work["probes_found"] += 1
            return list(found["w"]), dict(found["info"], probe_from_cache=True)
    started = time.perf_counter()
    settings = _probe_settings(config, method)
    probe = WProbe(sd, edit, ProbeConfig(**settings), concept_prompts=concept_prompts)
    result = probe.run(prompts, config.guidance_scale, prompt_embeddings=embeddings)
    info = {"D_empty": result.d_empty, "probe_seconds": round(time.perf_counter() - started, 2),
            "probe_rule": settings["rule"], "probe_timestep_mode": settings["timestep_mode"],
            "probe_threshold": result.threshold,
            "probe_unet_rows": probe.unet_calls,
            "probe": {p: dict(D=float(d), w=float(w)) for p, d, w in zip(prompts, result.d, result.w)}}
    ws = [float(w) for w in result.w]
    if key is not None:
        cache.work["probes_run"] += 1
        cache.put_record("probes", key, {"w": ws, "info": info})
    return ws, info


def oracle_ws(prompt_set: PromptSet, config: EvaluateConfig, extra: int = 0) -> list[float]:
    """The w a perfect probe gives: w_erase on the target and synonyms, w_keep on the other classes (and on the
    ``extra`` paraphrase prompts after them, which evoke the concept: w_erase)."""
    carries = [kind != "other" for _, kind, _ in prompt_set.items] + [True] * extra
    return [config.probe.w_erase if c else config.probe.w_keep for c in carries]


def rule_agreements(info: dict, prompts: list[str], oracle: list[float], config: EvaluateConfig) -> dict:
    """The share of prompts where each threshold rule, applied to this row's D(p), gives the oracle's w (paper:
    D(""); calibrated: √(D(concept) · D("")), known when the row ran that rule)."""
    d = np.asarray([info["probe"][p]["D"] for p in prompts])
    bars = {"paper": info["D_empty"]}
    if info.get("probe_threshold") is not None:
        bars["calibrated"] = info["probe_threshold"]
    return {rule: float(np.mean(weights_at(d, bar, config.probe) == np.asarray(oracle, np.float32)))
            for rule, bar in bars.items()}


def _method_ws(method: Method, config: EvaluateConfig, sd, edit, prompts: list[str],
               oracle: list[float], concept_prompts: list[str], cache: EvaluationCache | None = None,
               edit_id: str | None = None) -> tuple[list[float | None], dict]:
    info = {"w": float(method.w)} if method.mode == "fixed" else {}

    def probe():
        ws, probe_info = _probe(sd, edit, config, prompts, concept_prompts, method=method, cache=cache,
                                edit_id=edit_id)
        info.update(probe_info)
        return ws

    return weights_for(method.mode, len(prompts), fixed_w=method.w, probe=probe, oracle=oracle), info


def _attacks(sd, evaluator, prompt_set: PromptSet, concept, method: Method, edit, config: EvaluateConfig,
             x0: np.ndarray, seeds: list[int], bar: float | None, ring) -> dict[str, dict]:
    """Every attack of ``config.attack.kinds`` on the method's edit (``unguide_jax.evaluation.robustness``)."""
    probe = method.probe_of(config.probe)
    target_prompt = prompt_set.prompts[0]

    def ws_of(texts: list[str], contexts: np.ndarray):
        # The row's own mode; the oracle's w is w_erase, since every attacked prompt still asks for the concept.
        ws = weights_for(method.mode, len(texts), fixed_w=method.w, oracle=[probe.w_erase] * len(texts),
                         probe=lambda: _probe(sd, edit, config, texts, list(concept.targets),
                                              embeddings=jnp.asarray(contexts), method=method)[0])
        return None if all(w is None for w in ws) else ws

    def sample(texts: list[str], contexts: np.ndarray, w) -> np.ndarray:
        return sd.generate(texts, seeds, guidance_scale=config.guidance_scale, num_steps=config.num_steps, edit=edit,
                           w=w, fused=config.fused, prompt_embeddings=jnp.asarray(contexts)).images

    def is_erased(images: np.ndarray) -> np.ndarray:
        return evaluator.class_probabilities(np.asarray(images), prompt_set).argmax(axis=1) == prompt_set.erased

    attack = config.attack
    return run_attacks(sd, edit, method.mode, probe, bar, method.w, attack.kinds,
                       attack_settings(attack.settings, concept.kind, attack.explicit_prefix_tokens), target_prompt,
                       x0, seeds, ws_of=ws_of, is_erased=is_erased, ring=ring, sample=sample,
                       guidance_scale=config.guidance_scale, pipeline_draws=attack.pipeline_draws,
                       pipeline_temperature=attack.pipeline_temperature, label=f"{concept.name}: {method.name}")


def _attack_key(cache: EvaluationCache, edit_id: str | None, method: Method, config: EvaluateConfig,
                prompt_set: PromptSet, seeds: list[int]) -> str:
    return digest(dict(model=cache.model_id, edit=edit_id, mode=method.mode, w=method.w, rule=method.rule,
                        timestep_mode=method.timestep_mode, probe=dataclasses.asdict(method.probe_of(config.probe)),
                        attack=dataclasses.asdict(config.attack), seeds=seeds, target=prompt_set.prompts[0],
                        guidance=config.guidance_scale, steps=config.num_steps, fused=config.fused,
                        evaluator=cache.evaluator_id, classes=list(prompt_set.class_names)))


def generate_cached(sd, requests: list[ImageRequest], edit, edit_id: str | None, config: EvaluateConfig,
                     cache: EvaluationCache, desc: str) -> tuple[list[np.ndarray], list[str]]:
    """The images of ``requests`` and their cache keys: each image not in the cache is drawn once (the base
    model's images of a prompt serve every erasure, an oracle row reuses the probe row's images wherever the w
    agree) and kept as its batch finishes."""
    keys = [cache.image_key(edit_id, r) for r in requests]
    images: dict[str, np.ndarray] = {}
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in images or key in todo:
            continue
        image = cache.image(key)
        if image is None:
            todo[key] = i
        else:
            images[key] = image
    cache.work["images_found"] += len(images)
    if todo:
        todo_keys = list(todo)

        def keep(batch: list[int], batch_images: list[np.ndarray]) -> None:
            for j, image in zip(batch, batch_images):
                images[todo_keys[j]] = image
                cache.put_image(todo_keys[j], image)

        generate_images(sd, [requests[i] for i in todo.values()], batch_size=config.batch_size,
                        num_steps=config.num_steps, eta=config.eta, edit=edit, fused=config.fused, desc=desc,
                        on_batch=keep)
        cache.work["images_generated"] += len(todo)
    return [images[k] for k in keys], keys


def scores_cached(evaluator, images: list[np.ndarray], keys: list[str], prompt_set: PromptSet,
                   cache: EvaluationCache) -> tuple[np.ndarray, np.ndarray | None]:
    """The evaluator's (class, text) probabilities of ``images``; an image scored before against the same texts
    by the same evaluator is read, not scored. Fresh scores go through the record too, so that a first run and
    its rerun compute on the same float64 values."""
    kind, texts = cache.scores_kind(), cache.texts_id(prompt_set)
    todo = {}
    for i, key in enumerate(keys):
        if key not in todo and cache.record(kind, f"{key}:{texts}") is None:
            todo[key] = i
    cache.work["scores_found"] += len(set(keys)) - len(todo)
    if todo:
        class_probs, text_probs = evaluator.scores(np.stack([images[i] for i in todo.values()]), prompt_set)
        for row, key in enumerate(todo):
            cache.put_record(kind, f"{key}:{texts}", {
                "class": np.asarray(class_probs[row], np.float64).tolist(),
                "text": None if text_probs is None else np.asarray(text_probs[row], np.float64).tolist()})
        cache.work["scores_computed"] += len(todo)
    records = [cache.record(kind, f"{key}:{texts}") for key in keys]
    class_probs = np.asarray([r["class"] for r in records], np.float64)
    if any(r["text"] is None for r in records):
        return class_probs, None
    return class_probs, np.asarray([r["text"] for r in records], np.float64)


def evaluate_erasure(sd, evaluator, concept, edits_by_name: dict, config: EvaluateConfig, out_dir: Path,
                     cache: EvaluationCache | None = None, edit_keys: dict | None = None) -> dict:
    """Every method of ``config.methods`` on one erased concept; writes its PNGs and grids under out_dir.
    ``cache``: images, scores, probes and attacks already made (``EvaluationCache``; None: this call's memory);
    ``edit_keys``: edit name -> the edit's digest (``edit_digest``; by default the concept and the name)."""
    cache = EvaluationCache(None, "", config, evaluator) if cache is None else cache
    prompt_set = evaluator.prompt_set(concept)
    n = config.images_per_prompt
    owners = np.repeat(np.arange(len(prompt_set.items)), n)
    paraphrases = list(concept.paraphrases) if config.paraphrases else []
    attack_images = config.attack.images if config.attack.enabled else 0
    seeds = [config.seed + j for j in range(attack_images)]
    x0 = []  # the attack's targets, drawn when an attack first runs: the base model's images of the concept

    def attack_targets() -> np.ndarray:
        if not x0:
            x0.append(sd.generate([prompt_set.prompts[0]] * attack_images, seeds,
                                  guidance_scale=config.guidance_scale, num_steps=config.num_steps).latents)
        return x0[0]

    ring = []  # the concept's Ring-A-Bell prompts: model-agnostic, made when a row first samples them

    def ring_prompts():
        if not ring:
            ring.append(concept_ring_prompts(sd, config.attack.ring_a_bell, concept, attack_images))
        return ring[0]

    results = {}
    for method in config.method_rows():
        edit = edits_by_name[method.edit] if method.edit else None
        edit_id = None if edit is None else ((edit_keys or {}).get(method.edit) or f"{concept.name}/{method.edit}")
        started = time.perf_counter()
        prompts = prompt_set.prompts + paraphrases
        oracle = oracle_ws(prompt_set, config, len(paraphrases))
        ws, info = _method_ws(method, config, sd, edit, prompts, oracle, list(concept.targets), cache, edit_id)
        if method.mode == "unguide":  # the share of the table's prompts where the probe's w is the oracle's
            k = len(prompt_set.items)
            info["probe_agrees_with_oracle"] = float(np.mean(np.asarray(ws[:k]) == np.asarray(oracle[:k])))
            info["rules_agree_with_oracle"] = rule_agreements(info, prompt_set.prompts, oracle[:k], config)
        requests = [ImageRequest(p, config.seed + j, config.guidance_scale, ws[i])
                    for i, p in enumerate(prompts) for j in range(n)]
        images, keys = generate_cached(sd, requests, edit, edit_id, config, cache,
                                        desc=f"{concept.name}: {method.name}")
        seconds = round(time.perf_counter() - started, 2)
        class_probs, text_probs = scores_cached(evaluator, images, keys, prompt_set, cache)
        main = len(prompt_set.items) * n
        text_probs = None if text_probs is None else text_probs[:main]
        result = dict(score(prompt_set, class_probs[:main], owners, text_probs), seconds=seconds, mode=method.mode,
                      edit=method.edit, **info)
        if paraphrases:
            hits = class_probs[main:].argmax(axis=1) == prompt_set.erased
            result["paraphrase_leakage"] = float(hits.mean())
            result["paraphrase_per_prompt"] = {p: float(hits[i * n:(i + 1) * n].mean()) for i, p in enumerate(paraphrases)}
        if attack_images and edit is not None:
            key = _attack_key(cache, edit_id, method, config, prompt_set, seeds)
            attacks = cache.record("attacks", key)
            if attacks is None:
                bar = info.get("probe_threshold") if info.get("probe_threshold") is not None else info.get("D_empty")
                attacks = _attacks(sd, evaluator, prompt_set, concept, method, edit, config, attack_targets(), seeds,
                                   bar, ring_prompts)
                cache.put_record("attacks", key, attacks)
                cache.work["attacks_run"] += 1
            else:
                cache.work["attacks_found"] += 1
            before = float((class_probs[:attack_images].argmax(axis=1) == prompt_set.erased).mean())
            result["attacks"] = {kind: dict(found, before=before) for kind, found in attacks.items()}
        slug_name = slug(method.name)
        if not is_main_process():
            results[method.name] = result
            continue
        for k, (request, image, key) in enumerate(zip(requests, images, keys)):
            cache.place(key, image, out_dir / slug_name / f"{k:05d}_{slug(request.prompt)}_s{request.seed}.png")
        cols = min(n, 8)
        save_png(out_dir / f"grid_{slug_name}.png",
                 image_grid([im for i in range(len(prompts)) for im in images[i * n:i * n + cols]], cols=cols))
        results[method.name] = result
    cache.save()
    return dict(concept=concept.name, erased_class=prompt_set.class_names[prompt_set.erased], prompts=list(prompt_set.items),
                paraphrases=paraphrases, methods=results)


def average(per_concept: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        rows = [c["methods"][name] for c in per_concept]
        entry = {protocol: {key: float(np.mean([r[protocol][key] for r in rows])) for key in METRIC_KEYS}
                 for protocol in PROTOCOLS}
        if all("paraphrase_leakage" in r for r in rows):
            entry["paraphrase_leakage"] = float(np.mean([r["paraphrase_leakage"] for r in rows]))
        if all("attacks" in r for r in rows):
            for kind in rows[0]["attacks"]:
                entry[f"attack_before_{kind}"] = float(np.mean([r["attacks"][kind]["before"] for r in rows]))
                entry[f"attack_after_{kind}"] = float(np.mean([r["attacks"][kind]["success_rate"] for r in rows]))
        entry["mode"] = rows[0]["mode"]
        out[name] = entry
    return out


def format_table(summary: dict, protocol: str = "mace", deviation: dict | None = None) -> str:
    """The markdown table of ``summary``; with ``deviation`` (std over LoRA seeds) each metric reads mean ± std."""
    def cell(name: str, key: str) -> str:
        value = f"{summary[name][protocol][key]:.1%}"
        return value if deviation is None else f"{value} ± {deviation[name][protocol][key]:.1%}"

    extra = []
    if any("paraphrase_leakage" in m for m in summary.values()):
        extra.append(("paraphrases ↓", lambda m: f"{m['paraphrase_leakage']:.1%}" if "paraphrase_leakage" in m else "–"))
    kinds = [k for k in ATTACK_KINDS if any(f"attack_after_{k}" in m for m in summary.values())]
    for kind in kinds:
        extra.append((f"{ATTACK_LABELS[kind]}: before → after ↓",
                      lambda m, k=kind: f"{m[f'attack_before_{k}']:.0%} → {m[f'attack_after_{k}']:.0%}"
                      if f"attack_after_{k}" in m else "–"))
    header = "| method | Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ |" + "".join(f" {h} |" for h, _ in extra)
    lines = [header, "|---" * (5 + len(extra)) + "|"]
    for name, entry in summary.items():
        row = (f"| {name} | {cell(name, 'acc_e')} | {cell(name, 'acc_s')} | {cell(name, 'acc_g')} | "
               + ("–" if entry["mode"] == "base" else cell(name, "h_o")) + " |")
        lines.append(row + "".join(f" {fmt(entry)} |" for _, fmt in extra))
    return "\n".join(lines)


def spread(per_seed: list[dict]) -> tuple[dict, dict]:
    """The mean and the standard deviation (ddof 1; 0 for one seed) over LoRA seeds of the seeds' averages."""
    mean, std = {}, {}
    for name, first in per_seed[0].items():
        entries = [summary[name] for summary in per_seed]
        mean[name], std[name] = dict(first), {}
        for key, value in first.items():  # the optional columns (paraphrases, attack) are means too
            if isinstance(value, float):
                mean[name][key] = float(np.mean([e[key] for e in entries]))
        for protocol in PROTOCOLS:
            values = {key: [e[protocol][key] for e in entries] for key in METRIC_KEYS}
            mean[name][protocol] = {key: float(np.mean(v)) for key, v in values.items()}
            std[name][protocol] = {key: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()}
    return mean, std


def _is_shapes_concept(name: str) -> bool:
    concept = load_concept(name)
    return concept.kind == "object" and class_named_in(concept.targets[0]) is not None


WORK_KEYS = ("images_generated", "images_found", "scores_computed", "scores_found", "probes_run", "probes_found",
             "attacks_run", "attacks_found")


def _work(cache: EvaluationCache) -> dict[str, int]:
    return {key: int(cache.work[key]) for key in WORK_KEYS}


def _load_model(config):
    return load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                      config_folder=config.model_config or None).on_every_device()


def check_inputs(config: EvaluateConfig) -> None:
    """Before anything loads: the keys a preset leaves to the user are given, and the embedded shapes model and
    classifier are not asked for concepts they do not know (the sd14-table1 classes); one line saying what to
    pass otherwise."""
    check_given(config)
    wrong = [key for key in ("model", "evaluator") if getattr(config, key) == "embedded"]
    foreign = next((e.concept for e in config.erasures if not _is_shapes_concept(e.concept)), None) if wrong else None
    if foreign is not None:
        raise ConfigError(" and ".join(f"config.{key}=embedded" for key in wrong)
                          + f" know only the shapes model's ten classes, not concept {foreign!r}: pass "
                          + " ".join(GIVEN_BY_USER[key] for key in wrong))


def run_evaluation(config: EvaluateConfig | Mapping, train_runner=None) -> Path:
    """The evaluation job (``config``: an EvaluateConfig, or a dict validated into one): every erasure of
    ``config.erasures``, every method, for each of ``lora_seeds`` (or once); results.json + results.md.
    ``train_runner`` trains a missing edit (``train_missing``; default ``run_training``:
    ``unguide_jax.jobs.evaluate`` passes the train job)."""
    config = as_config(config, EvaluateConfig)
    check_inputs(config)
    methods = config.method_rows()
    out_dir = Path(config.out_dir)
    started = time.perf_counter()
    seeds = list(config.lora_seeds) or [None]
    trained = [folder for seed in seeds for folder in train_missing_edits(config, train_runner, seed)]
    sd = _load_model(config)
    check_same_config(to_dict(config), "evaluation config")
    evaluator = load_image_evaluator(config.evaluator)
    # the cache keeps the base model's images across seeds and erasures: they do not depend on the LoRA
    cache, per_seed_concepts, per_seed = open_cache(config, out_dir, evaluator), [], []
    for seed in seeds:
        erasures = seeded_erasures(config, seed)
        seed_dir = out_dir if seed is None else out_dir / f"seed{seed}"
        per_concept = []
        for erasure in erasures:
            concept = load_concept(erasure.concept)
            loaded, info, edit_keys = {}, {}, {}
            for name, sources in erasure.edits.items():
                edit, info[name] = load_edit(list(sources), sd.params["unet"])
                edit_keys[name] = edit_digest(edit)
                loaded[name] = sd.put_replicated(edit)
            result = evaluate_erasure(sd, evaluator, concept, loaded, config, seed_dir / concept.name, cache, edit_keys)
            result["edits"] = info
            per_concept.append(result)
        per_seed_concepts.append(per_concept)
        per_seed.append(average(per_concept, [m.name for m in methods]))
    summary, deviation = spread(per_seed)
    settings = {k: v for k, v in to_dict(config).items() if k != "job"}
    settings.update(versions=versions(), seconds=round(time.perf_counter() - started, 1), trained_first=trained,
                    evaluator=evaluator.name, work=_work(cache), **sd.placement())
    if not is_main_process():  # every process computed its share; one writes
        return out_dir
    record = {"settings": settings, "average": summary}
    if seeds == [None]:
        record["concepts"] = per_seed_concepts[0]
    else:
        record.update(std_over_lora_seeds=deviation, lora_seeds=[
            {"seed": seed, "average": avg, "concepts": concepts}
            for seed, avg, concepts in zip(seeds, per_seed, per_seed_concepts)])
    write_json(out_dir / "results.json", record)
    concepts = ", ".join(c["concept"] for c in per_seed_concepts[0])
    n = config.images_per_prompt
    model = "the embedded shapes model" if config.model == "embedded" else config.model
    text = [f"Erasure evaluation on {model}: {concepts}; {n} images per prompt, seeds {config.seed}+j, CFG "
            f"{config.guidance_scale}, {config.num_steps} DDIM steps; scored by the {evaluator.name}."]
    if len(seeds) > 1:
        text.append(f"Each edit trained with LoRA seeds {', '.join(map(str, seeds))}: mean ± std (ddof 1) over the "
                    "seeds of the concepts' average.")
    elif seeds != [None]:
        text.append(f"Each edit trained with LoRA seed {seeds[0]}.")
    work = settings["work"]
    text.append(f"This run generated {work['images_generated']} images and reused {work['images_found']} (from "
                f"{out_dir / CACHE_FOLDER} or an earlier row), scored {work['scores_computed']} (reused "
                f"{work['scores_found']}), ran {work['probes_run']} probes (reused {work['probes_found']}).")
    text.append("")
    for protocol in PROTOCOLS:
        table = format_table(summary, protocol, deviation if len(seeds) > 1 else None)  # one seed: no spread
        text += [f"Protocol: {protocol}", "", table, ""]
    (out_dir / "results.md").write_text("\n".join(text))
    return out_dir


def plan_evaluation(config: EvaluateConfig | Mapping, measure: bool = True) -> Plan:
    """The job's dry run (``unguide_jax.evaluation.plan``): per method, the images it would generate and those
    already in the cache (or made earlier in the run), their UNet calls and rows, the probes still to run, the
    evaluator calls; the runs to train first; with ``measure``, one UNet step and one evaluator call timed here.
    Loads the model, the evaluator and the edits that exist; generates, scores and trains nothing. An unguide
    row whose probe has not run yet has no w, so its images count as all to make (an upper bound)."""
    config = as_config(config, EvaluateConfig)
    check_inputs(config)
    methods = config.method_rows()
    seeds = list(config.lora_seeds) or [None]
    trainings = [planned_training(f"{name} for {erasure.concept}{seed_label(train_config)}",
                                  config.train_missing[name], train_config)
                 for seed in seeds for name, erasure, _, train_config in missing_edits(config, seed)]
    sd = _load_model(config)
    evaluator = load_image_evaluator(config.evaluator)
    cache = open_cache(config, Path(config.out_dir), evaluator)
    batch = padded_rows(config.batch_size, sd.mesh)
    stages = {m.name: Stage(m.name, steps=config.num_steps, batch=batch,
                            branches=4 if m.mode in ("unguide", "fixed", "oracle") else 2,
                            calls_per_step=2 if m.mode in ("unguide", "fixed", "oracle") and not config.fused else 1)
              for m in methods}
    made, scored = set(), set()  # what the run would have made and scored by then
    prompt_set = None
    for seed in seeds:
        for erasure in seeded_erasures(config, seed):
            concept = load_concept(erasure.concept)
            prompt_set = evaluator.prompt_set(concept)
            prompts = prompt_set.prompts + (list(concept.paraphrases) if config.paraphrases else [])
            texts = cache.texts_id(prompt_set)
            edit_ids = {}
            for name, sources in erasure.edits.items():
                if name in config.train_missing and run_is_missing(sources[0]):
                    edit_ids[name] = None  # trained first: nothing of it can be in the cache yet
                else:
                    edit_ids[name] = edit_digest(load_edit(list(sources), sd.params["unet"])[0])
            oracle = oracle_ws(prompt_set, config, len(prompts) - len(prompt_set.prompts))
            for method in methods:
                stage, known = stages[method.name], True
                edit_id = edit_ids[method.edit] if method.edit else None
                if method.mode == "unguide":
                    settings = _probe_settings(config, method)
                    found = None if edit_id is None else cache.record("probes", probe_key(
                        cache, edit_id, config, prompts, concept.targets, method))
                    if found is None:
                        known = False
                        references = 1 + (len(concept.targets) if settings["rule"] == "calibrated" else 0)
                        stage.probe_rows += probe_unet_rows(ProbeConfig(**settings), len(prompts), references,
                                                            sd.mesh)
                    else:
                        stage.probes_found += 1
                        ws = found["w"]
                else:
                    ws = weights_for(method.mode, len(prompts), fixed_w=method.w, probe=None, oracle=oracle)
                known = known and not (method.edit and edit_id is None)
                todo = 0
                for i, prompt in enumerate(prompts):
                    for j in range(config.images_per_prompt):
                        if not known:
                            todo += 1
                            stage.scores += 1
                            continue
                        key = cache.image_key(edit_id, ImageRequest(prompt, config.seed + j, config.guidance_scale,
                                                                    ws[i]))
                        if key in made or cache.has_image(key):
                            stage.found += 1
                        else:
                            todo += 1
                        made.add(key)
                        if (key, texts) in scored or cache.has_scores(key, texts):
                            stage.scores_found += 1
                        else:
                            stage.scores += 1
                        scored.add((key, texts))
                stage.add_images(todo)
    timing = None
    if measure:
        timing = measure_unet_step(sd, config.batch_size)
        timing = measure_evaluator(timing, evaluator, prompt_set, sd.default_size)
    concepts = ", ".join(e.concept for e in config.erasures)
    notes = []
    if config.attack.enabled:
        notes.append(f"Not counted: the attacks ({', '.join(config.attack.kinds)}; {config.attack.images} images per "
                     f"edit row, {config.attack.settings.iterations} iterations each) where their result is not "
                     "cached.")
    summary = (f"{len(config.erasures)} erasure(s) ({concepts}) × {len(methods)} method(s)"
               + (f" × {len(seeds)} LoRA seeds" if seeds != [None] else "")
               + f"; {config.images_per_prompt} images per prompt, {config.num_steps} DDIM steps, batches of "
               f"{config.batch_size}; out_dir {config.out_dir} (cache: {CACHE_FOLDER}/).")
    return Plan(job="evaluate", summary=summary, stages=list(stages.values()), trainings=trainings, timing=timing,
                evaluator="CLIP" if getattr(evaluator, "clip", None) is not None else "classifier", notes=notes)
