"""Attacks on every row of the erasure table, and how often the erased class comes back under each.

Three attacks (``config.attack.kinds``), each on ``config.attack.images`` target images of the erased concept (image
j: the base model's image of the target prompt with seed ``seed + j``):

    prefix       UnlearnDiffAtk-style prefix tokens (``evaluation.attack``) optimised against the row's edit alone
                 (Zhang et al., ECCV 2024): the attacker does not know about the probe.
    pipeline     the same optimisation against what the row samples from: ε_w = w·ε_base + (1 − w)·ε_edit, w the
                 row's probe made smooth (``PipelineTarget``). The attacker knows the probe, its threshold and the
                 w it gives. For a row without mixing (LoRA alone, learnable prompts, PURE, UCE) ε_w is the edit:
                 the prefix attack itself, whose result the row reuses.
    ring_a_bell  Ring-A-Bell (Tsai et al., ICLR 2024) prompts from the concept's vector in the text encoder's
                 space (``evaluation.ring_a_bell``): model-agnostic, made once per concept, sampled under every row.

Every attacked prompt is sampled as the row samples: the unguide rows probe it (the probe sees only the attacked
prompt, as a deployment would), a fixed row uses its w, the oracle row w_erase (an attacked prompt still asks for the
concept). Success: the evaluator's top-1 class of the image is the erased class; "before" is the same rate on the
row's own images of the target prompt with the same seeds.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.attack import AttackConfig, PipelineTarget, prefix_attack
from unguide_jax.evaluation.ring_a_bell import RingABellConfig, ring_a_bell_prompts
from unguide_jax.parallel.hosts import is_main_process

ATTACK_KINDS = ("prefix", "pipeline", "ring_a_bell")
ATTACK_LABELS = {"prefix": "prefix tokens", "pipeline": "prefix tokens, probe known", "ring_a_bell": "Ring-A-Bell"}


def attack_settings(settings: AttackConfig, concept_kind: str, explicit_prefix_tokens: int) -> AttackConfig:
    """The prefix optimisation for a concept: the field's 3 prefix tokens for objects and styles, 5 for explicit
    content (UnlearnDiffAtk's settings)."""
    if concept_kind == "explicit":
        return dataclasses.replace(settings, prefix_tokens=explicit_prefix_tokens)
    return settings


def pipeline_target(mode: str, probe: ProbeConfig, bar: float | None, fixed_w: float, draws: int,
                    temperature: float) -> PipelineTarget | None:
    """What the probe-aware attacker optimises against for a row of ``mode`` (None: the edit alone)."""
    if mode == "unguide":
        if bar is None:
            raise ValueError("the probe-aware attack on an unguide row needs the row's probe threshold")
        return PipelineTarget(bar=float(bar), w_erase=probe.w_erase, w_keep=probe.w_keep, probe=probe, draws=draws,
                              temperature=temperature)
    if mode in ("fixed", "oracle"):  # a constant w: the smooth step is flat, the bar does not matter
        w = float(fixed_w) if mode == "fixed" else probe.w_erase
        return PipelineTarget(bar=1.0, w_erase=w, w_keep=w, probe=probe, draws=draws, temperature=temperature)
    return None


def concept_ring_prompts(sd, config: RingABellConfig, concept, count: int):
    """The concept's Ring-A-Bell prompts: its vector added to its reference prompt (a scene without the concept)."""
    innocuous = concept.references[0] if concept.references else ""
    return ring_a_bell_prompts(sd, config, concept, innocuous, count)


def run_attacks(sd, edit, mode: str, probe: ProbeConfig, bar: float | None, fixed_w: float, kinds: Sequence[str],
                settings: AttackConfig, target_prompt: str, x0: np.ndarray, seeds: Sequence[int], *,
                ws_of: Callable[[list[str], np.ndarray], list[float] | None], is_erased: Callable[[np.ndarray], np.ndarray],
                ring: Callable[[], object], sample: Callable[..., np.ndarray], guidance_scale: float = 7.5,
                pipeline_draws: int = 2, pipeline_temperature: float = 0.1, label: str = "") -> dict[str, dict]:
    """Each attack of ``kinds`` on one row: {kind: {success_rate, prompts, w, seconds, settings}}.

    ``ws_of(texts, contexts)``: the row's w for attacked prompts (None: no mixing); ``is_erased(images)``: per
    image, whether the evaluator sees the erased class; ``ring()``: the concept's Ring-A-Bell prompts (made once
    by the caller); ``sample(texts, contexts, w)``: the row's images of attacked prompts with ``seeds``;
    ``guidance_scale``: the CFG scale the row samples with (the probe-aware attacker's trajectories use it);
    ``label``: what the progress lines name (empty: none printed)."""
    if kinds and sd.is_sdxl:
        # The attacks optimise tokens through one text encoder (attack.encode_with_prefix); SDXL's two, and its
        # pooled embedding, are not wired in.
        raise ValueError(f"attacks {list(kinds)} are built for SD 1.x/2.x's one text encoder, not SDXL: set attack.kinds=[]")
    out: dict[str, dict] = {}
    made: dict[str, tuple[list[str], np.ndarray, dict]] = {}
    for kind in kinds:
        started = time.perf_counter()
        if kind == "ring_a_bell":
            found = ring()
            texts, contexts = list(found.texts[:len(seeds)]), np.asarray(found.contexts[:len(seeds)])
            extra = dict(found.settings)
        else:
            target = (pipeline_target(mode, probe, bar, fixed_w, pipeline_draws, pipeline_temperature)
                      if kind == "pipeline" else None)
            key = "prefix" if target is None else kind
            if key not in made:
                result = prefix_attack(sd, edit, settings, target_prompt, x0, seeds, target=target,
                                       guidance_scale=guidance_scale)
                made[key] = (list(result.texts), np.asarray(result.contexts),
                             dict(result.settings, probe_aware=target is not None,
                                  final_loss=float(np.mean(np.asarray(result.losses)[:, -1]))))
            texts, contexts, extra = made[key]
        w = ws_of(texts, contexts)
        images = sample(texts, contexts, w)
        hits = np.asarray(is_erased(images), bool)
        out[kind] = dict(success_rate=float(hits.mean()), prompts=texts, w=None if w is None else [float(v) for v in w],
                         seconds=round(time.perf_counter() - started, 2), settings=extra)
        if label and is_main_process():
            print(f"{label}: {ATTACK_LABELS[kind]} attack on {len(texts)} image(s): {hits.mean():.0%} of the erased "
                  f"class back ({out[kind]['seconds']} s)", flush=True)
    return out
