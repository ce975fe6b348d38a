"""Every eraser in one table: how it is built from a config, trained or computed, turned into an
``Edit``, saved to its run folder and restored from a checkpoint.

    unguide            UnGuide's LoRA, trained with the ESD-style objective
    learnable_prompts  memory tokens + an ESD fine-tune, trained (Bui et al.)
    pure, uce          closed-form K/V edits (Moon et al.; Gandikota et al.): no iterations

A trained eraser is a class with ``init / embeddings / step_fn / parameters / to_edit / save``; a
closed-form one a function ``(sd, concept, settings) -> (edit, report)`` with its settings class.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.edits.edit import Edit, lora_edit, memory_layers
from unguide_jax.edits.lora import (
    count_parameters,
    reads_text,
    target_modules,
)
from unguide_jax.erasers import learnable_prompts, pure, uce
from unguide_jax.erasers.common import cross_attention_layers, kernel
from unguide_jax.erasers.sharded_step import jit_train_step
from unguide_jax.erasers.unguide.concept_direction import concept_directions
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    embed_concept,
)
from unguide_jax.erasers.unguide.train_step import (
    init_train_state,
    latent_shape_of,
    make_optimizer,
    make_train_step,
)
from unguide_jax.erasers.unguide.transfer import transfer_settings
from unguide_jax.loading.edit_files import save_adapter, save_edit
from unguide_jax.settings import as_config
from unguide_jax.training.checkpoints import RunCheckpoints
from unguide_jax.training.config import (
    LearnablePromptsTrainConfig,
    UnguideTrainConfig,
    train_schema,
)


class UnguideTrainer:
    """UnGuide: a LoRA adapter, the ESD-style negative-guidance objective, Adam on the adapter."""

    def __init__(self, config: UnguideTrainConfig | Mapping, rate_in_state: bool = False):
        config = as_config(config, UnguideTrainConfig, strict=False)
        self.rate_in_state = rate_in_state  # several concepts in one step: each state carries its own rate
        self.lora = config.lora
        self.objective = config.objective
        self.transfer_rule = config.transfer
        self.learning_rate = config.learning_rate
        self.optimizer = make_optimizer(self.learning_rate, rate_in_state)
        self.derived: dict = {}  # settings derived from the model (transfer, A's init): config.json's "derived"
        self._directions = None

    def describe(self, unet_params) -> dict:
        return {"lora_modules": len(target_modules(unet_params, self.lora.targets))}  # "matches no layer" fails here

    def init(self, key, unet_params):
        # init=concept starts A along the concept only where a layer reads the text tokens (``embeddings`` found
        # directions); with none, every layer starts random, as config.json's derived "lora_init" records.
        lora = self.lora if self._directions is not None else dataclasses.replace(self.lora, init="random")
        return init_train_state(key, unet_params, lora, self.optimizer, directions=self._directions)

    def init_for_restore(self, key, unet_params):
        return self.init(key, unet_params)  # only the shapes matter: the restored values replace A and B

    def embeddings(self, sd, concept):
        """The concept's encodings; also derives what depends on the model: the transferred learning rate and
        (``lora.init = "concept"``) A's starting direction."""
        embeddings = embed_concept(sd, concept)
        text = sd.attention_context  # what the K/V projections read (SDXL: without the pooled/time-id token)
        transfer = transfer_settings(self.transfer_rule, self.learning_rate, sd.params["unet"], text(embeddings.target))
        self.learning_rate = transfer.learning_rate
        self.optimizer = make_optimizer(self.learning_rate, self.rate_in_state)
        self.derived = transfer.record()
        self.derived_note = transfer.describe()
        adapts_text = any(map(reads_text, target_modules(sd.params["unet"], self.lora.targets)))
        if self.lora.init == "concept" and adapts_text:
            neutral = np.concatenate([np.asarray(text(embeddings.reference)), np.asarray(text(embeddings.uncond))])
            self._directions = concept_directions(np.asarray(text(embeddings.target)), neutral, self.lora.rank)
            self.derived["lora_init"] = "concept"
        elif self.lora.init == "concept":
            self.derived["lora_init"] = "random (lora.init=concept starts the cross-attention K/V only; none is adapted)"
        return embeddings

    def step_fn(self, sd, mesh):
        return make_train_step(sd.unet, sd.scheduler, self.lora, self.objective, self.optimizer, mesh=mesh)

    def parameters(self, state) -> int:
        return count_parameters(state.adapter)

    def to_edit(self, adapter) -> Edit:
        return lora_edit(adapter, self.lora.alpha)

    def checkpoint_info(self) -> dict:
        return {"kind": "lora", "rank": self.lora.rank, "alpha": self.lora.alpha, "targets": self.lora.targets}

    def save(self, state, run_dir: Path, concept, config: UnguideTrainConfig) -> Edit:
        adapter = jax.device_get(state.adapter)
        save_adapter(run_dir / ADAPTER_FILE, adapter, self.lora, extra={
            "concept": concept.to_json(), "base_model": config.model, "steps": int(state.step),
            "objective": dataclasses.asdict(self.objective), "learning_rate": self.learning_rate,
            "seed": config.seed, "derived": self.derived,
        })
        return self.to_edit(adapter)


