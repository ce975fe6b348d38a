"""The embedded default: a small Stable-Diffusion-architecture model of procedural shapes, and its evaluator.

Both were trained by ``python -m unguide_jax.shapes.recipe --config configs/embedded.py`` and ship
inside the package (fp16 safetensors) with the recipe's config, logs and quality-gate figures.
"""
from __future__ import annotations

from pathlib import Path

from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.shapes.classifier import load_classifier

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL = ASSETS / "shapes-sd"
EVALUATOR = ASSETS / "shapes-classifier"
RECIPE_RECORD = ASSETS / "recipe"

# Model paths a config may give by name instead of a folder.
NAMED_MODELS = {"embedded": EMBEDDED_MODEL}


def resolve_model_path(name_or_path: str) -> Path:
    return NAMED_MODELS.get(name_or_path, Path(name_or_path))


def load_embedded_model(**kwargs):
    """The shipped shapes model as a ``StableDiffusion`` (kwargs go to ``load_pipeline``)."""
    return load_pipeline(EMBEDDED_MODEL, **kwargs)


def load_evaluator():
    """The shipped shapes classifier (class and style heads)."""
    return load_classifier(EVALUATOR)
