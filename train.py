#!/usr/bin/env python
"""Train an UnGuide LoRA that erases a concept from a Flax Stable Diffusion model.

    python train.py --config configs/unguide.py
    python train.py --config configs/unguide.py:sd15-object --config.model=PATH --config.concept=dog
    python train.py --config configs/unguide.py --config.resume=true

Writes config.json, metrics.jsonl, checkpoints/, adapter.safetensors (and export/) to config.run_dir.
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
    print(f"wrote {run_dir / 'adapter.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
