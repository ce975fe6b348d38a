"""UnGuide for diffusers users: ``UnGuidePipeline``, a ``StableDiffusionPipeline`` that samples with UnGuidance,
and ``UnGuideXLPipeline``, the same on a ``StableDiffusionXLPipeline`` (an export of an SDXL model).

    from unguide_jax.pytorch import UnGuidePipeline
    pipe = UnGuidePipeline.from_pretrained("path/to/model", safety_checker=None)
    pipe.load_unguide("runs/unguide-sd15-dog/export")   # the PEFT LoRA + unguide.json
    out = pipe(["a photo of the dog", "a photo of the cat"], seeds=[0, 1])
    out.images, out.w, out.d, out.d_empty

Both classes are ``UnGuideMixin`` (loading, the probe, UnGuidance) over their diffusers pipeline; each says how it
encodes prompts, calls its UNet and decodes. An SDXL prompt's encoding is carried as one tensor, as our JAX side
carries it (``unguide_jax.models.unet.pack_context``): the text states with one more token holding the pooled
text embedding, split off again at the UNet call, where the time ids (size, crop 0, size) are added from the
latents' size. The empty prompt, the unconditional one, is all zeros where the folder sets
``force_zeros_for_empty_prompt`` (SDXL base), as in our sampler and diffusers' negative branch.

What a call does (UnGuide's sampling), with our JAX sampler's numbers:
1. The w probe of every distinct (prompt, guidance) of the call, batched: all prompts × the R draws
   (x_T, t) as rows of the same UNet calls (``probe_batch_size`` trajectories per call), base-model DDIM
   with CFG from x_T stopped at t_enc, then base and LoRA predictions at t in one call. D(p) is the mean
   ‖ε_lora − ε_base‖₂ over the draws; D("") comes from unguide.json when cached for this image size, else
   from the same batch (one more row of prompts), and is kept for the next calls. Rule "calibrated" (the
   default): w = w_erase if D(p) > √(D(concept) · D("")) else w_keep, D(concept) the mean D of the concept's
   target prompts (unguide.json's concept.targets) on the same draws, probed in the same batch at the median
   CFG scale of the call's prompts, once per image size, and kept (as our sampler's ``WProbe`` does); "paper":
   w = w_erase if D(p) > D("") else w_keep; "sequential": the paper's rule in rounds of draws, a prompt stops
   once decided. ``load_unguide(folder, probe={"rule": "paper"})`` replaces unguide.json's probe settings.
2. DDIM (η = 0) over ``num_inference_steps`` with ε = w·CFG_base + (1 − w)·CFG_lora per image; the four
   predictions (base/LoRA × uncond/cond) of a step come out of one UNet call on 4B rows (``fused``).

The base model is the same UNet with this adapter's contribution multiplied by 0 for its rows: a forward
hook on every ``lora_B`` of the adapter scales its output per row (0: base, 1: LoRA). That is exact (the
layer adds 0.0), lets base and LoRA rows share one call, and leaves any other loaded adapter as it is;
peft's ``disable_adapters`` would switch off every adapter and could not mix rows in one call.

Several concepts at once (issue 38; our JAX ``ManyProbe`` and ``generate_many``): ``load_unguide(folder,
adapter_name=...)`` once per export, each under its own name (the same name again replaces that one;
``unguide_adapters`` lists them, ``unload_unguide`` removes them). Each keeps its unguide.json, probe rule,
w_erase/w_keep and concept target prompts; the settings that make the draws and the base trajectory
(``DISTANCE_KEYS``) must agree, since the K probes share them: one trajectory per (prompt, draw), then the
base and each adapter's LoRA alone at t, so adapter k gets D_k(p), its own D_k("") and bar (rule calibrated:
√(D_k(concept_k) · D_k("")) from its own targets) and flags prompt p where D_k(p) passes that bar
(``AdaptersProbeResult``; rule sequential is for one adapter). Sampling, ``combine="flagged-mean"`` (the
default): prompt p with flagged set F ≠ ∅ samples w_erase·CFG_base + (1 − w_erase)·CFG_F, CFG_F with exactly
the LoRAs in F on (each at full strength), and with F = ∅ w_keep·CFG_base + (1 − w_keep)·CFG_mean, the K LoRAs
each at strength 1/K ("flagged": all K at full strength): still one UNet call on 4B rows per step, the hooks
scaling each adapter per row (``diffusion.many_guidance``). ``combine="sum"``: CFG_base +
Σ_k (1 − w_k)·(CFG_k − CFG_base), K + 1 CFG pairs. With one adapter both are the formula above, today's numbers.

Noise: ``seeds`` (default 0..n−1) give the initial latents of our JAX sampler exactly (``jax_latents``:
``jax.random``, on JAX's CPU device), and the probe draws come from the probe seed the same way
(``jax_probe_draws``): with the same model, adapter and seeds the images are ours (within rounding).
``latents=`` and ``probe_draws=`` take explicit arrays; ``generator=`` draws torch noise as diffusers does
(valid UnGuide images, not identical to ours).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from unguide_jax.diffusion.many_guidance import COMBINE_RULES, flagged_guidance
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.erasers.unguide.objective import num_sampling_steps, sampling_table
from unguide_jax.erasers.unguide.probe import (
    ProbeConfig,
    calibrated_threshold,
    decide,
    sequential_distances,
)
from unguide_jax.loading.base_model import fingerprint_mismatches, weight_fingerprint
from unguide_jax.models.unet import pooled_width, size_time_ids
from unguide_jax.publishing.unguide_json import PIPELINE_CLASSES, read_unguide_json

DEFAULT_ADAPTER_NAME = "unguide"
PEFT_UNET_PREFIX = "unet."
# The probe settings that change the distances: a D("") cached in unguide.json holds only for the same ones.
DISTANCE_KEYS = ("draws", "seed", "t_enc", "ddim_steps", "timestep_mode")


@dataclasses.dataclass
class UnGuidePipelineOutput(BaseOutput):
    """``images`` as diffusers returns them (PIL list, np array or latents); per image: ``w`` and ``d`` = D(p)
    (NaN where w was given); ``d_empty`` = D("") (NaN when nothing was probed); ``threshold``: rule calibrated's
    √(D(concept) · D("")) (None for the other rules or when w was given). ``adapters``: the UnGuide adapters, in
    load order. With K > 1 adapters: ``d`` (images, K), ``d_empty`` and ``threshold`` (K,) (NaN for an adapter
    of another rule), ``flags`` (images, K): the adapters each image's prompt carries, and ``w`` the w each image
    was sampled with: (images,) under combine "flagged", (images, K) under "sum"."""

    images: list | np.ndarray | torch.Tensor
    w: np.ndarray
    d: np.ndarray
    d_empty: float | np.ndarray
    nsfw_content_detected: list[bool] | None = None
    threshold: float | np.ndarray | None = None
    adapters: list[str] | None = None
    flags: np.ndarray | None = None


@dataclasses.dataclass
class ProbeResult:
    """The probe of distinct prompts: D(p), D(""), w, the per-draw distances (NaN: a draw a sequential probe
    did not need) and the draws used; rule calibrated: the threshold √(D(concept) · D("")), the concept's target
    prompts' (C, R) distances and the CFG scale they were probed at (None for the other rules)."""

    prompts: list[str]
    guidance_scales: np.ndarray
    d: np.ndarray
    d_empty: float
    w: np.ndarray
    distances: np.ndarray
    draws_used: np.ndarray
    threshold: float | None = None
    concept_distances: np.ndarray | None = None
    concept_guidance_scale: float | None = None


