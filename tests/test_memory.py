"""Memory: gradient checkpointing (remat) changes no value, and a request that cannot fit is refused
before it runs, in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import flax_unet
from unguide_jax.edits.edit import apply_unet, lora_edit
from unguide_jax.edits.lora import LoraConfig, init_lora


@pytest.mark.parametrize("policy", ["blocks", "dots"])
def test_remat_gives_the_gradients_of_the_plain_unet_with_and_without_an_edit(policy):
    unet, params = flax_unet(context_dim=16, context_len=5)
    config = LoraConfig(rank=2, alpha=8.0, targets="object", init="random")
    adapter = init_lora(jax.random.key(0), params, config)
    adapter = {k: dict(ab, lora_B=0.1 * jnp.ones_like(ab["lora_B"])) for k, ab in adapter.items()}
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    context = jax.random.normal(jax.random.key(2), (2, 5, 16))
    t = jnp.array([10, 500])

    def loss(model, params, adapter):
        return jnp.sum(apply_unet(model, params, lora_edit(adapter, config.alpha), x, t, context) ** 2)

    plain = jax.jit(jax.value_and_grad(lambda p, a: loss(unet, p, a), argnums=(0, 1)))(params, adapter)
    checkpointed = jax.jit(jax.value_and_grad(lambda p, a: loss(unet.clone(remat=policy), p, a), argnums=(0, 1)))(
        params, adapter)
    assert jax.tree.structure(checkpointed) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(checkpointed), jax.tree.leaves(plain)):
        # Recomputed activations fuse differently: fp32 reduction-order differences, ~3e-4 of a gradient.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="remat must be"):
        unet.clone(remat="everything").apply({"params": params}, x, t, context)


def test_a_request_that_cannot_fit_is_one_clear_error_before_it_runs(monkeypatch):
    from unguide_jax.diffusion import memory
    from unguide_jax.loading.resolve import load_model

    sd = load_model("embedded")
    monkeypatch.setattr(memory, "bytes_per_device", lambda: 2**20)  # a 1 MiB device
    size = sd.default_size
    with pytest.raises(memory.NotEnoughMemory, match=rf"sampling 3 images of {size}x{size} px \(3 per device, 1 steps\) "
                       r"needs [0-9.]+ MiB per device, 1.0 MiB are available: lower batch_size"):
        sd.generate(["a", "b", "c"], num_steps=1)
    monkeypatch.undo()
    assert sd.generate(["a", "b", "c"], num_steps=1).images.shape == (3, size, size, 3)
