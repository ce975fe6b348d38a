"""Baselines for K concepts (issue 38): K LoRAs merged into one, UCE and PURE solved for K concepts at once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unguide_jax.edits import edit as edit_lib
from unguide_jax.edits.merge import merge_loras
from unguide_jax.erasers import pure, uce
from unguide_jax.erasers.common import cross_attention_layers, kernel
from unguide_jax.erasers.concepts import Concept

# --- merge_loras ---------------------------------------------------------------------------------------

SHAPES = {"down.attn2.to_k": (6, 5), "down.attn2.to_v": (6, 5), "mid.attn1.to_q": (5, 5)}


def _adapter(rng, paths, rank):
    return {p: {"lora_A": jnp.asarray(rng.standard_normal((SHAPES[p][0], rank)), jnp.float32),
                "lora_B": jnp.asarray(rng.standard_normal((rank, SHAPES[p][1])), jnp.float32)} for p in paths}


def _deltas(edit):
    out = {}
    for adapter, alpha in edit.loras:
        for path, ab in adapter.items():
            d = float(alpha) * np.asarray(ab["lora_A"], np.float64) @ np.asarray(ab["lora_B"], np.float64)
            out[path] = out.get(path, 0) + d
    return out


def test_merged_lora_delta_is_the_sum_of_the_deltas():
    rng = np.random.default_rng(0)
    edits = [edit_lib.lora_edit(_adapter(rng, ["down.attn2.to_k", "down.attn2.to_v"], 1), 8.0),
             edit_lib.lora_edit(_adapter(rng, ["down.attn2.to_v", "mid.attn1.to_q"], 3), 0.5),
             edit_lib.combine([edit_lib.lora_edit(_adapter(rng, ["down.attn2.to_k"], 2), -1.5),
                               edit_lib.lora_edit(_adapter(rng, ["down.attn2.to_v"], 1), 1.0)])]
    merged = merge_loras(edits)
    assert len(merged.loras) == 1 and float(merged.loras[0][1]) == 1.0
    adapter = merged.loras[0][0]
    assert {p: ab["lora_A"].shape[1] for p, ab in adapter.items()} == {
        "down.attn2.to_k": 3, "down.attn2.to_v": 5, "mid.attn1.to_q": 3}
    expected, got = _deltas(edit_lib.combine(edits)), _deltas(merged)
    assert set(got) == set(expected)
    for path in expected:
        rel = np.linalg.norm(got[path] - expected[path]) / np.linalg.norm(expected[path])
        assert rel <= 1e-6, (path, rel)
    # Merged into base weights, the one LoRA gives the K LoRAs' weights.
    params = {"down": {"attn2": {n: {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}
                                 for n in ("to_k", "to_v")}},
              "mid": {"attn1": {"to_q": {"kernel": jnp.asarray(rng.standard_normal((5, 5)), jnp.float32)}}}}
    for a, b in zip(jax.tree.leaves(edit_lib.merge_weights(params, merged)),
                    jax.tree.leaves(edit_lib.merge_weights(params, edit_lib.combine(edits)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_merge_loras_refuses_what_is_not_a_lora():
    rng = np.random.default_rng(1)
    lora = edit_lib.lora_edit(_adapter(rng, ["down.attn2.to_k"], 1), 1.0)
    delta = edit_lib.Edit(deltas={"down.attn2.to_k": {"kernel": jnp.zeros((6, 5))}})
    memory = edit_lib.Edit(memory=edit_lib.PromptMemory(keys=jnp.zeros((2, 6)), values=jnp.zeros((2, 6))))
    with pytest.raises(ValueError, match="edit 1 has full weight deltas"):
        merge_loras([lora, delta])
    with pytest.raises(ValueError, match="edit 0 has a learnable-prompt memory"):
        merge_loras([memory, lora])
    other = {"down.attn2.to_k": {"lora_A": jnp.zeros((7, 1)), "lora_B": jnp.zeros((1, 5))}}
    with pytest.raises(ValueError, match="down.attn2.to_k maps 7 -> 5"):
        merge_loras([lora, edit_lib.lora_edit(other, 1.0)])
    assert merge_loras([]).is_empty


# --- the shared retain anchors ------------------------------------------------------------------------

def _concept(name, forget, retain, reference):
    return Concept(name=name, targets=(forget[0],), references=(reference,), forget=tuple(forget),
                   retain=tuple(retain))


CAT = _concept("cat", ["a photo of the cat", "the cat", "cat"], ["a photo", "the photo of the", "of the"],
               "a photo of the")
DOG = _concept("dog", ["a photo of the dog", "the dog", "dog"], ["a photo", "the cat", "of the dog"], "a photo")


def test_shared_retain_is_the_union_less_what_another_concept_erases():
    assert uce.shared_retain([CAT, DOG]) == (["a photo", "the photo of the", "of the", "of the dog"], ["the cat"])
    # One concept keeps its own list as it is (what the single-concept edit preserves).
    odd = _concept("odd", ["x"], ["y", "y", "x"], "")
    assert uce.shared_retain([odd]) == (["y", "y", "x"], [])
    with pytest.raises(ValueError, match="no concept"):
        uce.as_concepts([])


# --- UCE ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tiny_pipeline_dir):
    from unguide_jax.loading.diffusers_folder import load_pipeline

    folder, _ = tiny_pipeline_dir("sd1")
    return load_pipeline(folder)


def _subject_rows(sd, prompts):
    h, idx = uce.token_rows(sd, list(prompts), "subject")
    return np.stack([h[k][idx[k]] for k in range(len(prompts))])


def _edited(sd, edit, module):
    adapter, alpha = edit.loras[0]
    ab = adapter[module]
    k0 = kernel(sd.params["unet"], module)
    return k0, k0 + float(alpha) * np.asarray(ab["lora_A"], np.float64) @ np.asarray(ab["lora_B"], np.float64)


def test_uce_with_one_concept_is_the_single_concept_edit(tiny_sd):
    config = uce.UceConfig(tokens="subject", preserve_scale=2.0)
    single, report = uce.uce_edit(tiny_sd, CAT, config)
    listed, _ = uce.uce_edit(tiny_sd, [CAT], config)
    assert "concepts" not in report
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(listed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The same factors as the closed form on rows built here.
    erase, preserve = _subject_rows(tiny_sd, CAT.forget), _subject_rows(tiny_sd, CAT.retain)
    guide = np.repeat(_subject_rows(tiny_sd, [""]), 3, axis=0)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    a, b = uce.solve(kernel(tiny_sd.params["unet"], module), erase, guide, preserve, config)
    if a.shape[1] >= a.shape[0]:
        a, b = np.eye(a.shape[0]), a @ b
    adapter = single.loras[0][0][module]
    assert np.array_equal(np.asarray(adapter["lora_A"]), a.astype(np.float32))
    assert np.array_equal(np.asarray(adapter["lora_B"]), b.astype(np.float32))


def test_uce_with_two_concepts_solves_the_joint_problem_and_erases_both(tiny_sd):
    config = uce.UceConfig(tokens="subject", guide="reference", preserve_scale=2.0)
    edit, report = uce.uce_edit(tiny_sd, [CAT, DOG], config)
    assert report["erase_rows"] == 6 and report["preserve_rows"] == 4 and report["retain_dropped"] == ["the cat"]
    assert report["concepts"] == ["cat", "dog"] and report["erase_rows_per_concept"] == [3, 3]
    erase = {c.name: _subject_rows(tiny_sd, c.forget) for c in (CAT, DOG)}
    guide = {c.name: np.repeat(_subject_rows(tiny_sd, c.references), 3, axis=0) for c in (CAT, DOG)}
    e, g = np.concatenate([erase["cat"], erase["dog"]]), np.concatenate([guide["cat"], guide["dog"]])
    p = _subject_rows(tiny_sd, ["a photo", "the photo of the", "of the", "of the dog"])
    singles = {c.name: uce.uce_edit(tiny_sd, c, config)[0] for c in (CAT, DOG)}
    modules = list(edit.loras[0][0])
    assert len(modules) == 2 * len(cross_attention_layers(tiny_sd.params["unet"]))
    for module in modules:
        k0, k = _edited(tiny_sd, edit, module)
        # The normal equations of λ‖K − K0‖² + s_e‖E K − G K0‖² + s_p‖P K − P K0‖², measured against the
        # pull of the erase term at K0.
        gradient = (config.lam * (k - k0) + config.erase_scale * e.T @ (e @ k - g @ k0)
                    + config.preserve_scale * p.T @ (p @ (k - k0)))
        pull = np.linalg.norm(config.erase_scale * e.T @ (e - g) @ k0)
        assert np.linalg.norm(gradient) / pull <= 1e-5, module
        for name in ("cat", "dog"):
            _, k1 = _edited(tiny_sd, singles[name], module)
            before = np.linalg.norm((erase[name] - guide[name]) @ k0)
            joint = np.linalg.norm(erase[name] @ k - guide[name] @ k0)
            alone = np.linalg.norm(erase[name] @ k1 - guide[name] @ k0)
            assert joint < 0.5 * before and joint <= 1.25 * alone, (module, name, joint, alone, before)


# --- PURE ---------------------------------------------------------------------------------------------

def test_union_basis_spans_every_basis_and_keeps_heads_apart():
    rng = np.random.default_rng(2)
    d, heads = 8, 2
    h1, h2 = rng.standard_normal((30, d)), rng.standard_normal((30, d))
    h2[:, :4] = h1[:, :4]  # the first head's activations shared by both concepts
    b1, b2 = pure.head_subspace(h1, heads, 0.6), pure.head_subspace(h2, heads, 0.6)
    union = pure.union_basis([b1, b2], heads)
    np.testing.assert_allclose(union.T @ union, np.eye(union.shape[1]), atol=1e-12)
    assert union.shape[1] == np.linalg.matrix_rank(np.concatenate([b1, b2], axis=1))
    for b in (b1, b2):
        np.testing.assert_allclose(pure.projector(union) @ b, b, atol=1e-12)
    assert np.abs(union[:4] * union[4:].any(axis=0)).max() == 0 and np.abs(union[4:] * union[:4].any(axis=0)).max() == 0
    assert pure.union_basis([b1]) is b1


PURE_CONFIG = pure.PureConfig(steps=2, latents=2, energy=0.9, retain_energy=0.7, center=False, per_head=True,
                              anchor_chunk=3)


def test_pure_with_one_concept_is_the_single_concept_edit(tiny_sd):
    single, _ = pure.pure_edit(tiny_sd, CAT, PURE_CONFIG)
    listed, report = pure.pure_edit(tiny_sd, [CAT], PURE_CONFIG)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(listed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert report["concepts"] == ["cat"]


def test_pure_with_two_concepts_projects_out_the_sum_of_their_subspaces(tiny_sd):
    edit, report = pure.pure_edit(tiny_sd, [CAT, DOG], PURE_CONFIG)
    assert report["retain_anchors"] == 4 and report["retain_dropped"] == ["the cat"]
    h_f = [pure.collect(tiny_sd, list(c.forget), PURE_CONFIG)[0] for c in (CAT, DOG)]
    h_r, _ = pure.collect(tiny_sd, ["a photo", "the photo of the", "of the", "of the dog"], PURE_CONFIG)
    for layer in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                  "up_blocks.1.attentions.0.transformer_blocks.0.attn2"):
        heads = pure.layer_heads(tiny_sd.unet.config, layer)
        own = [pure.head_subspace(h[layer], heads, 0.9) for h in h_f]
        # The projector onto the sum of the two spans, from an orthonormalisation done here.
        q, s, _ = np.linalg.svd(np.concatenate(own, axis=1), full_matrices=False)
        q = q[:, s > 1e-8]
        assert report["ranks"][layer]["forget"] == q.shape[1] > max(b.shape[1] for b in own)
        p_r = pure.projector(pure.head_subspace(h_r[layer], heads, 0.7))
        for name in ("to_k", "to_v"):
            k0, k = _edited(tiny_sd, edit, f"{layer}.{name}")
            expected = -k0 @ (np.eye(len(p_r)) - p_r) @ (q @ q.T)
            np.testing.assert_allclose(k - k0, expected, atol=1e-5 * np.abs(expected).max())


def test_pure_without_retain_span_removes_each_concept_at_least_as_much_as_alone(tiny_sd):
    """E = I − P_F with P_F over the sum of the spans: every concept's rows lose at least what its own edit took."""
    config = pure.PureConfig(steps=2, latents=2, energy=0.9, retain_energy=0.0, center=False, anchor_chunk=3)
    _, joint = pure.pure_edit(tiny_sd, [CAT, DOG], config)
    for k, concept in enumerate((CAT, DOG)):
        _, alone = pure.pure_edit(tiny_sd, concept, config)
        for layer, ranks in joint["ranks"].items():
            assert ranks["forget_removed_per_concept"][k] >= alone["ranks"][layer]["forget_removed"] - 1e-4, layer
