"""The UNet attention as it was before the CPU levers (``jax.nn.dot_product_attention``), in one place for the
two benches that put it back: ``bench_levers.py`` (per lever) and ``sitecustomize.py`` (the whole job)."""
import jax


def dot_product_attention(q, k, v, heads, is_causal=False, key_mask=None, max_score_bytes=None):
    """Same signature as ``layers.multi_head_attention``; ``max_score_bytes`` is accepted and ignored."""
    b, t, c = q.shape
    s = k.shape[1]
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, heads, c // heads), k.reshape(b, s, heads, c // heads),
        v.reshape(b, s, heads, v.shape[-1] // heads),
        mask=None if key_mask is None else key_mask[:, None, None, :], is_causal=is_causal)
    return out.reshape(b, t, -1)
