"""One w probe for K edits (issue 38): D_k(p) for every prompt p and edit k in one jitted call per chunk.

The probe's cost is the base model's trajectory to z_p (2·(steps) UNet rows per draw); the edits only enter
at t (2 rows per draw and edit). Every edit sees the same draws and the same z_p, so the K probes share the
trajectory: a chunk costs R·(2·steps + 2K) rows instead of K·R·(2·steps + 2) for K ``WProbe``s.

Each edit keeps its own decision, by the config's rule, against its own references: D_k("") and, rule
calibrated, √(D_k(concept_k) · D_k("")) with edit k's own target prompts. Prompt p carries concept k
(edit k is *flagged*) where D_k(p) passes edit k's bar; w[p, k] is w_erase there, else w_keep. How the
K weights combine at sampling: ``unguide_jax.diffusion.many_guidance`` and docs/design.md ("How K probes
combine"). At K = 1 the distances, the references and w are ``WProbe``'s (the same program on the same
rows; tests/test_many_probe.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.sampler import XLA_CPU_OPTIONS, map_rows, rows_per_call
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits.edit import Edit
from unguide_jax.erasers.unguide.objective import ObjectiveConfig, num_sampling_steps, sample_until
from unguide_jax.erasers.unguide.probe import (
    ProbeConfig,
    ProbeResult,
    calibrated_threshold,
    decide,
    edit_minus_base,
    probe_draws,
    sized_for_probe,
)
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy

# How the K edits are evaluated at t inside the jitted call. "loop": one ``edit_minus_base`` per edit, the
# same computation as WProbe's for each; "stacked": the edits stacked on a leading axis and vmapped (every
# edit must then have the same structure: the same adapted layers and ranks). Warm, on the embedded model,
# 4 prompts in one chunk, 2 CPU cores: K = 2, R = 4: loop 0.49 s, stacked 0.50 s (K WProbes 0.89 s); K = 4,
# R = 8: 1.19 s, 1.15 s (3.60 s); the two agree within 7e-7 relative. The trajectory dominates either way, so
# "loop", which takes any edits, is the default.
MODES = ("loop", "stacked")


def stack_edits(edits: Sequence[Edit]) -> Edit:
    """The edits as one pytree with a leading K axis on every leaf (``mode="stacked"``)."""
    structures = {jax.tree.structure(e) for e in edits}
    if len(structures) != 1:
        raise ValueError("stacked probing needs edits of one structure (the same adapted layers, ranks and parts): "
                         "use mode='loop'")
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(e)) for e in edits}
    if len(shapes) != 1:
        raise ValueError("stacked probing needs edits whose leaves have the same shapes: use mode='loop'")
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(x) for x in leaves]), *edits)


def many_probe_distances(unet, scheduler_config: SchedulerConfig, config: ProbeConfig, base_params, edits,
                         cond: jax.Array, uncond: jax.Array, guidance_scale: jax.Array, x_T: jax.Array, t: jax.Array,
                         row_groups: int = 1, mode: str = "loop") -> jax.Array:
    """‖ε_edit_k − ε_base‖₂ per prompt, edit and draw: (P, K, R). ``edits``: a tuple of edits (mode loop) or
    ``stack_edits``'s pytree (mode stacked)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    return _many_probe_distances(unet, scheduler_config, config.objective, config.t_enc, base_params, edits, cond,
                                 uncond, guidance_scale, x_T, t, row_groups, mode)


@functools.partial(jax.jit, static_argnames=("unet", "scheduler_config", "objective", "t_enc", "row_groups", "mode"),
                   compiler_options=XLA_CPU_OPTIONS)
