"""The embedded evaluator: a small CNN that names the class and the style of a shapes image.

It plays the role the paper gives zero-shot CLIP in its CIFAR-10 evaluation: trained only on the
procedural generator (never on diffusion outputs), shipped as fp16 safetensors + ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from PIL import Image
from tqdm import tqdm

from unguide_jax.json_files import write_json
from unguide_jax.loading.weights import read_safetensors, write_safetensors
from unguide_jax.resources import EVALUATOR
from unguide_jax.shapes import data as shapes


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_classes: int = len(shapes.CLASSES)
    num_styles: int = len(shapes.STYLES)
    classes: tuple[str, ...] = shapes.CLASSES
    styles: tuple[str, ...] = shapes.STYLES

    @classmethod
    def from_dict(cls, raw: dict) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown classifier config keys: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class ShapeClassifier(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images: float (B, H, W, 3) in [-1, 1] -> (class logits, style logits)."""
        x = images
        for i, ch in enumerate(self.config.channels):
            for j in range(2):
                x = nn.Conv(ch, (3, 3), name=f"conv{i}_{j}")(x)
                x = nn.GroupNorm(num_groups=min(8, ch), name=f"norm{i}_{j}")(x)
                x = nn.silu(x)
            if i < len(self.config.channels) - 1:
                x = nn.max_pool(x, (2, 2), (2, 2))
        features = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return (nn.Dense(self.config.num_classes, name="class_head")(features),
                nn.Dense(self.config.num_styles, name="style_head")(features))


def to_model_input(images_uint8) -> jax.Array:
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Classifier:
    """A loaded evaluator: ``predict(images)`` -> (class ids, style ids, class probs, style probs)."""

    config: ClassifierConfig
    params: dict

    def __post_init__(self):
        module = ShapeClassifier(self.config)
        self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x))

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
        if images.shape[1:3] != (self.config.image_size,) * 2:
            images = _resize(images, self.config.image_size)
        class_probs, style_probs = [], []
        for start in range(0, len(images), batch_size):
            logits_c, logits_s = self._apply(self.params, to_model_input(images[start:start + batch_size]))
            class_probs.append(np.asarray(jax.nn.softmax(logits_c)))
            style_probs.append(np.asarray(jax.nn.softmax(logits_s)))
        return np.concatenate(class_probs), np.concatenate(style_probs)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        class_probs, style_probs = self.probabilities(images)
        return class_probs.argmax(-1), style_probs.argmax(-1)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def save_classifier(folder: str | Path, config: ClassifierConfig, params, metrics: dict | None = None) -> Path:
    folder = Path(folder)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
    write_safetensors(folder / "model.safetensors", {k: np.asarray(v, np.float16) for k, v in flat.items()})
    write_json(folder / "config.json", dataclasses.asdict(config))
    if metrics is not None:
        write_json(folder / "metrics.json", metrics)
    return folder


def load_classifier(folder: str | Path) -> Classifier:
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"missing {name} in evaluator folder {folder}")
    config = ClassifierConfig.from_dict(json.loads((folder / "config.json").read_text()))
    module = ShapeClassifier(config)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3))))["params"],
        sep=".")
    stored = read_safetensors(folder / "model.safetensors")
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(f"evaluator weights do not fit its config: missing {missing}, unexpected {extra}")
    for key, leaf in expected.items():
        if tuple(stored[key].shape) != tuple(leaf.shape):
            raise ValueError(f"evaluator tensor {key}: shape {stored[key].shape}, expected {leaf.shape}")
    params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in stored.items()}, sep=".")
    return Classifier(config, params)


def blur_matrices(sigmas: jax.Array, size: int) -> jax.Array:
    """(B, size, size) row-normalised Gaussian blur operators, edges clamped; sigma 0 is the identity."""
    pos = jnp.arange(size, dtype=jnp.float32)
    d2 = (pos[:, None] - pos[None, :]) ** 2
    weights = jnp.exp(-d2[None] / (2 * jnp.maximum(sigmas, 1e-3)[:, None, None] ** 2))
    return weights / weights.sum(-1, keepdims=True)


def augment(images: jax.Array, key: jax.Array, blur_sigma_max: float) -> jax.Array:
    """Half the batch Gaussian-blurred (sigma up to ``blur_sigma_max`` px), then mild pixel noise.

    Generated images are softer and noisier than the renderer's: an evaluator that only ever saw
    crisp renders would judge the VAE's sharpness rather than the shape.
    """
    k_which, k_sigma, k_noise, k_amount = jax.random.split(key, 4)
    b, h, w, _ = images.shape
    sigmas = jnp.where(jax.random.uniform(k_which, (b,)) < 0.5,
                       jax.random.uniform(k_sigma, (b,), minval=0.3, maxval=max(blur_sigma_max, 0.3)), 0.0)
    if blur_sigma_max > 0:
        rows, cols = blur_matrices(sigmas, h), blur_matrices(sigmas, w)
        images = jnp.einsum("bij,bjkc,blk->bilc", rows, images, cols)
    amount = 0.03 * jax.random.uniform(k_amount, (b, 1, 1, 1))
    return images + amount * jax.random.normal(k_noise, images.shape)


def train_classifier(config: ClassifierConfig, *, steps: int, batch_size: int, learning_rate: float, seed: int,
                     eval_images: int, data_seed: int, eval_seed: int, blur_sigma_max: float = 0.0,
                     log=print) -> tuple[dict, dict]:
    """Train on a fresh stream of procedural images (each example seen once); evaluate on a held-out seed."""
    module = ShapeClassifier(config)
    size = config.image_size
    params = module.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, steps // 10 + 1), steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, images, labels, styles, key):
        augmented = augment(images, key, blur_sigma_max)

        def loss_fn(p):
            logits_c, logits_s = module.apply({"params": p}, augmented)
            return (optax.softmax_cross_entropy_with_integer_labels(logits_c, labels).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(logits_s, styles).mean())

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key, started = jax.random.key(seed + 1), time.perf_counter()
    bar = tqdm(range(steps), desc="evaluator", mininterval=5)
    for step in bar:
        images, _, labels, styles = shapes.batch(data_seed, step * batch_size, batch_size, size)
        key, sub = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, to_model_input(images), labels, styles, sub)
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
            log({"stage": "evaluator", "step": step, "loss": float(loss)})
    classifier = Classifier(config, params)
    metrics = evaluate_on_fresh_images(classifier, eval_seed, eval_images)
    metrics.update(train_seconds=round(time.perf_counter() - started, 1), steps=steps, batch_size=batch_size,
                   data_seed=data_seed, eval_seed=eval_seed)
    return params, metrics


def accuracy_by_group(correct: np.ndarray, groups: np.ndarray, names) -> dict[str, float]:
    """The share of ``correct`` within each group (index into ``names``) that the draw holds. A group absent
    from a small draw has no accuracy, and is left out: a NaN would also make a metrics file invalid JSON."""
    return {name: float(correct[groups == g].mean()) for g, name in enumerate(names) if (groups == g).any()}


def evaluate_on_fresh_images(classifier: Classifier, seed: int, count: int) -> dict:
    images, _, labels, styles = shapes.batch(seed, 0, count, classifier.config.image_size)
    pred_class, pred_style = classifier.predict(images)
    correct = pred_class == labels
    return {"class_accuracy": float(correct.mean()), "style_accuracy": float((pred_style == styles).mean()),
            "per_class_accuracy": accuracy_by_group(correct, labels, classifier.config.classes), "eval_images": count}


def load_evaluator() -> Classifier:
    """The shipped shapes classifier (class and style heads)."""
    return load_classifier(EVALUATOR)
