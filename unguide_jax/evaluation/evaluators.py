"""What scores an erasure's images: ``evaluator="embedded"`` (the shipped shapes classifier) or
``evaluator="clip:SOURCE"`` (zero-shot CLIP, as MACE's and the UnGuide authors' scripts score CIFAR-10).

Both give, per image, a probability for each class of the table (``class_probabilities``: MACE's
protocol and top-1 read it; ``scores`` gives it with the text probabilities from one pass over the images). CLIP also scores the table's own prompt texts (``text_probabilities``: the
UnGuide authors' ``compute_metrics.py --metric acc`` takes a softmax of 100 · cos(image, text) over the
erased concept's target, synonyms and other prompts, and ``merge_metrics_results.py`` credits each
image with its own prompt's text). The shapes classifier scores classes, not wordings; the reference
protocol then lets each text stand in for its class (``erasure.score``).

A table's classes come from its concept: for the shapes classifier, the shapes class each prompt names;
for CLIP, the target prompt and each other prompt are a class and its text (MACE's texts "a photo of
the {class}" are exactly those of the CIFAR-10 concepts), synonyms count for the erased class.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unguide_jax.parallel.batches import data_mesh, pad_rows, padded_rows, put_replicated, put_rows
from unguide_jax.parallel.hosts import to_numpy
from unguide_jax.parallel.mesh import job_devices
from unguide_jax.shapes import data as shapes

# MACE (metrics/evaluate_clip_accuracy.py) and the UnGuide authors (compute_metrics.py) both use OpenAI's
# ViT-B/32 and a fixed logit scale of 100 (OpenAI's trained scale is 100 too, clamped there).
CLIP_LOGIT_SCALE = 100.0
EVALUATOR_DOC = ('"embedded": the shipped shapes classifier; "clip:SOURCE": zero-shot CLIP, SOURCE a transformers CLIP '
                 "folder, a hub id in the local cache (MACE and the UnGuide authors: openai/clip-vit-base-patch32) "
                 "or a safetensors file beside its config")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The evaluation prompts of one erased concept: (prompt, kind, class index), and the classes' names."""

    erased: int
    items: tuple[tuple[str, str, int], ...]
    class_names: tuple[str, ...] = ()

    @property
    def prompts(self) -> list[str]:
        return [p for p, _, _ in self.items]


def shapes_prompt_set(concept) -> PromptSet:
    """The shapes classifier's table: the shapes class each prompt names."""
    erased = shapes.class_named_in(concept.targets[0])
    if erased is None or concept.kind != "object":
        raise ValueError(f"concept {concept.name!r}: the shapes classifier scores object concepts of the shapes "
                         f"model (a target naming one of {list(shapes.CLASSES)}); use evaluator=clip:SOURCE "
                         "for other models")
    items = [(concept.targets[0], "target", erased)] + [(p, "synonym", erased) for p in concept.synonyms]
    for prompt in concept.other:
        if not prompt:
            continue  # "" serves the probe, not the evaluation
        label = shapes.class_named_in(prompt)
        if label is None:
            raise ValueError(f"concept {concept.name!r}: other prompt {prompt!r} names no shapes class")
        items.append((prompt, "other", label))
    return PromptSet(erased, tuple(items), tuple(shapes.CLASSES))


def clip_prompt_set(concept) -> PromptSet:
    """CLIP's table: the target and each other prompt are a class and its text; synonyms count for the target's."""
    if concept.kind != "object":
        raise ValueError(f"concept {concept.name!r}: the erasure table scores object concepts, got {concept.kind!r}")
    classes = [concept.targets[0]] + [p for p in concept.other if p]
    items = [(concept.targets[0], "target", 0)] + [(p, "synonym", 0) for p in concept.synonyms]
    items += [(p, "other", i + 1) for i, p in enumerate(classes[1:])]
    return PromptSet(0, tuple(items), tuple(classes))


def check_evaluator(value: str) -> str | None:
    if value == "embedded" or (value.startswith("clip:") and len(value) > len("clip:")):
        return None
    return f'must be "embedded" or "clip:SOURCE" (a CLIP folder, cached hub id or file), got {value!r}'


class ShapesEvaluator:
    """The shipped shapes classifier: ten classes, named by the prompts' class words."""

    name = "embedded shapes classifier (unguide_jax/assets/shapes-classifier)"

    def __init__(self):
        from unguide_jax.shapes.classifier import load_evaluator

        self.classifier = load_evaluator()

    def prompt_set(self, concept) -> PromptSet:
        return shapes_prompt_set(concept)

    def class_probabilities(self, images: np.ndarray, prompt_set: PromptSet) -> np.ndarray:
        return self.classifier.probabilities(images)[0]

    def text_probabilities(self, images: np.ndarray, prompt_set: PromptSet) -> np.ndarray | None:
        return None  # classes, not wordings: the reference protocol ties a class's texts

    def scores(self, images: np.ndarray, prompt_set: PromptSet) -> tuple[np.ndarray, np.ndarray | None]:
        return self.class_probabilities(images, prompt_set), None


