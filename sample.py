#!/usr/bin/env python
"""Sample images with a Flax Stable Diffusion model, with or without edits (UnGuidance), or evaluate erasures.

    python sample.py --config configs/sample.py:embedded
    python sample.py --config configs/sample.py --config.model=PATH --config.prompt="a photo of a cat"
    python sample.py --config configs/sample.py:embedded --config.adapters='["runs/unguide-shapes-circle"]'
    python sample.py --config configs/evaluate.py          # the erasure evaluation table

Sampling writes one PNG per image, grid.png and manifest.json to config.out_dir; the evaluation
writes results.md, results.json, PNGs and grids per method.
"""
import json
import sys

from unguide_jax.config import parse_cli
from unguide_jax.runtime import setup_runtime


def main(argv=None) -> int:
    config = parse_cli(sys.argv[1:] if argv is None else argv, "configs/sample.py")
    setup_runtime()
    job = config.pop("job", "sample")
    if job == "evaluate":
        from unguide_jax.evaluation import run_evaluation

        out_dir = run_evaluation(config)
        print((out_dir / "results.md").read_text())
        print(f"wrote {out_dir / 'results.json'} and the images under {out_dir}")
        return 0
    if job != "sample":
        raise ValueError(f"unknown job {job!r} in the config (sample, evaluate)")
    from unguide_jax.sample_job import run_sampling

    manifest = run_sampling(config)
    print(f"wrote {manifest}")
    evaluation = json.loads(manifest.read_text())["settings"].get("evaluation")
    if evaluation and evaluation["images_naming_a_class"]:
        print(f"evaluator: {evaluation['classified_as_prompted']} of {evaluation['images_naming_a_class']} images "
              f"are classified as the class their prompt names ({evaluation['accuracy']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
