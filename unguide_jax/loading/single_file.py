"""Single-file Stable Diffusion checkpoints (the original CompVis / LDM layout) -> Flax.

A single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.ckpt``, ...)
holds the whole model under LDM names::

    model.diffusion_model.*          the UNet
    first_stage_model.*  (or vae.*)  the VAE
    cond_stage_model.transformer.*   the text encoder, SD 1.x (a transformers CLIPTextModel)
    cond_stage_model.model.*         the text encoder, SD 2.x (OpenCLIP)

It carries no configs, tokenizer or scheduler settings, and nothing can be downloaded here, so
the caller names a local diffusers-layout folder of the same architecture whose
``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``, ``tokenizer/`` and
``scheduler/scheduler_config.json`` are used (its weight files are never read) -- or one of the
configs shipped for SD 1.x / 2.x (:mod:`unguide_jax.loading.sd_configs`), by name or picked from
the checkpoint's tensor shapes (:func:`pick_shipped_config`). The renaming
itself is diffusers' own (``diffusers.loaders.single_file_utils``): it turns the checkpoint into
per-component diffusers state dicts, which then go through the same strict PyTorch -> Flax
conversion as :func:`unguide_jax.loading.diffusers_folder.load_pipeline` (every tensor used once, shapes checked).
diffusers and torch must be installed for this module.
"""
from __future__ import annotations

import re
import tempfile
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.loading.convert import ConversionError
from unguide_jax.loading.diffusers_folder import (
    COMPONENTS,
    build_module,
    check_compatible,
    load_tokenizer,
    params_from_state_dict,
)
from unguide_jax.loading.sd_configs import SHIPPED_CONFIGS, ShippedConfig
from unguide_jax.loading.weights import PICKLE_SUFFIXES, read_pickle, read_weights
from unguide_jax.models.config_io import read_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP text tower
SDXL_PREFIX = "conditioner.embedders."

CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}

