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
    attack       a prefix-token attack on each edit (``unguide_jax.evaluation.attack``), one target image per
                 seed: how often the erased class comes back, before → after the attack
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.batching import ImageRequest, generate_images
from unguide_jax.diffusion.images import image_grid, save_png, slug, versions
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.unguide.modes import weights_for
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe, weights_at
from unguide_jax.evaluation.attack import (
    AttackConfig,
    attacked_context,
    prefixed_ids,
    run_attack,
)
from unguide_jax.evaluation.config import EvaluateConfig, Method
from unguide_jax.evaluation.evaluators import PromptSet, load_image_evaluator
from unguide_jax.json_files import write_json
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.hosts import check_same_config, is_main_process
from unguide_jax.settings import as_config, to_dict
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


def _probe(sd, edit, config: EvaluateConfig, prompts, concept_prompts, embeddings=None, rule: str = "",
           timestep_mode: str = ""):
    started = time.perf_counter()
    settings = dict(dataclasses.asdict(config.probe), rule=rule or config.probe.rule,
                    timestep_mode=timestep_mode or config.probe.timestep_mode)
    probe = WProbe(sd, edit, ProbeConfig(**settings), concept_prompts=concept_prompts)
    result = probe.run(prompts, config.guidance_scale, prompt_embeddings=embeddings)
    info = {"D_empty": result.d_empty, "probe_seconds": round(time.perf_counter() - started, 2),
            "probe_rule": settings["rule"], "probe_timestep_mode": settings["timestep_mode"],
            "probe_threshold": result.threshold,
            "probe_unet_rows": probe.unet_calls,
            "probe": {p: dict(D=float(d), w=float(w)) for p, d, w in zip(prompts, result.d, result.w)}}
    return [float(w) for w in result.w], info


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
               oracle: list[float], concept_prompts: list[str]) -> tuple[list[float | None], dict]:
    info = {"w": float(method.w)} if method.mode == "fixed" else {}

    def probe():
        ws, probe_info = _probe(sd, edit, config, prompts, concept_prompts, rule=method.rule,
                                timestep_mode=method.timestep_mode)
        info.update(probe_info)
        return ws

    return weights_for(method.mode, len(prompts), fixed_w=method.w, probe=probe, oracle=oracle), info


def _attack(sd, evaluator, prompt_set: PromptSet, method: Method, edit, config: EvaluateConfig,
            x0: np.ndarray, seeds: list[int]) -> dict:
    """The prefix attack on the method's edit, one target image per seed; success = the erased class is back."""
    attack = AttackConfig(**dataclasses.asdict(config.attack.settings))
    erased, target_prompt = prompt_set.erased, prompt_set.prompts[0]
    started = time.perf_counter()
    ids = jnp.asarray(prefixed_ids(sd, target_prompt, attack.prefix_tokens))
    contexts, texts = [], []
    for j, seed in enumerate(seeds):
        adv_ids, prefix, _ = run_attack(sd.unet, sd.text_encoder, sd.scheduler, attack, sd.params["unet"],
                                        sd.params["text_encoder"], edit, ids, jnp.asarray(x0[j:j + 1]),
                                        jax.random.key(attack.seed + seed))
        contexts.append(attacked_context(sd, adv_ids, prefix, attack)[0])
        texts.append(sd.tokenizer.decode([int(i) for i in adv_ids if int(i) not in sd.tokenizer.all_special_ids]))
    contexts = jnp.stack(contexts)
    w = None
    if method.mode == "unguide":
        w, _ = _probe(sd, edit, config, texts, [target_prompt], embeddings=contexts, rule=method.rule,
                      timestep_mode=method.timestep_mode)
    elif method.mode == "fixed":
        w = [float(method.w)] * len(seeds)
    elif method.mode == "oracle":  # the attacked prompts still ask for the erased concept
        w = [float(config.probe.w_erase)] * len(seeds)
    images = sd.generate(texts, seeds, guidance_scale=config.guidance_scale, num_steps=config.num_steps, edit=edit,
                         w=w, fused=config.fused, prompt_embeddings=contexts).images
    predicted = evaluator.class_probabilities(np.asarray(images), prompt_set).argmax(axis=1)
    return dict(success_rate=float(np.mean(predicted == erased)), prompts=texts,
                seconds=round(time.perf_counter() - started, 2), settings=dataclasses.asdict(attack))


