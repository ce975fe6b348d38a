"""Load a diffusers-layout Stable Diffusion folder into Flax models, and save one back.

Layout: ``model_index.json``, ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``,
``scheduler/`` (SDXL: also ``text_encoder_2/`` and ``tokenizer_2/``); weights as safetensors (pickled
``.bin`` only with ``allow_pickle=True``, then ``weights_only``). What we save, diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained`` loads.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.json_files import write_json
from unguide_jax.loading.convert import flax_to_torch, torch_to_flax
from unguide_jax.loading.weights import (
    find_weights_file,
    read_weights,
    write_safetensors,
)
from unguide_jax.models import text_encoder as te
from unguide_jax.models import vae as vae_lib
from unguide_jax.models.config_io import config_to_dict, read_json
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig

DIFFUSERS_VERSION = "0.42.1"
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
SUPPORTED_PIPELINES = SD_PIPELINES + SDXL_PIPELINES


@dataclasses.dataclass(frozen=True)
class Component:
    config_cls: Any
    module_cls: Any
    weight_stems: tuple[str, ...]
    rename: Callable[[str], str | None] | None
    class_name: str
    library: str


COMPONENTS = {
    "unet": Component(UNetConfig, UNet2DConditionModel, ("diffusion_pytorch_model",), None, "UNet2DConditionModel", "diffusers"),
    "text_encoder": Component(te.CLIPTextConfig, te.CLIPTextModel, ("model", "pytorch_model"), te.rename_torch_key, "CLIPTextModel", "transformers"),
    "text_encoder_2": Component(te.CLIPTextConfig, te.CLIPTextModelWithProjection, ("model", "pytorch_model"),
                                te.rename_torch_key, "CLIPTextModelWithProjection", "transformers"),
    "vae": Component(vae_lib.VAEConfig, vae_lib.AutoencoderKL, ("diffusion_pytorch_model",), vae_lib.rename_torch_key, "AutoencoderKL", "diffusers"),
}


def text_encoder_state_dict(params: Mapping, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax params -> ``text_model.``-prefixed numpy state dict: the Hub layout, which
    ``CLIPTextModel.from_pretrained`` loads in transformers 4.x and 5.x alike (the projection of
    ``CLIPTextModelWithProjection`` stays unprefixed, as transformers names it)."""
    return {(k if k.startswith("text_projection.") else te.TORCH_PREFIX + k): v
            for k, v in flax_to_torch(params, dtype=dtype).items()}


def build_module(name: str, config, dtype=jnp.float32, param_dtype=jnp.float32):
    return COMPONENTS[name].module_cls(config, dtype=dtype, param_dtype=param_dtype)


def params_from_state_dict(name: str, module, state_dict, param_dtype=None) -> dict:
    """A component's PyTorch state dict -> its Flax params (every tensor used exactly once)."""
    abstract = module_abstract_params(module)
    return torch_to_flax(state_dict, abstract, dtype=param_dtype, rename=COMPONENTS[name].rename, what=name)


def module_abstract_params(module) -> dict:
    """``abstract_params`` of a component module, remembered per (class, config, dtypes): tracing a
    full-size UNet's init takes seconds, and every load of the same architecture would repeat it.
    The tree holds immutable ShapeDtypeStructs and is only read."""
    fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name"}
    if fields == {"config", "dtype", "param_dtype"}:
        try:
            return _abstract_params_of(type(module), module.config, module.dtype, module.param_dtype)
        except TypeError:  # an unhashable config value: no cache
            pass
    return abstract_params(module, *module.init_inputs())


@functools.lru_cache(maxsize=16)
def _abstract_params_of(module_cls, config, dtype, param_dtype) -> dict:
    module = module_cls(config, dtype=dtype, param_dtype=param_dtype)
    return abstract_params(module, *module.init_inputs())


def load_component(
    folder: str | Path, name: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
    allow_pickle: bool = False, variant: str | None = None,
):
    """Load one component folder (e.g. ``.../unet``) -> (Flax module, params)."""
    folder = Path(folder)
    spec = COMPONENTS[name]
    config = spec.config_cls.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    weights_file = find_weights_file(folder, spec.weight_stems, variant=variant, allow_pickle=allow_pickle)
    module = build_module(name, config, dtype, param_dtype)
    params = params_from_state_dict(name, module, read_weights(weights_file, allow_pickle), param_dtype)
    return module, params


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe_files and not (folder / "tokenizer.json").is_file():  # transformers 5 saves tokenizer.json only
        raise FileNotFoundError(f"missing tokenizer files in {folder}: need vocab.json + merges.txt, or tokenizer.json")
    return CLIPTokenizer.from_pretrained(str(folder))


def check_compatible(unet_config: UNetConfig, text_config, where, text_config_2=None) -> None:
    """The UNet cross-attends to the text encoders' hidden states (SDXL: both, concatenated), and an SDXL
    UNet takes the second encoder's projected pooled output: their widths must agree."""
    width = text_config.hidden_size + (text_config_2.hidden_size if text_config_2 is not None else 0)
    if width != unet_config.cross_attention_dim:
        what = "text encoder width" if text_config_2 is None else "text encoders' widths together"
        raise ValueError(f"{where}: {what} {width} != UNet cross_attention_dim {unet_config.cross_attention_dim}")
    if (text_config_2 is None) != (unet_config.pooled_dim is None):
        raise ValueError(f"{where}: an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and the "
                         "other way round")
    if text_config_2 is not None and text_config_2.projection_dim != unet_config.pooled_dim:
        raise ValueError(f"{where}: text_encoder_2 projection_dim {text_config_2.projection_dim} != the UNet's pooled "
                         f"text width {unet_config.pooled_dim}")