@dataclasses.dataclass
class AdaptersProbeResult:
    """The probe of K loaded adapters on shared draws (``UnGuidePipeline.probe`` with K > 1; our JAX
    ``ManyProbeResult``): d (P, K) D_k(p), d_empty (K,) D_k(""), w (P, K) by adapter k's own rule and bar, flags
    (P, K) where D_k(p) passes that bar, distances (P, K, R); thresholds (K,) rule calibrated's √(D_k(concept_k)
    · D_k("")), NaN for an adapter of another rule (None when no adapter has rule calibrated); per adapter, its
    concept prompts' (C_k, R) distances and the CFG scale they were probed at (None: not rule calibrated)."""

    adapters: list[str]
    prompts: list[str]
    guidance_scales: np.ndarray
    d: np.ndarray
    d_empty: np.ndarray
    w: np.ndarray
    flags: np.ndarray
    distances: np.ndarray
    draws_used: np.ndarray
    thresholds: np.ndarray | None = None
    concept_distances: list = dataclasses.field(default_factory=list)
    concept_guidance_scales: list = dataclasses.field(default_factory=list)

    def flagged(self) -> list[list[str]]:
        """Per prompt, the adapters (concepts) it carries."""
        return [[self.adapters[k] for k in np.flatnonzero(row)] for row in self.flags]

    def for_adapter(self, name: str) -> ProbeResult:
        """Adapter ``name``'s result as ``probe`` gives it with that adapter loaded alone (within rounding)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} in this probe; its adapters: {self.adapters}")
        k = self.adapters.index(name)
        threshold = None if self.thresholds is None or np.isnan(self.thresholds[k]) else float(self.thresholds[k])
        return ProbeResult(prompts=list(self.prompts), guidance_scales=self.guidance_scales, d=self.d[:, k],
                           d_empty=float(self.d_empty[k]), w=self.w[:, k], distances=self.distances[:, k],
                           draws_used=self.draws_used[:, k], threshold=threshold,
                           concept_distances=self.concept_distances[k],
                           concept_guidance_scale=self.concept_guidance_scales[k])


@dataclasses.dataclass(frozen=True)
class UnGuideAdapter:
    """A loaded UnGuide adapter (``UnGuidePipeline.unguide_adapters``): its unguide.json record, the probe
    settings in use and its concept's target prompts."""

    name: str
    settings: dict
    probe: ProbeConfig
    concept_prompts: tuple[str, ...]


@dataclasses.dataclass
class _Adapter:
    name: str
    settings: dict
    probe: ProbeConfig
    layers: list          # peft LoRA layers carrying the adapter
    hooks: list           # their lora_B forward hooks
    strength: list        # [None or a (rows,) tensor]: the per-row scale the hooks apply
    empty_cache: dict     # (height, width, draws key) -> D("") per draw, float32
    concept_prompts: list = dataclasses.field(default_factory=list)  # unguide.json's concept.targets
    # rule calibrated: (height, width, draws key) -> (the concept prompts' (C, R) distances, their CFG scale)
    concept_cache: dict = dataclasses.field(default_factory=dict)


# --- JAX-identical noise -------------------------------------------------------------------------------

def _jax_on_cpu():
    """jax and its CPU device. JAX is told not to preallocate accelerator memory if this is the first use of
    JAX in the process (torch holds that memory); the draws are the same on every backend."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    try:
        return jax, jax.devices("cpu")[0]
    except RuntimeError:  # JAX restricted to other platforms
        return jax, jax.devices()[0]


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


@functools.cache
def _jitted(name: str):
    """Our draw functions, jitted (one compile instead of one per eager op): the same values."""
    import jax

    from unguide_jax.diffusion.sampler import initial_latents
    from unguide_jax.erasers.unguide.probe import probe_draws

    if name == "latents":
        return jax.jit(initial_latents, static_argnums=(1,))
    return jax.jit(probe_draws, static_argnums=(0, 1, 2))


def jax_latents(seeds: Sequence[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial latents (B, C, h, w) fp32 exactly as our JAX sampler draws them: one ``jax.random`` stream per
    seed (``unguide_jax.diffusion.sampler.initial_latents``). ``latent_shape``: (C, h, w)."""
    jax, cpu = _jax_on_cpu()
    c, h, w = latent_shape
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer) or (seeds < 0).any() or (seeds >= 2 ** 32).any():
        raise ValueError(f"seeds must be a list of integers in [0, 2**32), got {seeds.tolist()}")
    with jax.default_device(cpu):
        return _nchw(jax.device_get(_jitted("latents")(seeds.astype(np.uint32), (h, w, c))))


