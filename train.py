#!/usr/bin/env python
"""Erase a concept from a Flax Stable Diffusion model; the same command as ``unguide-train``
(see ``unguide_jax/cli/train.py``)."""
import sys

from unguide_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
