"""A transformers CLIP model into Flax, with its image preprocessing done in JAX.

``load_clip(spec)`` takes a transformers ``CLIPModel`` folder (``config.json`` with ``text_config``
and ``vision_config``, weights in ``model.safetensors``; ``pytorch_model.bin`` only with
``allow_pickle``), a single weights file with ``config_folder`` naming the folder of its config, or a
hub id already in the local Hugging Face cache (nothing is downloaded).

The preprocessing settings come from the folder's ``preprocessor_config.json``, or from the
``image_processor`` part of transformers 5's ``processor_config.json``; without either, CLIP's
defaults. ``preprocess_images`` reproduces ``CLIPImageProcessor``: its resize is Pillow's, and
``jax.image.resize`` is up to 21/255 away from Pillow's bicubic on noisy images (edge weights,
the 8-bit rounding between the two passes), enough to move a CLIP score. So the resize here is
Pillow's own algorithm (``resize_like_pil``): the same coefficients, the same fixed-point
arithmetic and the same rounding, pixel for pixel.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import PIL

from unguide_jax.loading.convert import torch_to_flax
from unguide_jax.loading.resolve import (
    ModelNotFound,
    find_in_hub_cache,
    looks_like_hub_id,
)
from unguide_jax.loading.weights import PICKLE_SUFFIXES, find_weights_file, read_weights
from unguide_jax.models.clip import CLIPConfig, CLIPModel, rename_torch_key
from unguide_jax.models.config_io import ConfigError, read_json
from unguide_jax.models.layers import abstract_params

WEIGHT_STEMS = ("model", "pytorch_model")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL.Image.Resampling codes, as image processor configs store them.
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = range(6)


# --- image preprocessing settings ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CLIPImageProcessing:
    """What ``CLIPImageProcessor`` does to an image; the defaults are its own.

    ``size``: an int resizes the shorter side to it (the longer one keeps the aspect ratio, rounded
    down), ``(height, width)`` resizes to exactly that, None does not resize. ``crop_size``: the
    centre crop ``(height, width)``, None for none. ``rescale_factor`` and ``image_mean``/``image_std``:
    None skips that step.
    """

    size: int | tuple[int, int] | None = 224
    crop_size: tuple[int, int] | None = (224, 224)
    resample: int = BICUBIC
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | None = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.resample not in _FILTERS:
            names = {NEAREST: "nearest"}
            raise ConfigError(f"resample={self.resample} ({names.get(self.resample, 'unknown')}) is not supported: "
                              f"supported are {sorted(_FILTERS)} (lanczos, bilinear, bicubic, box, hamming)")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "image processor config") -> "CLIPImageProcessing":
        """An image processor's saved settings (transformers 4.x or 5.x, CLIPImageProcessor or the
        older CLIPFeatureExtractor). A key that would change the output and is not understood is an
        error that names it."""
        raw = dict(raw)
        problems = []

        def flag(key: str) -> bool:
            value = raw.pop(key, None)
            return True if value is None else bool(value)  # None: the processor's default

        def pixels(key: str, value: Any) -> tuple[int, int] | int | None:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, Mapping):
                value = {k: v for k, v in value.items() if v is not None}
                if set(value) == {"shortest_edge"}:
                    return int(value["shortest_edge"])
                if set(value) == {"height", "width"}:
                    return int(value["height"]), int(value["width"])
            problems.append(f"{key}={value!r} is not supported (an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}})")
            return None

        square = bool(raw.pop("use_square_size", False))
        do_resize, do_crop = flag("do_resize"), flag("do_center_crop")
        do_rescale, do_normalize = flag("do_rescale"), flag("do_normalize")
        defaults = cls()
        size = pixels("size", raw.pop("size", {"shortest_edge": defaults.size}))
        if square and isinstance(size, int):
            size = (size, size)
        crop = pixels("crop_size", raw.pop("crop_size", dict(zip(("height", "width"), defaults.crop_size))))
        if isinstance(crop, int):
            crop = (crop, crop)
        resample = raw.pop("resample", defaults.resample)
        factor = raw.pop("rescale_factor", None)
        factor = defaults.rescale_factor if factor is None else float(factor)

        def channels(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
            value = raw.pop(key, default)
            return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3

        mean, std = channels("image_mean", defaults.image_mean), channels("image_std", defaults.image_std)
        for key, allowed in _PROCESSOR_FIXED.items():
            if key in raw and raw.pop(key) not in allowed:
                problems.append(f"{key} must be one of {allowed!r}")
        unknown = sorted(k for k in raw if k not in _PROCESSOR_IGNORED and not k.startswith("_"))
        problems += [f"unknown key {k!r}" for k in unknown]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        try:
            return cls(size=size if do_resize else None, crop_size=crop if do_crop else None, resample=resample,
                       rescale_factor=factor if do_rescale else None,
                       image_mean=mean if do_normalize else None, image_std=std if do_normalize else None)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


# Bookkeeping, and settings that cannot change a 3-channel uint8 image's result (our input is RGB
# already; the output layout is ours).
_PROCESSOR_IGNORED = frozenset({
    "image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb", "default_to_square",
    "data_format", "input_data_format", "return_tensors", "device", "disable_grouping", "pad_size",
})
_PROCESSOR_FIXED = {"do_pad": (False, None), "reducing_gap": (None,), "crop_pct": (None,)}


def read_image_processing(folder: str | Path) -> CLIPImageProcessing:
    """The preprocessing a CLIP folder asks for: ``preprocessor_config.json``, else the image
    processor in ``processor_config.json``, else CLIP's defaults."""
    folder = Path(folder)
    legacy, combined = (folder / name for name in PREPROCESSOR_FILES)
    if legacy.is_file():
        return CLIPImageProcessing.from_dict(read_json(legacy), source=str(legacy))
    if combined.is_file():
        raw = read_json(combined)
        if "image_processor" not in raw:
            raise ConfigError(f"{combined}: no 'image_processor' entry (keys: {', '.join(sorted(raw)) or 'none'})")
        return CLIPImageProcessing.from_dict(raw["image_processor"], source=f"{combined}, image_processor")
    return CLIPImageProcessing()


