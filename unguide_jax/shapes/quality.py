"""The quality gate of the embedded model: does it draw what the prompt names?

Class prompts "a photo of the {class}" and synonym prompts "a photo of the {synonym}" are scored by
the evaluator's class head (accuracy = fraction of images classified as the prompted class); style
prompts "a photo of the {style} {class}" are scored by its style head.
"""
from __future__ import annotations

import time

import numpy as np

from unguide_jax.diffusion.batching import ImageRequest, generate_images
from unguide_jax.diffusion.images import image_grid
from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.shapes import data as shapes
from unguide_jax.shapes.classifier import Classifier


def article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def gate_prompts() -> list[dict]:
    """Every prompt of the gate with what it should show: kind, class index and, for style prompts, style index."""
    out = [dict(kind="class", prompt=f"a photo of the {c}", label=i, style=None) for i, c in enumerate(shapes.CLASSES)]
    out += [dict(kind="synonym", prompt=f"a photo of the {s}", label=i, style=None)
            for i, c in enumerate(shapes.CLASSES) for s in shapes.SYNONYMS[c]]
    out += [dict(kind="style", prompt=f"a photo of the {st} {c}", label=i, style=j)
            for j, st in enumerate(shapes.STYLES) for i, c in enumerate(shapes.CLASSES)]
    return out


def run_quality_gate(sd: StableDiffusion, evaluator: Classifier, *, images_per_prompt: int, style_images_per_prompt: int,
                     num_steps: int, guidance_scale: float, seed: int, batch_size: int) -> tuple[dict, np.ndarray]:
    """Generate, classify, and summarise; returns (metrics, a grid of the class prompts)."""
    started = time.perf_counter()
    items = gate_prompts()
    prompts, seeds, owners = [], [], []
    for k, item in enumerate(items):
        n = style_images_per_prompt if item["kind"] == "style" else images_per_prompt
        prompts += [item["prompt"]] * n
        seeds += [seed + j for j in range(n)]
        owners += [k] * n
    requests = [ImageRequest(p, s, guidance_scale) for p, s in zip(prompts, seeds)]
    images = np.stack(generate_images(sd, requests, batch_size=batch_size, num_steps=num_steps, desc="quality gate"))
    pred_class, pred_style = evaluator.predict(images)
    owners = np.asarray(owners)
    per_prompt = []
    for k, item in enumerate(items):
        mine = owners == k
        # what was drawn instead: how many images the evaluator put in each class, in shapes.CLASSES order
        counts = np.bincount(pred_class[mine], minlength=len(shapes.CLASSES))
        row = dict(item, images=int(mine.sum()), class_accuracy=float(counts[item["label"]] / mine.sum()),
                   predicted_class_counts=counts.tolist())
        if item["style"] is not None:
            row["style_accuracy"] = float((pred_style[mine] == item["style"]).mean())
        per_prompt.append(row)

    def mean_of(kind, field):
        return float(np.mean([r[field] for r in per_prompt if r["kind"] == kind]))

    metrics = {
        "class_prompt_accuracy": mean_of("class", "class_accuracy"),
        "synonym_prompt_accuracy": mean_of("synonym", "class_accuracy"),
        "style_prompt_style_accuracy": mean_of("style", "style_accuracy"),
        "style_prompt_class_accuracy": mean_of("style", "class_accuracy"),
        "per_style_accuracy": {st: float(np.mean([r["style_accuracy"] for r in per_prompt if r["style"] == j]))
                               for j, st in enumerate(shapes.STYLES)},
        "settings": dict(images_per_prompt=images_per_prompt, style_images_per_prompt=style_images_per_prompt,
                         num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, scheduler="DDIM", eta=0.0),
        "seconds": round(time.perf_counter() - started, 1),
        "per_prompt": per_prompt,
    }
    cols = min(8, images_per_prompt)
    class_rows = [images[owners == k][:cols] for k, item in enumerate(items) if item["kind"] == "class"]
    grid = image_grid(list(np.concatenate(class_rows)), cols=cols)
    return metrics, grid


def format_quality_table(metrics: dict) -> str:
    lines = ["| prompt set | accuracy |", "|---|---|",
             f"| class prompts \"a photo of the X\" (class head) | {metrics['class_prompt_accuracy']:.1%} |",
             f"| synonym prompts (class head) | {metrics['synonym_prompt_accuracy']:.1%} |",
             f"| style prompts \"a photo of the S X\" (style head) | {metrics['style_prompt_style_accuracy']:.1%} |",
             f"| style prompts (class head) | {metrics['style_prompt_class_accuracy']:.1%} |"]
    lines += [f"| style = {st} (style head) | {acc:.1%} |" for st, acc in metrics["per_style_accuracy"].items()]
    return "\n".join(lines + ["", format_class_confusion(metrics)])


def format_class_confusion(metrics: dict) -> str:
    """Rows: the class a class prompt names; columns: the class the evaluator saw, as % of that prompt's images."""
    lines = ["| prompted ↓, seen → | " + " | ".join(shapes.CLASSES) + " |", "|---" * (len(shapes.CLASSES) + 1) + "|"]
    for r in (r for r in metrics["per_prompt"] if r["kind"] == "class"):
        percents = [f"{100 * n / r['images']:.0f}" if n else "" for n in r["predicted_class_counts"]]
        percents[r["label"]] = f"**{percents[r['label']] or 0}**"
        lines.append(f"| {shapes.CLASSES[r['label']]} | " + " | ".join(percents) + " |")
    return "\n".join(lines)
