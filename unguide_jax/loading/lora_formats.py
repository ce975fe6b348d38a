"""LoRA files PyTorch users load: export our adapters, import theirs.

Our adapter (``unguide_jax.edits.lora``) is ``{module path: {"lora_A": (in, r), "lora_B": (r, out)}}`` with one
``alpha`` that multiplies directly: ``W' = W + alpha A B``. The PyTorch formats scale by a ratio instead:

- diffusers/PEFT (``unet.<path>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r]; 1x1 conv with
  trailing ``1, 1``): ``W' = W + (lora_alpha / r) B A``. diffusers reads ``lora_alpha`` (and per-module
  ``rank_pattern`` / ``alpha_pattern``) from the JSON under the safetensors metadata key
  ``lora_adapter_metadata``, keys prefixed ``unet.``; that JSON becomes ``peft.LoraConfig(**kwargs)``.
  Without it diffusers assumes ``lora_alpha = r`` (scale 1). We therefore write ``lora_alpha = alpha * r``.
- kohya/A1111 (``lora_unet_<path with '.' -> '_'>.lora_down.weight`` [r, in(, 1, 1)],
  ``.lora_up.weight`` [out, r(, 1, 1)], scalar ``.alpha``): scale ``alpha_k / r``, so ``.alpha = alpha * r``;
  a missing ``.alpha`` means scale 1. The path is diffusers' for SD 1.x/2.x, but kohya's sd-scripts train SDXL
  on the original (SGM) UNet and name SDXL modules after it (``sgm_module_names``):
  ``down_blocks.1.attentions.0.…`` is ``input_blocks.4.1.…`` in SDXL; the export writes those names for an
  SDXL UNet, the import reads both.

Imported files may carry a different scale per module (mixed ranks, per-module alphas). Our pytree has a
single alpha, so the most common scale becomes ``alpha`` and every other module's ratio ``scale / alpha``
is folded into its ``lora_B``; the product ``alpha A B`` is what the file means, up to one rounding of B.
"""
from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from unguide_jax.edits.lora import Adapter, check_fits, merge
from unguide_jax.loading.weights import read_safetensors, write_safetensors

PEFT_UNET_PREFIX = "unet."
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for first
PEFT_ADAPTER_FILE, PEFT_ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft save_pretrained
PEFT_MODEL_PREFIX = "base_model.model."
PEFT_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
# Our exact alpha, so that export -> import returns it bit for bit: the file stores alpha * r, and
# alpha * r / r is not always alpha in floating point (nor is float32(alpha * r) / r).
ALPHA_METADATA_KEY = "unguide_jax.alpha"


class LoraFileError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------- shared


def _kernel_shapes(params: Mapping) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(params)
    return {".".join(path[:-1]): tuple(leaf.shape) for path, leaf in flat.items() if path[-1] == "kernel"}


def _is_conv(path: str, kernel_shape: tuple[int, ...]) -> bool:
    if len(kernel_shape) == 2:
        return False
    if len(kernel_shape) == 4 and kernel_shape[:2] == (1, 1):
        return True
    raise LoraFileError(f"LoRA can adapt Dense and 1x1-conv layers only; {path} has a kernel of shape {kernel_shape}")


def _adapted_kernels(params: Mapping, adapter: Adapter) -> dict[str, tuple[int, ...]]:
    check_fits(params, adapter)
    shapes = _kernel_shapes(params)
    return {path: shapes[path] for path in adapter}


