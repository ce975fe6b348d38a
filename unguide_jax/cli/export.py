"""``unguide-export``: hand edits that already exist (run folders, edit/adapter files, Orbax
checkpoints) to PyTorch users, as PEFT/diffusers or kohya LoRAs, partial or merged UNet weights.

    unguide-export runs/unguide-shapes-arrow --formats peft kohya --out runs/unguide-shapes-arrow/export
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unguide_jax.edits.export import EXPORTERS, check_exports, export_edit
from unguide_jax.edits.sources import load_edit
from unguide_jax.loading.resolve import load_model


def main(argv=None) -> int:
    """Export edits that already exist (run folders, edit/adapter files, Orbax checkpoints) for PyTorch users."""
    parser = argparse.ArgumentParser(prog="unguide-export", description=main.__doc__)
    parser.add_argument("sources", nargs="+", help="run folders, edit files or Orbax checkpoint folders (they add up)")
    parser.add_argument("--model", default="embedded", help="the base model the edits were made on")
    parser.add_argument("--formats", nargs="+", default=["peft"], help=f"of {sorted(EXPORTERS)}")
    parser.add_argument("--out", required=True, help="export folder")
    args = parser.parse_args(argv)
    check_exports(args.formats)
    sd = load_model(args.model)
    edit, _ = load_edit(args.sources, sd.params["unet"])
    for path in export_edit(args.formats, Path(args.out), edit, sd.unet, sd.params["unet"]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
