"""The w probe of UnGuidance (Polowczyk et al., arXiv 2508.05755): how much does the edit change a prompt's early denoising?

    D(p) = mean over R draws of ‖ ε_edit(z_p, t, p) − ε_base(z_p, t, p) ‖₂

z_p is the latent after the first DDIM steps of the *base* model with CFG on p from x_T (stopped at
``t_enc``, as the training objective stops its trajectories, in either timestep mode), and t is drawn
from the query range of that ``t_enc``. The R draws (x_T, t) come from the probe seed alone, so every
prompt and the empty prompt see the same draws: D("") is paired with every D(p), does not depend on
p, and is computed once per edit (``WProbe`` caches it). Paper rule: w = w_erase (−1) where
D(p) > D(""), else w_keep (2).

All prompts of a chunk and all their draws run in one jitted call: ``jax.vmap`` over prompts of a
function that batches the draws (on the CPU in groups of prompts of about ``rows_per_call()`` UNet
rows, one group after the other, so that each group stays in the caches), the base/edited predictions at t coming out of one UNet call with a
per-row edit strength (``unguide_jax.edits``).
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
from unguide_jax.edits.edit import Edit, apply_unet
from unguide_jax.erasers.unguide.objective import (
    TIMESTEP_MODES,
    ObjectiveConfig,
    num_sampling_steps,
    query_timestep_range,
    sample_until,
)
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import to_numpy
from unguide_jax.settings import Config, InvalidValue, at_least, option, seed_range

RULES = ("paper", "sequential", "calibrated")


@dataclasses.dataclass(frozen=True)
class ProbeConfig(Config):
    """UnGuidance's w probe (UnGuide, Sec. 4). The default rule is ``calibrated``, the rule behind the
    README's table; ``paper`` is the paper's own threshold."""

    draws: int = option(30, "draws R: 30 for objects (one probe per prompt), 10 for explicit content", check=at_least(1))
    t_enc: int = option(40, "the base trajectory stops at t_enc of ddim_steps, as the objective does")
    ddim_steps: int = option(50, "DDIM steps of the probe's trajectory")
    # "corrected" (as training): 9 steps from t = 981 leave z at t = 801, queried there.
    # "reference": the authors' code, 10 steps from 961 leave z at 761, queried at t ~ U[800, 820).
    timestep_mode: str = option("corrected", "corrected (as training) | reference (the authors' code)",
                                choices=TIMESTEP_MODES)
    seed: int = option(0, "seed of the draws (x_T, t), shared by every prompt and by the empty prompt",
                       check=seed_range)
    w_erase: float = option(-1.0, "w1: the prompt carries the concept, lean on the edit")
    w_keep: float = option(2.0, "w2: an unrelated prompt, lean on the base model")
    # "calibrated" (ours): w1 if D(p) > √(D(concept) · D("")), D(concept) the mean D of the edit's own target
    # prompts on the same draws: a threshold halfway, on a log scale, between what the edit does to its concept
    # and what it does to nothing. The paper's threshold D("") is the floor every prompt sits on: a prompt the
    # edit hardly touches still lands just above it (on the shipped model 0.47–0.74 against 0.48, the concept 2.9).
    rule: str = option("calibrated", 'calibrated: w1 if D(p) > √(D(concept) · D("")), the edit\'s own target prompts '
                                     'giving D(concept); paper: w1 if D(p) > D("") else w2; sequential: paper\'s '
                                     'rule, stopping early per prompt', choices=RULES)
    prompt_chunk: int = option(8, "prompts per jitted probe call (the last chunk is padded: one compile)",
                               check=at_least(1))
    # rule "sequential" (ours, not the paper's): draws in rounds of round_draws, up to `draws`; a prompt stops
    # once its paired differences d_r(p) − d_r("") have a mean farther than z standard errors from 0.
    round_draws: int = option(5, "rule=sequential: draws per round, in [2, draws]")
    z: float = option(2.58, "rule=sequential: a prompt stops once its mean paired difference is z standard errors "
                            "from 0 (inf: never early, the paper's rule on every draw)", infinite=True)

    def validate(self) -> None:
        if not 0 <= self.t_enc < self.ddim_steps:
            raise InvalidValue("t_enc", f"must be in [0, ddim_steps={self.ddim_steps}), got {self.t_enc}")
        if self.rule == "sequential" and not 2 <= self.round_draws <= self.draws:
            raise InvalidValue("round_draws", f"must be in [2, draws={self.draws}] with rule=sequential, "
                                              f"got {self.round_draws}")

    @property
    def objective(self) -> ObjectiveConfig:
        """The trajectory and timestep arithmetic shared with the training objective."""
        return ObjectiveConfig(ddim_steps=self.ddim_steps, timestep_mode=self.timestep_mode)


def probe_draws(config: ProbeConfig, scheduler_config: SchedulerConfig,
                latent_shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """(x_T (R, h, w, c), t (R,)) from the probe seed."""
    k_noise, k_t = jax.random.split(jax.random.key(config.seed))
    low, high = query_timestep_range(scheduler_config, config.objective, np.int32(config.t_enc))
    x_T = jax.random.normal(k_noise, (config.draws, *latent_shape), jnp.float32)
    t = jax.random.randint(k_t, (config.draws,), int(low), int(high), jnp.int32)
    return x_T, t


def base_and_edited(unet, base_params, edit: Edit, z, t, context) -> tuple[jax.Array, jax.Array]:
    """(ε_base, ε_edit) per row, fp32: one UNet call when the edit allows per-row strength."""
    n = z.shape[0]
    if edit.supports_rows:
        out = apply_unet(unet, base_params, edit, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                         jnp.concatenate([context, context]),
                         strength=jnp.concatenate([jnp.zeros((n,)), jnp.ones((n,))]))
        base, edited = jnp.split(out.astype(jnp.float32), 2)
        return base, edited
    base = unet.apply({"params": base_params}, z, t, context).astype(jnp.float32)
    return base, apply_unet(unet, base_params, edit, z, t, context).astype(jnp.float32)


def edit_minus_base(unet, base_params, edit: Edit, z, t, context) -> jax.Array:
    """ε_edit(z, t, c) − ε_base(z, t, c) per row, fp32."""
    base, edited = base_and_edited(unet, base_params, edit, z, t, context)
    return edited - base


def probe_distances(unet, scheduler_config: SchedulerConfig, config: ProbeConfig, base_params, edit: Edit,
                    cond: jax.Array, uncond: jax.Array, guidance_scale: jax.Array, x_T: jax.Array,
                    t: jax.Array, row_groups: int = 1) -> jax.Array:
    """‖ε_edit − ε_base‖₂ per prompt and draw: (P, R). cond (P, L, D), uncond (1, L, D), guidance_scale (P,).
    ``row_groups``: the mesh's data size when the prompts are sharded over it."""
    # Compiled per trajectory, not per ProbeConfig: the rule, the seed, the w values and the chunking do not
    # change the program, and a new static value would trace it again.
    return _probe_distances(unet, scheduler_config, config.objective, config.t_enc, base_params, edit, cond, uncond,
                            guidance_scale, x_T, t, row_groups)