def load_pipeline(
    path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32, allow_pickle: bool = False,
    variant: str | None = None, clip_skip: int = 0,
) -> StableDiffusion:
    """Load a diffusers-layout Stable Diffusion folder (SD 1.x / 2.x / SDXL base) into Flax.

    ``dtype`` is the compute dtype and ``param_dtype`` the stored-parameter dtype (fp32 or bf16 each);
    ``variant`` picks e.g. ``*.fp16.safetensors``; ``clip_skip`` skips the last N text-encoder layers.
    """
    root = Path(path)
    index = read_json(root / "model_index.json")
    if index.get("_class_name") not in SUPPORTED_PIPELINES:
        raise ValueError(f"{root}: unsupported pipeline {index.get('_class_name')!r}; expected one of {SUPPORTED_PIPELINES}")
    sdxl = index["_class_name"] in SDXL_PIPELINES
    subfolders = ("unet", "text_encoder", "vae", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    for sub in subfolders:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root}: missing component folder {sub}/" + (
                " (an SDXL refiner, which has no first text encoder, is not supported)" if sub == "text_encoder" and sdxl else ""))
    kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, variant=variant)
    unet, unet_params = load_component(root / "unet", "unet", **kw)
    text_encoder, text_params = load_component(root / "text_encoder", "text_encoder", **kw)
    vae, vae_params = load_component(root / "vae", "vae", **kw)
    params = {"unet": unet_params, "text_encoder": text_params, "vae": vae_params}
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = SchedulerConfig.from_dict(read_json(scheduler_file), source=str(scheduler_file))
    sdxl_parts = {}
    if sdxl:
        text_encoder_2, params["text_encoder_2"] = load_component(root / "text_encoder_2", "text_encoder_2", **kw)
        sdxl_parts = dict(text_encoder_2=text_encoder_2, tokenizer_2=load_tokenizer(root / "tokenizer_2"),
                          force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    check_compatible(unet.config, text_encoder.config, root, sdxl_parts["text_encoder_2"].config if sdxl else None)
    return StableDiffusion(
        unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=load_tokenizer(root / "tokenizer"),
        scheduler=scheduler, params=params, clip_skip=clip_skip, **sdxl_parts,
    )


def component_config_dict(name: str, config) -> dict:
    if name in ("text_encoder", "text_encoder_2"):
        return te.config_to_transformers_dict(config, COMPONENTS[name].class_name)
    return config_to_dict(config, COMPONENTS[name].class_name, {"_diffusers_version": DIFFUSERS_VERSION})


def save_component(folder: str | Path, name: str, config, params, dtype: Any = None) -> Path:
    """Write ``config.json`` + safetensors weights that diffusers/transformers ``from_pretrained`` loads."""
    folder = Path(folder)
    text = name in ("text_encoder", "text_encoder_2")
    state = text_encoder_state_dict(params) if text else flax_to_torch(params)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    stem = COMPONENTS[name].weight_stems[0]
    write_safetensors(folder / f"{stem}.safetensors", state, metadata={"format": "pt"})
    config_dict = component_config_dict(name, config)
    stored_dtypes = {str(np.asarray(v).dtype) for v in state.values()}  # float32, float16 or bfloat16 (ml_dtypes)
    if text and len(stored_dtypes) == 1:
        # transformers 5 loads the model in this dtype when from_pretrained is given none (4.x with "auto")
        config_dict["torch_dtype"] = stored_dtypes.pop()
    write_json(folder / "config.json", config_dict)
    return folder


def save_pipeline(sd: StableDiffusion, path: str | Path, *, dtype: Any = None) -> Path:
    """Save in diffusers layout (``dtype``: the stored weights' dtype, default the params'). Keep it fp32 for a
    folder that ``StableDiffusionPipeline.from_pretrained`` loads without ``torch_dtype``: diffusers then builds
    the UNet and VAE in fp32 whatever their files hold, transformers 5 the text encoder in its stored dtype."""
    root = Path(path)
    modules = [("unet", sd.unet), ("text_encoder", sd.text_encoder), ("vae", sd.vae)]
    if sd.is_sdxl:
        modules.append(("text_encoder_2", sd.text_encoder_2))
        sd.tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
    for name, module in modules:
        save_component(root / name, name, module.config, sd.params[name], dtype)
    sd.tokenizer.save_pretrained(str(root / "tokenizer"))
    write_json(root / "scheduler" / "scheduler_config.json",
               config_to_dict(sd.scheduler, "DDIMScheduler", {"_diffusers_version": DIFFUSERS_VERSION}))
    if sd.is_sdxl:
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": sd.force_zeros_for_empty_prompt,
                 "image_encoder": [None, None], "feature_extractor": [None, None],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    else:
        index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                 "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None]}
    index.update({"_diffusers_version": DIFFUSERS_VERSION, "scheduler": ["diffusers", "DDIMScheduler"],
                  "tokenizer": ["transformers", "CLIPTokenizer"]})
    index.update({name: [COMPONENTS[name].library, COMPONENTS[name].class_name] for name, _ in modules})
    write_json(root / "model_index.json", index)
    return root