def _many_probe_distances(unet, scheduler_config: SchedulerConfig, objective: ObjectiveConfig, t_enc: int,
                          base_params, edits, cond: jax.Array, uncond: jax.Array, guidance_scale: jax.Array,
                          x_T: jax.Array, t: jax.Array, row_groups: int = 1, mode: str = "loop") -> jax.Array:
    # Kept line for line beside probe._probe_distances, so that at K = 1 this is the same program: WProbe's
    # numbers, not numbers within rounding of them.
    draws = x_T.shape[0]
    t_enc_r = jnp.full((draws,), t_enc, jnp.int32)
    uncond_r = jnp.broadcast_to(uncond, (draws,) + uncond.shape[1:])

    def norms(diff):
        return jnp.sqrt(jnp.sum(diff.reshape(draws, -1) ** 2, axis=-1))

    def one_prompt(c, scale):
        c_r = jnp.broadcast_to(c, (draws,) + c.shape)
        z = sample_until(unet, base_params, scheduler_config, objective, x_T, t_enc_r, c_r, uncond_r, scale)
        if mode == "stacked":
            return jax.vmap(lambda e: norms(edit_minus_base(unet, base_params, e, z, t, c_r)))(edits)
        return jnp.stack([norms(edit_minus_base(unet, base_params, e, z, t, c_r)) for e in edits])

    scales = jnp.asarray(guidance_scale, jnp.float32)
    # As WProbe: on the CPU, prompts in groups of about rows_per_call() UNet rows of the trajectory.
    prompts_per_call = max(1, rows_per_call() // (2 * draws)) if rows_per_call() else 0
    return map_rows(jax.vmap(one_prompt), prompts_per_call, cond, scales, groups=row_groups)


@dataclasses.dataclass
class ManyProbeResult:
    prompts: list[str]
    d: np.ndarray                   # (P, K) D_k(p)
    d_empty: np.ndarray             # (K,) D_k("")
    w: np.ndarray                   # (P, K) w_erase where edit k is flagged for prompt p, else w_keep
    flags: np.ndarray               # (P, K) bool: D_k(p) above edit k's bar
    distances: np.ndarray           # (P, K, R)
    thresholds: np.ndarray | None   # (K,) rule calibrated: √(D_k(concept_k) · D_k("")); None for paper

    @property
    def bars(self) -> np.ndarray:
        """Each edit's bar: its threshold (calibrated) or D_k("") (paper)."""
        return self.d_empty if self.thresholds is None else self.thresholds

    def flagged(self) -> list[list[int]]:
        """Per prompt, the edits (concepts) it carries."""
        return [np.flatnonzero(row).tolist() for row in self.flags]

    def for_edit(self, k: int) -> ProbeResult:
        """Edit k's result as ``WProbe.run`` gives it."""
        r = self.distances.shape[-1]
        return ProbeResult(prompts=list(self.prompts), d=self.d[:, k], d_empty=float(self.d_empty[k]), w=self.w[:, k],
                           distances=self.distances[:, k], draws_used=np.full(len(self.prompts), r, np.int64),
                           threshold=None if self.thresholds is None else float(self.thresholds[k]))

    def records(self) -> list[dict]:
        bars = self.bars
        return [dict(prompt=p, flagged=self.flagged()[i], D=self.d[i].tolist(), D_empty=self.d_empty.tolist(),
                     bar=bars.tolist(), w=self.w[i].tolist()) for i, p in enumerate(self.prompts)]


class ManyProbe:
    """The probe of K edits over one model: fixed draws shared by every prompt and edit, each edit's references
    computed once (in the first run's call, as rows before the prompts), prompts in chunks."""

    def __init__(self, sd, edits: Sequence[Edit], config: ProbeConfig,
                 concept_prompts_per_edit: Sequence[Sequence[str]] | None = None,
                 latent_shape: tuple[int, int, int] | None = None, mode: str = "loop"):
        edits = list(edits)
        if not edits:
            raise ValueError("ManyProbe needs at least one edit")
        if config.rule == "sequential":
            # Its early stop is per prompt against one edit's D(""); with K edits a prompt would stop per edit,
            # and the chunks would lose the shared trajectory that makes one probe cheaper than K.
            raise ValueError("ManyProbe decides with rule paper or calibrated; rule sequential stops per prompt and "
                             "edit: probe each edit with its own WProbe")
        concepts = [list(c) for c in (concept_prompts_per_edit or [()] * len(edits))]
        if len(concepts) != len(edits):
            raise ValueError(f"need one list of concept prompts per edit: {len(edits)} edits, {len(concepts)} lists")
        if config.rule == "calibrated" and not all(concepts):
            missing = [k for k, c in enumerate(concepts) if not c]
            raise ValueError(f"probe rule calibrated (the default) needs each edit's concept prompts (its targets): "
                             f"edits {missing} have none; or choose the paper's rule (--config.probe.rule=paper)")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        self.sd, self.edits, self.config, self.mode = sd, edits, config, mode
        self.concept_prompts = concepts
        self.latent_shape = latent_shape or sd.latent_shape(None, None)
        self.x_T, self.t = probe_draws(config, sd.scheduler, self.latent_shape)
        self._uncond = sd.put_replicated(self._encode([""]))
        # D("")'s row: the text "" (for SD 1.x/2.x the unconditional branch itself; for SDXL, whose unconditional
        # branch is zeros that no K/V LoRA changes, D of zeros would be 0 and every prompt would pass any bar).
        self._empty_text = sd.put_replicated(self._encode([""], empty_is_unconditional=False))
        self._edits = sd.put_replicated(stack_edits(edits) if mode == "stacked" else tuple(edits))
        self._empty: np.ndarray | None = None        # (K, R)
        self._thresholds: np.ndarray | None = None   # (K,)
        self.unet_calls = 0

    @property
    def k(self) -> int:
        return len(self.edits)

    def _sized(self, encoded):
        return sized_for_probe(self.sd, self.latent_shape, encoded)

    def _encode(self, prompts, **kw):
        return self._sized(self.sd.encode_prompts(list(prompts), **kw))

    def _distances(self, cond, scales: np.ndarray) -> np.ndarray:
        """(P, K, R) in padded chunks of ``prompt_chunk`` prompts, each chunk split over the model's mesh."""
        n = cond.shape[0]
        chunk = padded_rows(min(self.config.prompt_chunk, n), self.sd.mesh)
        x_T, t = self.sd.put_replicated((self.x_T, self.t))
        steps = int(num_sampling_steps(self.config.objective, self.config.t_enc))
        cond = to_numpy(cond)
        out = []
        for start in range(0, n, chunk):
            c, s = cond[start:start + chunk], scales[start:start + chunk]
            d = many_probe_distances(self.sd.unet, self.sd.scheduler, self.config, self.sd.params["unet"], self._edits,
                                     self.sd.put_rows(c, chunk), self._uncond,
                                     self.sd.put_rows(s.astype(np.float32), chunk), x_T, t,
                                     row_groups=self.sd.data_size, mode=self.mode)
            out.append(to_numpy(d)[: c.shape[0]])
            self.unet_calls += chunk * x_T.shape[0] * (2 * steps + 2 * self.k)  # one trajectory, then 2 rows per edit
        return np.concatenate(out)

    def _concept_rows(self) -> tuple[list[str], list[list[int]]]:
        """The concept prompts of every edit, each once, and for each edit the rows of its own."""
        unique: list[str] = []
        rows = []
        for prompts in self.concept_prompts:
            index = []
            for p in prompts:
                if p not in unique:
                    unique.append(p)
                index.append(unique.index(p))
            rows.append(index)
        return unique, rows

    def _distances_with_references(self, cond, scales: np.ndarray, guidance_scale: float) -> np.ndarray:
        """As WProbe: references not known yet ("" and, rule calibrated, the concept prompts of every edit) go in
        the same chunks as rows before the prompts; each concept prompt is probed once, against every edit."""
        empty = [to_numpy(self._empty_text)] if self._empty is None else []
        wants_concept = self.config.rule == "calibrated" and self._thresholds is None
        unique, rows = self._concept_rows()
        concept = [to_numpy(self._encode(unique))] if wants_concept else []
        if not empty and not concept:
            return self._distances(cond, scales)
        n_empty, n_concept = len(empty), len(unique) if concept else 0
        parts = empty + concept + ([to_numpy(cond)] if cond is not None else [])
        part_scales = [np.ones(n_empty, np.float32), np.full(n_concept, guidance_scale, np.float32)]
        distances = self._distances(np.concatenate(parts),
                                    np.concatenate(part_scales + ([scales] if cond is not None else [])))
        if n_empty:
            self._empty = distances[0]
        if n_concept:
            concept_d = distances[n_empty:n_empty + n_concept]
            self._thresholds = np.asarray([calibrated_threshold(concept_d[index, k], self._empty[k])
                                           for k, index in enumerate(rows)], np.float64)
        return distances[n_empty + n_concept:]

    @property
    def empty_distances(self) -> np.ndarray:
        """d_r,k("") for every edit and draw, (K, R), computed on first use."""
        if self._empty is None:
            self._empty = self._distances(self._empty_text, np.ones(1, np.float32))[0]
        return self._empty

    def thresholds(self, guidance_scale: float) -> np.ndarray | None:
        """Rule calibrated: (K,) √(D_k(concept_k) · D_k("")), computed on first use (None for rule paper)."""
        if self.config.rule != "calibrated":
            return None
        if self._thresholds is None:
            self._distances_with_references(None, np.zeros(0, np.float32), guidance_scale)
        return self._thresholds

    def run(self, prompts: Sequence[str], guidance_scales: float | Sequence[float] = 7.5,
            prompt_embeddings: jax.Array | None = None) -> ManyProbeResult:
        """D_k(p), each edit's references, flags and w for ``prompts``; the concept prompts are probed at the
        median of the first run's scales, as WProbe does."""
        prompts = list(prompts)
        scales = np.broadcast_to(np.asarray(guidance_scales, np.float32), (len(prompts),)).copy()
        guidance = float(np.median(scales)) if prompts else 7.5
        if prompts:
            cond = self._encode(prompts) if prompt_embeddings is None else self._sized(jnp.asarray(prompt_embeddings))
            distances = self._distances_with_references(cond, scales, guidance)
        else:
            distances = np.zeros((0, self.k, self.config.draws), np.float32)
        empty = self.empty_distances
        thresholds = self.thresholds(guidance)
        d = np.zeros((len(prompts), self.k), np.float32)
        w = np.zeros((len(prompts), self.k), np.float32)
        for k in range(self.k):
            # decide() per edit: the very rule WProbe and UnGuidePipeline apply, edit k against its own bar.
            d[:, k], w[:, k], _ = decide(distances[:, k], empty[k], self.config,
                                         None if thresholds is None else float(thresholds[k]))
        d_empty = np.asarray([float(e.mean()) for e in empty])
        # The bar in float32, as decide() compares it: a D on the bar flags exactly where w says so.
        bars = (d_empty if thresholds is None else thresholds).astype(np.float32)
        return ManyProbeResult(prompts=prompts, d=d, d_empty=d_empty, w=w, flags=d > bars[None, :],
                               distances=distances, thresholds=thresholds)