def _torch_pair(ab: Mapping, conv: bool, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Our (in, r) / (r, out) -> PyTorch's down [r, in] / up [out, r], with 1x1 spatial dims for a conv."""
    down = np.asarray(ab["lora_A"], dtype=np.float32).T
    up = np.asarray(ab["lora_B"], dtype=np.float32).T
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return np.ascontiguousarray(down.astype(dtype)), np.ascontiguousarray(up.astype(dtype))


def _rank(ab: Mapping) -> int:
    return int(ab["lora_A"].shape[1])


def _most_common(values: Sequence) -> Any:
    return collections.Counter(values).most_common(1)[0][0]  # ties: the first seen


# ----------------------------------------------------------------------------------------------- export


def peft_state_dict(adapter: Adapter, alpha: float, unet_params: Mapping, dtype=np.float32):
    """(tensors, metadata) of the diffusers/PEFT file for ``adapter``; ``unet_params`` may be abstract."""
    kernels = _adapted_kernels(unet_params, adapter)
    tensors = {}
    for path in sorted(adapter):
        down, up = _torch_pair(adapter[path], _is_conv(path, kernels[path]), dtype)
        tensors[f"{PEFT_UNET_PREFIX}{path}.lora_A.weight"] = down
        tensors[f"{PEFT_UNET_PREFIX}{path}.lora_B.weight"] = up
    ranks = {path: _rank(adapter[path]) for path in sorted(adapter)}
    r = _most_common(list(ranks.values()))
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module): anchor and escape the full path
    # so that one module's entry can never apply to another.
    odd = {f"^{re.escape(path)}": rank for path, rank in ranks.items() if rank != r}
    config = {
        "r": r,
        "lora_alpha": float(alpha) * r,
        "rank_pattern": odd,
        "alpha_pattern": {key: float(alpha) * rank for key, rank in odd.items()},
        "target_modules": sorted(adapter),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }
    packed = {f"{PEFT_UNET_PREFIX}{key}": value for key, value in config.items()}
    metadata = {"format": "pt", PEFT_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
                ALPHA_METADATA_KEY: repr(float(alpha))}
    return tensors, metadata


def export_peft(path: str | Path, adapter: Adapter, alpha: float, unet_params: Mapping, dtype=np.float32) -> Path:
    """Write a diffusers/PEFT LoRA file that ``StableDiffusionPipeline.load_lora_weights`` loads (for an SDXL UNet,
    ``StableDiffusionXLPipeline.load_lora_weights``: the same ``unet.<diffusers path>`` keys).

    ``path`` ending in ``.safetensors`` is the file; otherwise it is a folder that gets
    ``pytorch_lora_weights.safetensors`` (the name ``load_lora_weights(folder)`` picks). Returns the file.
    """
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / DIFFUSERS_LORA_FILE
    tensors, metadata = peft_state_dict(adapter, alpha, unet_params, dtype)
    return write_safetensors(file, tensors, metadata)


def export_peft_adapters(folder: str | Path, adapters: Mapping[str, tuple[Adapter, float]], unet_params: Mapping,
                         dtype=np.float32) -> dict[str, Path]:
    """One ``<folder>/<name>.safetensors`` per adapter, e.g. for ``load_lora_weights(file, adapter_name=name)``."""
    folder = Path(folder)
    out = {}
    for name, (adapter, alpha) in adapters.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise LoraFileError(f"adapter name {name!r} is not a safe file name (letters, digits, _ . - only)")
        out[name] = export_peft(folder / f"{name}.safetensors", adapter, alpha, unet_params, dtype)
    return out


# ------------------------------------------------------------------------------------------ SDXL's SGM names

# Inside a block, the SGM UNet names a ResBlock's layers its own way; a transformer's layers keep diffusers' names.
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                     "conv_shortcut": "skip_connection"}
SGM_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
                 "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK_LAYER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(\..+)")
_MID_LAYER = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(\..+)")


def is_sdxl_unet(unet_params: Mapping) -> bool:
    """An SDXL UNet: it has the text_time add-embedding (pooled text + time ids) that SD 1.x/2.x lack."""
    return any(path.startswith("add_embedding.") for path in _kernel_shapes(unet_params))


def _inner_sgm_name(kind: str, rest: str) -> str | None:
    """A block layer's own path (``rest``: ".conv1", ".transformer_blocks.0.attn2.to_k") in the SGM UNet; None
    where it has none."""
    if kind == "attentions":
        return rest
    if kind == "resnets":
        return "." + SGM_RESNET_LAYERS[rest[1:]] if rest[1:] in SGM_RESNET_LAYERS else None
    if rest != ".conv":
        return None
    return ".op" if kind == "downsamplers" else ".conv"


