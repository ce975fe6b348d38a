"""Where the prefix attack's prompts land on the probe's scale, at more than one timestep.

For one erased class of the embedded model: the prefix-token attack (``evaluation.attack.prefix_attack``, against the
LoRA alone) on 8 target images, then the probe's D(p) of the attacked prompts beside D of the table's own prompts
(the erased class and its synonyms; the other classes) and D(""), with the probe's trajectory stopped at several
t_enc (40 of 50 steps: the default, t ≈ 800; 30: t ≈ 600; 20: t ≈ 400). A rule that separates the attacked prompts
from the other classes at some timestep could flag them; this prints whether any does (docs/results.md, "UnGuide
under attack"). Ends with a JSON line.

python bench/bench_probe_under_attack.py [--concept shapes-arrow] [--run runs/unguide-shapes-arrow] [--draws 10]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="shapes-arrow")
    parser.add_argument("--run", default="runs/unguide-shapes-arrow", help="the UnGuide run folder (its LoRA)")
    parser.add_argument("--draws", type=int, default=10, help="probe draws R per prompt")
    parser.add_argument("--images", type=int, default=8, help="attacked target images (seeds 2024 + j)")
    parser.add_argument("--t-enc", type=int, nargs="+", default=[40, 30, 20])
    args = parser.parse_args(argv)

    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
    from unguide_jax.evaluation.attack import AttackConfig, prefix_attack
    from unguide_jax.evaluation.evaluators import load_image_evaluator
    from unguide_jax.loading.resolve import load_model
    from unguide_jax.training.sources import load_edit

    started = time.perf_counter()
    sd = load_model("embedded").on_every_device()
    edit, _ = load_edit(args.run, sd.params["unet"])
    concept = load_concept(args.concept)
    prompt_set = load_image_evaluator("embedded").prompt_set(concept)
    target = prompt_set.prompts[0]
    seeds = [2024 + j for j in range(args.images)]
    x0 = sd.generate([target] * len(seeds), seeds, guidance_scale=7.5, num_steps=50).latents
    attacked = prefix_attack(sd, sd.put_replicated(edit), AttackConfig(), target, x0, seeds)
    kinds = np.asarray([kind for _, kind, _ in prompt_set.items])
    rows = []
    print(f"{args.concept}: the prefix attack's {len(seeds)} prompts against the table's, D at each t_enc "
          f"(R = {args.draws})")
    print("| t_enc | D(\"\") | threshold | erased class and synonyms | other classes (min–max) | attacked (min–max) | "
          "attacked above the other classes' max |")
    print("|---|---|---|---|---|---|---|")
    for t_enc in args.t_enc:
        probe = WProbe(sd, edit, ProbeConfig(draws=args.draws, t_enc=t_enc, prompt_chunk=16),
                       concept_prompts=list(concept.targets))
        table = probe.run(prompt_set.prompts, 7.5)
        adv = probe.run(attacked.texts, 7.5, prompt_embeddings=attacked.contexts)
        concept_d = table.d[kinds != "other"]
        other_d = table.d[kinds == "other"]
        above = int(np.sum(adv.d > other_d.max()))
        rows.append(dict(t_enc=t_enc, d_empty=table.d_empty, threshold=table.threshold,
                         concept=[float(v) for v in concept_d], other=[float(v) for v in other_d],
                         attacked=[float(v) for v in adv.d], attacked_above_other_max=above))
        print(f"| {t_enc} | {table.d_empty:.2f} | {table.threshold:.2f} | {concept_d.min():.2f}–{concept_d.max():.2f} | "
              f"{other_d.min():.2f}–{other_d.max():.2f} | {adv.d.min():.2f}–{adv.d.max():.2f} | {above} of "
              f"{len(adv.d)} |")
    result = dict(bench="probe_under_attack", concept=args.concept, run=args.run, draws=args.draws, images=len(seeds),
                  prompts=attacked.texts, rows=rows, seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
