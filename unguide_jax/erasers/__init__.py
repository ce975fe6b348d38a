"""Erasers beside UnGuide, each producing an ``unguide_jax.edits.edit.Edit`` on the base UNet:
PURE and UCE (closed form, K/V edits as exact low-rank LoRAs) and learnable prompts (trained memory
tokens plus a cross-attention fine-tune)."""