# --- Pillow's resampling ---------------------------------------------------------------------------
# Pillow (src/libImaging/Resample.c) resizes separably, each output pixel a weighted sum over a
# window that widens by the scale when shrinking (antialiasing). Weights are normalised per output
# pixel (so the edges renormalise rather than pad), rounded to 22-bit fixed point, and each pass
# rounds and clips to 8 bits, so the order of the passes shows in the result: see
# ``pil_vertical_first``.

def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


# Pillow writes the Hamming window's constants as C floats (0.54f, 0.46f)
_F32_054, _F32_046 = float(np.float32(0.54)), float(np.float32(0.46))


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


_FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    LANCZOS: (_lanczos, 3.0), BILINEAR: (_bilinear, 1.0), BICUBIC: (_bicubic, 2.0), BOX: (_box, 0.5), HAMMING: (_hamming, 1.0),
}
_PRECISION_BITS = 32 - 8 - 2
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def pil_vertical_first(in_size: tuple[int, int], out_size: tuple[int, int], pillow_major: int = PILLOW_MAJOR) -> bool:
    """Whether Pillow runs the vertical pass first for (height, width) ``in_size`` -> ``out_size``.

    Pillow up to 12 always starts with the horizontal pass. Pillow 13 starts with the vertical one when
    the height shrinks by more than twice as many pixels as the width does (measured against Pillow
    13.0.0 on 3,954 random size pairs: every one agrees). For CLIP's aspect-keeping resize that is an
    image more than twice as tall as wide being shrunk; the two orders then differ by the rounding
    between the passes, up to a few levels on noisy images.
    """
    (h, w), (oh, ow) = in_size, out_size
    return pillow_major >= 13 and oh < h and h - oh > 2 * (w - ow)


