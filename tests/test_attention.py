"""Attention in query chunks (the path for large token counts) equals the one-piece path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unguide_jax.models import layers
from unguide_jax.models.layers import multi_head_attention


@pytest.mark.parametrize("heads", [1, 4])
def test_query_chunks_give_the_attention_of_one_piece(heads):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 48, 32))
    k = jax.random.normal(keys[1], (2, 20, 32))
    v = jax.random.normal(keys[2], (2, 20, 32))
    mask = jax.random.bernoulli(keys[3], 0.8, (2, 20)).at[:, 0].set(True)
    whole = multi_head_attention(q, k, v, heads)
    scores = 2 * heads * 48 * 20 * 4
    for limit in (scores // 3, scores // 48, 1):  # 16 query rows a chunk, 1 row, 1 row (never fewer)
        chunked = multi_head_attention(q, k, v, heads, max_score_bytes=limit)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi_head_attention(q, k, v, heads, key_mask=mask, max_score_bytes=scores // 3),
                               multi_head_attention(q, k, v, heads, key_mask=mask), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) ** 2))(q)  # noqa: E731
    np.testing.assert_allclose(grad(lambda q: multi_head_attention(q, k, v, heads, max_score_bytes=scores // 3)),
                               grad(lambda q: multi_head_attention(q, k, v, heads)), rtol=1e-4, atol=1e-5)


def test_the_unet_attends_in_chunks_past_the_score_limit(monkeypatch):
    from tests.tiny_models import flax_unet

    unet, params = flax_unet(context_dim=16, context_len=5)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    context = jax.random.normal(jax.random.key(2), (2, 5, 16))
    t = jnp.array([10, 500])
    whole = unet.apply({"params": params}, x, t, context)
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BYTES", 2 * 2 * 64 * 5 * 4 // 4)  # a quarter of the cross scores
    traced = []
    real_map = jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs, **kw: traced.append(1) or real_map(f, xs, **kw))
    chunked = unet.apply({"params": params}, x, t, context)
    assert traced  # the chunked path ran
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)

