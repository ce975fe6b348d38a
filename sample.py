#!/usr/bin/env python
"""Sample images with a Flax Stable Diffusion model.

    python sample.py --config configs/sample.py:smoke
    python sample.py --config configs/sample.py --config.model=PATH --config.prompt="a photo of a cat"

Writes one PNG per image, grid.png and manifest.json to config.out_dir.
"""
import sys

from unguide_jax.config import parse_cli
from unguide_jax.runtime import setup_runtime


def main(argv=None) -> int:
    config = parse_cli(sys.argv[1:] if argv is None else argv, "configs/sample.py")
    setup_runtime()
    from unguide_jax.sample_job import run_sampling

    manifest = run_sampling(config)
    print(f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