def sgm_module_names(unet) -> dict[str, str]:
    """diffusers module path -> the SGM (original Stability) UNet's path, for every module of ``unet`` that the SGM
    layout names (others are left out). ``unet``: the UNet's parameters, or the paths of all its Linear/conv
    modules (the layer numbering is read from them: a subset would number wrong).

    The SGM UNet numbers its layers through the whole UNet: ``input_blocks.0`` is conv_in, then each level's
    layers (``.0`` the ResBlock, ``.1`` the transformer) and its downsampler (``.0.op``) one after the other;
    ``middle_block.0/1/2`` is ResBlock, transformer, ResBlock; ``output_blocks`` count the up levels' layers, the
    upsampler inside a level's last one (``.2``, or ``.1`` in a level without attention). With SDXL's uniform
    layers per block n this is diffusers' ``_maybe_map_sgm_blocks_to_diffusers``: down_blocks.i.attentions.j is
    input_blocks.(i·(n+1) + j + 1).1 and up_blocks.i.attentions.j is output_blocks.(i·(n+1) + j).1."""
    paths = list(_kernel_shapes(unet)) if isinstance(unet, Mapping) else list(unet)
    layers = {"down_blocks": collections.defaultdict(set), "up_blocks": collections.defaultdict(set)}
    downsampled, attended = set(), set()
    for path in paths:
        match = _BLOCK_LAYER.fullmatch(path)
        if not match:
            continue
        side, level, kind, index, _ = match.groups()
        if kind == "resnets":
            layers[side][int(level)].add(int(index))
        elif kind == "downsamplers":
            downsampled.add(int(level))
        elif kind == "attentions" and side == "up_blocks":
            attended.add(int(level))
    first_input, first_output, start, out_start = {}, {}, 1, 0
    for level in sorted(layers["down_blocks"]):
        first_input[level] = start
        start += len(layers["down_blocks"][level]) + (level in downsampled)
    for level in sorted(layers["up_blocks"]):
        first_output[level] = out_start
        out_start += len(layers["up_blocks"][level])
    names = {}
    for path in paths:
        if path in SGM_TOP_LEVEL:
            names[path] = SGM_TOP_LEVEL[path]
            continue
        block = _BLOCK_LAYER.fullmatch(path)
        mid = _MID_LAYER.fullmatch(path)
        if block:
            side, level, kind, index, rest = block.groups()
            level, index = int(level), int(index)
            inner = _inner_sgm_name(kind, rest)
            if inner is None:
                continue
            if side == "down_blocks":
                count = len(layers[side][level])
                number = first_input[level] + (count if kind == "downsamplers" else index)
                slot = "0" if kind in ("resnets", "downsamplers") else "1"
                names[path] = f"input_blocks.{number}.{slot}{inner}"
            else:
                count = len(layers[side][level])
                number = first_output[level] + (count - 1 if kind == "upsamplers" else index)
                slot = {"resnets": "0", "attentions": "1"}.get(kind, "2" if level in attended else "1")
                names[path] = f"output_blocks.{number}.{slot}{inner}"
        elif mid:
            kind, index, rest = mid.groups()
            inner = _inner_sgm_name(kind, rest)
            if inner is not None:
                names[path] = f"middle_block.{1 if kind == 'attentions' else 2 * int(index)}{inner}"
    return names


def _kohya_names(kernel_paths, sgm: bool = False) -> dict[str, str | None]:
    """kohya name (without prefix) -> module path, or None where '.' -> '_' makes two paths collide. ``sgm``
    (SDXL): the SGM names as well as diffusers'."""
    paths = list(kernel_paths)
    table: dict[str, str | None] = {}
    named = [(path, path) for path in paths]
    if sgm:
        named += [(sgm_path, path) for path, sgm_path in sgm_module_names(paths).items()]
    for dotted, path in named:
        name = dotted.replace(".", "_")
        table[name] = None if name in table and table[name] != path else path
    return table


def kohya_module_name(path: str, sgm_names: Mapping[str, str] | None) -> str:
    """The name kohya's scripts give ``path`` (without prefix): diffusers' path, or for SDXL (``sgm_names``
    given, ``sgm_module_names``) the SGM UNet's, both with '.' -> '_'."""
    if sgm_names is None:
        return path.replace(".", "_")
    if path not in sgm_names:
        raise LoraFileError(f"{path}: kohya names SDXL modules after the SGM UNet, which has no name for this module")
    return sgm_names[path].replace(".", "_")


