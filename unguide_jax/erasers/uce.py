"""UCE (Gandikota et al., WACV 2024): the closed-form K/V edit PURE builds on.

For every cross-attention to_k and to_v (a Flax kernel K0, text × d) it solves

    min_K  λ‖K − K0‖² + s_e Σ_i ‖c_iᵀ K − g_iᵀ K0‖² + s_p Σ_j ‖c_jᵀ K − c_jᵀ K0‖²

(erase rows c_i map to what K0 makes of the guide rows g_i; preserve rows c_j keep their output):
    K = K0 + s_e M⁻¹ C_eᵀ (C_g − C_e) K0,   M = λI + s_e C_eᵀ C_e + s_p C_pᵀ C_p,
an exact low-rank change (rank ≤ the number of erase rows), shipped as a LoRA with alpha 1.

Rows are text-encoder outputs. ``tokens="subject_to_end"`` (default, as the authors' code): from the
prompt's last subject token to the end of the sequence, erase and guide rows aligned from their
last subject tokens (CLIP's causal attention spreads the subject into every later token, which the
UNet also attends to); ``"subject"``: the last subject token only. Erase prompts: the concept's
forget anchors; preserve: its retain anchors; guide: "" (default) or the concept's reference.

K concepts (the paper's setting: its closed form is stated for many concepts at once) are one problem:
every concept's erase rows with its own guides, and the retain anchors of all of them less any prompt
another concept erases (``shared_retain``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.edits import edit as edit_lib
from unguide_jax.erasers.common import cross_attention_layers, kernel, low_rank_factors
from unguide_jax.erasers.concepts import Concept
from unguide_jax.settings import Config, option, positive

TOKEN_MODES = ("subject_to_end", "subject")
GUIDES = ("empty", "reference")


@dataclasses.dataclass(frozen=True)
class UceConfig(Config):
    """UCE: the closed-form K/V edit baseline."""

    lam: float = option(0.5, "λ: weight of staying at the original projection", check=positive)
    erase_scale: float = option(1.0, "weight of the erase term")
    preserve_scale: float = option(1.0, "weight of the preserve (retain anchors) term")
    tokens: str = option("subject_to_end", "token rows edited: subject_to_end (the authors' code) | subject",
                         choices=TOKEN_MODES)
    guide: str = option("empty", 'what the concept is mapped to: empty ("") | reference (its reference prompt)',
                        choices=GUIDES)


def last_subject_index(sd, prompt: str) -> int:
    """Position of the prompt's last real token (before the end-of-text token); 0 (BOS) for ""."""
    return max(0, len(sd.tokenizer(prompt).input_ids) - 2)


def token_rows(sd, prompts: list[str], tokens: str) -> tuple[np.ndarray, list[int]]:
    """(encoder outputs (P, L, D) as float64, last-subject index per prompt)."""
    # The text as encoded (SDXL: "" too, not the zeros of the unconditional branch), as K/V read it.
    hidden = np.asarray(sd.attention_context(sd.encode_prompts(prompts, empty_is_unconditional=False)), np.float64)
    return hidden, [last_subject_index(sd, p) for p in prompts]


