#!/usr/bin/env python
"""Erase a concept from a Flax Stable Diffusion model: UnGuide (default), learnable prompts, PURE or UCE.

    python train.py --config configs/unguide.py
    python train.py --config configs/unguide.py:sd15-object --config.model=PATH --config.concept=dog
    python train.py --config configs/unguide.py --config.resume=true
    python train.py --config configs/learnable_prompts.py
    python train.py --config configs/pure.py        # closed form: seconds, no iterations
    python train.py --config configs/uce.py

Writes config.json, metrics.jsonl, checkpoints/, adapter.safetensors or edit.safetensors (and export/)
to config.run_dir.
"""
import sys

from unguide_jax.config import parse_cli
from unguide_jax.runtime import setup_runtime


def main(argv=None) -> int:
    config = parse_cli(sys.argv[1:] if argv is None else argv, "configs/unguide.py")
    setup_runtime()
    from unguide_jax.unguide.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from unguide_jax.train_job import run_training

    run_dir = run_training(config)
    made = [run_dir / name for name in ("adapter.safetensors", "edit.safetensors") if (run_dir / name).is_file()]
    print(f"wrote {', '.join(str(m) for m in made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