def jax_probe_draws(probe: ProbeConfig, latent_shape: tuple[int, int, int],
                    scheduler_config: SchedulerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's draws (x_T (R, C, h, w) fp32, t (R,) int64) from its seed, as our JAX probe makes them."""
    jax, cpu = _jax_on_cpu()
    c, h, w = latent_shape
    with jax.default_device(cpu):
        x_T, t = jax.device_get(_jitted("draws")(probe, scheduler_config, (h, w, c)))
    return _nchw(x_T), torch.from_numpy(np.asarray(t, np.int64))


def probe_settings(folder, settings: dict, overrides=None) -> ProbeConfig:
    """The probe ``load_unguide`` uses: unguide.json's settings, ``overrides`` (a mapping or a ProbeConfig)
    replacing some; keys neither gives take ``ProbeConfig``'s defaults. Rule calibrated needs the concept's
    target prompts in unguide.json."""
    if isinstance(overrides, ProbeConfig):
        overrides = dataclasses.asdict(overrides)
    try:
        probe = ProbeConfig(**{**settings["probe"], **dict(overrides or {})})
    except (TypeError, ValueError) as err:
        raise ValueError(f"probe settings {dict(overrides or {})!r} over {folder}'s unguide.json: {err}") from None
    if probe.rule == "calibrated" and not settings.get("concept", {}).get("targets"):
        raise ValueError(
            f"{folder}: the probe rule is 'calibrated' (w = w_erase if D(p) > sqrt(D(concept) * D(\"\")), D(concept) "
            "from the concept's target prompts), but unguide.json has no concept target prompts (concept.targets "
            "missing or empty: an export from an older version). Re-export the edit with `unguide-export RUN "
            "--formats peft --out DIR`, which writes them, or pass probe rule=paper: "
            "pipe.load_unguide(folder, probe={'rule': 'paper'}) (the paper's rule, w_erase if D(p) > D(\"\"))")
    return probe


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _count(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer argument in [minimum, maximum], or a ValueError naming it."""
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _per_prompt(name: str, value, prompts: int) -> np.ndarray:
    """One finite number, or one per prompt, as a (prompts,) float32 array; a ValueError naming ``name``."""
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or one number per prompt, got {value!r}") from None
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != prompts):
        got = f"{array.shape[0]} values" if array.ndim == 1 else f"shape {array.shape}"
        raise ValueError(f"{name}: one value or one per prompt ({prompts}), got {got}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return np.broadcast_to(array.astype(np.float32), (prompts,)).copy()


def _finite_tensor(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(tensor)).sum())} non-finite values")
    return tensor


def _per_prompt_adapter(name: str, value, prompts: int, adapters: int) -> np.ndarray:
    """``_per_prompt``'s values as (prompts, adapters) float32; with several adapters also a (prompts, adapters)
    array."""
    if adapters > 1 and np.ndim(value) == 2:
        array = np.asarray(value, np.float64)
        if array.shape != (prompts, adapters):
            raise ValueError(f"{name}: one value, one per prompt ({prompts}) or one per prompt and adapter "
                             f"({prompts}, {adapters}), got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite, got {array.tolist()}")
        return array.astype(np.float32)
    return np.repeat(_per_prompt(name, value, prompts)[:, None], adapters, axis=1)


def _check_one_w(adapters: list) -> None:
    """combine "flagged" samples a prompt with one w for all the adapters it flags (or all, when it flags none)."""
    for key in ("w_erase", "w_keep"):
        first = adapters[0]
        for other in adapters[1:]:
            if getattr(other.probe, key) != getattr(first.probe, key):
                raise ValueError(
                    f"probe setting {key!r}: {getattr(first.probe, key)!r} for adapter {first.name!r}, "
                    f"{getattr(other.probe, key)!r} for adapter {other.name!r}; combine='flagged' samples a prompt "
                    f"with one {key} for all the adapters it flags (or, flagging none, for all): load them with the "
                    "same one (load_unguide's probe=), or use combine='sum'")


class UnGuideMixin:
    """``load_unguide(export_folder)`` on a diffusers text-to-image pipeline; calling it probes the prompts and
    samples with UnGuidance. See the module docstring. A pipeline class gives ``unguide_family`` (unguide.json's
    base_model.family it takes) and ``_encode``, ``_unet_output`` and ``_decode``."""

    unguide_family = ""

    # --- loading -------------------------------------------------------------------------------------------

    def load_unguide(self, folder: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME,
                     check_base_model: bool = True, probe: dict | ProbeConfig | None = None) -> dict:
        """Load an UnGuide export (``folder/unguide.json`` + the PEFT LoRA it names; a train.py run folder
        works too: its export/). Checks, before anything is loaded: the probe's settings (rule calibrated needs
        unguide.json's concept target prompts), the LoRA's modules and shapes against this UNet, and
        (``check_base_model``) that the UNet's weights are the ones the LoRA was trained on. ``probe``: settings
        replacing unguide.json's (e.g. ``{"rule": "paper"}``). Returns the unguide.json record.

        Each ``adapter_name`` is one concept: another name adds an adapter beside those loaded (their probe
        settings in ``DISTANCE_KEYS`` must agree: the adapters share the draws), the same name replaces it."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        settings, lora_file = read_unguide_json(folder)
        family = settings["base_model"]["family"]
        if family != self.unguide_family:
            raise ValueError(f"{folder} is an export for a {family} base model (unguide.json base_model.family); "
                             f"{type(self).__name__} samples {self.unguide_family} models: load it with "
                             f"{PIPELINE_CLASSES[family]['unguide']}")
        file_probe = ProbeConfig(**settings["probe"])
        probe = probe_settings(folder, settings, probe)
        adapters = self._unguide_state()
        for other in adapters.values():
            if other.name == adapter_name:
                continue
            for key in DISTANCE_KEYS:
                if getattr(other.probe, key) != getattr(probe, key):
                    raise ValueError(
                        f"probe setting {key!r}: {getattr(probe, key)!r} for adapter {adapter_name!r} ({folder}), "
                        f"{getattr(other.probe, key)!r} for the loaded adapter {other.name!r}; the adapters' probes "
                        f"share one set of draws and one base trajectory, so {', '.join(DISTANCE_KEYS)} must agree: "
                        f"pass probe={{{key!r}: {getattr(other.probe, key)!r}}}, or unload_unguide({other.name!r})")
        modules = self._check_lora_file(lora_file, settings)
        if check_base_model:
            self._check_base_model(settings, modules, lora_file)
        order = list(adapters)
        if adapter_name in adapters:
            self.unload_unguide(adapter_name)
        elif adapter_name in (getattr(self.unet, "peft_config", None) or {}):
            self.delete_adapters(adapter_name)
        # diffusers leaves only the adapter it loads active; the others that were active stay so (the UnGuide
        # adapters need to be, and any other adapter of the user's is left as it was).
        active = [name for name in self._active_unet_adapters() if name != adapter_name]
        with warnings.catch_warnings():
            # peft warns of "multiple adapters in the model" from the second on: here that is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)
        try:
            self.unet.set_adapter(active + [adapter_name])
            layers = self._adapter_layers(adapter_name)
            if sorted(path for path, _ in layers) != modules:
                raise RuntimeError(f"diffusers adapted {len(layers)} modules of the UNet, the LoRA file has "
                                   f"{len(modules)}: {sorted(set(modules) ^ {p for p, _ in layers})[:5]}")
            alpha = float(settings["lora"]["alpha"])
            for path, layer in layers:
                scaling = float(layer.scaling[adapter_name])
                if not math.isclose(scaling, alpha, rel_tol=1e-5):
                    raise RuntimeError(f"{path}: peft scales the LoRA by {scaling}, unguide.json says alpha = {alpha} "
                                       "(a LoRA file without its lora_alpha metadata?)")
        except Exception:
            # A half-loaded adapter would be applied, unscaled, to every row of the others' calls.
            self.delete_adapters(adapter_name)
            if active:
                self.unet.set_adapter(active)
            raise
        strength: list = [None]

        def scale_rows(module, inputs, output):
            rows = strength[0]
            if rows is None:
                return None
            if output.shape[0] != rows.shape[0]:
                raise RuntimeError(f"UnGuide per-row strength: a LoRA layer saw {output.shape[0]} rows, the call has "
                                   f"{rows.shape[0]}")
            return output * rows.to(device=output.device, dtype=output.dtype).view(-1, *([1] * (output.ndim - 1)))

        hooks = [layer.lora_B[adapter_name].register_forward_hook(scale_rows) for _, layer in layers]
        state = _Adapter(adapter_name, settings, probe, [layer for _, layer in layers], hooks, strength, {},
                         concept_prompts=list(settings["concept"]["targets"]))
        adapters[adapter_name] = state
        if adapter_name in order:  # replaced: it keeps its place on the K axis
            for name in order:
                adapters[name] = adapters.pop(name)
        same_distances = all(getattr(probe, key) == getattr(file_probe, key) for key in DISTANCE_KEYS)
        if settings.get("empty_probe") and same_distances:
            record = settings["empty_probe"]
            if record.get("draws") == probe.draws and record.get("seed") == probe.seed:
                key = (int(record["height"]), int(record["width"]), ("seed", probe.seed))
                state.empty_cache[key] = np.asarray(record["distances"], np.float32)
        return settings

    def unload_unguide(self, adapter_name: str | None = None) -> None:
        """Remove the UnGuide adapter ``adapter_name`` (its hooks and its LoRA), or every one (None)."""
        adapters = self._unguide_state()
        if adapter_name is not None and adapter_name not in adapters:
            raise KeyError(f"no UnGuide adapter {adapter_name!r} loaded; loaded: {list(adapters)}")
        for name in [adapter_name] if adapter_name is not None else list(adapters):
            state = adapters.pop(name)
            for hook in state.hooks:
                hook.remove()
            active = [a for a in self._active_unet_adapters() if a != name]
            if name in (getattr(self.unet, "peft_config", None) or {}):
                self.delete_adapters(name)
            # peft activates some remaining adapter when the last active one goes; keep the rest as they were.
            if active:
                self.unet.set_adapter(active)

    def _active_unet_adapters(self) -> list[str]:
        if not getattr(self.unet, "peft_config", None):
            return []
        active = self.unet.active_adapters()
        return [active] if isinstance(active, str) else list(active or [])

    def _unguide_state(self) -> dict[str, _Adapter]:
        """The loaded adapters by name, in load order (the K axis of the probe and of the LoRA mix)."""
        if getattr(self, "_unguide_adapters", None) is None:
            self._unguide_adapters = {}
            self._unguide_draws = {}
        return self._unguide_adapters

    def _check_lora_file(self, lora_file: Path, settings: dict) -> list[str]:
        """The LoRA's module paths, after checking each against this UNet (exists, Linear/1x1 conv, shapes)."""
        from safetensors import safe_open

        shapes: dict[str, dict[str, tuple]] = {}
        with safe_open(str(lora_file), "pt") as f:
            for key in f.keys():
                if not key.startswith(PEFT_UNET_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                    raise ValueError(f"{lora_file}: tensor {key!r} is not a UNet LoRA weight (unet.<module>.lora_A/B.weight)")
                path, part, _ = key[len(PEFT_UNET_PREFIX):].rsplit(".", 2)
                shapes.setdefault(path, {})[part] = tuple(f.get_slice(key).get_shape())
        modules = sorted(shapes)
        listed = sorted(settings["lora"]["target_modules"])
        if modules != listed:
            raise ValueError(f"{lora_file} adapts other modules than unguide.json lists: "
                             f"{sorted(set(modules) ^ set(listed))[:5]}")
        problems = []
        for path in modules:
            try:
                layer = self.unet.get_submodule(path)
            except AttributeError:
                problems.append(f"{path}: no such module")
                continue
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, torch.nn.Linear):
                fan_in, fan_out = layer.in_features, layer.out_features
            elif isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1):
                fan_in, fan_out = layer.in_channels, layer.out_channels
            else:
                problems.append(f"{path}: a {type(layer).__name__}, not a Linear or 1x1 conv")
                continue
            a, b = shapes[path].get("lora_A"), shapes[path].get("lora_B")
            if a is None or b is None or a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
                problems.append(f"{path}: lora_A {a}, lora_B {b} for a layer of {fan_in} -> {fan_out}")
        if problems:
            raise ValueError(f"the LoRA {lora_file} does not match this UNet ({len(problems)} of {len(modules)} modules): "
                             + "; ".join(problems[:5]))
        return modules

    def _check_base_model(self, settings: dict, modules: list[str], lora_file: Path) -> None:
        expected = settings["base_model"].get("fingerprint")
        if expected is None:
            return  # exported from abstract parameters: nothing to compare
        weights = {}
        for path in modules:
            layer = self.unet.get_submodule(path)
            if getattr(layer, "merged", False):
                raise ValueError(f"{path} has a LoRA fused into its weights (fuse_lora): unfuse it before load_unguide")
            weights[path] = getattr(layer, "base_layer", layer).weight.detach().float().cpu().numpy()
        tolerance = float(settings["base_model"].get("tolerance", 1e-2))
        bad = fingerprint_mismatches(expected, weight_fingerprint(weights), tolerance)
        if bad:
            raise ValueError(f"base-model mismatch: the UNet's weights differ from the model {lora_file} was trained on "
                             f"in {len(bad)} of {len(modules)} adapted modules (e.g. {bad[0]}); load the same base model, "
                             "or pass check_base_model=False to use the LoRA anyway")

    def _adapter_layers(self, adapter_name: str) -> list[tuple[str, torch.nn.Module]]:
        from peft.tuners.lora import LoraLayer

        return [(path, m) for path, m in self.unet.named_modules()
                if isinstance(m, LoraLayer) and adapter_name in m.lora_B]

    @property
    def unguide_adapters(self) -> dict[str, UnGuideAdapter]:
        """The loaded UnGuide adapters by name, in load order."""
        return {name: UnGuideAdapter(name, a.settings, a.probe, tuple(a.concept_prompts))
                for name, a in self._unguide_state().items()}

    @property
    def unguide_settings(self) -> dict:
        """The loaded unguide.json record (one adapter loaded; several: ``unguide_adapters[name].settings``)."""
        return self._single("unguide_settings").settings

    @property
    def unguide_probe(self) -> ProbeConfig:
        """The probe's settings in use (unguide.json's, with ``load_unguide``'s ``probe`` replacing some; several
        adapters: ``unguide_adapters[name].probe``)."""
        return self._single("unguide_probe").probe

    def _single(self, what: str) -> _Adapter:
        adapters = self._loaded()
        if len(adapters) > 1:
            names = ", ".join(a.name for a in adapters)
            raise RuntimeError(f"{what}: {len(adapters)} UnGuide adapters are loaded ({names}); read each one's from "
                               "pipe.unguide_adapters[name]")
        return adapters[0]

    def _loaded(self) -> list[_Adapter]:
        adapters = list(self._unguide_state().values())
        if not adapters:
            raise RuntimeError("no UnGuide adapter loaded: call pipe.load_unguide(export_folder) first")
        for state in adapters:
            for layer in state.layers:
                if layer.merged or layer.disable_adapters or state.name not in layer.active_adapters:
                    raise RuntimeError(f"the UnGuide adapter {state.name!r} is fused, disabled or not active "
                                       "(set_adapters / fuse_lora / disable_lora changed it): UnGuidance needs it "
                                       "loaded and active, unfused")
        return adapters

    # --- model calls -------------------------------------------------------------------------------------

    def _scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_dict(dict(self.scheduler.config), source="the pipeline's scheduler config")

    def _ddim(self, num_steps: int, device) -> DDIMScheduler:
        """DDIM with exactly our SchedulerConfig's reading of the folder's scheduler config (whatever scheduler
        class the folder names), its timesteps checked against ours."""
        from unguide_jax.diffusion.schedulers import ddim_timesteps

        config = self._scheduler_config()
        fields = dataclasses.asdict(config)
        if fields["trained_betas"] is not None:
            fields["trained_betas"] = list(fields["trained_betas"])
        scheduler = DDIMScheduler(**fields)
        scheduler.set_timesteps(num_steps, device=device)
        ours, _ = ddim_timesteps(config, num_steps)
        if not np.array_equal(scheduler.timesteps.cpu().numpy(), ours):
            raise RuntimeError(f"diffusers' DDIM timesteps {scheduler.timesteps.tolist()[:4]}... differ from ours "
                               f"{ours.tolist()[:4]}...")
        return scheduler

    def _predict(self, z: torch.Tensor, t, context: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """UNet output (fp32) with adapter k's rows scaled by ``strength[:, k]`` ((rows, K), K in load order)."""
        adapters = list(self._unguide_state().values())
        if strength.ndim != 2 or strength.shape[1] != len(adapters):
            raise RuntimeError(f"UnGuide strength {tuple(strength.shape)}: need (rows, {len(adapters)} adapters)")
        t = t if torch.is_tensor(t) and t.ndim else torch.full((z.shape[0],), int(t), device=z.device)
        for k, state in enumerate(adapters):
            state.strength[0] = strength[:, k].contiguous()
        try:
            out = self._unet_output(z.to(self.unet.dtype), t, context)
        finally:
            for state in adapters:
                state.strength[0] = None
        return out.float()

    def _encode(self, prompts: list[str], device, empty_is_unconditional: bool = True) -> torch.Tensor:
        """The prompts' conditioning as one (B, L, D) tensor (rows are indexed, repeated and concatenated).
        ``empty_is_unconditional=False``: "" encoded as text (D("")'s row), not as the unconditional branch."""
        raise NotImplementedError

    def _unet_output(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for latents ``z`` at ``t`` (B,) with ``_encode``'s conditioning."""
        raise NotImplementedError

    def _decode(self, z: torch.Tensor, output_type: str, device, dtype) -> tuple:
        """(images as diffusers returns them, nsfw flags or None) of the final latents."""
        raise NotImplementedError

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of height x width pixels (default: the UNet's own size)."""
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a positive multiple of {f} (or None: the UNet's size), got {value!r}")
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return self.unet.config.in_channels, height // f, width // f

    # --- the probe -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def probe(self, prompts: Sequence[str], guidance_scale: float | Sequence[float] = 7.5, height: int | None = None,
              width: int | None = None, probe_draws: tuple[torch.Tensor, torch.Tensor] | None = None,
              probe_batch_size: int = 64, reuse_empty: bool = True) -> ProbeResult | AdaptersProbeResult:
        """D(p), D("") and w for ``prompts`` (each probed with its own CFG scale); ``probe_draws``: (x_T (R, C, h, w),
        t (R,)) instead of the probe seed's draws. ``reuse_empty``: take D("") (and, rule calibrated, D(concept))
        from unguide.json or an earlier call when it is there for this size and these draws (False: probe "" and
        the concept's prompts again, in the prompts' batch). Rule calibrated probes the concept's target prompts
        at the median CFG scale of ``prompts``, as our sampler's ``WProbe`` does.

        With K > 1 adapters loaded: an ``AdaptersProbeResult``, each adapter decided by its own rule against its own
        references, all on the same draws and base trajectories (our ``ManyProbe``)."""
        adapters = self._loaded()
        shared = adapters[0].probe  # its DISTANCE_KEYS are every adapter's (load_unguide)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        scales = _per_prompt("guidance_scale", guidance_scale, len(prompts))
        _count("probe_batch_size", probe_batch_size)
        self._check_rules(adapters)
        shape = self.latent_shape(height, width)
        device = self._execution_device
        if probe_draws is None:
            draws_key = ("seed", shared.seed)
            cached = (shape, tuple(getattr(shared, key) for key in DISTANCE_KEYS))
            if cached not in self._unguide_draws:
                self._unguide_draws[cached] = jax_probe_draws(shared, shape, self._scheduler_config())
            x_T, t = self._unguide_draws[cached]
        else:
            x_T, t = probe_draws
            x_T = _finite_tensor("probe_draws x_T", x_T).to(dtype=torch.float32).cpu()
            t = torch.as_tensor(t, dtype=torch.int64).cpu()
            if x_T.shape != (shared.draws, *shape) or t.shape != (shared.draws,):
                raise ValueError(f"probe_draws: need x_T {(shared.draws, *shape)} and t ({shared.draws},), got "
                                 f"{tuple(x_T.shape)} and {tuple(t.shape)}")
            draws_key = ("given", hash((x_T.numpy().tobytes(), t.numpy().tobytes())))
        x_T, t = x_T.to(device), t.to(device)
        uncond = self._encode([""], device)
        # D("")'s row is the text "" (SDXL's unconditional branch is zeros, which no K/V LoRA changes), as WProbe's.
        empty_text = self._encode([""], device, empty_is_unconditional=False)
        cache_key = (shape[1] * self.vae_scale_factor, shape[2] * self.vae_scale_factor, draws_key)
        empty = [a.empty_cache.get(cache_key) if reuse_empty else None for a in adapters]
        missing = [k for k, e in enumerate(empty) if e is None]
        cond = self._encode(prompts, device) if prompts else uncond[:0]
        scales_t = torch.from_numpy(scales).to(device)
        run = lambda c, s, draws: self._distances(c, s, uncond, x_T[draws], t[draws], probe_batch_size)  # noqa: E731

        calibrated = [a.probe.rule == "calibrated" and bool(prompts) for a in adapters]
        concept = [a.concept_cache.get(cache_key) if reuse_empty and on else None
                   for a, on in zip(adapters, calibrated)]

        if shared.rule == "sequential" or not prompts:  # sequential: one adapter (_check_rules)
            if missing:
                out = run(empty_text, torch.ones(1, device=device), slice(None))[0]
                for k in missing:
                    empty[k] = out[k]

            def one_adapter(i, draws):
                i = torch.from_numpy(i).to(device)
                return run(cond[i], scales_t[i], draws)[:, 0]

            distances = (sequential_distances(len(prompts), shared, empty[0], one_adapter)[:, None] if prompts
                         else np.zeros((0, len(adapters), shared.draws), np.float32))
        else:
            # The references not known yet go in the same batch as more prompts: D("") ("": CFG is the unconditional
            # prediction whatever its scale) and, rule calibrated, the concept's target prompts at the median scale.
            rows, row_scales = [cond], [scales_t]
            if missing:
                rows.append(empty_text)
                row_scales.append(torch.ones(1, device=device))
            guidance = float(np.median(scales))
            wanted = [k for k, on in enumerate(calibrated) if on and concept[k] is None]
            unique, concept_rows = self._concept_rows([adapters[k].concept_prompts for k in wanted])
            if unique:
                rows.append(self._encode(unique, device))
                row_scales.append(torch.full((len(unique),), guidance, dtype=torch.float32, device=device))
            out = run(torch.cat(rows), torch.cat(row_scales), slice(None))
            distances, rest = out[:len(prompts)], out[len(prompts):]
            if missing:
                for k in missing:
                    empty[k] = rest[0, k]
                rest = rest[1:]
            for k, index in zip(wanted, concept_rows):
                concept[k] = (rest[index, k], guidance)
        thresholds: list[float | None] = [None] * len(adapters)
        decisions, flags = [], []
        for k, state in enumerate(adapters):
            state.empty_cache[cache_key] = empty[k]
            if calibrated[k]:
                state.concept_cache[cache_key] = concept[k]
                thresholds[k] = calibrated_threshold(concept[k][0], empty[k])
            # No prompts: nothing to decide (and no threshold: the concept's prompts are probed beside prompts).
            bar = thresholds[k] if prompts else float("nan")
            decisions.append(decide(distances[:, k], empty[k], state.probe, bar))
            # Flagged: the very comparison w comes from, told apart even where w_erase = w_keep.
            as_flag = dataclasses.replace(state.probe, w_erase=1.0, w_keep=0.0)
            flags.append(decide(distances[:, k], empty[k], as_flag, bar)[1] == 1.0)
        if len(adapters) == 1:
            (d, w, used), = decisions
            return ProbeResult(prompts=prompts, guidance_scales=scales, d=d, d_empty=float(empty[0].mean()), w=w,
                               distances=distances[:, 0], draws_used=used, threshold=thresholds[0],
                               concept_distances=None if concept[0] is None else concept[0][0],
                               concept_guidance_scale=None if concept[0] is None else concept[0][1])
        d, w, used = (np.stack(column, axis=1) for column in zip(*decisions))
        return AdaptersProbeResult(
            adapters=[a.name for a in adapters], prompts=prompts, guidance_scales=scales, d=d,
            d_empty=np.asarray([float(e.mean()) for e in empty]), w=w, flags=np.stack(flags, axis=1),
            distances=distances, draws_used=used,
            thresholds=None if not any(calibrated) else np.asarray([np.nan if x is None else x for x in thresholds]),
            concept_distances=[None if c is None else c[0] for c in concept],
            concept_guidance_scales=[None if c is None else c[1] for c in concept])

    @staticmethod
    def _check_rules(adapters: list[_Adapter]) -> None:
        sequential = [a.name for a in adapters if a.probe.rule == "sequential"]
        if len(adapters) > 1 and sequential:
            raise ValueError(
                f"adapter {sequential[0]!r} has probe rule 'sequential', which stops a prompt early against one "
                f"adapter's D(\"\"); the {len(adapters)} loaded adapters share one probe: load it with "
                "probe={'rule': 'calibrated'} or {'rule': 'paper'}, or use it alone")

    @staticmethod
    def _concept_rows(lists: list[list[str]]) -> tuple[list[str], list[list[int]]]:
        """The concept prompts of several adapters as rows, a prompt an earlier adapter lists probed once (each
        row gives every adapter's distance), and each adapter's rows. One adapter's list stays as it is."""
        unique: list[str] = []
        rows = []
        for prompts in lists:
            earlier = len(unique)
            index = []
            for prompt in prompts:
                if prompt in unique[:earlier]:
                    index.append(unique.index(prompt))
                else:
                    index.append(len(unique))
                    unique.append(prompt)
            rows.append(index)
        return unique, rows

    def _distances(self, cond: torch.Tensor, scales: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor,
                   t: torch.Tensor, batch_size: int) -> np.ndarray:
        """(P, K, R) ‖ε_lora_k(z, t, p) − ε_base(z, t, p)‖₂ for the K loaded adapters, z the base model's CFG
        trajectory from x_T stopped at t_enc (one for all K: the settings it depends on agree); every (prompt,
        draw) pair a row, ``batch_size`` trajectories per UNet call, then the base and each adapter alone at t in
        one call."""
        adapters = list(self._unguide_state().values())
        k_count = len(adapters)
        probe = adapters[0].probe
        objective = probe.objective
        table, _, start = sampling_table(self._scheduler_config(), objective)
        trajectory = [int(s) for s in table[start:start + int(num_sampling_steps(objective, probe.t_enc))]]
        scheduler = self._ddim(probe.ddim_steps, x_T.device)
        prompts, draws = cond.shape[0], x_T.shape[0]
        prompt_of = torch.arange(prompts).repeat_interleave(draws)
        draw_of = torch.arange(draws).repeat(prompts)
        out = torch.empty(prompts * draws, k_count, dtype=torch.float32)
        # At t: the base, then each adapter alone.
        at_t = torch.cat([torch.zeros(1, k_count), torch.eye(k_count)]).to(x_T.device)
        for first in range(0, prompts * draws, batch_size):
            p, r = prompt_of[first:first + batch_size], draw_of[first:first + batch_size]
            n = len(p)
            c, z = cond[p.to(cond.device)], x_T[r.to(x_T.device)].float()
            scale = scales[p.to(scales.device)].view(-1, 1, 1, 1)
            off = torch.zeros(2 * n, k_count, device=z.device)
            context = torch.cat([uncond.expand(n, -1, -1), c])
            for step in trajectory:
                u, k = self._predict(torch.cat([z, z]), step, context, off).chunk(2)
                z = scheduler.step(u + scale * (k - u), step, z, eta=0.0, return_dict=False)[0]
            t_rows = t[r.to(t.device)]
            base, *loras = self._predict(torch.cat([z] * (k_count + 1)), torch.cat([t_rows] * (k_count + 1)),
                                         torch.cat([c] * (k_count + 1)),
                                         at_t.repeat_interleave(n, dim=0)).chunk(k_count + 1)
            for j, lora in enumerate(loras):
                out[first:first + n, j] = (lora - base).flatten(1).norm(dim=1).cpu()
        return out.view(prompts, draws, k_count).permute(0, 2, 1).contiguous().numpy()

    # --- sampling ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_noise(n: int, shape: tuple[int, int, int], seeds, generator, latents) -> None:
        """The noise arguments of a call of ``n`` images (before anything runs: the probe takes minutes)."""
        given = [name for name, value in (("seeds", seeds), ("generator", generator), ("latents", latents))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of seeds, generator and latents (got {', '.join(given)})")
        if latents is not None:
            latents = _finite_tensor("latents", latents)
            if tuple(latents.shape) != (n, *shape):
                raise ValueError(f"latents must have shape {(n, *shape)} (images, C, h, w), got {tuple(latents.shape)}")
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"generator: one torch.Generator or one per image ({n}), got {len(generator)}")
        if seeds is not None:
            if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
                raise ValueError(f"seeds must be a list of integers (one per image), got {seeds!r}")
            if len(seeds) != n:
                raise ValueError(f"seeds: need one seed per image: {n} images, {len(seeds)} seeds")
            bad = [s for s in seeds if not _is_int(s) or not 0 <= s < 2 ** 32]
            if bad:
                raise ValueError(f"seeds must be integers in [0, 2**32), got {bad[:3]}")

    def _initial_latents(self, n: int, shape: tuple[int, int, int], seeds, generator, latents, device) -> torch.Tensor:
        self._check_noise(n, shape, seeds, generator, latents)
        if latents is not None:
            return torch.as_tensor(latents).to(device=device, dtype=torch.float32)
        if generator is not None:
            return randn_tensor((n, *shape), generator=generator, device=device, dtype=torch.float32)
        return jax_latents(list(range(n)) if seeds is None else list(seeds), shape).to(device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float | Sequence[float] = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        w: float | Sequence[float] | None = None,
        probe_draws: tuple[torch.Tensor, torch.Tensor] | None = None,
        probe_batch_size: int = 64,
        fused: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        combine: str = "flagged-mean",
    ) -> UnGuidePipelineOutput | tuple:
        """Probe the prompts, then sample each image with UnGuidance (DDIM, η = 0).

        ``guidance_scale``: one, or one per prompt (the probe uses each prompt's own). Noise: ``seeds`` (one per
        image; default 0..n−1: our sampler's images), or ``generator`` (torch noise), or ``latents`` (B, C, h, w).
        ``w``: skip the probe and use this w (one, or one per prompt; with K adapters also one per prompt and
        adapter, (prompts, K), where combine "flagged" takes adapter k as flagged where w equals its w_erase).
        ``fused``: the predictions of a step in one UNet call (False: base and LoRA calls apart). ``output_type``:
        "pil", "np", "pt" or "latent". ``combine`` (K adapters; the same at K = 1): "flagged" or "sum", see the
        module docstring. Images are prompt-major: prompt i's images are i·k … i·k + k − 1 for k =
        ``num_images_per_prompt``. ``return_dict=False``: the tuple (images, w, d, d_empty).
        """
        adapters = self._loaded()
        n_adapters = len(adapters)
        # Every argument is checked here, before the probe (a minute or more on a real model) and the sampling.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        k = _count("num_images_per_prompt", num_images_per_prompt)
        _count("num_inference_steps", num_inference_steps, maximum=int(self.scheduler.config.num_train_timesteps))
        scales = _per_prompt("guidance_scale", guidance_scale, len(prompts))
        shape = self.latent_shape(height, width)
        n = len(prompts) * k
        self._check_noise(n, shape, seeds, generator, latents)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        elif not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError("negative_prompt must be a string or a list of strings")
        elif len(negative_prompt) == len(prompts):
            negatives = list(negative_prompt)
        else:
            raise ValueError(f"negative_prompt: one string or one per prompt ({len(prompts)}), got {len(negative_prompt)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
        summed = combine == "sum" and n_adapters > 1
        prompt_w = None if w is None else _per_prompt_adapter("w", w, len(prompts), n_adapters)
        if w is None:
            _count("probe_batch_size", probe_batch_size)
            if probe_draws is not None and (not isinstance(probe_draws, (tuple, list)) or len(probe_draws) != 2):
                raise ValueError("probe_draws must be a pair (x_T, t)")
            self._check_rules(adapters)
            if not summed:
                _check_one_w(adapters)
        device = self._execution_device

        erase = np.asarray([a.probe.w_erase for a in adapters], np.float32)
        if w is None:
            keys = list(dict.fromkeys(zip(prompts, scales.tolist())))
            result = self.probe([p for p, _ in keys], [s for _, s in keys], height, width, probe_draws,
                                probe_batch_size)
            index = [keys.index(key) for key in zip(prompts, scales.tolist())]
            if n_adapters == 1:
                prompt_w, prompt_d = result.w[index][:, None], result.d[index][:, None]
                prompt_flags = None
                d_empty, threshold = result.d_empty, result.threshold
            else:
                prompt_w, prompt_d, prompt_flags = result.w[index], result.d[index], result.flags[index]
                d_empty, threshold = result.d_empty, result.thresholds
        else:
            prompt_d = np.full((len(prompts), n_adapters), np.nan, np.float32)
            prompt_flags = None if n_adapters == 1 else prompt_w == erase
            d_empty = float("nan") if n_adapters == 1 else np.full(n_adapters, np.nan)
            threshold = None

        if summed:
            images_w = np.repeat(prompt_w, k, axis=0)
        else:
            # One adapter: w as it is and its LoRA on every edited row, whatever it flags (today's formula).
            flags = prompt_w == erase if prompt_flags is None else prompt_flags
            per_prompt, lora_mix = flagged_guidance(prompt_w, flags, "flagged" if combine == "sum" else combine)
            images_w = np.repeat(per_prompt, k)
            on = torch.from_numpy(np.repeat(lora_mix, k, axis=0)).to(device)
        cond = self._encode(prompts, device).repeat_interleave(k, dim=0)
        uncond = self._encode(negatives, device).repeat_interleave(k, dim=0)
        z = self._initial_latents(n, shape, seeds, generator, latents, device)
        scale = torch.from_numpy(np.repeat(scales, k)).to(device).view(-1, 1, 1, 1)
        off = torch.zeros(n, n_adapters, device=device)
        scheduler = self._ddim(num_inference_steps, device)

        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for t in scheduler.timesteps:
                if summed:
                    guided = self._summed_prediction(z, t, cond, uncond, scale, images_w, fused)
                else:
                    if fused:
                        out = self._predict(torch.cat([z, z, z, z]), t, torch.cat([uncond, cond, uncond, cond]),
                                            torch.cat([off, off, on, on]))
                        base_u, base_c, lora_u, lora_c = out.chunk(4)
                    else:
                        base_u, base_c = self._predict(torch.cat([z, z]), t, torch.cat([uncond, cond]),
                                                       torch.cat([off, off])).chunk(2)
                        lora_u, lora_c = self._predict(torch.cat([z, z]), t, torch.cat([uncond, cond]),
                                                       torch.cat([on, on])).chunk(2)
                    mix = torch.from_numpy(images_w).to(device).view(-1, 1, 1, 1)
                    base = base_u + scale * (base_c - base_u)
                    lora = lora_u + scale * (lora_c - lora_u)
                    guided = mix * base + (1.0 - mix) * lora
                z = scheduler.step(guided, t, z, eta=0.0, return_dict=False)[0]
                progress.update()

        images, nsfw = (z, None) if output_type == "latent" else self._decode(z, output_type, device, cond.dtype)
        self.maybe_free_model_hooks()
        images_d = np.repeat(prompt_d, k, axis=0)
        images_flags = None if prompt_flags is None else np.repeat(prompt_flags, k, axis=0)
        if n_adapters == 1:
            images_d = images_d[:, 0]
        if not return_dict:
            return images, images_w, images_d, d_empty
        return UnGuidePipelineOutput(images=images, w=images_w, d=images_d, d_empty=d_empty, nsfw_content_detected=nsfw,
                                     threshold=threshold, adapters=[a.name for a in adapters], flags=images_flags)

    def _summed_prediction(self, z: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor,
                           w: np.ndarray, fused: bool) -> torch.Tensor:
        """combine "sum": w₀·CFG_base + Σ_k (1 − w_k)·CFG_k, w₀ = 1 − Σ_k (1 − w_k), each adapter's CFG pair
        with that adapter alone on (our ``many_unguided_prediction``); ``fused``: the K + 1 pairs in one call."""
        n, n_adapters = w.shape
        strengths = torch.cat([torch.zeros(1, n_adapters), torch.eye(n_adapters)]).to(z.device)
        pairs = [strengths[j].expand(2 * n, n_adapters) for j in range(n_adapters + 1)]
        if fused:
            out = self._predict(torch.cat([z] * (2 * len(pairs))), t, torch.cat([uncond, cond] * len(pairs)),
                                torch.cat(pairs)).chunk(2 * len(pairs))
        else:
            out = [half for pair in pairs
                   for half in self._predict(torch.cat([z, z]), t, torch.cat([uncond, cond]), pair).chunk(2)]
        cfg = [u + scale * (c - u) for u, c in zip(out[0::2], out[1::2])]
        w = torch.from_numpy(w).to(z.device)
        guided = (1.0 - (1.0 - w).sum(dim=1)).view(-1, 1, 1, 1) * cfg[0]
        for j in range(n_adapters):
            guided = guided + (1.0 - w[:, j]).view(-1, 1, 1, 1) * cfg[1 + j]
        return guided


class UnGuidePipeline(UnGuideMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x/2.x) + ``load_unguide(export_folder)``; calling it probes the prompts and
    samples with UnGuidance. See the module docstring."""

    unguide_family = "sd"

    def _encode(self, prompts: list[str], device, empty_is_unconditional: bool = True) -> torch.Tensor:
        embeds, _ = self.encode_prompt(prompts, device, 1, False)
        return embeds

    def _unet_output(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]

    def _decode(self, z: torch.Tensor, output_type: str, device, dtype) -> tuple:
        decoded = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        decoded, nsfw = self.run_safety_checker(decoded, device, dtype)
        denormalize = [True] * z.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize), nsfw


class UnGuideXLPipeline(UnGuideMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` + ``load_unguide(export_folder)`` of an SDXL export; calling it probes the
    prompts and samples with UnGuidance, as ``UnGuidePipeline`` does. See the module docstring."""

    unguide_family = "sdxl"

    @property
    def _pooled_width(self) -> int:
        """The pooled text embedding's width, as the UNet's add-embedding reads it beside the time ids."""
        config = self.unet.config
        return pooled_width(int(config.projection_class_embeddings_input_dim), int(config.addition_time_embed_dim))

    def _encode(self, prompts: list[str], device, empty_is_unconditional: bool = True) -> torch.Tensor:
        """Both encoders' states (B, 77, D) and one more token [pooled (P), 0...]: (B, 78, D)."""
        embeds, _, pooled, _ = self.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if self.config.force_zeros_for_empty_prompt and empty_is_unconditional:
            keep = torch.tensor([p != "" for p in prompts], device=embeds.device)
            embeds = embeds * keep.view(-1, 1, 1).to(embeds.dtype)
            pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
        width = embeds.shape[-1]
        if pooled.shape[-1] != self._pooled_width or pooled.shape[-1] > width:
            raise RuntimeError(f"a pooled text embedding of {pooled.shape[-1]} values: the UNet's add-embedding reads "
                               f"{self._pooled_width}, and it must fit in one context token of {width}")
        token = torch.nn.functional.pad(pooled.to(embeds.dtype), (0, width - pooled.shape[-1]))
        return torch.cat([embeds, token[:, None]], dim=1)

    def _unet_output(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # The time ids of an image of the latents' size, as our sampler stamps them.
        height, width = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor(size_time_ids(height, width), dtype=context.dtype, device=z.device)
        added = {"text_embeds": context[:, -1, :self._pooled_width], "time_ids": time_ids.expand(z.shape[0], -1)}
        return self.unet(z, t, encoder_hidden_states=context[:, :-1], added_cond_kwargs=added, return_dict=False)[0]

    def _decode(self, z: torch.Tensor, output_type: str, device, dtype) -> tuple:
        """As ``StableDiffusionXLPipeline`` decodes: a float16 VAE with ``force_upcast`` decodes in float32, and the
        latents' mean/std of the VAE's config where it has them."""
        vae_dtype = self.vae.dtype
        upcast = vae_dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        latents = z.to(self.vae.dtype)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=latents.dtype).view(1, -1, 1, 1)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        try:
            decoded = self.vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(dtype=vae_dtype)
        if getattr(self, "watermark", None) is not None:
            decoded = self.watermark.apply_watermark(decoded)
        return self.image_processor.postprocess(decoded, output_type=output_type), None