def _generate_cached(sd, requests: list[ImageRequest], edit, edit_key, config: EvaluateConfig, cache: dict,
                     desc: str) -> list[np.ndarray]:
    """The images of ``requests``, each (edit, prompt, seed, guidance, w) drawn once per run: the base model's
    images of a prompt serve every erasure, and an oracle row reuses the probe row's images wherever the w agree."""
    keys = [(edit_key, r.prompt, r.seed, r.guidance_scale, r.w) for r in requests]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        images = generate_images(sd, [requests[i] for i in todo], batch_size=config.batch_size,
                                 num_steps=config.num_steps, eta=config.eta, edit=edit, fused=config.fused, desc=desc)
        cache.update({keys[i]: image for i, image in zip(todo, images)})
    return [cache[k] for k in keys]


def evaluate_erasure(sd, evaluator, concept, edits_by_name: dict, config: EvaluateConfig, out_dir: Path,
                     cache: dict | None = None, edit_keys: dict | None = None) -> dict:
    """Every method of ``config.methods`` on one erased concept; writes its PNGs and grids under out_dir.
    ``cache``: images already drawn in this run (``_generate_cached``); ``edit_keys``: edit name -> what identifies
    the edit in that cache (its sources)."""
    cache = {} if cache is None else cache
    prompt_set = evaluator.prompt_set(concept)
    n = config.images_per_prompt
    owners = np.repeat(np.arange(len(prompt_set.items)), n)
    paraphrases = list(concept.paraphrases) if config.paraphrases else []
    attack_images = config.attack.images if config.attack.enabled else 0
    x0 = None
    if attack_images:  # the attack's targets: the base model's own images of the concept, its latents
        seeds = [config.seed + j for j in range(attack_images)]
        x0 = sd.generate([prompt_set.prompts[0]] * attack_images, seeds, guidance_scale=config.guidance_scale,
                         num_steps=config.num_steps).latents
    results = {}
    for method in config.method_rows():
        edit = edits_by_name[method.edit] if method.edit else None
        started = time.perf_counter()
        prompts = prompt_set.prompts + paraphrases
        oracle = oracle_ws(prompt_set, config, len(paraphrases))
        ws, info = _method_ws(method, config, sd, edit, prompts, oracle, list(concept.targets))
        if method.mode == "unguide":  # the share of the table's prompts where the probe's w is the oracle's
            k = len(prompt_set.items)
            info["probe_agrees_with_oracle"] = float(np.mean(np.asarray(ws[:k]) == np.asarray(oracle[:k])))
            info["rules_agree_with_oracle"] = rule_agreements(info, prompt_set.prompts, oracle[:k], config)
        requests = [ImageRequest(p, config.seed + j, config.guidance_scale, ws[i])
                    for i, p in enumerate(prompts) for j in range(n)]
        edit_key = None if edit is None else ((edit_keys or {}).get(method.edit) or (concept.name, method.edit))
        images = _generate_cached(sd, requests, edit, edit_key, config, cache, desc=f"{concept.name}: {method.name}")
        seconds = round(time.perf_counter() - started, 2)
        class_probs, text_probs = evaluator.scores(np.stack(images), prompt_set)
        main = len(prompt_set.items) * n
        text_probs = None if text_probs is None else text_probs[:main]
        result = dict(score(prompt_set, class_probs[:main], owners, text_probs), seconds=seconds, mode=method.mode,
                      edit=method.edit, **info)
        if paraphrases:
            hits = class_probs[main:].argmax(axis=1) == prompt_set.erased
            result["paraphrase_leakage"] = float(hits.mean())
            result["paraphrase_per_prompt"] = {p: float(hits[i * n:(i + 1) * n].mean()) for i, p in enumerate(paraphrases)}
        if attack_images and edit is not None:
            result["attack"] = _attack(sd, evaluator, prompt_set, method, edit, config, x0, seeds)
            result["attack"]["before"] = float((class_probs[:attack_images].argmax(axis=1) == prompt_set.erased).mean())
        slug_name = slug(method.name)
        if not is_main_process():
            results[method.name] = result
            continue
        for k, (request, image) in enumerate(zip(requests, images)):
            save_png(out_dir / slug_name / f"{k:05d}_{slug(request.prompt)}_s{request.seed}.png", image)
        cols = min(n, 8)
        save_png(out_dir / f"grid_{slug_name}.png",
                 image_grid([im for i in range(len(prompts)) for im in images[i * n:i * n + cols]], cols=cols))
        results[method.name] = result
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
        if all("attack" in r for r in rows):
            entry["attack_before"] = float(np.mean([r["attack"]["before"] for r in rows]))
            entry["attack_after"] = float(np.mean([r["attack"]["success_rate"] for r in rows]))
        entry["mode"] = rows[0]["mode"]
        out[name] = entry
    return out