class PromptTrainer:
    """Learnable prompts: memory tokens and an ESD fine-tune of a parameter subset, trained alternately."""

    def __init__(self, config: LearnablePromptsTrainConfig | Mapping):
        config = as_config(config, LearnablePromptsTrainConfig, strict=False)
        self.prompt = config.prompt
        self.objective = config.objective
        self._concept_vector = None

    def describe(self, unet_params) -> dict:
        return {"trained_tensors": len(learnable_prompts.trainable_parameters(unet_params, self.prompt.parameters)),
                "prompt_layers": len(memory_layers(unet_params, self.prompt.scope)), "prompt_tokens": self.prompt.tokens}

    def embeddings(self, sd, concept):
        targets = [t for t, _ in concept.pairs]
        target = jnp.asarray(sd.encode_prompts(targets))
        # The tokens start at the encoder's output at the concept word of the first target.
        self._concept_vector = target[0, uce.last_subject_index(sd, targets[0])]
        # ESD: the empty prompt is e0's condition; the references are not used.
        return ConceptEmbeddings(target=target, reference=target, uncond=jnp.asarray(sd.encode_prompts([""])))

    def init(self, key, unet_params):
        if self._concept_vector is None:
            raise RuntimeError("PromptTrainer.embeddings() must run before init(): the tokens start at the concept")
        return learnable_prompts.init_state(key, unet_params, self.prompt, self._concept_vector)

    def init_for_restore(self, key, unet_params):
        # Only the shapes matter for a restore: the tokens' starting values are overwritten.
        width = kernel(unet_params, cross_attention_layers(unet_params)[0] + ".to_k").shape[0]
        return learnable_prompts.init_state(key, unet_params, self.prompt, jnp.zeros((width,)))

    def step_fn(self, sd, mesh):
        step = learnable_prompts.make_step(sd.unet, sd.scheduler, self.objective, self.prompt, latent_shape_of(sd.unet))
        return jit_train_step(step, mesh)

    def parameters(self, state) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(state.adapter))

    def to_edit(self, adapter, keep_prompt: bool = False) -> Edit:
        return learnable_prompts.to_edit(adapter, self.prompt, keep_prompt)

    def checkpoint_info(self) -> dict:
        return {"kind": "learnable_prompts", "prompt_tokens": "dropped"}

    def save(self, state, run_dir: Path, concept, config: LearnablePromptsTrainConfig) -> Edit:
        adapter = jax.device_get(state.adapter)
        extra = {"concept": concept.to_json(), "base_model": config.model, "steps": int(state.step),
                 "prompt": dataclasses.asdict(self.prompt), "objective": dataclasses.asdict(self.objective)}
        save_edit(run_dir / "edit_with_prompt.safetensors", self.to_edit(adapter, True),
                  "learnable_prompts", dict(extra, keep_prompt=True))
        save_edit(run_dir / EDIT_FILE, self.to_edit(adapter, False), "learnable_prompts", dict(extra, keep_prompt=False))
        return self.to_edit(adapter, True)  # exports: the delta as weights, the tokens as their own file


@dataclasses.dataclass(frozen=True)
class ClosedForm:
    settings_key: str                  # the config's sub-dict of settings
    settings_cls: type
    compute: Callable[..., tuple[Edit, dict]]


ADAPTER_FILE, EDIT_FILE = "adapter.safetensors", "edit.safetensors"
# A trainer is built from its train config (or a dict such as a checkpoint's record).
TRAINED: dict[str, Callable[..., Any]] = {"unguide": UnguideTrainer, "learnable_prompts": PromptTrainer}
CLOSED_FORM: dict[str, ClosedForm] = {
    "pure": ClosedForm("pure", pure.PureConfig, pure.pure_edit),
    "uce": ClosedForm("uce", uce.UceConfig, uce.uce_edit),
}
ERASERS = tuple(TRAINED) + tuple(CLOSED_FORM)


def restore_checkpoint_edit(step_dir: Path, unet_params: Mapping) -> tuple[Edit, dict]:
    """The edit of one Orbax checkpoint step of a train.py run (UnGuide's LoRA, or learnable prompts'
    delta, deployed without its tokens), on the default device."""
    checkpoints = RunCheckpoints(step_dir.parent)
    try:
        step = int(step_dir.name)
        saved = checkpoints.saved_config(step)
        method = saved.get("method", "unguide")
        if method not in TRAINED:
            raise ValueError(f"{step_dir}: a checkpoint of method {method!r} holds no edit to sample with")
        config = as_config(saved, train_schema, strict=False)  # a record of this or an older version
        trainer = TRAINED[method](config)
        abstract = jax.eval_shape(lambda key: trainer.init_for_restore(key, unet_params), jax.random.key(config.seed))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, _ = checkpoints.restore(abstract, step=step)
    finally:
        checkpoints.close()
    info = dict(trainer.checkpoint_info(), source=str(step_dir), steps=int(state.step), concept=saved.get("concept"))
    return trainer.to_edit(state.adapter), info
