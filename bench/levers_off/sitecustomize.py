"""Imported at start-up by every Python process that has this folder on PYTHONPATH (``bench_main_job.py
--sides before``): undoes issue 25's three CPU levers, so that a whole job can be timed as it ran before
them. Patches only; the package is not changed.

- XLA's default CPU options (YNNPACK fusions on) for every jitted function that takes the package's
  ``XLA_CPU_OPTIONS``: the dict is emptied before the modules that pass it to ``jax.jit`` are imported;
- ``jax.nn.dot_product_attention`` instead of the einsum attention;
- the whole batch in one UNet call (no 32-row chunks).
"""
import os

if os.environ.get("UNGUIDE_BENCH_LEVERS_OFF") == "1":
    import jax

    # First: the modules imported below take the attention from it by name.
    from unguide_jax.models import layers as _layers

    _einsum_attention = _layers.multi_head_attention

    def _dot_product_attention(q, k, v, heads, is_causal=False, key_mask=None, max_score_bytes=None):
        b, t, c = q.shape
        s = k.shape[1]
        if b * heads * t * s * 4 > _layers.ATTENTION_SCORE_BYTES:  # the memory path is not a lever
            return _einsum_attention(q, k, v, heads, is_causal, key_mask, max_score_bytes)
        out = jax.nn.dot_product_attention(
            q.reshape(b, t, heads, c // heads), k.reshape(b, s, heads, c // heads),
            v.reshape(b, s, heads, v.shape[-1] // heads),
            mask=None if key_mask is None else key_mask[:, None, None, :], is_causal=is_causal)
        return out.reshape(b, t, -1)

    _layers.multi_head_attention = _dot_product_attention

    from unguide_jax.diffusion import sampler as _sampler

    _sampler.XLA_CPU_OPTIONS.clear()
    _sampler.CPU_ROWS_PER_CALL = 0