def kohya_state_dict(adapter: Adapter, alpha: float, unet_params: Mapping, dtype=np.float32):
    """(tensors, metadata) of the kohya/A1111 file for ``adapter``; ``unet_params`` may be abstract. An SDXL UNet's
    modules get the SGM names kohya's scripts use (``sgm_module_names``)."""
    kernels = _adapted_kernels(unet_params, adapter)
    all_paths = list(_kernel_shapes(unet_params))
    sgm_names = sgm_module_names(all_paths) if is_sdxl_unet(unet_params) else None
    names = _kohya_names(all_paths, sgm=sgm_names is not None)
    tensors = {}
    for path in sorted(adapter):
        name = kohya_module_name(path, sgm_names)
        if names.get(name) != path:
            raise LoraFileError(f"{path}: its kohya name {KOHYA_UNET_PREFIX}{name} would be ambiguous in this model")
        down, up = _torch_pair(adapter[path], _is_conv(path, kernels[path]), dtype)
        key = KOHYA_UNET_PREFIX + name
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        # float32 whatever ``dtype``: a float16 alpha would shift the scale by up to 1e-3.
        tensors[f"{key}.alpha"] = np.asarray(float(alpha) * _rank(adapter[path]), dtype=np.float32)
    metadata = {"format": "pt", "ss_network_module": "networks.lora", ALPHA_METADATA_KEY: repr(float(alpha))}
    ranks = {_rank(ab) for ab in adapter.values()}
    if len(ranks) == 1:  # the trainer's summary fields, meaningful only for a uniform rank
        (r,) = ranks
        metadata.update(ss_network_dim=str(r), ss_network_alpha=repr(float(alpha) * r))
    return tensors, metadata


def export_kohya(path: str | Path, adapter: Adapter, alpha: float, unet_params: Mapping, dtype=np.float32) -> Path:
    """Write a kohya/A1111 LoRA ``.safetensors`` file (UNet only; an SDXL UNet's modules under their SGM names).

    A1111 and kohya's scripts read one ``.alpha`` per module. diffusers 0.42.1 also loads these files, but
    ignores per-module alphas that differ (mixed ranks): for diffusers prefer ``export_peft``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraFileError(f"a kohya LoRA is a single .safetensors file; got {path}")
    tensors, metadata = kohya_state_dict(adapter, alpha, unet_params, dtype)
    return write_safetensors(path, tensors, metadata)


def export_merged_unet(folder: str | Path, unet_config, unet_params: Mapping,
                       adapters: Sequence[tuple[Adapter, float]], dtype: Any = None) -> Path:
    """A diffusers ``unet/`` folder (config.json + weights) with the adapters merged into the weights."""
    from unguide_jax.loading.diffusers_folder import (
        save_component,  # loading pulls in every model; only this export needs it
    )

    for adapter, _ in adapters:
        check_fits(unet_params, adapter)
    return save_component(folder, "unet", unet_config, merge(unet_params, adapters), dtype)


# ----------------------------------------------------------------------------------------------- import


def _read_file(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors = read_safetensors(file)  # names the file when it is missing
    with safe_open(str(file), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    return tensors, metadata


def _text_encoder_keys(keys, prefixes, skip_text_encoder: bool, file: Path) -> set[str]:
    found = {k for k in keys if k.startswith(prefixes)}
    if found and not skip_text_encoder:
        raise LoraFileError(
            f"{file} also adapts the text encoder ({len(found)} tensors, e.g. {sorted(found)[0]}); only UNet LoRA "
            "is imported. Pass skip_text_encoder=True to ignore those tensors.")
    return found


def _to_ours(key_down: str, down: np.ndarray, key_up: str, up: np.ndarray, path: str,
             kernel_shape: tuple[int, ...], dtype) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch down/up -> our (in, r) / (r, out), checking shapes against the model's layer."""
    try:
        conv = _is_conv(path, kernel_shape)
    except LoraFileError as err:
        raise LoraFileError(f"{key_down}: {err}") from None
    fan_in, fan_out = kernel_shape[-2:]
    for key, value in ((key_down, down), (key_up, up)):
        want_ndim = 4 if conv else 2
        if value.ndim != want_ndim or (conv and tuple(value.shape[2:]) != (1, 1)):
            kind = "1x1 conv [.., .., 1, 1]" if conv else "linear [.., ..]"
            raise LoraFileError(f"{key}: shape {tuple(value.shape)} does not fit {path}, a {kind} layer")
    down2, up2 = (down[:, :, 0, 0], up[:, :, 0, 0]) if conv else (down, up)
    rank = down2.shape[0]
    if down2.shape[1] != fan_in:
        raise LoraFileError(f"{key_down}: shape {tuple(down.shape)}, but {path} has {fan_in} inputs")
    if up2.shape != (fan_out, rank):
        raise LoraFileError(
            f"{key_up}: shape {tuple(up.shape)}, expected ({fan_out}, {rank}) for {path} at rank {rank}")
    return np.asarray(down2.T, np.float32).astype(dtype), np.asarray(up2.T, np.float32).astype(dtype)


def _exact_alpha(metadata: Mapping[str, str], file: Path) -> float | None:
    raw = metadata.get(ALPHA_METADATA_KEY)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise LoraFileError(f"{file}: metadata {ALPHA_METADATA_KEY} = {raw!r} is not a number") from None


