"""How an edit is used at sampling time, and where each prompt's UnGuidance weight w comes from.

    base      the model alone (no edit)
    adapter   the edited model alone
    unguide   UnGuidance: w·CFG_base + (1 − w)·CFG_edit, w per prompt from the probe
    fixed     UnGuidance with one given w for every prompt
    oracle    (evaluation only) UnGuidance with the w a perfect probe would give: w_erase on the prompts that
              name the erased concept (target, synonyms), w_keep elsewhere; an upper bound for the probe
    auto      (sampling only) base without an edit, unguide with one
"""
from __future__ import annotations

from typing import Callable, Sequence

MODES = ("base", "adapter", "unguide", "fixed", "oracle")
SAMPLE_MODES = ("auto", "base", "adapter", "unguide", "fixed")


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


def weights_for(mode: str, count: int, *, fixed_w: float, probe: Callable[[], Sequence[float]],
                oracle: Sequence[float] | None = None) -> list[float | None]:
    """One w per prompt: None (no mixing) for base/adapter, ``fixed_w`` for fixed, the probe's for unguide,
    ``oracle`` (the evaluation's own w per prompt) for oracle."""
    if mode in ("base", "adapter"):
        return [None] * count
    if mode == "fixed":
        return [float(fixed_w)] * count
    if mode == "unguide":
        ws = [float(w) for w in probe()]
        if len(ws) != count:
            raise ValueError(f"the probe gave {len(ws)} weights for {count} prompts")
        return ws
    if mode == "oracle":
        if oracle is None or len(oracle) != count:
            raise ValueError("mode=oracle needs the evaluation's w per prompt (it knows which prompts name the concept)")
        return [float(w) for w in oracle]
    raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