def format_table(summary: dict, protocol: str = "mace") -> str:
    extra = []
    if any("paraphrase_leakage" in m for m in summary.values()):
        extra.append(("paraphrases ↓", lambda m: f"{m['paraphrase_leakage']:.1%}" if "paraphrase_leakage" in m else "–"))
    if any("attack_after" in m for m in summary.values()):
        extra.append(("attack: before → after ↓", lambda m: f"{m['attack_before']:.0%} → {m['attack_after']:.0%}"
                      if "attack_after" in m else "–"))
    header = "| method | Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ |" + "".join(f" {h} |" for h, _ in extra)
    lines = [header, "|---" * (5 + len(extra)) + "|"]
    for name, entry in summary.items():
        m = entry[protocol]
        row = (f"| {name} | {m['acc_e']:.1%} | {m['acc_s']:.1%} | {m['acc_g']:.1%} | "
               + ("–" if entry["mode"] == "base" else f"{m['h_o']:.1%}") + " |")
        lines.append(row + "".join(f" {fmt(entry)} |" for _, fmt in extra))
    return "\n".join(lines)


def train_missing_edits(config: EvaluateConfig, train_runner=None) -> list[str]:
    """Train every ``train_missing`` edit whose run folder is missing (its train config, the erasure's concept,
    the evaluated model); returns the folders trained. ``train_runner``: ``run_training`` unless given."""
    from unguide_jax.presets import load_config_file
    from unguide_jax.training.run import run_training

    train_runner = train_runner or (lambda c: run_training(c, progress=False))

    trained = []
    for erasure in config.erasures:
        for name, spec in config.train_missing.items():
            run_dir = Path(erasure.edits[name][0])
            if (run_dir / "config.json").is_file() and any(run_dir.glob("*.safetensors")):
                continue
            # Trained on the model under evaluation, whatever model the train config names.
            train_config = dict(load_config_file(spec), concept=erasure.concept, run_dir=str(run_dir), overwrite=True,
                                model=config.model, variant=config.variant, revision=config.revision,
                                model_config=config.model_config)
            if is_main_process():
                print(f"training {name} for {erasure.concept}: {spec} -> {run_dir}", flush=True)
            train_runner(train_config)
            trained.append(str(run_dir))
    return trained


def run_evaluation(config: EvaluateConfig | Mapping, train_runner=None) -> Path:
    """The evaluation job (``config``: an EvaluateConfig, or a dict validated into one): every erasure of
    ``config.erasures``, every method; results.json + results.md. ``train_runner`` trains a missing edit
    (``train_missing``; default ``run_training``: ``unguide_jax.jobs.evaluate`` passes the train job)."""
    config = as_config(config, EvaluateConfig)
    methods = config.method_rows()
    out_dir = Path(config.out_dir)
    started = time.perf_counter()
    trained = train_missing_edits(config, train_runner)
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    check_same_config(to_dict(config), "evaluation config")
    evaluator = load_image_evaluator(config.evaluator)
    cases = []
    for erasure in config.erasures:
        concept = load_concept(erasure.concept)
        loaded, info = {}, {}
        for name, sources in erasure.edits.items():
            edit, info[name] = load_edit(list(sources), sd.params["unet"])
            loaded[name] = sd.put_replicated(edit)
        cases.append((concept, loaded, info))
    per_concept, cache = [], {}
    for (concept, loaded, info), erasure in zip(cases, config.erasures):
        edit_keys = {name: tuple(sources) for name, sources in erasure.edits.items()}
        result = evaluate_erasure(sd, evaluator, concept, loaded, config, out_dir / concept.name, cache, edit_keys)
        result["edits"] = info
        per_concept.append(result)
    summary = average(per_concept, [m.name for m in methods])
    settings = {k: v for k, v in to_dict(config).items() if k != "job"}
    settings.update(versions=versions(), seconds=round(time.perf_counter() - started, 1), trained_first=trained,
                    evaluator=evaluator.name, **sd.placement())
    if not is_main_process():  # every process computed its share; one writes
        return out_dir
    write_json(out_dir / "results.json", {"settings": settings, "average": summary, "concepts": per_concept})
    concepts = ", ".join(c["concept"] for c in per_concept)
    n = config.images_per_prompt
    model = "the embedded shapes model" if config.model == "embedded" else config.model
    text = [f"Erasure evaluation on {model}: {concepts}; {n} images per prompt, seeds {config.seed}+j, CFG "
            f"{config.guidance_scale}, {config.num_steps} DDIM steps; scored by the {evaluator.name}.", ""]
    for protocol in PROTOCOLS:
        text += [f"Protocol: {protocol}", "", format_table(summary, protocol), ""]
    (out_dir / "results.md").write_text("\n".join(text))
    return out_dir
