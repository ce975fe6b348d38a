"""Edits applied at activation level (unguide_jax.edits): per-row strength, memory tokens, merging, checks.

Pure JAX on the smallest Flax UNet; the LoRA part is also covered against torch in test_unguide_parity
(UnGuidance sampling) and test_lora_io (diffusers).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_models
from unguide_jax.edits import edit as edit_lib
from unguide_jax.edits.lora import LoraConfig, init_lora, merge

CONTEXT_DIM, CONTEXT_LEN = 16, 5


@pytest.fixture(scope="module")
def tiny():
    unet, params = tiny_models.flax_unet(CONTEXT_DIM, CONTEXT_LEN)
    rng = np.random.default_rng(0)

    def random_adapter(targets, seed):
        fresh = init_lora(jax.random.key(seed), params, LoraConfig(rank=2, alpha=4.0, targets=targets, init="random"))
        return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), fresh)

    z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, CONTEXT_LEN, CONTEXT_DIM)), jnp.float32)
    forward = jax.jit(lambda p, e, s, zz, cc: edit_lib.apply_unet(unet, p, e, zz, jnp.array([500, 500]), cc, s))
    return dict(unet=unet, params=params, z=z, context=context, forward=forward,
                object_lora=random_adapter("object", 1), explicit_lora=random_adapter("explicit", 2))


def _memory(m, scope="mid", seed=0):
    rng = np.random.default_rng(seed)
    return edit_lib.PromptMemory(keys=jnp.asarray(rng.standard_normal((m, CONTEXT_DIM)), jnp.float32),
                              values=jnp.asarray(rng.standard_normal((m, CONTEXT_DIM)), jnp.float32), scope=scope)


def test_per_row_strength_interpolates_between_base_and_merged(tiny):
    p, f, z, c = tiny["params"], tiny["forward"], tiny["z"], tiny["context"]
    edit = edit_lib.combine([edit_lib.lora_edit(tiny["object_lora"], 4.0), edit_lib.lora_edit(tiny["explicit_lora"], 2.0)])
    base = f(p, None, None, z, c)
    merged = f(merge(p, [(tiny["object_lora"], 4.0), (tiny["explicit_lora"], 2.0)]), None, None, z, c)
    assert float(jnp.abs(merged - base).max()) > 1e-2  # the edit matters
    np.testing.assert_allclose(f(p, edit, None, z, c), merged, atol=1e-5)
    rows = f(p, edit, jnp.array([0.0, 1.0]), z, c)
    np.testing.assert_allclose(rows[0], base[0], atol=1e-5)
    np.testing.assert_allclose(rows[1], merged[1], atol=1e-5)
    half = f(merge(p, [(tiny["object_lora"], 2.0), (tiny["explicit_lora"], 1.0)]), None, None, z, c)
    np.testing.assert_allclose(f(p, edit, jnp.array([0.5, 0.5]), z, c), half, atol=1e-5)


def test_memory_with_no_tokens_is_plain_attention(tiny):
    p, f, z, c = tiny["params"], tiny["forward"], tiny["z"], tiny["context"]
    edit = edit_lib.Edit(memory=_memory(0, scope="inmidout"))
    np.testing.assert_allclose(f(p, edit, None, z, c), f(p, None, None, z, c), atol=1e-6)


def test_memory_tokens_extend_keys_and_values_in_scope_only(tiny):
    """The to_k / to_v outputs of in-scope layers get m more tokens, p_K W_K and p_V W_V; other layers none."""
    p, z, c = tiny["params"], tiny["z"], tiny["context"]
    memory = _memory(3, scope="mid")
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = ".".join(context.module.path)
        if context.method_name == "__call__" and path.endswith(("attn2.to_k", "attn2.to_v")):
            seen[path] = out
        return out

    with nn.intercept_methods(record):
        edit_lib.apply_unet(tiny["unet"], p, edit_lib.Edit(memory=memory), z, 500, c)
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert edit_lib.memory_layers(p, "mid") == [mid]
    for name, tokens in (("to_k", memory.keys), ("to_v", memory.values)):
        kernel = p["mid_block.attentions.0"]["transformer_blocks.0"]["attn2"][name]["kernel"]
        out = seen[f"{mid}.{name}"]
        assert out.shape[1] == CONTEXT_LEN + 3
        np.testing.assert_allclose(out[:, :CONTEXT_LEN], c @ kernel, atol=1e-5)
        np.testing.assert_allclose(out[0, CONTEXT_LEN:], tokens @ kernel, atol=1e-5)
    others = [k for k in seen if not k.startswith(mid)]
    assert others and all(seen[k].shape[1] == CONTEXT_LEN for k in others)


def test_memory_duplicating_the_text_tokens_changes_nothing(tiny):
    """Keys and values that repeat the text tokens halve every attention weight and leave the output as is:
    the extra tokens take part in the softmax over 77 + m keys, unmasked."""
    p, f, z = tiny["params"], tiny["forward"], tiny["z"]
    c = jnp.broadcast_to(tiny["context"][:1], tiny["context"].shape)
    memory = edit_lib.PromptMemory(keys=c[0], values=c[0], scope="inmidout")
    np.testing.assert_allclose(f(p, edit_lib.Edit(memory=memory), None, z, c), f(p, None, None, z, c), atol=1e-5)


def test_memory_rows_are_masked_where_the_strength_is_zero(tiny):
    p, f, z, c = tiny["params"], tiny["forward"], tiny["z"], tiny["context"]
    edit = edit_lib.combine([edit_lib.Edit(memory=_memory(4, scope="midout")), edit_lib.lora_edit(tiny["object_lora"], 4.0)])
    on, off = f(p, edit, None, z, c), f(p, None, None, z, c)
    assert float(jnp.abs(on - off).max()) > 1e-2
    rows = f(p, edit, jnp.array([1.0, 0.0]), z, c)
    np.testing.assert_allclose(rows[0], on[0], atol=1e-5)
    np.testing.assert_allclose(rows[1], off[1], atol=1e-5)


def test_weight_deltas_merge_and_refuse_per_row_strength(tiny):
    p, f, z, c = tiny["params"], tiny["forward"], tiny["z"], tiny["context"]
    path = "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    kernel = p["mid_block.attentions.0"]["transformer_blocks.0"]["attn2"]["to_out.0"]["kernel"]
    delta = {path: {"kernel": 0.1 * jnp.ones_like(kernel)}}
    edit = edit_lib.Edit(deltas=delta)
    merged = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.1 if "/".join(str(k.key) for k in kp).endswith("attn2/to_out.0/kernel")
        and "mid_block" in str(kp[0].key) else x, p)
    np.testing.assert_allclose(f(p, edit, None, z, c), f(merged, None, None, z, c), atol=1e-5)
    assert not edit.supports_rows
    with pytest.raises(ValueError, match="cannot be scaled per row"):
        edit_lib.apply_unet(tiny["unet"], p, edit, z, 500, c, strength=jnp.ones(2))


def test_edits_that_do_not_fit_are_named(tiny):
    p = tiny["params"]
    path = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError, match="no_such_block"):
        edit_lib.check_edit_fits(p, edit_lib.Edit(deltas={"no_such_block.to_k": {"kernel": jnp.zeros((1, 1))}}))
    with pytest.raises(ValueError, match=rf"delta {path}.kernel has shape \(3, 3\)"):
        edit_lib.check_edit_fits(p, edit_lib.Edit(deltas={path: {"kernel": jnp.zeros((3, 3))}}))
    bad_memory = edit_lib.PromptMemory(keys=jnp.zeros((2, 7)), values=jnp.zeros((2, 7)), scope="mid")
    with pytest.raises(ValueError, match=r"memory keys have shape \(2, 7\), expected \(m, 16\)"):
        edit_lib.check_edit_fits(p, edit_lib.Edit(memory=bad_memory))
    with pytest.raises(ValueError, match="unknown memory scope 'out'"):
        edit_lib.memory_layers(p, "out")
    with pytest.raises(ValueError, match="at most one learnable-prompt memory"):
        edit_lib.combine([edit_lib.Edit(memory=_memory(1)), edit_lib.Edit(memory=_memory(1))])
