"""A LoRA that starts on the concept (``lora.init = "concept"``; ours, not the paper's).

The authors' code draws A ~ N(0, 1/r) (std 1/√r) and A hardly trains (0.3–0.8 % in 200 steps), so the K/V change
α·(c·A)·B reaches a token c in proportion to its projection on a *random* direction. On the shipped
model that projection is 3.5–4.8 for the arrow's prompts and 13–16 for the ring's and the crescent's:
the rank-1 LoRA trained to erase the arrow changes the ring most, and no probe statistic can separate them.

Here A starts along what the target prompts' tokens carry and the neutral prompts' tokens do not: the
top-r right singular vectors of the target tokens after projecting out the directions that hold
``NEUTRAL_ENERGY`` of the energy of the anchor's and ""'s tokens (the template and padding the prompts
share). Each column is scaled so that the target's tokens see the ‖c·a‖ a random N(0, 1/r) init's column gives
in expectation (‖c‖_F / √r), which keeps the transfer rule's arithmetic. The objective, the rank, B = 0 at
init and everything after initialisation are the paper's. On the shipped model the arrow's four prompts
project 67–69 on its direction and the nine other classes at most 22.5 (all ten classes: families
50–74, other classes at most 16–25, the anchor and "" 1–7).
"""
from __future__ import annotations

import numpy as np

LORA_INITS = ("random", "concept")
NEUTRAL_ENERGY = 0.9  # of the anchor's and ""'s token energy projected out (2 directions on the shipped model)


def concept_directions(target: np.ndarray, neutral: np.ndarray, rank: int) -> np.ndarray:
    """A's init (D, rank) from the target prompts' encoder outputs (P, L, D) and the neutral prompts' (Q, L, D)."""
    width = target.shape[-1]
    tokens = np.asarray(target, np.float64).reshape(-1, width)
    shared = np.asarray(neutral, np.float64).reshape(-1, width)
    _, s, vt = np.linalg.svd(shared, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), NEUTRAL_ENERGY) + 1)
    outside = np.eye(width) - vt[:k].T @ vt[:k]
    _, _, vt_t = np.linalg.svd(tokens @ outside, full_matrices=False)
    if vt_t.shape[0] < rank:
        raise ValueError(f"lora.init=concept: the target prompts span {vt_t.shape[0]} directions, rank {rank} needs more")
    directions = vt_t[:rank].T  # (D, r), unit columns orthogonal to the neutral span
    # A sign that makes the target's mean token project positively (cosmetic: B learns either sign).
    directions *= np.where(tokens.mean(axis=0) @ directions < 0, -1.0, 1.0)
    scale = np.linalg.norm(tokens) / (np.linalg.norm(tokens @ directions, axis=0) * np.sqrt(rank))
    return (directions * scale).astype(np.float32)
