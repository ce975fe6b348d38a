"""The embedded default: a small Stable-Diffusion-architecture model of procedural shapes, and its evaluator.

Both were trained by ``python -m unguide_jax.cli.recipe --config configs/embedded.py`` and ship
inside the package (the model in fp32, the evaluator in fp16 safetensors) with the recipe's final config, logs
and quality-gate figures.
Load the model with ``unguide_jax.load_model("embedded")`` and the evaluator with
``unguide_jax.shapes.classifier.load_evaluator()``. Their folders are named in ``unguide_jax.resources``
(``EMBEDDED_MODEL``, ``EVALUATOR``, ``RECIPE_RECORD``), which the loaders read without this room.
"""
