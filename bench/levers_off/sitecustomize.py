"""Imported at start-up by every Python process that has this folder on PYTHONPATH (``bench_main_job.py
--sides before``): undoes the three CPU levers (docs/benchmarks.md, "Levers"), so that a whole job can be timed as it ran before
them. Patches only; the package is not changed.

- XLA's default CPU options (YNNPACK fusions on) for every jitted function that takes the package's
  ``XLA_CPU_OPTIONS``: the dict is emptied before the modules that pass it to ``jax.jit`` are imported;
- ``jax.nn.dot_product_attention`` instead of the einsum attention;
- the whole batch in one UNet call (no 32-row chunks).
"""
import os

if os.environ.get("UNGUIDE_BENCH_LEVERS_OFF") == "1":
    # This folder is on PYTHONPATH. The layers are patched before the sampler is imported: the modules it
    # imports take the attention from the layers module by name.
    from attention_before import dot_product_attention as _attention_before

    from unguide_jax.models import layers as _layers

    _einsum_attention = _layers.multi_head_attention

    def _dot_product_attention(q, k, v, heads, is_causal=False, key_mask=None, max_score_bytes=None):
        if q.shape[0] * heads * q.shape[1] * k.shape[1] * 4 > _layers.ATTENTION_SCORE_BYTES:
            return _einsum_attention(q, k, v, heads, is_causal, key_mask, max_score_bytes)  # not a lever
        return _attention_before(q, k, v, heads, is_causal, key_mask)

    _layers.multi_head_attention = _dot_product_attention

    from unguide_jax.diffusion import sampler as _sampler

    _sampler.XLA_CPU_OPTIONS.clear()
    _sampler.CPU_ROWS_PER_CALL = 0