class ClipEvaluator:
    """Zero-shot CLIP over the table's texts: softmax(100 · cos(image, text)).

    Embeddings are computed as sampling computes images: each batch is padded to a multiple of the mesh's
    data size and its rows sharded over the "data" axis of a mesh of every device of the job (across hosts:
    ``parallel.batches.data_mesh``, as ``StableDiffusion.on_every_device`` places a model), the weights
    replicated on each device. With several processes every process must pass the same images and texts (as
    every process holds every sampled image); each embeds its devices' rows and the rows are gathered, so
    every process gets every embedding. ``mesh``: the mesh to use (None: that default; a single device
    needs none).
    """

    def __init__(self, source: str, batch_size: int = 64, mesh=None):
        from unguide_jax.loading.clip import load_clip, preprocess_images
        from unguide_jax.loading.diffusers_folder import load_tokenizer

        self.clip = load_clip(source)
        self.tokenizer = load_tokenizer(self.clip.weights.parent)
        self.name = f"zero-shot CLIP {source} ({self.clip.weights})"
        self.batch_size = batch_size
        if mesh is None and len(job_devices()) > 1:
            mesh = data_mesh()
        self.mesh = mesh
        self.params = self.clip.params if mesh is None else put_replicated(mesh, self.clip.params)
        model, processing = self.clip.model, self.clip.processing

        # Preprocessing inside the same program: each device resizes only its own rows.
        def image_embeddings(params, images):
            pixels = preprocess_images(images, processing)
            return model.apply({"params": params}, pixels, normalize=True, method=model.image_embeddings)

        def text_embeddings(params, ids):
            return model.apply({"params": params}, ids, normalize=True, method=model.text_embeddings)

        self._images, self._texts = jax.jit(image_embeddings), jax.jit(text_embeddings)
        self._text_cache: dict[tuple[str, ...], np.ndarray] = {}

    def prompt_set(self, concept) -> PromptSet:
        return clip_prompt_set(concept)

    def _rows(self, apply, x: np.ndarray) -> np.ndarray:
        """``apply(params, rows)`` over ``x`` in batches of ``batch_size`` rows, sharded over the mesh."""
        if not len(x):
            raise ValueError("nothing to embed: no rows")
        # Every batch padded to one row count (a multiple of the data size): one compile per input shape.
        rows = padded_rows(min(self.batch_size, len(x)), self.mesh)
        out = []
        for start in range(0, len(x), rows):
            chunk = pad_rows(x[start:start + rows], rows)
            placed = jnp.asarray(chunk) if self.mesh is None else put_rows(self.mesh, chunk)
            out.append(to_numpy(apply(self.params, placed))[:min(rows, len(x) - start)])
        return np.concatenate(out)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, one row per text (texts past the tokenizer's length are cut)."""
        key = tuple(texts)
        if key not in self._text_cache:
            ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True).input_ids
            self._text_cache[key] = self._rows(self._texts, np.asarray(ids, np.int32))
        return self._text_cache[key]

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings of (N, H, W, 3) uint8 RGB images, one row per image."""
        return self._rows(self._images, np.asarray(images))

    def _softmax(self, image_embeddings: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        logits = CLIP_LOGIT_SCALE * image_embeddings.astype(np.float64) @ self.text_embeddings(texts).astype(np.float64).T
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def scores(self, images: np.ndarray, prompt_set: PromptSet) -> tuple[np.ndarray, np.ndarray | None]:
        embeddings = self.image_embeddings(images)  # once, for the class texts and the table's texts alike
        return self._softmax(embeddings, prompt_set.class_names), self._softmax(embeddings, prompt_set.prompts)

    def class_probabilities(self, images: np.ndarray, prompt_set: PromptSet) -> np.ndarray:
        return self._softmax(self.image_embeddings(images), prompt_set.class_names)

    def text_probabilities(self, images: np.ndarray, prompt_set: PromptSet) -> np.ndarray | None:
        return self._softmax(self.image_embeddings(images), prompt_set.prompts)


def load_image_evaluator(spec: str):
    """``embedded`` or ``clip:SOURCE`` -> an evaluator (see the module doc)."""
    problem = check_evaluator(spec)
    if problem:
        raise ValueError(f"evaluator {problem}")
    return ShapesEvaluator() if spec == "embedded" else ClipEvaluator(spec[len("clip:"):])