@functools.partial(jax.jit, static_argnames=("unet", "scheduler_config", "objective", "t_enc", "row_groups"),
                   compiler_options=XLA_CPU_OPTIONS)
def _probe_distances(unet, scheduler_config: SchedulerConfig, objective: ObjectiveConfig, t_enc: int, base_params,
                     edit: Edit, cond: jax.Array, uncond: jax.Array, guidance_scale: jax.Array, x_T: jax.Array,
                     t: jax.Array, row_groups: int = 1) -> jax.Array:
    draws = x_T.shape[0]
    t_enc_r = jnp.full((draws,), t_enc, jnp.int32)
    uncond_r = jnp.broadcast_to(uncond, (draws,) + uncond.shape[1:])

    def one_prompt(c, scale):
        c_r = jnp.broadcast_to(c, (draws,) + c.shape)
        z = sample_until(unet, base_params, scheduler_config, objective, x_T, t_enc_r, c_r, uncond_r, scale)
        diff = edit_minus_base(unet, base_params, edit, z, t, c_r)
        return jnp.sqrt(jnp.sum(diff.reshape(draws, -1) ** 2, axis=-1))

    scales = jnp.asarray(guidance_scale, jnp.float32)
    # On the CPU, prompts in groups of about rows_per_call() UNet rows (2R per prompt), one group after
    # the other, so that a group's activations stay in the caches; elsewhere all prompts in one call.
    prompts_per_call = max(1, rows_per_call() // (2 * draws)) if rows_per_call() else 0
    return map_rows(jax.vmap(one_prompt), prompts_per_call, cond, scales, groups=row_groups)


def decide(distances: np.ndarray, empty: np.ndarray, probe: ProbeConfig,
           threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D(p), w, draws used) per prompt from (P, R) distances (NaN: not drawn) and D("")'s R distances. The
    paper's rule compares D(p) with D("") over all draws; the sequential rule pairs each prompt with D("")
    over the draws it used; the calibrated rule compares with ``threshold`` (``calibrated_threshold``).
    Framework-free: ``WProbe`` and the PyTorch ``UnGuidePipeline`` both decide here."""
    used = (~np.isnan(distances)).sum(axis=1)
    d = np.nanmean(distances, axis=1) if len(distances) else np.zeros(0, np.float32)
    if probe.rule == "sequential":
        bar = np.asarray([empty[:k].mean() for k in used], np.float32)  # paired: the draws the prompt used
    elif probe.rule == "calibrated":
        if threshold is None:
            raise ValueError("probe rule calibrated needs the threshold from the edit's concept prompts")
        bar = np.full(len(d), float(threshold), np.float32)
    else:
        bar = np.full(len(d), float(empty.mean()), np.float32)
    return d, weights_at(d, bar, probe), used


def weights_at(d: np.ndarray, bar, probe: ProbeConfig) -> np.ndarray:
    """w per prompt: w_erase where D(p) passes the bar (a scalar or one per prompt), else w_keep."""
    return np.where(np.asarray(d) > bar, probe.w_erase, probe.w_keep).astype(np.float32)


def calibrated_threshold(concept_distances: np.ndarray, empty: np.ndarray) -> float:
    """√(D(concept) · D("")): D(concept) the mean over the concept prompts' (C, R) distances."""
    return float(np.sqrt(np.nanmean(concept_distances) * np.mean(empty)))


def sequential_distances(num_prompts: int, probe: ProbeConfig, empty: np.ndarray, run) -> np.ndarray:
    """The sequential rule's (P, R) distances, NaN where a prompt had stopped: rounds of ``round_draws`` draws; a
    prompt stops once its paired differences d_r(p) − d_r("") have a mean farther than z standard errors from 0
    (the last round overlaps the previous, so that every round has one compiled shape). ``run(prompts,
    draws)``: the distances of those prompts (an index array) on those draws (a slice)."""
    distances = np.full((num_prompts, probe.draws), np.nan, np.float32)
    open_ = np.arange(num_prompts)
    for start in range(0, probe.draws, probe.round_draws):
        stop = min(start + probe.round_draws, probe.draws)
        if stop - start < probe.round_draws:
            start = stop - probe.round_draws
        distances[open_, start:stop] = run(open_, slice(start, stop))
        diffs = distances[open_, :stop] - empty[:stop]
        mean, sem = diffs.mean(axis=1), diffs.std(axis=1, ddof=1) / np.sqrt(stop)
        open_ = open_[np.abs(mean) <= probe.z * sem]
        if not len(open_):
            break
    return distances


@dataclasses.dataclass
class ProbeResult:
    prompts: list[str]
    d: np.ndarray           # (P,) D(p), the mean over the draws used
    d_empty: float          # D("") over all draws
    w: np.ndarray           # (P,)
    distances: np.ndarray   # (P, R) per draw; NaN where a sequential probe stopped before the draw
    draws_used: np.ndarray  # (P,)
    threshold: float | None = None  # rule calibrated: √(D(concept) · D(""))

    def records(self) -> list[dict]:
        bar = self.d_empty if self.threshold is None else self.threshold
        extra = {} if self.threshold is None else {"threshold": self.threshold}
        return [dict(prompt=p, D=float(d), D_empty=self.d_empty, w=float(w), carries_concept=bool(d > bar),
                     draws=int(n), **extra) for p, d, w, n in zip(self.prompts, self.d, self.w, self.draws_used)]


def sized_for_probe(sd, latent_shape: tuple[int, int, int], encoded):
    """SDXL: ``encoded`` with the time ids of the probed size (the draws' latent shape); SD 1.x/2.x: unchanged."""
    f = sd.vae_scale_factor
    return sd.sized_context(encoded, latent_shape[0] * f, latent_shape[1] * f)


class WProbe:
    """The probe of one edit over one model: fixed draws, D("") computed once, prompts in chunks."""

    def __init__(self, sd, edit: Edit, config: ProbeConfig, latent_shape: tuple[int, int, int] | None = None,
                 concept_prompts: Sequence[str] = ()):
        """``concept_prompts``: the edit's own target prompts (rule calibrated sets its threshold from them)."""
        if config.rule == "calibrated" and not concept_prompts:
            raise ValueError("probe rule calibrated (the default) needs the edit's concept prompts (its targets): none "
                             "were given. Edits saved by this project's train job carry their concept; for another "
                             "LoRA choose the paper's rule (--config.probe.rule=paper)")
        self.sd, self.edit, self.config = sd, edit, config
        self.concept_prompts = list(concept_prompts)
        self._threshold: float | None = None
        self.latent_shape = latent_shape or sd.latent_shape(None, None)
        self.x_T, self.t = probe_draws(config, sd.scheduler, self.latent_shape)
        self._uncond = sd.put_replicated(self._encode([""]))
        # D("")'s row: the text "" (for SD 1.x/2.x the unconditional branch itself; for SDXL, whose unconditional
        # branch is zeros that no K/V LoRA changes, D of zeros would be 0 and every prompt would pass any bar).
        self._empty_text = sd.put_replicated(self._encode([""], empty_is_unconditional=False))
        self._edit = sd.put_replicated(edit)
        self._empty: np.ndarray | None = None
        self.unet_calls = 0  # UNet rows evaluated, for cost accounting

    def _sized(self, encoded):
        return sized_for_probe(self.sd, self.latent_shape, encoded)

    def _encode(self, prompts, **kw):
        return self._sized(self.sd.encode_prompts(list(prompts), **kw))

    def _distances(self, cond: jax.Array, scales: np.ndarray, draws: slice = slice(None)) -> np.ndarray:
        """(P, R') distances for the draws ``draws``, the prompts in padded chunks (one compile per shape),
        each chunk's prompts split over the model's mesh."""
        n = cond.shape[0]
        chunk = padded_rows(min(self.config.prompt_chunk, n), self.sd.mesh)
        x_T, t = self.sd.put_replicated((self.x_T[draws], self.t[draws]))
        steps = int(num_sampling_steps(self.config.objective, self.config.t_enc))
        cond = to_numpy(cond)
        out = []
        for start in range(0, n, chunk):
            c, s = cond[start:start + chunk], scales[start:start + chunk]
            d = probe_distances(self.sd.unet, self.sd.scheduler, self.config, self.sd.params["unet"], self._edit,
                                self.sd.put_rows(c, chunk), self._uncond, self.sd.put_rows(s.astype(np.float32), chunk),
                                x_T, t, row_groups=self.sd.data_size)
            out.append(to_numpy(d)[: c.shape[0]])
            self.unet_calls += chunk * x_T.shape[0] * (2 * steps + 2)  # CFG steps, then base + edited at t
        return np.concatenate(out)

    def _distances_with_references(self, cond: jax.Array, scales: np.ndarray, guidance_scale: float) -> np.ndarray:
        """The prompts' (P, R) distances. The references not known yet, D("") and (rule calibrated) the concept
        prompts' distances, go in the same chunks as rows before the prompts: every prompt is its own row of the
        vmap, so they come out as their own calls would give them, and one compiled shape serves them all."""
        empty = [to_numpy(self._empty_text)] if self._empty is None else []
        wants_concept = self.config.rule == "calibrated" and self._threshold is None
        concept = [to_numpy(self._encode(self.concept_prompts))] if wants_concept else []
        if not empty and not concept:
            return self._distances(cond, scales)
        n_empty, n_concept = len(empty), len(self.concept_prompts) if concept else 0
        distances = self._distances(
            np.concatenate(empty + concept + [to_numpy(cond)]),
            np.concatenate([np.ones(n_empty, np.float32), np.full(n_concept, guidance_scale, np.float32), scales]))
        if n_empty:
            self._empty = distances[0]
        if n_concept:
            self._threshold = calibrated_threshold(distances[n_empty:n_empty + n_concept], self.empty_distances)
        return distances[n_empty + n_concept:]

    @property
    def empty_distances(self) -> np.ndarray:
        """d_r("") for every draw, computed on first use (CFG on "" is the unconditional prediction whatever
        its scale, so one probe serves every prompt)."""
        if self._empty is None:
            self._empty = self._distances(self._empty_text, np.ones(1, np.float32))[0]
        return self._empty

    @property
    def d_empty(self) -> float:
        return float(self.empty_distances.mean())

    def threshold(self, guidance_scale: float) -> float | None:
        """Rule calibrated: √(D(concept) · D("")), computed on first use (None for the other rules)."""
        if self.config.rule != "calibrated":
            return None
        if self._threshold is None:
            concept = self._distances(self._encode(self.concept_prompts),
                                      np.full(len(self.concept_prompts), guidance_scale, np.float32))
            self._threshold = calibrated_threshold(concept, self.empty_distances)
        return self._threshold

    def run(self, prompts: Sequence[str], guidance_scales: float | Sequence[float] = 7.5,
            prompt_embeddings: jax.Array | None = None) -> ProbeResult:
        """D(p), D("") and w for ``prompts`` (``prompt_embeddings``: encoder outputs to use instead)."""
        prompts = list(prompts)
        scales = np.broadcast_to(np.asarray(guidance_scales, np.float32), (len(prompts),)).copy()
        cond = self._encode(prompts) if prompt_embeddings is None else self._sized(jnp.asarray(prompt_embeddings))
        r = self.config.draws
        guidance = float(np.median(scales)) if prompts else 0.0
        if not prompts:
            distances = np.zeros((0, r))
        elif self.config.rule == "sequential":
            distances = sequential_distances(len(prompts), self.config, self.empty_distances,
                                             lambda index, draws: self._distances(cond[index], scales[index], draws))
        else:
            distances = self._distances_with_references(cond, scales, guidance)
        if not prompts:  # nothing to decide (and no threshold to probe for)
            empty = np.zeros((0,), np.float32)
            return ProbeResult(prompts=[], d=empty, d_empty=self.d_empty, w=empty, distances=distances,
                               draws_used=np.zeros((0,), np.int32), threshold=None)
        threshold = self.threshold(guidance)
        d, w, used = decide(distances, self.empty_distances, self.config, threshold)
        return ProbeResult(prompts=prompts, d=d, d_empty=self.d_empty, w=w, distances=distances, draws_used=used,
                           threshold=threshold)