@functools.lru_cache(maxsize=64)
def pil_resample_tables(in_size: int, out_size: int, resample: int = BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight), each (out_size, taps) int32: output pixel ``i`` is
    ``sum_k input[index[i, k]] * weight[i, k]`` in Pillow's 22-bit fixed point. Padding taps have
    weight 0. Computed in Python floats, in Pillow's order, so that every rounding is Pillow's."""
    kernel, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, taps), np.int32)
    weight = np.zeros((out_size, taps), np.int32)
    for i in range(out_size):
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        ws = [kernel((x + xmin - center + 0.5) / filterscale) for x in range(count)]
        total = 0.0
        for w in ws:
            total += w
        for x, w in enumerate(ws):
            w = w / total if total != 0.0 else w
            index[i, x] = xmin + x
            weight[i, x] = int(w * (1 << _PRECISION_BITS) + (0.5 if w >= 0 else -0.5))
        index[i, count:] = xmin
    return index, weight


def _resample_axis(x: jax.Array, axis: int, out_size: int, resample: int) -> jax.Array:
    index, weight = pil_resample_tables(x.shape[axis], out_size, resample)
    taps = jnp.take(x, jnp.asarray(index), axis=axis)  # the axis becomes (out_size, taps)
    weight = jnp.asarray(weight).reshape(weight.shape + (1,) * (x.ndim - axis - 1))
    # int32 as in Pillow: the products and their sum fit (|weights| sum to about 1.1 * 2**22)
    total = jnp.sum(taps * weight, axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
    return jnp.clip(total >> _PRECISION_BITS, 0, 255)


def resize_like_pil(images: jax.Array, size: tuple[int, int], resample: int = BICUBIC,
                    pillow_major: int = PILLOW_MAJOR) -> jax.Array:
    """(B, H, W, C) uint8 -> (B, height, width, C) uint8, equal to ``PIL.Image.resize((width, height),
    resample)`` of each image in the installed Pillow (``pillow_major`` picks another version's order
    of passes). A side whose size stays is not resampled, as in Pillow."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"resize_like_pil takes uint8 images, got {images.dtype}")
    height, width = size
    passes = [(2, width), (1, height)]
    if pil_vertical_first(tuple(images.shape[1:3]), (height, width), pillow_major):
        passes.reverse()
    x = images.astype(jnp.int32)
    for axis, out_size in passes:
        if out_size != x.shape[axis]:
            x = _resample_axis(x, axis, out_size, resample)
    return x.astype(jnp.uint8)


def resized_shape(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """The (height, width) ``CLIPImageProcessor`` resizes an image to: an int is the shorter side's
    length, the longer side scaled alike and rounded down."""
    if not isinstance(size, int):
        return tuple(size)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(x: jax.Array, crop: tuple[int, int]) -> jax.Array:
    """transformers' centre crop: a side shorter than the crop is zero-padded first, the odd pixel
    of padding going before the image."""
    sides = list(zip(x.shape[1:3], crop))
    before = [math.ceil(max(c - n, 0) / 2) for n, c in sides]
    x = jnp.pad(x, [(0, 0)] + [(b, max(c - n, 0) - b) for b, (n, c) in zip(before, sides)] + [(0, 0)])
    (h, w), (ch, cw) = x.shape[1:3], crop
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw]


