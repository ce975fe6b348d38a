"""UnGuide for diffusers users: ``UnGuidePipeline``, a ``StableDiffusionPipeline`` that samples with UnGuidance.

    from unguide_jax.pytorch import UnGuidePipeline
    pipe = UnGuidePipeline.from_pretrained("path/to/model", safety_checker=None)
    pipe.load_unguide("runs/unguide-sd15-dog/export")   # the PEFT LoRA + unguide.json
    out = pipe(["a photo of the dog", "a photo of the cat"], seeds=[0, 1])
    out.images, out.w, out.d, out.d_empty

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
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.erasers.unguide.objective import num_sampling_steps, sampling_table
from unguide_jax.erasers.unguide.probe import (
    ProbeConfig,
    calibrated_threshold,
    decide,
    sequential_distances,
)
from unguide_jax.loading.base_model import fingerprint_mismatches, weight_fingerprint
from unguide_jax.publishing.unguide_json import read_unguide_json

DEFAULT_ADAPTER_NAME = "unguide"
PEFT_UNET_PREFIX = "unet."
# The probe settings that change the distances: a D("") cached in unguide.json holds only for the same ones.
DISTANCE_KEYS = ("draws", "seed", "t_enc", "ddim_steps", "timestep_mode")


@dataclasses.dataclass
class UnGuidePipelineOutput(BaseOutput):
    """``images`` as diffusers returns them (PIL list, np array or latents); per image: ``w`` and ``d`` = D(p)
    (NaN where w was given); ``d_empty`` = D("") (NaN when nothing was probed); ``threshold``: rule calibrated's
    √(D(concept) · D("")) (None for the other rules or when w was given)."""

    images: list | np.ndarray | torch.Tensor
    w: np.ndarray
    d: np.ndarray
    d_empty: float
    nsfw_content_detected: list[bool] | None = None
    threshold: float | None = None


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
class _Adapter:
    name: str
    settings: dict
    probe: ProbeConfig
    layers: list          # peft LoRA layers carrying the adapter
    hooks: list           # their lora_B forward hooks
    strength: list        # [None or a (rows,) tensor]: the per-row scale the hooks apply
    empty_cache: dict     # (height, width, draws key) -> D("") per draw, float32
    draws_cache: dict = dataclasses.field(default_factory=dict)  # (latent shape, draws key) -> (x_T, t)
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


class UnGuidePipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` + ``load_unguide(export_folder)``; calling it probes the prompts and samples
    with UnGuidance. See the module docstring."""

    # --- loading -------------------------------------------------------------------------------------------

    def load_unguide(self, folder: str | Path, adapter_name: str = DEFAULT_ADAPTER_NAME,
                     check_base_model: bool = True, probe: dict | ProbeConfig | None = None) -> dict:
        """Load an UnGuide export (``folder/unguide.json`` + the PEFT LoRA it names; a train.py run folder
        works too: its export/). Checks, before anything is loaded: the probe's settings (rule calibrated needs
        unguide.json's concept target prompts), the LoRA's modules and shapes against this UNet, and
        (``check_base_model``) that the UNet's weights are the ones the LoRA was trained on. ``probe``: settings
        replacing unguide.json's (e.g. ``{"rule": "paper"}``). Returns the unguide.json record."""
        settings, lora_file = read_unguide_json(folder)
        file_probe = ProbeConfig(**settings["probe"])
        probe = probe_settings(folder, settings, probe)
        modules = self._check_lora_file(lora_file, settings)
        if check_base_model:
            self._check_base_model(settings, modules, lora_file)
        previous = getattr(self, "_unguide", None)
        if previous is not None:
            for hook in previous.hooks:
                hook.remove()
            self._unguide = None
        if adapter_name in (getattr(self.unet, "peft_config", None) or {}):
            self.delete_adapters(adapter_name)
        self.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)
        layers = self._adapter_layers(adapter_name)
        if sorted(path for path, _ in layers) != modules:
            raise RuntimeError(f"diffusers adapted {len(layers)} modules of the UNet, the LoRA file has {len(modules)}: "
                               f"{sorted(set(modules) ^ {p for p, _ in layers})[:5]}")
        alpha = float(settings["lora"]["alpha"])
        for path, layer in layers:
            scaling = float(layer.scaling[adapter_name])
            if not math.isclose(scaling, alpha, rel_tol=1e-5):
                raise RuntimeError(f"{path}: peft scales the LoRA by {scaling}, unguide.json says alpha = {alpha} (a LoRA "
                                   "file without its lora_alpha metadata?)")
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
        self._unguide = _Adapter(adapter_name, settings, probe, [layer for _, layer in layers], hooks, strength, {},
                                 concept_prompts=list(settings["concept"]["targets"]))
        same_distances = all(getattr(probe, key) == getattr(file_probe, key) for key in DISTANCE_KEYS)
        if settings.get("empty_probe") and same_distances:
            record = settings["empty_probe"]
            if record.get("draws") == probe.draws and record.get("seed") == probe.seed:
                key = (int(record["height"]), int(record["width"]), ("seed", probe.seed))
                self._unguide.empty_cache[key] = np.asarray(record["distances"], np.float32)
        return settings

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
    def unguide_settings(self) -> dict:
        """The loaded unguide.json record."""
        return self._loaded().settings

    @property
    def unguide_probe(self) -> ProbeConfig:
        """The probe's settings in use (unguide.json's, with ``load_unguide``'s ``probe`` replacing some)."""
        return self._loaded().probe

    def _loaded(self) -> _Adapter:
        state = getattr(self, "_unguide", None)
        if state is None:
            raise RuntimeError("no UnGuide adapter loaded: call pipe.load_unguide(export_folder) first")
        for layer in state.layers:
            if layer.merged or layer.disable_adapters or state.name not in layer.active_adapters:
                raise RuntimeError(f"the UnGuide adapter {state.name!r} is fused, disabled or not active (set_adapters / "
                                   "fuse_lora / disable_lora changed it): UnGuidance needs it loaded and active, unfused")
        return state

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
        """UNet output (fp32) with the adapter's rows scaled by ``strength`` (rows,)."""
        state = self._unguide
        t = t if torch.is_tensor(t) and t.ndim else torch.full((z.shape[0],), int(t), device=z.device)
        state.strength[0] = strength
        try:
            out = self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=context, return_dict=False)[0]
        finally:
            state.strength[0] = None
        return out.float()

    def _encode(self, prompts: list[str], device) -> torch.Tensor:
        embeds, _ = self.encode_prompt(prompts, device, 1, False)
        return embeds

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
              probe_batch_size: int = 64, reuse_empty: bool = True) -> ProbeResult:
        """D(p), D("") and w for ``prompts`` (each probed with its own CFG scale); ``probe_draws``: (x_T (R, C, h, w),
        t (R,)) instead of the probe seed's draws. ``reuse_empty``: take D("") (and, rule calibrated, D(concept))
        from unguide.json or an earlier call when it is there for this size and these draws (False: probe "" and
        the concept's prompts again, in the prompts' batch). Rule calibrated probes the concept's target prompts
        at the median CFG scale of ``prompts``, as our sampler's ``WProbe`` does."""
        state = self._loaded()
        probe = state.probe
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        scales = _per_prompt("guidance_scale", guidance_scale, len(prompts))
        _count("probe_batch_size", probe_batch_size)
        shape = self.latent_shape(height, width)
        device = self._execution_device
        if probe_draws is None:
            draws_key = ("seed", probe.seed)
            if (shape, draws_key) not in state.draws_cache:
                state.draws_cache[shape, draws_key] = jax_probe_draws(probe, shape, self._scheduler_config())
            x_T, t = state.draws_cache[shape, draws_key]
        else:
            x_T, t = probe_draws
            x_T = _finite_tensor("probe_draws x_T", x_T).to(dtype=torch.float32).cpu()
            t = torch.as_tensor(t, dtype=torch.int64).cpu()
            if x_T.shape != (probe.draws, *shape) or t.shape != (probe.draws,):
                raise ValueError(f"probe_draws: need x_T {(probe.draws, *shape)} and t ({probe.draws},), got "
                                 f"{tuple(x_T.shape)} and {tuple(t.shape)}")
            draws_key = ("given", hash((x_T.numpy().tobytes(), t.numpy().tobytes())))
        x_T, t = x_T.to(device), t.to(device)
        uncond = self._encode([""], device)
        cache_key = (shape[1] * self.vae_scale_factor, shape[2] * self.vae_scale_factor, draws_key)
        empty = state.empty_cache.get(cache_key) if reuse_empty else None
        cond = self._encode(prompts, device) if prompts else uncond[:0]
        scales_t = torch.from_numpy(scales).to(device)
        run = lambda c, s, draws: self._distances(c, s, uncond, x_T[draws], t[draws], probe_batch_size)  # noqa: E731

        calibrated = probe.rule == "calibrated" and bool(prompts)
        concept = state.concept_cache.get(cache_key) if reuse_empty and calibrated else None

        if probe.rule == "sequential" or not prompts:
            if empty is None:
                empty = run(uncond, torch.ones(1, device=device), slice(None))[0]
            distances = (sequential_distances(len(prompts), probe, empty,
                                              lambda i, draws: run(cond[torch.from_numpy(i).to(device)],
                                                                   scales_t[torch.from_numpy(i).to(device)], draws))
                         if prompts else np.zeros((0, probe.draws), np.float32))
        else:
            # The references not known yet go in the same batch as more prompts: D("") ("": CFG is the unconditional
            # prediction whatever its scale) and, rule calibrated, the concept's target prompts at the median scale.
            rows, row_scales = [cond], [scales_t]
            if empty is None:
                rows.append(uncond)
                row_scales.append(torch.ones(1, device=device))
            guidance = float(np.median(scales))
            if calibrated and concept is None:
                rows.append(self._encode(state.concept_prompts, device))
                row_scales.append(torch.full((len(state.concept_prompts),), guidance, dtype=torch.float32,
                                             device=device))
            out = run(torch.cat(rows), torch.cat(row_scales), slice(None))
            distances, rest = out[:len(prompts)], out[len(prompts):]
            if empty is None:
                empty, rest = rest[0], rest[1:]
            if calibrated and concept is None:
                concept = (rest, guidance)
        state.empty_cache[cache_key] = empty
        threshold = None
        if calibrated:
            state.concept_cache[cache_key] = concept
            threshold = calibrated_threshold(concept[0], empty)
        # No prompts: nothing to decide (and no threshold: the concept's prompts are probed beside prompts).
        d, w, used = decide(distances, empty, probe, threshold if prompts else float("nan"))
        return ProbeResult(prompts=prompts, guidance_scales=scales, d=d, d_empty=float(empty.mean()), w=w,
                           distances=distances, draws_used=used, threshold=threshold,
                           concept_distances=None if concept is None else concept[0],
                           concept_guidance_scale=None if concept is None else concept[1])

    def _distances(self, cond: torch.Tensor, scales: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor,
                   t: torch.Tensor, batch_size: int) -> np.ndarray:
        """(P, R) ‖ε_lora(z, t, p) − ε_base(z, t, p)‖₂ with z the base model's CFG trajectory from x_T stopped at
        t_enc; every (prompt, draw) pair a row, ``batch_size`` trajectories per UNet call."""
        probe = self._unguide.probe
        objective = probe.objective
        table, _, start = sampling_table(self._scheduler_config(), objective)
        trajectory = [int(s) for s in table[start:start + int(num_sampling_steps(objective, probe.t_enc))]]
        scheduler = self._ddim(probe.ddim_steps, x_T.device)
        prompts, draws = cond.shape[0], x_T.shape[0]
        prompt_of = torch.arange(prompts).repeat_interleave(draws)
        draw_of = torch.arange(draws).repeat(prompts)
        out = torch.empty(prompts * draws, dtype=torch.float32)
        for first in range(0, prompts * draws, batch_size):
            p, r = prompt_of[first:first + batch_size], draw_of[first:first + batch_size]
            n = len(p)
            c, z = cond[p.to(cond.device)], x_T[r.to(x_T.device)].float()
            scale = scales[p.to(scales.device)].view(-1, 1, 1, 1)
            off = torch.zeros(2 * n, device=z.device)
            context = torch.cat([uncond.expand(n, -1, -1), c])
            for step in trajectory:
                u, k = self._predict(torch.cat([z, z]), step, context, off).chunk(2)
                z = scheduler.step(u + scale * (k - u), step, z, eta=0.0, return_dict=False)[0]
            t_rows = t[r.to(t.device)]
            base, lora = self._predict(torch.cat([z, z]), torch.cat([t_rows, t_rows]), torch.cat([c, c]),
                                       torch.cat([off[:n], torch.ones(n, device=z.device)])).chunk(2)
            out[first:first + n] = (lora - base).flatten(1).norm(dim=1).cpu()
        return out.view(prompts, draws).numpy()

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
    ) -> UnGuidePipelineOutput | tuple:
        """Probe the prompts, then sample each image with UnGuidance (DDIM, η = 0).

        ``guidance_scale``: one, or one per prompt (the probe uses each prompt's own). Noise: ``seeds`` (one per
        image; default 0..n−1: our sampler's images), or ``generator`` (torch noise), or ``latents`` (B, C, h, w).
        ``w``: skip the probe and use this w (one, or one per prompt). ``fused``: the four predictions of a step
        in one UNet call (False: base and LoRA calls apart). ``output_type``: "pil", "np", "pt" or "latent".
        Images are prompt-major: prompt i's images are i·k … i·k + k − 1 for k = ``num_images_per_prompt``.
        ``return_dict=False``: the tuple (images, w, d, d_empty).
        """
        self._loaded()
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
        prompt_w = None if w is None else _per_prompt("w", w, len(prompts))
        if w is None:
            _count("probe_batch_size", probe_batch_size)
            if probe_draws is not None and (not isinstance(probe_draws, (tuple, list)) or len(probe_draws) != 2):
                raise ValueError("probe_draws must be a pair (x_T, t)")
        device = self._execution_device

        if w is None:
            keys = list(dict.fromkeys(zip(prompts, scales.tolist())))
            result = self.probe([p for p, _ in keys], [s for _, s in keys], height, width, probe_draws,
                                probe_batch_size)
            index = [keys.index(key) for key in zip(prompts, scales.tolist())]
            prompt_w, prompt_d, d_empty = result.w[index], result.d[index], result.d_empty
            threshold = result.threshold
        else:
            prompt_d, d_empty = np.full(len(prompts), np.nan, np.float32), float("nan")
            threshold = None

        images_w, images_d = np.repeat(prompt_w, k), np.repeat(prompt_d, k)
        cond = self._encode(prompts, device).repeat_interleave(k, dim=0)
        uncond = self._encode(negatives, device).repeat_interleave(k, dim=0)
        z = self._initial_latents(n, shape, seeds, generator, latents, device)
        scale = torch.from_numpy(np.repeat(scales, k)).to(device).view(-1, 1, 1, 1)
        mix = torch.from_numpy(images_w).to(device).view(-1, 1, 1, 1)
        off, on = torch.zeros(n, device=device), torch.ones(n, device=device)
        scheduler = self._ddim(num_inference_steps, device)

        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for t in scheduler.timesteps:
                if fused:
                    out = self._predict(torch.cat([z, z, z, z]), t, torch.cat([uncond, cond, uncond, cond]),
                                        torch.cat([off, off, on, on]))
                    base_u, base_c, lora_u, lora_c = out.chunk(4)
                else:
                    base_u, base_c = self._predict(torch.cat([z, z]), t, torch.cat([uncond, cond]),
                                                   torch.cat([off, off])).chunk(2)
                    lora_u, lora_c = self._predict(torch.cat([z, z]), t, torch.cat([uncond, cond]),
                                                   torch.cat([on, on])).chunk(2)
                base = base_u + scale * (base_c - base_u)
                lora = lora_u + scale * (lora_c - lora_u)
                z = scheduler.step(mix * base + (1.0 - mix) * lora, t, z, eta=0.0, return_dict=False)[0]
                progress.update()

        nsfw = None
        if output_type == "latent":
            images = z
        else:
            decoded = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            decoded, nsfw = self.run_safety_checker(decoded, device, cond.dtype)
            denormalize = [True] * n if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, images_w, images_d, d_empty
        return UnGuidePipelineOutput(images=images, w=images_w, d=images_d, d_empty=d_empty, nsfw_content_detected=nsfw,
                                     threshold=threshold)
