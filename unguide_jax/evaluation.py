"""Object-erasure evaluation (spec unguide.md §6) on the embedded shapes model, as one command.

Per erased concept: N images for the target prompt, each synonym and each other class prompt, image j
of every prompt with seed ``seed + j`` (paired across prompts and methods). The shipped shapes
classifier scores every image; per method (base, adapter only, UnGuide, fixed w):

    Acc_e  target-prompt images recognised as the erased class          (lower is better)
    Acc_s  other-class images recognised as their own class             (higher is better)
    Acc_g  synonym images recognised as the erased class                (lower is better)
    H_o    3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))

Two scoring protocols:
    mace       top-1 among the 10 class names, synonyms credited to their base class (the comparable
               default, as MACE and the paper's Table 1);
    reference  the reference code's: a softmax over all the prompt texts (target, synonyms, others).
               Our classifier scores classes, not wordings, so each text's logit is its class's logit;
               the four texts of the erased class then carry 4·p_e of the mass, and an image scores the
               mass of its class's texts (a probability, not a top-1 hit).
Averages over several concepts are means of the per-concept values.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .data import shapes
from .generation import ImageRequest, generate_images
from .outputs import image_grid, save_png, slug
from .weights import write_json

METHODS = ("base", "adapter", "unguide", "fixed")
PROTOCOLS = ("mace", "reference")
METRIC_KEYS = ("acc_e", "acc_s", "acc_g", "h_o")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The evaluation prompts of one erased class: (prompt, kind, class index)."""

    erased: int
    items: tuple[tuple[str, str, int], ...]

    @classmethod
    def from_concept(cls, concept) -> "PromptSet":
        erased = shapes.class_named_in(concept.targets[0])
        if erased is None or concept.kind != "object":
            raise ValueError(f"concept {concept.name!r}: the evaluation scores object concepts of the shapes model "
                             f"(a target naming one of {list(shapes.CLASSES)})")
        items = [(concept.targets[0], "target", erased)]
        items += [(p, "synonym", erased) for p in concept.synonyms]
        for prompt in concept.other:
            if not prompt:
                continue  # "" serves the probe, not the evaluation
            label = shapes.class_named_in(prompt)
            if label is None:
                raise ValueError(f"concept {concept.name!r}: other prompt {prompt!r} names no shapes class")
            items.append((prompt, "other", label))
        return cls(erased, tuple(items))

    @property
    def prompts(self) -> list[str]:
        return [p for p, _, _ in self.items]


def harmonic_overall(acc_e: float, acc_s: float, acc_g: float) -> float:
    terms = (1 - acc_e, acc_s, 1 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / x for x in terms)


