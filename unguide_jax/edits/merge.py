"""K LoRA edits as one: the "LoRA only" baseline for many concepts (issue 38).

Per module the merged LoRA is the K LoRAs side by side on the rank axis, A = [A_1 … A_K] (in, Σ r_k) and
B = [α_1 B_1; …; α_K B_K] (Σ r_k, out), so that A B = Σ_k α_k A_k B_k: exactly the sum of the K weight
deltas, whatever each LoRA's rank and alpha. The merged edit carries alpha 1, since each alpha lives in its
B. Unlike ``edit.combine`` (which keeps K separate LoRAs), the result is one adapter that the LoRA file
formats and exporters take as any other.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from unguide_jax.edits import lora as lora_lib
from unguide_jax.edits.edit import Edit


def merge_loras(edits: Sequence[Edit]) -> Edit:
    """One LoRA edit whose delta at every module is the sum of the ``edits``' LoRA deltas there.

    Modules adapted by only some edits get only those edits' columns. Float32 factors: folding an alpha into
    a half-precision B would round it. Edits with full weight deltas or a prompt memory are refused: neither
    is a low-rank factor that can join the concatenation.
    """
    parts: dict[str, list[tuple[jnp.ndarray, jnp.ndarray]]] = {}
    for i, edit in enumerate(edits):
        if not isinstance(edit, Edit):
            raise TypeError(f"merge_loras: edit {i} is a {type(edit).__name__}, not an Edit")
        if edit.deltas:
            raise ValueError(f"merge_loras: edit {i} has full weight deltas ({len(edit.deltas)} modules); only "
                             "pure LoRA edits can be concatenated on the rank axis (use edits.edit.combine)")
        if edit.memory is not None:
            raise ValueError(f"merge_loras: edit {i} has a learnable-prompt memory, which is not a LoRA; only pure "
                             "LoRA edits can be merged (use edits.edit.combine to apply it beside them)")
        for j, (adapter, alpha) in enumerate(edit.loras):
            scale = jnp.asarray(alpha, jnp.float32)
            for path, ab in adapter.items():
                a, b = ab["lora_A"], ab["lora_B"]
                if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                    raise ValueError(f"merge_loras: edit {i}, LoRA {j} at {path}: A {tuple(a.shape)} and "
                                     f"B {tuple(b.shape)} are not (in, r) and (r, out)")
                if path in parts:
                    a0, b0 = parts[path][0]
                    if a.shape[0] != a0.shape[0] or b.shape[1] != b0.shape[1]:
                        raise ValueError(f"merge_loras: edit {i}, LoRA {j} at {path} maps {a.shape[0]} -> "
                                         f"{b.shape[1]}, an earlier LoRA there {a0.shape[0]} -> {b0.shape[1]}")
                parts.setdefault(path, []).append((a.astype(jnp.float32), scale * b.astype(jnp.float32)))
    if not parts:
        return Edit()
    adapter: lora_lib.Adapter = {
        path: {"lora_A": jnp.concatenate([a for a, _ in pairs], axis=1),
               "lora_B": jnp.concatenate([b for _, b in pairs], axis=0)}
        for path, pairs in parts.items()}
    return Edit(loras=((adapter, jnp.asarray(1.0, jnp.float32)),))