def aligned_rows(hidden_a, index_a, hidden_b, index_b, tokens: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a and b from their last subject tokens on, trimmed to a common length (UCE's alignment)."""
    if tokens == "subject":
        return hidden_a[index_a][None], hidden_b[index_b][None]
    length = hidden_a.shape[0] - max(index_a, index_b)
    return hidden_a[index_a:index_a + length], hidden_b[index_b:index_b + length]


def solve(k0: np.ndarray, erase: np.ndarray, guide: np.ndarray, preserve: np.ndarray, config: UceConfig):
    """(A, B) with K = K0 + A B the minimiser above; erase/guide (n, D), preserve (m, D), K0 (D, d)."""
    d_text = k0.shape[0]
    m = config.lam * np.eye(d_text) + config.erase_scale * erase.T @ erase
    if len(preserve):
        m = m + config.preserve_scale * preserve.T @ preserve
    a = config.erase_scale * np.linalg.solve(m, erase.T)
    return a, (guide - erase) @ k0


def objective(k, k0, erase, guide, preserve, config: UceConfig) -> float:
    """The least-squares objective UCE minimises (for tests and reports)."""
    value = config.lam * np.sum((k - k0) ** 2) + config.erase_scale * np.sum((erase @ k - guide @ k0) ** 2)
    if len(preserve):
        value += config.preserve_scale * np.sum((preserve @ k - preserve @ k0) ** 2)
    return float(value)


def as_concepts(concepts) -> list:
    """One concept or a sequence of them, as a non-empty list."""
    listed = [concepts] if isinstance(concepts, Concept) else list(concepts)
    if not listed:
        raise ValueError("no concept to erase: give a Concept or a non-empty sequence of them")
    return listed


def shared_retain(concepts: Sequence[Concept]) -> tuple[list[str], list[str]]:
    """(the retain anchors of K concepts together, those left out): each concept's own list in order, less a
    prompt an earlier concept already brought and less a prompt another concept erases (preserving what one
    concept erases would pull the solution back from that erasure). A concept's own list is kept as it is, so
    that K = 1 is the single-concept edit exactly."""
    retain, dropped, seen = [], [], set()
    for k, concept in enumerate(concepts):
        erased_elsewhere = {p for j, other in enumerate(concepts) if j != k for p in other.forget_anchors}
        mine = [p for p in concept.retain_anchors if p not in seen]
        for prompt in mine:
            (dropped if prompt in erased_elsewhere else retain).append(prompt)
        seen.update(mine)
    return retain, sorted(set(dropped))


def concept_guides(concept: Concept, config: UceConfig) -> list[str]:
    forget = concept.forget_anchors
    if config.guide == "reference":
        pairs = concept.pairs
        return [pairs[min(i, len(pairs) - 1)][1] for i in range(len(forget))]
    return [""] * len(forget)


def edit_rows(sd, concepts: Sequence[Concept], config: UceConfig):
    """(erase, guide, preserve rows, report fields) for K concepts: every concept's forget anchors with its
    own guides, and the retain anchors of ``shared_retain``."""
    forget = [p for c in concepts for p in c.forget_anchors]
    guides = [g for c in concepts for g in concept_guides(c, config)]
    retain, dropped = shared_retain(concepts)
    h_f, i_f = token_rows(sd, forget, config.tokens)
    h_g, i_g = token_rows(sd, guides, config.tokens)
    erase_rows, guide_rows = [], []
    for k in range(len(forget)):
        e, g = aligned_rows(h_f[k], i_f[k], h_g[k], i_g[k], config.tokens)
        erase_rows.append(e)
        guide_rows.append(g)
    erase, guide = np.concatenate(erase_rows), np.concatenate(guide_rows)
    if retain:
        h_r, i_r = token_rows(sd, retain, config.tokens)
        preserve = np.concatenate([h_r[k][i_r[k]:] if config.tokens == "subject_to_end" else h_r[k][i_r[k]][None]
                                   for k in range(len(retain))])
    else:
        preserve = np.zeros((0, erase.shape[1]))
    owner = [k for k, c in enumerate(concepts) for _ in c.forget_anchors]
    per_concept = [sum(len(r) for r, o in zip(erase_rows, owner) if o == k) for k in range(len(concepts))]
    info = dict(guides=sorted(set(guides)), retain_dropped=dropped, erase_rows_per_concept=per_concept)
    return erase, guide, preserve, info


def uce_edit(sd, concepts: Concept | Sequence[Concept], config: UceConfig) -> tuple[edit_lib.Edit, dict]:
    """UCE on one concept, or on K at once: the paper states its closed form for many concepts (all erase rows
    and all preserve rows in one least-squares problem), solved once per K/V kernel."""
    started = time.perf_counter()
    listed = as_concepts(concepts)
    erase, guide, preserve, info = edit_rows(sd, listed, config)
    adapter = {}
    for layer in cross_attention_layers(sd.params["unet"]):
        for name in ("to_k", "to_v"):
            module = f"{layer}.{name}"
            a, b = solve(kernel(sd.params["unet"], module), erase, guide, preserve, config)
            adapter[module] = low_rank_factors(a, b)
    adapter = jax.tree.map(jnp.asarray, adapter)
    report = dict(erase_rows=int(erase.shape[0]), preserve_rows=int(preserve.shape[0]), guides=info["guides"],
                  seconds=round(time.perf_counter() - started, 2), config=dataclasses.asdict(config))
    if not isinstance(concepts, Concept):
        report.update(concepts=[c.name for c in listed], erase_rows_per_concept=info["erase_rows_per_concept"],
                      retain_dropped=info["retain_dropped"])
    return edit_lib.lora_edit(adapter, 1.0), report
