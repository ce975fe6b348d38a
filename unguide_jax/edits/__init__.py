"""The Edit pytree every eraser produces and how it applies to the UNet, and LoRA as its own pytree: what the
sampler needs. Their files and formats are in ``unguide_jax.loading``; loading an edit from any source in
``unguide_jax.training.sources``."""