def _fold_scales(pairs: dict[str, tuple[np.ndarray, np.ndarray]], scales: dict[str, float],
                 written_alpha: float | None, dtype) -> tuple[Adapter, float]:
    """One alpha for all modules: the most common scale; every other module's ratio goes into its B.

    ``written_alpha``: every module stores exactly what our export writes for this alpha, so it is the alpha.
    """
    if not pairs:
        raise LoraFileError("the file holds no UNet LoRA tensors")
    if written_alpha is not None:
        scales = dict.fromkeys(scales, written_alpha)
    alpha = float(_most_common([scales[p] for p in sorted(scales)]))
    if alpha == 0.0:
        alpha = 1.0  # a zero scale cannot carry the others; fold every module instead
    adapter = {}
    for path in sorted(pairs):
        a, b = pairs[path]
        if scales[path] != alpha:
            b = (np.asarray(b, np.float64) * (scales[path] / alpha)).astype(dtype)
        adapter[path] = {"lora_A": jnp.asarray(a, dtype), "lora_B": jnp.asarray(b, dtype)}
    return adapter, alpha


def _resolve_peft_file(path: Path) -> tuple[Path, dict | None]:
    """The weights file, plus the adapter_config.json of a peft ``save_pretrained`` folder if there is one."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"missing LoRA file or folder: {path}")
    if (path / PEFT_ADAPTER_CONFIG).is_file() and (path / PEFT_ADAPTER_FILE).is_file():
        return path / PEFT_ADAPTER_FILE, json.loads((path / PEFT_ADAPTER_CONFIG).read_text())
    if (path / DIFFUSERS_LORA_FILE).is_file():
        return path / DIFFUSERS_LORA_FILE, None
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise LoraFileError(f"{path}: expected {DIFFUSERS_LORA_FILE} or a single .safetensors file; found {found}")
    return files[0], None


def _peft_config(metadata: Mapping[str, str], folder_config: dict | None, file: Path) -> dict | None:
    """The LoraConfig kwargs diffusers would use for the UNet, or None (then every scale is 1)."""
    if folder_config is not None:
        return folder_config
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFileError(f"{file}: metadata {PEFT_METADATA_KEY} is not JSON: {err}") from None
    prefixed = {k[len(PEFT_UNET_PREFIX):]: v for k, v in config.items() if k.startswith(PEFT_UNET_PREFIX)}
    if prefixed:
        return prefixed
    # UNet2DConditionModel.save_lora_adapter writes the config unprefixed.
    return None if any(k.startswith(PEFT_TEXT_PREFIXES) for k in config) else config


def _pattern_value(patterns: Mapping[str, Any], path: str, default):
    """peft.utils.other.get_pattern_key semantics: first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _peft_alpha(config: dict | None, path: str, rank: int, key: str) -> tuple[float, bool]:
    """(module's lora_alpha as diffusers/peft would use it, whether the scale is alpha / sqrt(r))."""
    if config is None:
        return float(rank), False  # diffusers without metadata: lora_alpha = r for every module
    config_rank = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))  # 8: LoraConfig default
    if int(config_rank) != rank:
        raise LoraFileError(f"{key}: rank {rank}, but the adapter config gives {path} rank {config_rank}")
    lora_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
    return lora_alpha, bool(config.get("use_rslora"))


