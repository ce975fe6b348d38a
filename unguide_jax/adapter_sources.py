"""Where sampling gets its edits from: one loader for every file or folder an eraser can leave.

``load_edit(source, unet_params)`` accepts
- an adapter file of ours: a LoRA (``adapter.safetensors`` of train.py) or any edit (``edit.safetensors``
  of the other erasers: PURE, UCE, learnable prompts);
- a train.py run folder (its ``adapter.safetensors``, or its latest Orbax checkpoint if the run has
  not finished);
- an Orbax checkpoint: one step folder (``checkpoints/<step>``) or a ``checkpoints/`` folder (its
  latest complete step);
- a diffusers/PEFT LoRA (``pytorch_lora_weights.safetensors``, a folder holding it, or a peft
  ``save_pretrained`` folder) or a kohya/A1111 LoRA file.
Every edit is checked against the model before it is used; errors name the file and the module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from safetensors import safe_open

from . import edits
from .adapter_file import ADAPTER_FORMAT, EDIT_FORMAT, load_adapter, load_edit_file, read_adapter_metadata
from .checkpoints import RECORD_FILE, RunCheckpoints

ADAPTER_FILE, EDIT_FILE = "adapter.safetensors", "edit.safetensors"


def _file_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format")
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def _from_adapter_file(path: Path) -> tuple[edits.Edit, dict]:
    adapter, config = load_adapter(path)
    info = {"source": str(path), "kind": "lora", "rank": config.rank, "alpha": config.alpha, "targets": config.targets}
    info.update({k: v for k, v in read_adapter_metadata(path).items() if k in ("concept", "base_model", "steps")})
    return edits.lora_edit(adapter, config.alpha), info


def restore_checkpoint_adapter(step_dir: Path, unet_params: Mapping) -> tuple[edits.Edit, dict]:
    """The edit of one Orbax checkpoint step of a train.py run (UnGuide's LoRA, or learnable prompts'
    delta, deployed without its tokens), on the default device."""
    checkpoints = RunCheckpoints(step_dir.parent)
    try:
        step = int(step_dir.name)
        config = checkpoints.saved_config(step)
        method = config.get("method", "unguide")
        if method == "unguide":
            from .lora import LoraConfig
            from .unguide.train_step import init_train_state, make_optimizer

            lora_config = LoraConfig(rank=int(config["lora"]["rank"]), alpha=float(config["lora"]["alpha"]),
                                     targets=str(config["lora"]["targets"]))
            optimizer = make_optimizer(float(config["learning_rate"]))
            init = lambda key: init_train_state(key, unet_params, lora_config, optimizer)  # noqa: E731
            info = {"kind": "lora", "rank": lora_config.rank, "alpha": lora_config.alpha, "targets": lora_config.targets}
        elif method == "learnable_prompts":
            from .erasers.common import cross_attention_layers, kernel
            from .erasers.learnable_prompts import PromptConfig, init_state

            prompt_config = PromptConfig(**config["prompt"])
            width = kernel(unet_params, cross_attention_layers(unet_params)[0] + ".to_k").shape[0]
            init = lambda key: init_state(key, unet_params, prompt_config, jax.numpy.zeros((width,)))  # noqa: E731
            info = {"kind": "learnable_prompts", "prompt_tokens": "dropped"}
        else:
            raise ValueError(f"{step_dir}: a checkpoint of method {method!r} holds no edit to sample with")
        abstract = jax.eval_shape(init, jax.random.key(int(config["seed"])))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, _ = checkpoints.restore(abstract, step=step)
    finally:
        checkpoints.close()
    info.update(source=str(step_dir), steps=int(state.step), concept=config.get("concept"))
    if method == "unguide":
        return edits.lora_edit(state.adapter, lora_config.alpha), info
    return edits.Edit(deltas=state.adapter["delta"]), info


def _latest_step_dir(checkpoints_dir: Path) -> Path:
    with RunCheckpoints(checkpoints_dir) as checkpoints:
        step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpoints_dir} holds no complete checkpoint")
    return checkpoints_dir / str(step)


def _load_one(source: str | Path, unet_params: Mapping) -> tuple[edits.Edit, dict]:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"missing adapter: {path}")
    if path.is_dir():
        for name in (ADAPTER_FILE, EDIT_FILE):
            if (path / name).is_file():
                return _load_one(path / name, unet_params)
        if (path / RECORD_FILE).is_file():
            return restore_checkpoint_adapter(path, unet_params)
        if (path / "checkpoints").is_dir():
            return restore_checkpoint_adapter(_latest_step_dir(path / "checkpoints"), unet_params)
        if any(child.name.isdigit() and (child / RECORD_FILE).is_file() for child in path.iterdir()):
            return restore_checkpoint_adapter(_latest_step_dir(path), unet_params)
    elif path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are read from safetensors files (or our run/checkpoint folders)")
    elif (file_format := _file_format(path)) == ADAPTER_FORMAT:
        return _from_adapter_file(path)
    elif file_format == EDIT_FORMAT:
        edit, metadata = load_edit_file(path)
        return edit, {"source": str(path), **{k: v for k, v in metadata.items() if k != "format"}}
    from .lora_io import import_lora

    adapter, alpha = import_lora(path, unet_params)  # PEFT/diffusers file or folder, or kohya; names what is wrong
    return edits.lora_edit(adapter, alpha), {"source": str(path), "kind": "lora (imported)", "alpha": float(alpha)}


def load_edit(sources: Sequence[str | Path] | str | Path, unet_params: Mapping) -> tuple[edits.Edit | None, list[dict]]:
    """All ``sources`` as one edit (they add up), and a description of each for manifests."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    loaded = [_load_one(s, unet_params) for s in sources]
    if not loaded:
        return None, []
    edit = edits.combine([e for e, _ in loaded])
    for (e, info) in loaded:
        edits.check_edit_fits(unet_params, e, what=info["source"])
    return edit, [json.loads(json.dumps(info, default=_jsonable)) for _, info in loaded]


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)
