"""Every eraser's edit, exported for PyTorch users (``export/`` of a train.py run).

Formats (``config.export``):
    peft          LoRA parts as a diffusers/PEFT file: export/diffusers/pytorch_lora_weights.safetensors
                  (``pipe.load_lora_weights(folder)``). One LoRA keeps its alpha; several, or per-module
                  ranks, are folded exactly into one LoRA of alpha 1 (A's side by side, alpha_i·B_i stacked).
                  The train and export jobs add export/unguide.json beside it (alpha, probe settings, the
                  concept's targets, base-model fingerprint: ``unguide_jax.publishing``) for
                  ``unguide_jax.pytorch.UnGuidePipeline.load_unguide(export)`` (SDXL: ``UnGuideXLPipeline``).
    kohya         the same LoRA as a kohya/A1111 file: export/kohya.safetensors (an SDXL UNet's modules named
                  after the SGM UNet, as kohya's scripts name them: ``lora_unet_input_blocks_4_1_...``)
    partial_unet  the weights the edit changes, edited, as a diffusers-named partial state dict:
                  export/unet_edited.safetensors (``unet.load_state_dict(sd, strict=False)``); exact for
                  LoRAs and full deltas alike
    merged_unet   a whole diffusers unet/ folder with the edit merged in: export/unet/
    prompt        learnable prompt tokens: export/prompt_tokens.safetensors (see ``export_prompt``)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np

from unguide_jax.edits import edit as edit_lib
from unguide_jax.loading.convert import flax_to_torch
from unguide_jax.loading.lora_formats import export_kohya
from unguide_jax.loading.weights import write_safetensors

PROMPT_FORMAT = "unguide-jax-prompt-tokens/1"


def single_lora(edit: edit_lib.Edit) -> tuple[dict, float]:
    """The edit's LoRAs as one (adapter, alpha); an error if it has deltas or memory (not a LoRA)."""
    if edit.deltas or edit.memory is not None or not edit.loras:
        raise ValueError("this edit is not a pure LoRA (it has full weight deltas or prompt tokens): "
                         "export it as partial_unet / merged_unet (and prompt)")
    if len(edit.loras) == 1:
        adapter, alpha = edit.loras[0]
        return jax.device_get(adapter), float(alpha)
    folded: dict = {}
    for adapter, alpha in edit.loras:
        for path, ab in jax.device_get(adapter).items():
            a, b = np.asarray(ab["lora_A"], np.float32), float(alpha) * np.asarray(ab["lora_B"], np.float32)
            if path in folded:
                a = np.concatenate([folded[path]["lora_A"], a], axis=1)
                b = np.concatenate([folded[path]["lora_B"], b], axis=0)
            folded[path] = {"lora_A": a, "lora_B": b}
    return folded, 1.0


def edited_modules(edit: edit_lib.Edit) -> set[str]:
    return {p for adapter, _ in edit.loras for p in adapter} | set(edit.deltas or {})


def partial_state_dict(unet_params: Mapping, edit: edit_lib.Edit) -> dict[str, np.ndarray]:
    """PyTorch-layout weights (diffusers names) of every parameter of every module the edit touches, edited."""
    merged = jax.device_get(edit_lib.merge_weights(unet_params, edit))
    modules = edited_modules(edit)
    return {key: value for key, value in flax_to_torch(merged).items() if key.rsplit(".", 1)[0] in modules}


def export_prompt(path: Path, edit: edit_lib.Edit, unet_params: Mapping) -> Path:
    """The learnable tokens, documented in the file's metadata: for each cross-attention layer in scope,
    append ``prompt_keys`` (m, text_dim) to the text tokens before ``to_k`` and ``prompt_values`` before
    ``to_v`` (no mask), in both CFG branches."""
    if edit.memory is None:
        raise ValueError("this edit has no prompt tokens to export")
    layers = edit_lib.memory_layers(unet_params, edit.memory.scope)
    usage = ("For every cross-attention module listed in 'layers' (diffusers names): K = to_k(concat([text, "
             "prompt_keys])), V = to_v(concat([text, prompt_values])) along the token axis, Q unchanged, "
             "softmax over text + m keys, in both CFG branches.")
    return write_safetensors(path, {"prompt_keys": np.asarray(edit.memory.keys, np.float32),
                                    "prompt_values": np.asarray(edit.memory.values, np.float32)},
                             {"format": PROMPT_FORMAT, "scope": edit.memory.scope, "layers": ",".join(layers),
                              "usage": usage})


def _peft(export_dir, edit, unet, unet_params):
    from unguide_jax.loading.lora_formats import export_peft

    adapter, alpha = single_lora(edit)
    return export_peft(export_dir / "diffusers", adapter, alpha, unet_params)


def _kohya(export_dir, edit, unet, unet_params):
    adapter, alpha = single_lora(edit)
    return export_kohya(export_dir / "kohya.safetensors", adapter, alpha, unet_params)


def _partial_unet(export_dir, edit, unet, unet_params):
    return write_safetensors(export_dir / "unet_edited.safetensors", partial_state_dict(unet_params, edit),
                             {"format": "pt", "note": "diffusers UNet2DConditionModel keys; load_state_dict(strict=False)"})


def _merged_unet(export_dir, edit, unet, unet_params):
    from unguide_jax.loading.diffusers_folder import save_component

    return save_component(export_dir / "unet", "unet", unet.config,
                          jax.device_get(edit_lib.merge_weights(unet_params, edit)))


def _prompt(export_dir, edit, unet, unet_params):
    return export_prompt(export_dir / "prompt_tokens.safetensors", edit, unet_params)


EXPORTERS: dict[str, Callable] = {"peft": _peft, "kohya": _kohya, "partial_unet": _partial_unet,
                                  "merged_unet": _merged_unet, "prompt": _prompt}


def unknown_formats(formats) -> str | None:
    """What is wrong with a list of export format names (None: nothing): a settings ``check``."""
    unknown = [f for f in formats if f not in EXPORTERS]
    return f"has unknown export format(s) {unknown}; known: {sorted(EXPORTERS)}" if unknown else None


def check_exports(formats) -> None:
    if not isinstance(formats, (list, tuple)):
        raise ValueError(f"config.export must be a list of formats, got {formats!r}")
    if problem := unknown_formats(formats):
        raise ValueError(f"config.export {problem}")


def export_edit(formats, export_dir: Path, edit: edit_lib.Edit, unet, unet_params) -> list[Path]:
    check_exports(formats)
    return [EXPORTERS[name](Path(export_dir), edit, unet, unet_params) for name in formats]
