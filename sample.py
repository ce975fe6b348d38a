#!/usr/bin/env python
"""Sample images (with or without edits, UnGuidance) or evaluate erasures; the same command as
``unguide-sample`` (see ``unguide_jax/cli/sample.py``)."""
import sys

from unguide_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
