"""How an edit is used at sampling time, and where each prompt's UnGuidance weight w comes from.

    base      the model alone (no edit)
    adapter   the edited model alone
    unguide   UnGuidance: w·CFG_base + (1 − w)·CFG_edit, w per prompt from the probe (spec §4)
    fixed     UnGuidance with one given w for every prompt
    auto      (sampling only) base without an edit, unguide with one
"""
from __future__ import annotations

from typing import Callable, Sequence

MODES = ("base", "adapter", "unguide", "fixed")
SAMPLE_MODES = ("auto",) + MODES


def resolve_mode(mode: str, has_edit: bool) -> str:
    """``mode`` checked against whether an edit is loaded (``auto`` resolved)."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {SAMPLE_MODES}")
    if mode == "auto":
        return "unguide" if has_edit else "base"
    if mode == "base" and has_edit:
        raise ValueError("mode=base samples the model alone: drop config.adapters, or choose another mode")
    if mode != "base" and not has_edit:
        raise ValueError(f"mode={mode} needs config.adapters (an adapter file, a train.py run folder, a checkpoint, "
                         "or a PEFT/kohya LoRA)")
    return mode


def weights_for(mode: str, count: int, *, fixed_w: float, probe: Callable[[], Sequence[float]]) -> list[float | None]:
    """One w per prompt: None (no mixing) for base/adapter, ``fixed_w`` for fixed, the probe's for unguide."""
    if mode in ("base", "adapter"):
        return [None] * count
    if mode == "fixed":
        return [float(fixed_w)] * count
    if mode == "unguide":
        ws = [float(w) for w in probe()]
        if len(ws) != count:
            raise ValueError(f"the probe gave {len(ws)} weights for {count} prompts")
        return ws
    raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
