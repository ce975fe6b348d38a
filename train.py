#!/usr/bin/env python
"""UnGuide LoRA training: not implemented yet.

This entry point is reserved for the UnGuide trainer (jitted, mesh-sharded, Orbax-checkpointed);
it is tracked as its own issue and is not part of this release. It exits with an error rather
than pretend to train.
"""
import sys


def main() -> int:
    print("train.py: UnGuide training is not implemented yet (see the project's issue tracker). "
          "Available now: the Flax SD stack and sample.py.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
