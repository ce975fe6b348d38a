"""The embedded default: a small Stable-Diffusion-architecture model of procedural shapes, and its evaluator.

Both were trained by ``python -m unguide_jax.shapes.recipe --config configs/embedded.py`` and ship
inside the package (the model in fp32, the evaluator in fp16 safetensors) with the recipe's final config, logs
and quality-gate figures.
Load the model with ``unguide_jax.load_model("embedded")`` and the evaluator with
``unguide_jax.shapes.classifier.load_evaluator()``. This module only names the folders, so that
``unguide_jax.shapes.data`` imports without the model stack.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODEL = ASSETS / "shapes-sd"
EVALUATOR = ASSETS / "shapes-classifier"
RECIPE_RECORD = ASSETS / "recipe"
