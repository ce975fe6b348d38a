"""``unguide-export``: hand edits that already exist (run folders, edit/adapter files, Orbax
checkpoints) to PyTorch users, as PEFT/diffusers or kohya LoRAs, partial or merged UNet weights.

    unguide-export runs/unguide-shapes-arrow --formats peft kohya --out runs/unguide-shapes-arrow/export
    unguide-export runs/unguide-shapes-arrow --out export --probe draws=10 rule=sequential --cache-empty-probe

With ``peft`` the folder also gets unguide.json: what ``unguide_jax.pytorch.UnGuidePipeline.load_unguide``
needs besides the LoRA -- alpha, the w probe's settings (``--probe KEY=VALUE``: the keys of unguide-sample's
``probe``), the concept's target prompts and, with ``--cache-empty-probe``, D("") computed here at the
model's default image size. Every export folder gets a model card, README.md; ``--evaluation
OUT/results.json`` (of the erasure evaluation that measured these sources) puts its table in the card.
A source trained on other weights than ``--model``'s (its run folder's base_model.json) is refused, naming
the modules that differ and the model it was trained on, unless ``--allow-other-base``.

The job and its settings: ``unguide_jax.publishing.export`` (``ExportConfig``, ``run_export``).
"""
from __future__ import annotations

import argparse
import sys

from unguide_jax.cli.config import (
    apply_overrides,
    debug_requested,
    error_lines,
    exit_code_of,
)
from unguide_jax.jobs import export
from unguide_jax.publishing.export import ExportConfig
from unguide_jax.settings import ConfigError, from_dict, to_dict

DEFAULTS = ExportConfig()


def parse(argv=None) -> ExportConfig:
    """``argv`` -> ExportConfig (the defaults are the class's); a bad value is an argparse error (exit 2)."""
    parser = argparse.ArgumentParser(prog="unguide-export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f.metadata["doc"] for f in ExportConfig.__dataclass_fields__.values()}
    parser.add_argument("sources", nargs="+", help=fields["sources"])
    parser.add_argument("--out", required=True, help=fields["out"])
    parser.add_argument("--model", default=DEFAULTS.model, help=fields["model"])
    parser.add_argument("--formats", nargs="+", default=list(DEFAULTS.formats), help=fields["formats"])
    parser.add_argument("--probe", nargs="+", default=[], metavar="KEY=VALUE",
                        help="peft: w-probe settings for unguide.json (keys: "
                             f"{', '.join(to_dict(DEFAULTS.probe))}); default: unguide-sample's")
    parser.add_argument("--cache-empty-probe", action="store_true", help=fields["cache_empty_probe"])
    parser.add_argument("--evaluation", default=DEFAULTS.evaluation, help=fields["evaluation"])
    parser.add_argument("--overwrite", action="store_true", help=fields["overwrite"])
    parser.add_argument("--allow-other-base", action="store_true", help=fields["allow_other_base"])
    args = parser.parse_args(argv)
    if (args.probe or args.cache_empty_probe) and "peft" not in args.formats:
        parser.error("--probe and --cache-empty-probe describe unguide.json, which only the peft format writes")
    try:
        overrides = {}
        for pair in args.probe:
            key, sep, raw = pair.partition("=")
            if not sep:
                raise ConfigError(f"--probe {pair!r}: expected KEY=VALUE")
            overrides[f"probe.{key}"] = raw
        raw = apply_overrides(to_dict(DEFAULTS), overrides, ExportConfig)
        raw.update(sources=args.sources, out=args.out, model=args.model, formats=args.formats,
                   cache_empty_probe=args.cache_empty_probe, evaluation=args.evaluation, overwrite=args.overwrite,
                   allow_other_base=args.allow_other_base)
        return from_dict(ExportConfig, raw)
    except ConfigError as err:  # the probe's keys are --probe KEY=VALUE here, not --config.probe.KEY
        parser.error(str(err).replace("--config.probe.", "--probe ").replace("config.probe.", "--probe "))


def main(argv=None) -> int:
    config = parse(argv)
    try:
        for path in export(config):
            print(path)
    except (Exception, KeyboardInterrupt) as err:
        if debug_requested([]):  # UNGUIDE_DEBUG=1: the traceback
            raise
        for line in error_lines(err):
            print(line, file=sys.stderr)
        return exit_code_of(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
