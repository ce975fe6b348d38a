"""List the shipped concepts, or (``--write-shapes``) rewrite the embedded shapes model's concept files.

    python -m unguide_jax.cli.concepts
    python -m unguide_jax.cli.concepts --write-shapes [--dir FOLDER]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unguide_jax.erasers.concepts import list_concepts
from unguide_jax.shapes.concepts import write_shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-shapes", action="store_true", help="(re)write configs/concepts/shapes-*.json")
    parser.add_argument("--dir", type=Path, default=None, help="output folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.write_shapes:
        for path in write_shapes(args.dir):
            print(path)
    else:
        for name in list_concepts():
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