def import_peft(path: str | Path, unet_params: Mapping, *, skip_text_encoder: bool = False,
                dtype=jnp.float32) -> tuple[Adapter, float]:
    """A diffusers/PEFT LoRA (file, diffusers folder, or peft ``save_pretrained`` folder) -> (adapter, alpha).

    Keys may carry ``unet.`` (pipeline files), ``base_model.model.`` (peft folders) or no prefix
    (``UNet2DConditionModel.save_lora_adapter``). Text-encoder tensors are an error unless ``skip_text_encoder``.
    """
    file, folder_config = _resolve_peft_file(Path(path))
    tensors, metadata = _read_file(file)
    skipped = _text_encoder_keys(tensors, PEFT_TEXT_PREFIXES, skip_text_encoder, file)
    kernels = _kernel_shapes(unet_params)
    config = _peft_config(metadata, folder_config, file)
    halves: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for key in sorted(set(tensors) - skipped):
        name = key
        for prefix in (PEFT_UNET_PREFIX, PEFT_MODEL_PREFIX):
            name = name.removeprefix(prefix)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if not match:
            raise LoraFileError(f"{file}: key {key} is not a PEFT LoRA weight (<module>.lora_A/lora_B.weight)")
        module, half = match.groups()
        if module not in kernels:
            raise LoraFileError(f"{file}: key {key} names module {module}, which the model does not have")
        halves[module][half] = key
    written = _exact_alpha(metadata, file)
    pairs, scales, all_written = {}, {}, written is not None
    for module, keys in halves.items():
        for half in ("lora_A", "lora_B"):
            if half not in keys:
                other = next(iter(keys.values()))
                raise LoraFileError(f"{file}: {other} has no matching {half} tensor for {module}")
        pairs[module] = _to_ours(keys["lora_A"], tensors[keys["lora_A"]], keys["lora_B"], tensors[keys["lora_B"]],
                                 module, kernels[module], dtype)
        rank = pairs[module][0].shape[1]
        lora_alpha, rslora = _peft_alpha(config, module, rank, keys["lora_A"])
        scales[module] = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank
        all_written = all_written and not rslora and lora_alpha == written * rank
    adapter, alpha = _fold_scales(pairs, scales, written if all_written else None, dtype)
    check_fits(unet_params, adapter, what=str(file))
    return adapter, alpha


def import_kohya(path: str | Path, unet_params: Mapping, *, skip_text_encoder: bool = False,
                 dtype=jnp.float32) -> tuple[Adapter, float]:
    """A kohya/A1111 LoRA ``.safetensors`` -> (adapter, alpha), names resolved against the model's modules (an
    SDXL UNet's by their SGM names, as kohya's scripts write them, or by diffusers')."""
    file = Path(path)
    tensors, metadata = _read_file(file)
    skipped = _text_encoder_keys(tensors, KOHYA_TEXT_PREFIXES, skip_text_encoder, file)
    kernels = _kernel_shapes(unet_params)
    names = _kohya_names(kernels, sgm=is_sdxl_unet(unet_params))
    parts: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for key in sorted(set(tensors) - skipped):
        match = re.fullmatch(rf"{KOHYA_UNET_PREFIX}([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if not match:
            raise LoraFileError(f"{file}: key {key} is not a kohya UNet LoRA tensor "
                                f"({KOHYA_UNET_PREFIX}<module>.lora_down.weight / .lora_up.weight / .alpha)")
        name, part = match.groups()
        if name not in names:
            raise LoraFileError(f"{file}: key {key} matches no module of the model")
        if names[name] is None:
            raise LoraFileError(f"{file}: key {key} matches several modules of the model once '.' is read as '_'")
        parts[names[name]][part] = key
    written = _exact_alpha(metadata, file)
    pairs, scales, all_written = {}, {}, written is not None
    for module, keys in parts.items():
        for part in ("lora_down.weight", "lora_up.weight"):
            if part not in keys:
                raise LoraFileError(f"{file}: {next(iter(keys.values()))} has no matching {part} tensor")
        down_key, up_key = keys["lora_down.weight"], keys["lora_up.weight"]
        pairs[module] = _to_ours(down_key, tensors[down_key], up_key, tensors[up_key], module, kernels[module], dtype)
        rank = pairs[module][0].shape[1]
        if "alpha" in keys:
            value = np.asarray(tensors[keys["alpha"]], np.float64)
            if value.size != 1:
                raise LoraFileError(f"{file}: {keys['alpha']} should be a scalar, has shape {value.shape}")
            scales[module] = float(value.reshape(())) / rank
            all_written = all_written and value.reshape(()) == np.asarray(written * rank, tensors[keys["alpha"]].dtype)
        else:
            scales[module] = 1.0  # kohya: no alpha means alpha = rank
            all_written = False
    adapter, alpha = _fold_scales(pairs, scales, written if all_written else None, dtype)
    check_fits(unet_params, adapter, what=str(file))
    return adapter, alpha


def import_lora(path: str | Path, unet_params: Mapping, *, skip_text_encoder: bool = False,
                dtype=jnp.float32) -> tuple[Adapter, float]:
    """Either format, told apart by its key names."""
    path = Path(path)
    if path.is_file():
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
        if keys and all(k.startswith((KOHYA_UNET_PREFIX, *KOHYA_TEXT_PREFIXES)) for k in keys):
            return import_kohya(path, unet_params, skip_text_encoder=skip_text_encoder, dtype=dtype)
    return import_peft(path, unet_params, skip_text_encoder=skip_text_encoder, dtype=dtype)