_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be loaded (wrong layout, or not matching the configs)."""


def load_single_file(
    checkpoint_path: str | Path,
    config_folder: str | Path | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    allow_pickle: bool = False,
    clip_skip: int = 0,
    extract_ema: bool = False,
) -> StableDiffusion:
    """Load an SD 1.x / 2.x single-file LDM checkpoint (``.safetensors``, or a pickled ``.ckpt``).

    ``config_folder`` is a diffusers-layout folder of the same architecture (e.g. a copy of
    ``stable-diffusion-v1-5`` or ``stable-diffusion-2-1`` without weights): the component configs,
    the tokenizer and the scheduler config come from it. In particular the **prediction type comes
    from ``scheduler/scheduler_config.json``** -- an SD 2.x 768px checkpoint needs a folder whose
    scheduler says ``"prediction_type": "v_prediction"`` (SD 2.x base and SD 1.x: ``"epsilon"``);
    the checkpoint itself does not record it.

    ``config_folder`` may also name a shipped config (``"sd1"``, ``"sd2-base"``, ``"sd2-v"``; an
    existing folder of that name wins), or be ``None``: then the shipped config is picked from the
    checkpoint's tensors (:func:`pick_shipped_config`) -- SD 1.x is recognised outright, SD 2.x
    asks for ``"sd2-base"`` or ``"sd2-v"`` since its weights do not tell the two apart.

    ``dtype``/``param_dtype``/``clip_skip`` are as in :func:`unguide_jax.loading.diffusers_folder.load_pipeline`.
    Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused unless
    ``allow_pickle=True``, and then read with ``torch.load(weights_only=True)``.
    ``extract_ema=True`` takes the UNet from the ``model_ema.*`` copy when the checkpoint has one
    (diffusers' rule), else the regular weights are used.

    For SD 2.x the OpenCLIP tower's last block is unused (SD 2 conditions on the penultimate layer,
    and diffusers' text encoder config has one layer fewer); such a surplus final block is dropped.
    Any other mismatch between checkpoint and configs is an error naming the offending tensors.
    """
    checkpoint_path = Path(checkpoint_path)
    # Everything that can be checked cheaply is checked before reading gigabytes of weights.
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {checkpoint_path}")
    kw = {"dtype": dtype, "param_dtype": param_dtype, "allow_pickle": allow_pickle, "clip_skip": clip_skip,
          "extract_ema": extract_ema}
    shipped = shipped_config_named(config_folder)
    if shipped is None and config_folder is None:
        shipped = pick_shipped_config(checkpoint_path, allow_pickle=allow_pickle)
    if shipped is None:
        return _load(checkpoint_path, Path(config_folder), None, **kw)
    with tempfile.TemporaryDirectory(prefix=f"unguide-{shipped.name}-config-") as tmp:
        # The tokenizer is read into memory here, so the folder may go once the model is loaded.
        return _load(checkpoint_path, shipped.write(tmp), shipped.name, **kw)


def _load(checkpoint_path: Path, config_folder: Path, shipped_name: str | None, *, dtype, param_dtype, allow_pickle,
          clip_skip, extract_ema) -> StableDiffusion:
    label = config_folder if shipped_name is None else f"the shipped {shipped_name!r} config"

    def where(rel: str) -> str:
        return str(config_folder / rel) if shipped_name is None else f"{label}'s {rel}"

    configs = read_config_folder(config_folder)
    parsed = {name: COMPONENTS[name].config_cls.from_dict(configs[name], source=where(CONFIG_FILES[name]))
              for name in ("unet", "text_encoder", "vae")}
    scheduler = SchedulerConfig.from_dict(configs["scheduler"], source=where(CONFIG_FILES["scheduler"]))
    check_compatible(parsed["unet"], parsed["text_encoder"], label)
    tokenizer = load_tokenizer(config_folder / "tokenizer")
    if checkpoint_path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        read_pickle(checkpoint_path, allow_pickle=False)  # raises PickledWeightsRefused, explaining why
    if checkpoint_path.suffix == ".safetensors":
        check_layout(_safetensors_keys(checkpoint_path), checkpoint_path)

    tensors = read_weights(checkpoint_path, allow_pickle=allow_pickle)
    text_kind = check_layout(tensors, checkpoint_path)
    checkpoint = {k: _as_torch(v) for k, v in tensors.items()}
    del tensors
    state_dicts = convert_checkpoint(checkpoint, configs, text_kind, extract_ema=extract_ema, source=checkpoint_path)
    del checkpoint

    modules, params = {}, {}
    for name, config in parsed.items():
        module = build_module(name, config, dtype, param_dtype)
        try:
            params[name] = params_from_state_dict(name, module, state_dicts.pop(name), param_dtype)
        except ConversionError as e:
            raise SingleFileError(
                f"{checkpoint_path}: its {_PART_NAMES[name]} does not match {where(CONFIG_FILES[name])} "
                f"({'is the config folder the same architecture?' if shipped_name is None else 'pass config_folder: a diffusers folder of its architecture'}): {e}"
            ) from e
        modules[name] = module

    return StableDiffusion(
        unet=modules["unet"], text_encoder=modules["text_encoder"], vae=modules["vae"], tokenizer=tokenizer,
        scheduler=scheduler, params=params, clip_skip=clip_skip,
    )


_PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


def read_config_folder(config_folder: Path) -> dict[str, dict]:
    """The raw config dicts of a diffusers-layout folder (its weights are not needed)."""
    if not config_folder.is_dir():
        raise FileNotFoundError(f"missing config folder: {config_folder} (a diffusers-layout folder is needed)")
    missing = [rel for rel in CONFIG_FILES.values() if not (config_folder / rel).is_file()]
    if not (config_folder / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise FileNotFoundError(
            f"config folder {config_folder} is not a complete diffusers layout: missing {', '.join(missing)}"
        )
    return {name: read_json(config_folder / rel) for name, rel in CONFIG_FILES.items()}


def check_layout(keys: Iterable[str], source: Any = "checkpoint") -> str:
    """Check that all three parts are present under LDM names; returns "clip" (SD 1) or "open_clip" (SD 2)."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has(SDXL_PREFIX):
        raise SingleFileError(f"{source}: looks like an SDXL checkpoint ({SDXL_PREFIX}*); only SD 1.x/2.x are supported")
    missing = []
    if not has(UNET_PREFIX):
        missing.append(f"the UNet ({UNET_PREFIX}*)")
    if not has(*VAE_PREFIXES):
        missing.append(f"the VAE ({'* or '.join(VAE_PREFIXES)}*)")
    text_kind = "clip" if has(CLIP_PREFIX) else "open_clip" if has(OPEN_CLIP_PREFIX) else None
    if text_kind is None:
        missing.append(f"the text encoder ({CLIP_PREFIX}* for SD 1.x or {OPEN_CLIP_PREFIX}* for SD 2.x)")
    if missing:
        sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
        raise SingleFileError(
            f"{source} is not a complete single-file (LDM-layout) Stable Diffusion checkpoint: it lacks "
            f"{'; '.join(missing)}. First keys: {sample}"
        )
    return text_kind


def shipped_config_named(config_folder: str | Path | None) -> ShippedConfig | None:
    """The shipped config ``config_folder`` names ("sd1", "sd2-base", "sd2-v"), unless a folder of that name exists."""
    if config_folder is None or str(config_folder) not in SHIPPED_CONFIGS or Path(config_folder).is_dir():
        return None
    return SHIPPED_CONFIGS[str(config_folder)]


def checkpoint_shapes(path: str | Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, without reading the weights: the safetensors header; for a pickle
    (only with ``allow_pickle``) a memory-mapped ``torch.load`` (a full load for pre-zip pickles)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if path.suffix not in PICKLE_SUFFIXES:
        raise SingleFileError(f"{path}: not a single-file checkpoint (expected .safetensors or {', '.join(PICKLE_SUFFIXES)})")
    if not allow_pickle:
        read_pickle(path, allow_pickle=False)  # raises PickledWeightsRefused, explaining why
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


_CROSS_ATTENTION_KEY = re.compile(rf"^{re.escape(UNET_PREFIX)}.*\.attn2\.to_k\.weight$")
_TEXT_NAMES = {"clip": f"SD 1.x-style CLIP ({CLIP_PREFIX}*)", "open_clip": f"SD 2.x-style OpenCLIP ({OPEN_CLIP_PREFIX}*)"}


def checkpoint_signature(shapes: Mapping[str, tuple[int, ...]], source: Any = "checkpoint") -> tuple[str, int, int, int]:
    """(text encoder kind, cross-attention width, UNet in_channels, UNet base width), from tensor shapes alone:
    what :attr:`ShippedConfig.signature` is matched against."""
    text_kind = check_layout(shapes, source)
    widths = {shape[-1] for key, shape in shapes.items() if _CROSS_ATTENTION_KEY.match(key) and len(shape) >= 2}
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if len(widths) != 1 or conv_in is None or len(conv_in) != 4:
        raise SingleFileError(
            f"{source}: cannot read the architecture from its UNet (cross-attention widths {sorted(widths)}, "
            f"conv_in {conv_in}); pass config_folder: a diffusers folder of its architecture"
        )
    return text_kind, widths.pop(), int(conv_in[1]), int(conv_in[0])


def pick_shipped_config(checkpoint_path: str | Path, *, allow_pickle: bool = False) -> ShippedConfig:
    """The shipped config that fits a single-file checkpoint, from its tensor shapes.

    The text encoder's layout and the UNet's cross-attention width decide: CLIP and 768 is SD 1.x
    ("sd1"); OpenCLIP and 1024 is SD 2.x. SD 2.x base (512 px, epsilon) and 768-v (v-prediction)
    have the same tensors, and a safetensors file records neither, so that case is an error asking
    for ``config_folder="sd2-base"`` or ``"sd2-v"`` rather than a guess (diffusers guesses v unless a
    pickle's ``global_step`` is 875000; a wrong guess samples noise). Anything else (SDXL, an
    inpainting UNet with 9 input channels, ...) is an error asking for a config folder.
    """
    path = Path(checkpoint_path)
    return shipped_config_for(checkpoint_shapes(path, allow_pickle), path)


def shipped_config_for(shapes: Mapping[str, tuple[int, ...]], source: Any = "checkpoint") -> ShippedConfig:
    """:func:`pick_shipped_config` on tensor name -> shape."""
    path = source
    signature = checkpoint_signature(shapes, source)
    matches = [c for c in SHIPPED_CONFIGS.values() if c.signature == signature]
    if len(matches) == 1:
        return matches[0]
    text_kind, width, in_channels, base = signature
    found = (f"text encoder {_TEXT_NAMES[text_kind]}, cross-attention width {width}, UNet in_channels {in_channels}"
             + (" (an inpainting model?)" if in_channels == 9 else "") + f", UNet base width {base}")
    if not matches:
        shipped = "; ".join(f"{c.name}: {c.description}" for c in SHIPPED_CONFIGS.values())
        raise SingleFileError(
            f"{path}: no shipped config fits this checkpoint ({found}). Shipped: {shipped}. Pass config_folder: "
            "a diffusers-layout folder of its architecture (its weights are not needed)."
        )
    options = " or ".join(f"config_folder={c.name!r} ({c.description})" for c in matches)
    raise SingleFileError(
        f"{path}: ambiguous single file ({found}): its tensors fit several shipped configs, which differ in what "
        f"the weights do not record (the prediction type and native size). Pass {options}, or a diffusers folder."
    )


def convert_checkpoint(
    checkpoint: Mapping[str, Any], configs: Mapping[str, Mapping], text_kind: str, *,
    extract_ema: bool = False, source: Any = "checkpoint",
) -> dict[str, dict]:
    """LDM checkpoint (torch tensors) -> {"unet", "vae", "text_encoder"}: diffusers-named state dicts."""
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = dict(checkpoint)
    out = {}
    steps = {
        "unet": lambda: sfu.convert_ldm_unet_checkpoint(checkpoint, dict(configs["unet"]), extract_ema=extract_ema),
        "vae": lambda: sfu.convert_ldm_vae_checkpoint(checkpoint, dict(configs["vae"])),
        "text_encoder": lambda: _convert_text_encoder(sfu, checkpoint, configs["text_encoder"], text_kind),
    }
    for name, step in steps.items():
        try:
            out[name] = step()
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise SingleFileError(
                f"{source}: diffusers could not convert the {_PART_NAMES[name]} with the given "
                f"{CONFIG_FILES[name]}: {type(e).__name__}: {e}"
            ) from e
    return out


def _convert_text_encoder(sfu, checkpoint: dict, config: Mapping, text_kind: str) -> dict:
    if text_kind == "clip":
        return sfu.convert_ldm_clip_checkpoint(checkpoint)
    # convert_open_clip_checkpoint reads only ``text_model.config.hidden_size`` (to split the fused qkv).
    shim = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=int(config["hidden_size"])))
    state = sfu.convert_open_clip_checkpoint(shim, checkpoint, prefix=OPEN_CLIP_PREFIX)
    # SD 2.x uses the penultimate OpenCLIP layer: diffusers' config has one layer fewer than the tower.
    # diffusers drops block 23 of the full-size model by name; drop a surplus last block of any size.
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    n = int(config.get("num_hidden_layers", -1))
    if layers and len(layers) == n + 1 and max(layers) == n:
        state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{n}.")}
    return state


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def _as_torch(value: Any):
    """numpy (incl. ml_dtypes bfloat16) -> torch tensor, sharing memory; torch tensors pass through."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))
