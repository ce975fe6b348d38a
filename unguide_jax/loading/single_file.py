"""Single-file Stable Diffusion checkpoints (the original CompVis / LDM and Stability SGM layouts) -> Flax.

A single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.ckpt``,
``sd_xl_base_1.0.safetensors``, ...) holds the whole model under LDM names::

    model.diffusion_model.*                the UNet (SDXL: ``label_emb.0.*`` is its text_time add-embedding)
    first_stage_model.*  (or vae.*)        the VAE
    cond_stage_model.transformer.*         the text encoder, SD 1.x (a transformers CLIPTextModel)
    cond_stage_model.model.*               the text encoder, SD 2.x (OpenCLIP)
    conditioner.embedders.0.transformer.*  SDXL's first text encoder (CLIP ViT-L, transformers names)
    conditioner.embedders.1.model.*        SDXL's second text encoder (OpenCLIP ViT-bigG with its text_projection)

It carries no configs, tokenizer or scheduler settings, and nothing can be downloaded here, so
the caller names a local diffusers-layout folder of the same architecture whose
``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``, ``tokenizer/`` and
``scheduler/scheduler_config.json`` (SDXL: also ``text_encoder_2/config.json`` and ``tokenizer_2/``)
are used (its weight files are never read) -- or one of the configs shipped for SD 1.x / 2.x / SDXL
base (:mod:`unguide_jax.loading.sd_configs`), by name or picked from the checkpoint's tensor shapes
(:func:`pick_shipped_config`). The SDXL refiner (one OpenCLIP encoder under
``conditioner.embedders.0.model.*``) is refused. The renaming
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
from unguide_jax.models.unet import TEXT_TIME

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP text tower
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = SDXL_PREFIX + "0.transformer."  # SDXL base's first encoder: CLIP ViT-L, transformers names
SDXL_OPEN_CLIP_PREFIX = SDXL_PREFIX + "1.model."  # its second: OpenCLIP ViT-bigG, with text_projection
SDXL_REFINER_PREFIX = SDXL_PREFIX + "0.model."  # the refiner's only encoder (bigG), where the base has CLIP-L

CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
SDXL_CONFIG_FILES = {"text_encoder_2": "text_encoder_2/config.json"}  # needed besides CONFIG_FILES by an SDXL folder
ALL_CONFIG_FILES = {**CONFIG_FILES, **SDXL_CONFIG_FILES}

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
    """Load an SD 1.x / 2.x / SDXL base single-file checkpoint (``.safetensors``, or a pickled ``.ckpt``).

    ``config_folder`` is a diffusers-layout folder of the same architecture (e.g. a copy of
    ``stable-diffusion-v1-5``, ``stable-diffusion-2-1`` or ``stable-diffusion-xl-base-1.0`` without
    weights): the component configs, the tokenizer(s) and the scheduler config come from it (SDXL:
    also ``force_zeros_for_empty_prompt``, from its ``model_index.json``, on by default). In particular
    the **prediction type comes from ``scheduler/scheduler_config.json``** -- an SD 2.x 768px checkpoint
    needs a folder whose scheduler says ``"prediction_type": "v_prediction"`` (SD 2.x base, SD 1.x and
    SDXL base: ``"epsilon"``); the checkpoint itself does not record it. The folder's family must be the
    checkpoint's: an SDXL file needs an SDXL folder (its UNet's ``addition_embed_type`` is "text_time").

    ``config_folder`` may also name a shipped config (``"sd1"``, ``"sd2-base"``, ``"sd2-v"``,
    ``"sdxl-base"``; an existing folder of that name wins), or be ``None``: then the shipped config is
    picked from the checkpoint's tensors (:func:`pick_shipped_config`) -- SD 1.x and SDXL base are
    recognised outright, SD 2.x asks for ``"sd2-base"`` or ``"sd2-v"`` since its weights do not tell
    the two apart.

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
    sdxl = "text_encoder_2" in configs
    parts = ("unet", "text_encoder", "text_encoder_2", "vae") if sdxl else ("unet", "text_encoder", "vae")
    parsed = {name: COMPONENTS[name].config_cls.from_dict(configs[name], source=where(ALL_CONFIG_FILES[name]))
              for name in parts}
    scheduler = SchedulerConfig.from_dict(configs["scheduler"], source=where(CONFIG_FILES["scheduler"]))
    check_compatible(parsed["unet"], parsed["text_encoder"], label, parsed.get("text_encoder_2"))
    tokenizer = load_tokenizer(config_folder / "tokenizer")
    sdxl_parts = {}
    if sdxl:
        index_file = config_folder / "model_index.json"
        index = read_json(index_file) if index_file.is_file() else {}
        sdxl_parts = dict(tokenizer_2=load_tokenizer(config_folder / "tokenizer_2"),
                          force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    if checkpoint_path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        read_pickle(checkpoint_path, allow_pickle=False)  # raises PickledWeightsRefused, explaining why
    if checkpoint_path.suffix == ".safetensors":
        _check_family(check_layout(_safetensors_keys(checkpoint_path), checkpoint_path), sdxl, checkpoint_path, label)

    tensors = read_weights(checkpoint_path, allow_pickle=allow_pickle)
    text_kind = check_layout(tensors, checkpoint_path)
    _check_family(text_kind, sdxl, checkpoint_path, label)
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
                f"{checkpoint_path}: its {_PART_NAMES[name]} does not match {where(ALL_CONFIG_FILES[name])} "
                f"({'is the config folder the same architecture?' if shipped_name is None else 'pass config_folder: a diffusers folder of its architecture'}): {e}"
            ) from e
        modules[name] = module

    return StableDiffusion(
        unet=modules["unet"], text_encoder=modules["text_encoder"], vae=modules["vae"], tokenizer=tokenizer,
        scheduler=scheduler, params=params, clip_skip=clip_skip, text_encoder_2=modules.get("text_encoder_2"),
        **sdxl_parts,
    )


_PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
               "text_encoder_2": "second text encoder (OpenCLIP bigG)"}


def _check_family(text_kind: str, folder_is_sdxl: bool, checkpoint_path: Path, label: Any) -> None:
    """An SDXL file needs an SDXL config folder and an SD 1.x/2.x file one that is not: said before the
    weights are read, rather than as a list of missing tensors."""
    if (text_kind == "sdxl") == folder_is_sdxl:
        return
    if folder_is_sdxl:
        raise SingleFileError(
            f"{checkpoint_path} is an SD 1.x/2.x checkpoint ({_TEXT_NAMES[text_kind]}) but {label} is an SDXL layout "
            "(its UNet takes the text_time add-embedding): pass config_folder: a diffusers folder of its architecture"
        )
    raise SingleFileError(
        f"{checkpoint_path} is an SDXL checkpoint ({_TEXT_NAMES[text_kind]}) but {label} is not an SDXL layout "
        "(its UNet has no text_time add-embedding): pass config_folder='sdxl-base' or an SDXL diffusers folder"
    )


def read_config_folder(config_folder: Path) -> dict[str, dict]:
    """The raw config dicts of a diffusers-layout folder (its weights are not needed). An SDXL folder (its
    UNet's ``addition_embed_type`` is "text_time", which needs a second text encoder's pooled output)
    must also hold ``text_encoder_2/config.json`` and ``tokenizer_2/``; its result has "text_encoder_2"."""
    if not config_folder.is_dir():
        raise FileNotFoundError(f"missing config folder: {config_folder} (a diffusers-layout folder is needed)")
    files, tokenizers = dict(CONFIG_FILES), ["tokenizer"]
    unet_file = config_folder / CONFIG_FILES["unet"]
    if unet_file.is_file() and read_json(unet_file).get("addition_embed_type") == TEXT_TIME:
        files.update(SDXL_CONFIG_FILES)
        tokenizers.append("tokenizer_2")
    missing = [rel for rel in files.values() if not (config_folder / rel).is_file()]
    missing += [f"{name}/" for name in tokenizers if not (config_folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"config folder {config_folder} is not a complete diffusers layout: missing {', '.join(missing)}"
        )
    return {name: read_json(config_folder / rel) for name, rel in files.items()}


def check_layout(keys: Iterable[str], source: Any = "checkpoint") -> str:
    """Check that every part is present under LDM/SGM names; returns the text encoders' layout: "clip"
    (SD 1.x), "open_clip" (SD 2.x) or "sdxl" (SDXL base: CLIP ViT-L and OpenCLIP bigG)."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has(SDXL_REFINER_PREFIX):
        raise SingleFileError(
            f"{source}: an SDXL refiner checkpoint (its only text encoder is OpenCLIP bigG under "
            f"{SDXL_REFINER_PREFIX}*, with no CLIP ViT-L under {SDXL_CLIP_PREFIX}*): the refiner is not supported, "
            "only SDXL base and its fine-tunes"
        )
    missing = []
    if not has(UNET_PREFIX):
        missing.append(f"the UNet ({UNET_PREFIX}*)")
    if not has(*VAE_PREFIXES):
        missing.append(f"the VAE ({'* or '.join(VAE_PREFIXES)}*)")
    if has(SDXL_PREFIX):
        text_kind = "sdxl"
        if not has(SDXL_CLIP_PREFIX):
            missing.append(f"SDXL's first text encoder, CLIP ViT-L ({SDXL_CLIP_PREFIX}*)")
        if not has(SDXL_OPEN_CLIP_PREFIX):
            missing.append(f"SDXL's second text encoder, OpenCLIP bigG ({SDXL_OPEN_CLIP_PREFIX}*)")
    else:
        text_kind = "clip" if has(CLIP_PREFIX) else "open_clip" if has(OPEN_CLIP_PREFIX) else None
        if text_kind is None:
            missing.append(f"the text encoder ({CLIP_PREFIX}* for SD 1.x, {OPEN_CLIP_PREFIX}* for SD 2.x or "
                           f"{SDXL_PREFIX}{{0,1}}.* for SDXL)")
    if missing:
        sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
        raise SingleFileError(
            f"{source} is not a complete single-file (LDM/SGM-layout) Stable Diffusion checkpoint: it lacks "
            f"{'; '.join(missing)}. First keys: {sample}"
        )
    return text_kind


def shipped_config_named(config_folder: str | Path | None) -> ShippedConfig | None:
    """The shipped config ``config_folder`` names ("sd1", "sd2-base", "sd2-v", "sdxl-base"), unless a folder of
    that name exists."""
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
_TEXT_NAMES = {"clip": f"SD 1.x-style CLIP ({CLIP_PREFIX}*)", "open_clip": f"SD 2.x-style OpenCLIP ({OPEN_CLIP_PREFIX}*)",
               "sdxl": f"SDXL's CLIP ViT-L and OpenCLIP bigG ({SDXL_CLIP_PREFIX}*, {SDXL_OPEN_CLIP_PREFIX}*)"}


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

    The text encoders' layout and the UNet's cross-attention width decide: CLIP and 768 is SD 1.x
    ("sd1"); SDXL's two encoders and 2048 with a 320-wide UNet is SDXL base ("sdxl-base"); OpenCLIP
    and 1024 is SD 2.x. SD 2.x base (512 px, epsilon) and 768-v (v-prediction)
    have the same tensors, and a safetensors file records neither, so that case is an error asking
    for ``config_folder="sd2-base"`` or ``"sd2-v"`` rather than a guess (diffusers guesses v unless a
    pickle's ``global_step`` is 875000; a wrong guess samples noise). Anything else (an inpainting
    UNet with 9 input channels, ...) is an error asking for a config folder; the SDXL refiner is
    refused outright (:func:`check_layout`).
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
    """LDM/SGM checkpoint (torch tensors) -> {"unet", "vae", "text_encoder"} (SDXL: and "text_encoder_2"):
    diffusers-named state dicts."""
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = dict(checkpoint)
    out = {}
    steps = {
        "unet": lambda: sfu.convert_ldm_unet_checkpoint(checkpoint, dict(configs["unet"]), extract_ema=extract_ema),
        "vae": lambda: sfu.convert_ldm_vae_checkpoint(checkpoint, dict(configs["vae"])),
        "text_encoder": lambda: _convert_text_encoder(sfu, checkpoint, configs["text_encoder"], text_kind),
    }
    if text_kind == "sdxl":
        # Unlike SD 2.x, every block of the bigG tower is kept (diffusers' text_encoder_2 has all 32; SDXL reads
        # the penultimate hidden state), and its ``text_projection`` becomes CLIPTextModelWithProjection's.
        steps["text_encoder_2"] = lambda: _convert_open_clip(sfu, checkpoint, configs["text_encoder_2"],
                                                             SDXL_OPEN_CLIP_PREFIX)
    for name, step in steps.items():
        try:
            out[name] = step()
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise SingleFileError(
                f"{source}: diffusers could not convert the {_PART_NAMES[name]} with the given "
                f"{ALL_CONFIG_FILES[name]}: {type(e).__name__}: {e}"
            ) from e
    return out


def _convert_open_clip(sfu, checkpoint: dict, config: Mapping, prefix: str) -> dict:
    # convert_open_clip_checkpoint splits the fused qkv at the width: ``text_projection``'s first dimension
    # where the file has one, else the one config value it reads, ``text_model.config.hidden_size``.
    shim = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=int(config["hidden_size"])))
    return sfu.convert_open_clip_checkpoint(shim, checkpoint, prefix=prefix)


def _convert_text_encoder(sfu, checkpoint: dict, config: Mapping, text_kind: str) -> dict:
    if text_kind in ("clip", "sdxl"):  # strips cond_stage_model.transformer. (SD 1) or conditioner.embedders.0.transformer.
        return sfu.convert_ldm_clip_checkpoint(checkpoint)
    state = _convert_open_clip(sfu, checkpoint, config, OPEN_CLIP_PREFIX)
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
