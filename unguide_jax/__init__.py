"""unguide-jax: concept erasure (UnGuide, learnable prompts, PURE, UCE) for Stable Diffusion in JAX/Flax.

The public API, imported on first use (``import unguide_jax`` and its light submodules stay cheap;
jax, flax and the models load when a name below is first touched)::

    import unguide_jax as ug

    sd = ug.load_model("runwayml/stable-diffusion-v1-5")  # a folder, a single file or a cached hub id
    sd = ug.load_pipeline("path/to/stable-diffusion-v1-5")  # a diffusers folder -> StableDiffusion
    edit, info = ug.load_edit("runs/unguide-sd15-cat/adapter.safetensors", sd.params["unet"])
    images = sd.generate(["a photo of a cat"], seeds=[0], edit=edit).images  # uint8 (1, H, W, 3)
    ug.export_edit(["peft"], "export", edit, sd.unet, sd.params["unet"])  # export/diffusers/...

Names: ``StableDiffusion`` (the pipeline); ``load_model`` (a diffusers folder, a single-file
checkpoint or a hub id in the local Hugging Face cache) and ``load_pipeline`` (a diffusers folder);
``Edit`` (the pytree every eraser produces); ``load_edit`` (from an adapter, an edit file, a run's
checkpoint or a PEFT/kohya LoRA); ``save_adapter`` / ``load_adapter`` / ``save_edit`` /
``load_edit_file`` (the on-disk formats); ``export_edit`` (PEFT, kohya, partial or merged UNet,
prompt tokens, for PyTorch users). The jobs the commands run, each taking its settings object:
``from unguide_jax import jobs`` (``jobs.train``, ``sample``, ``evaluate``, ``i2p``, ``export``, ``recipe``).
"""
from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING

from unguide_jax.lazy_names import lazy_names

try:
    __version__ = _metadata.version("unguide-jax")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "StableDiffusion": "unguide_jax.diffusion.pipeline",
    "load_model": "unguide_jax.loading.resolve",
    "load_pipeline": "unguide_jax.loading.diffusers_folder",
    "Edit": "unguide_jax.edits.edit",
    "load_edit": "unguide_jax.training.sources",
    "save_adapter": "unguide_jax.loading.edit_files",
    "load_adapter": "unguide_jax.loading.edit_files",
    "save_edit": "unguide_jax.loading.edit_files",
    "load_edit_file": "unguide_jax.loading.edit_files",
    "export_edit": "unguide_jax.loading.exports",
}

__all__ = [
    "__version__",
    "StableDiffusion",
    "load_model",
    "load_pipeline",
    "Edit",
    "load_edit",
    "save_adapter",
    "load_adapter",
    "save_edit",
    "load_edit_file",
    "export_edit",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from unguide_jax.diffusion.pipeline import StableDiffusion
    from unguide_jax.edits.edit import Edit
    from unguide_jax.loading.diffusers_folder import load_pipeline
    from unguide_jax.loading.edit_files import (
        load_adapter,
        load_edit_file,
        save_adapter,
        save_edit,
    )
    from unguide_jax.loading.exports import export_edit
    from unguide_jax.loading.resolve import load_model
    from unguide_jax.training.sources import load_edit


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