@functools.partial(jax.jit, static_argnums=1)
def preprocess_images(images: jax.Array, processing: CLIPImageProcessing = CLIPImageProcessing()) -> jax.Array:
    """(B, H, W, 3) uint8 RGB -> (B, crop_h, crop_w, 3) float32, the NHWC ``pixel_values`` that
    ``CLIPImageProcessor`` makes of these images (resize, centre crop, rescale, normalise)."""
    if images.dtype != jnp.uint8 or images.ndim != 4:
        raise TypeError(f"preprocess_images takes (batch, height, width, 3) uint8 images, got {images.dtype}{tuple(images.shape)}")
    x = images
    if processing.size is not None:
        x = resize_like_pil(x, resized_shape(x.shape[1], x.shape[2], processing.size), processing.resample)
    if processing.crop_size is not None:
        x = _center_crop(x, processing.crop_size)
    x = x.astype(jnp.float32)
    if processing.rescale_factor is not None:
        x = x * jnp.float32(processing.rescale_factor)
    if processing.image_mean is not None:
        x = (x - jnp.asarray(processing.image_mean, jnp.float32)) / jnp.asarray(processing.image_std, jnp.float32)
    return x


# --- the model ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoadedCLIP:
    """A CLIP model ready to apply: ``model.apply({"params": params}, ...)``, and the preprocessing
    its images need. ``weights``: the file the parameters came from."""

    model: CLIPModel
    params: dict
    processing: CLIPImageProcessing
    weights: Path


def read_clip_config(folder: str | Path) -> CLIPConfig:
    path = Path(folder) / "config.json"
    if not path.is_file() and (Path(folder) / "model_index.json").is_file():
        raise ModelNotFound(f"{folder} is a diffusers pipeline folder, not a transformers CLIP model (no config.json)")
    return CLIPConfig.from_dict(read_json(path), source=str(path))


def params_from_state_dict(model: CLIPModel, state_dict: Mapping[str, Any], *, param_dtype=None,
                           what: str = "CLIP model") -> dict:
    """A transformers ``CLIPModel`` state dict -> Flax params (every tensor used exactly once)."""
    abstract = abstract_params(model, *model.init_inputs())
    return torch_to_flax(state_dict, abstract, dtype=param_dtype, rename=rename_torch_key, what=what)


def load_clip(
    spec: str | Path, *, config_folder: str | Path | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
    allow_pickle: bool = False, revision: str = "",
) -> LoadedCLIP:
    """Load a transformers CLIP model (see the module doc for ``spec``) into Flax.

    ``config_folder``: for a single weights file, the folder holding its ``config.json`` (and
    preprocessing config); by default the file's own folder when it holds a ``config.json``.
    ``dtype``/``param_dtype``: compute and stored-parameter dtypes. ``allow_pickle``: accept
    ``pytorch_model.bin`` / pickled files (read with ``torch.load(weights_only=True)``).
    ``revision``: branch, tag or commit of a hub id.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if revision and path.exists():
        raise ValueError(f"revision={revision!r} applies to hub ids only; {text!r} is a local path")
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: unknown weights file type {path.suffix or '(no suffix)'!r}: expected "
                             f".safetensors (or {', '.join(PICKLE_SUFFIXES)} with allow_pickle)")
        if config_folder is None:
            if not (path.parent / "config.json").is_file():
                raise ValueError(f"{path}: a single weights file needs config_folder, a folder with its config.json")
            config_folder = path.parent
        folder, weights = Path(config_folder), path
    else:
        if config_folder is not None:
            raise ValueError(f"{text}: config_folder applies to a single weights file; a model folder has its own config")
        if path.is_dir():
            folder = path
        elif looks_like_hub_id(text):
            folder = find_in_hub_cache(text, revision)
        else:
            raise ModelNotFound(f"missing CLIP model: {path} does not exist (and {text!r} is not a hub id of the form org/name)")
        weights = None
    config = read_clip_config(folder)
    processing = read_image_processing(folder)
    if weights is None:
        weights = find_weights_file(folder, WEIGHT_STEMS, allow_pickle=allow_pickle)
    model = CLIPModel(config, dtype=dtype, param_dtype=param_dtype)
    params = params_from_state_dict(model, read_weights(weights, allow_pickle), param_dtype=param_dtype,
                                    what=f"CLIP model {weights}")
    return LoadedCLIP(model=model, params=params, processing=processing, weights=weights)