def score(prompt_set: PromptSet, class_probs: np.ndarray, owners: np.ndarray) -> dict[str, dict]:
    """Acc_e / Acc_s / Acc_g / H_o under both protocols; class_probs (n_images, 10), owners: prompt index per image."""
    kinds = np.asarray([k for _, k, _ in prompt_set.items])
    labels = np.asarray([c for _, _, c in prompt_set.items])
    texts_per_class = np.bincount(labels, minlength=class_probs.shape[1]).astype(np.float64)
    weighted = class_probs * texts_per_class
    text_mass = weighted / weighted.sum(axis=1, keepdims=True)  # the 13-way softmax, summed over a class's texts
    per_image = {
        "mace": (class_probs.argmax(axis=1) == labels[owners]).astype(np.float64),
        "reference": text_mass[np.arange(len(owners)), labels[owners]],
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


def _method_ws(method: str, config: dict, sd, edit, prompts: list[str]) -> tuple[list[float | None], dict]:
    if method in ("base", "adapter"):
        return [None] * len(prompts), {}
    if method == "fixed":
        return [float(config["w"])] * len(prompts), {"w": float(config["w"])}
    from .unguide.probe import ProbeConfig, WProbe

    started = time.perf_counter()
    probe = WProbe(sd, edit, ProbeConfig(**config["probe"]))
    result = probe.run(prompts, config["guidance_scale"])
    info = {"D_empty": result.d_empty, "probe_seconds": round(time.perf_counter() - started, 2),
            "probe_unet_rows": probe.unet_calls,
            "probe": {p: dict(D=float(d), w=float(w)) for p, d, w in zip(prompts, result.d, result.w)}}
    return [float(w) for w in result.w], info


def evaluate_erasure(sd, evaluator, concept, edit, config: dict, out_dir: Path) -> dict:
    """Every method of ``config["methods"]`` on one erased concept; writes its PNGs and grids under out_dir."""
    prompt_set = PromptSet.from_concept(concept)
    n = int(config["images_per_prompt"])
    owners = np.repeat(np.arange(len(prompt_set.items)), n)
    results = {}
    for method in config["methods"]:
        if method not in METHODS:
            raise ValueError(f"unknown evaluation method {method!r}; known: {METHODS}")
        started = time.perf_counter()
        ws, info = _method_ws(method, config, sd, edit, prompt_set.prompts)
        requests = [ImageRequest(p, int(config["seed"]) + j, float(config["guidance_scale"]), ws[i])
                    for i, p in enumerate(prompt_set.prompts) for j in range(n)]
        images = generate_images(sd, requests, batch_size=int(config["batch_size"]), num_steps=int(config["num_steps"]),
                                 eta=float(config["eta"]), edit=None if method == "base" else edit,
                                 fused=bool(config["fused"]), desc=f"{concept.name}: {method}")
        seconds = round(time.perf_counter() - started, 2)
        class_probs, _ = evaluator.probabilities(np.stack(images))
        method_dir = out_dir / method
        for k, (request, image) in enumerate(zip(requests, images)):
            save_png(method_dir / f"{k:05d}_{slug(request.prompt)}_s{request.seed}.png", image)
        cols = min(n, 8)
        save_png(out_dir / f"grid_{method}.png",
                 image_grid([im for i in range(len(prompt_set.items)) for im in images[i * n:i * n + cols]], cols=cols))
        results[method] = dict(score(prompt_set, class_probs, owners), seconds=seconds, **info)
    return dict(concept=concept.name, erased_class=shapes.CLASSES[prompt_set.erased], prompts=list(prompt_set.items),
                methods=results)


def average(per_concept: list[dict], methods: list[str]) -> dict:
    out = {}
    for method in methods:
        out[method] = {protocol: {key: float(np.mean([c["methods"][method][protocol][key] for c in per_concept]))
                                  for key in METRIC_KEYS} for protocol in PROTOCOLS}
    return out


METHOD_NAMES = {"base": "base model", "adapter": "adapter only (LoRA)", "unguide": "UnGuide (probe w)",
                "fixed": "fixed w"}


def format_table(summary: dict, protocol: str = "mace") -> str:
    lines = [f"| method | Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ |", "|---|---|---|---|---|"]
    for method, by_protocol in summary.items():
        m = by_protocol[protocol]
        lines.append(f"| {METHOD_NAMES[method]} | {m['acc_e']:.1%} | {m['acc_s']:.1%} | {m['acc_g']:.1%} | "
                     + ("–" if method == "base" else f"{m['h_o']:.1%}") + " |")
    return "\n".join(lines)


def run_evaluation(config: dict) -> Path:
    """The evaluation job: every erasure of ``config["erasures"]``, every method; results.json + results.md."""
    from .adapter_sources import load_edit
    from .embedded import load_evaluator, resolve_model_path
    from .loading import load_pipeline
    from .sample_job import _dtype, versions
    from .unguide.concepts import load_concept

    if config["evaluator"] != "embedded":
        raise ValueError(f"unknown evaluator {config['evaluator']!r}: the only one is 'embedded' (the shapes classifier)")
    unknown = [m for m in config["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown evaluation methods {unknown}; known: {list(METHODS)}")
    if not config["erasures"]:
        raise ValueError("config.erasures is empty: give [{concept: ..., adapters: [...]}, ...]")
    out_dir = Path(config["out_dir"])
    started = time.perf_counter()
    sd = load_pipeline(resolve_model_path(config["model"]), dtype=_dtype(config["dtype"]))
    evaluator = load_evaluator()
    cases = []
    for erasure in config["erasures"]:
        unknown_keys = sorted(set(erasure) - {"concept", "adapters"})
        if unknown_keys:
            raise ValueError(f"unknown keys {unknown_keys} in an erasure of config.erasures (known: concept, adapters)")
        concept = load_concept(erasure["concept"])
        edit, adapter_info = load_edit(list(erasure.get("adapters", [])), sd.params["unet"])
        if edit is None and any(m != "base" for m in config["methods"]):
            raise ValueError(f"erasure of {concept.name!r} has no adapters: methods other than base need one")
        cases.append((concept, edit, adapter_info))
    per_concept = []
    for concept, edit, adapter_info in cases:
        result = evaluate_erasure(sd, evaluator, concept, edit, config, out_dir / concept.name)
        result["adapters"] = adapter_info
        per_concept.append(result)
    summary = average(per_concept, list(config["methods"]))
    settings = {k: v for k, v in config.items()}
    settings.update(versions=versions(), seconds=round(time.perf_counter() - started, 1),
                    evaluator="embedded shapes classifier (unguide_jax/assets/shapes-classifier)")
    write_json(out_dir / "results.json", {"settings": settings, "average": summary, "concepts": per_concept})
    concepts = ", ".join(c["concept"] for c in per_concept)
    n = config["images_per_prompt"]
    text = [f"Erasure evaluation on the embedded shapes model: {concepts}; {n} images per prompt, seeds "
            f"{config['seed']}+j, CFG {config['guidance_scale']}, {config['num_steps']} DDIM steps.", ""]
    for protocol in PROTOCOLS:
        text += [f"Protocol: {protocol}", "", format_table(summary, protocol), ""]
    (out_dir / "results.md").write_text("\n".join(text))
    return out_dir
