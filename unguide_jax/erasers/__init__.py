"""The erasers, each producing an ``unguide_jax.edits.edit.Edit`` on the frozen base UNet, and their
registry (``registry.py``): UnGuide (``unguide/``: objective, train step, probe, sampling modes),
learnable prompts (trained memory tokens plus a cross-attention fine-tune), PURE and UCE (closed
form, K/V edits as exact low-rank LoRAs), and the concept files they all read (``concepts.py``)."""
