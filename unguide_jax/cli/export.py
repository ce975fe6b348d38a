"""``unguide-export``: hand edits that already exist (run folders, edit/adapter files, Orbax
checkpoints) to PyTorch users, as PEFT/diffusers or kohya LoRAs, partial or merged UNet weights.

    unguide-export runs/unguide-shapes-arrow --formats peft kohya --out runs/unguide-shapes-arrow/export
    unguide-export runs/unguide-shapes-arrow --out export --probe draws=10 rule=sequential --cache-empty-probe

With ``peft`` the folder also gets unguide.json (``unguide_jax.edits.unguide_json``): what
``unguide_jax.pytorch.UnGuidePipeline.load_unguide`` needs besides the LoRA -- alpha, the w probe's settings
(``--probe KEY=VALUE``: the keys of unguide-sample's ``probe``) and, with ``--cache-empty-probe``, D("")
computed here at the model's default image size.

Every export folder gets a model card, README.md (``unguide_jax.edits.model_card``); ``--evaluation
OUT/results.json`` (of the erasure evaluation that measured these sources) puts its table in the card.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from unguide_jax.edits.export import EXPORTERS, check_exports, export_edit, single_lora
from unguide_jax.edits.model_card import check_card_inputs, write_model_card
from unguide_jax.edits.sources import load_edit
from unguide_jax.edits.unguide_json import empty_probe_record, write_unguide_json
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.loading.resolve import load_model


def main(argv=None) -> int:
    """Export edits that already exist (run folders, edit/adapter files, Orbax checkpoints) for PyTorch users."""
    parser = argparse.ArgumentParser(prog="unguide-export", description=main.__doc__)
    parser.add_argument("sources", nargs="+", help="run folders, edit files or Orbax checkpoint folders (they add up)")
    parser.add_argument("--model", default="embedded", help="the base model the edits were made on")
    parser.add_argument("--formats", nargs="+", default=["peft"], help=f"of {sorted(EXPORTERS)}")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--probe", nargs="+", default=[], metavar="KEY=VALUE",
                        help="peft: w-probe settings for unguide.json (draws, t_enc, ddim_steps, timestep_mode, seed, "
                             "w_erase, w_keep, rule, round_draws, z); default: unguide-sample's")
    parser.add_argument("--cache-empty-probe", action="store_true",
                        help="peft: compute D(\"\") (the probe of the empty prompt) now and store it in unguide.json")
    parser.add_argument("--evaluation", help="an erasure evaluation's results.json that evaluated these sources: "
                                              "its table goes into the model card (README.md)")
    args = parser.parse_args(argv)
    check_exports(args.formats)
    if (args.probe or args.cache_empty_probe) and "peft" not in args.formats:
        parser.error("--probe and --cache-empty-probe describe unguide.json, which only the peft format writes")
    try:
        probe = probe_config(args.probe)
    except ValueError as err:
        parser.error(f"--probe: {err}")
    check_card_inputs(args.sources, args.evaluation)
    sd = load_model(args.model)
    edit, _ = load_edit(args.sources, sd.params["unet"])
    for path in export_edit(args.formats, Path(args.out), edit, sd.unet, sd.params["unet"]):
        print(path)
    if "peft" in args.formats and (args.probe or args.cache_empty_probe):
        print(write_unguide_settings(Path(args.out), sd, edit, probe, args.cache_empty_probe))
    print(write_model_card(args.out, args.sources, formats=args.formats, base_model=args.model,
                           evaluation=args.evaluation))
    return 0


def probe_config(pairs: list[str]) -> ProbeConfig:
    """``KEY=VALUE`` strings -> ProbeConfig, each value parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(ProbeConfig)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{pair!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        kind = type(getattr(ProbeConfig(), key))
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected a value of type {kind.__name__}") from None
    return ProbeConfig(**values)


def write_unguide_settings(out: Path, sd, edit, probe: ProbeConfig, cache_empty_probe: bool) -> Path:
    """Rewrite out/unguide.json with these probe settings (and D("") per draw, computed with our probe)."""
    from unguide_jax.edits.lora_formats import DIFFUSERS_LORA_FILE
    from unguide_jax.erasers.unguide.probe import WProbe

    adapter, alpha = single_lora(edit)
    empty = None
    if cache_empty_probe:
        distances = WProbe(sd, edit, probe).empty_distances
        empty = empty_probe_record(distances, probe, sd.default_size, sd.default_size)
    return write_unguide_json(out, out / "diffusers" / DIFFUSERS_LORA_FILE, adapter, alpha, sd.params["unet"], probe,
                              empty)


if __name__ == "__main__":
    sys.exit(main())
