"""PURE and UCE: the algebra of their closed forms, and the edits they produce on a tiny model."""
import jax
import numpy as np
import pytest

from unguide_jax.erasers import pure, uce
from unguide_jax.erasers.concepts import Concept


def _orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def test_pure_projector_keeps_the_retain_span_and_removes_forget_only_directions():
    rng = np.random.default_rng(0)
    d = 12
    q = _orthonormal(rng, d, d)                 # a random orthonormal basis
    v_r = q[:, 0:3]
    v_f = q[:, [3, 0]]                          # one forget-only direction (q3), one shared with the retain span (q0)
    e = pure.edit_matrix(v_f, v_r)
    p_r = pure.projector(v_r)
    np.testing.assert_allclose(e @ p_r, p_r, atol=1e-12)           # E·P_R = P_R
    np.testing.assert_allclose(e @ q[:, 3], 0, atol=1e-12)         # forget only: removed
    np.testing.assert_allclose(e @ q[:, :3], q[:, :3], atol=1e-12)  # retained (shared included): kept
    np.testing.assert_allclose(e @ q[:, 4:], q[:, 4:], atol=1e-12)  # neither: kept
    # A forget direction that half overlaps the retain span is attenuated, not removed.
    f = (q[:, 3] + q[:, 1]) / np.sqrt(2)
    np.testing.assert_allclose(pure.edit_matrix(f[:, None], v_r) @ f, f / 2, atol=1e-12)


def test_flax_layout_edit_equals_the_pytorch_layout_edit():
    rng = np.random.default_rng(1)
    text, d = 7, 10
    kernel = rng.standard_normal((text, d))          # Flax: y = x · kernel
    weight = kernel.T                                # PyTorch: y = W x, W (d, text)
    v_f, v_r = _orthonormal(rng, d, 3), _orthonormal(rng, d, 4)
    e = pure.edit_matrix(v_f, v_r)
    a, b = pure.kernel_delta_factors(kernel, v_f, v_r)
    np.testing.assert_allclose(kernel + a @ b, (e @ weight).T, atol=1e-12)
    assert a.shape == (text, 3) and b.shape == (3, d)


def test_subspace_keeps_the_smallest_rank_reaching_the_energy():
    rng = np.random.default_rng(2)
    u, v = _orthonormal(rng, 50, 4), _orthonormal(rng, 8, 4)
    h = u @ np.diag([10.0, 5.0, 1.0, 0.1]) @ v.T
    energies = np.cumsum(np.array([100.0, 25.0, 1.0, 0.01])) / 126.01
    assert pure.subspace(h, 0.5).shape == (8, 1)
    assert pure.subspace(h, energies[1]).shape == (8, 2)
    assert pure.subspace(h, 0.999).shape == (8, 3)
    basis = pure.subspace(h, 1.0)
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-10)


def test_retain_energy_sets_the_retain_rank_alone_and_zero_drops_the_retain_span():
    rng = np.random.default_rng(5)
    d = 8
    q = _orthonormal(rng, d, d)
    coords = rng.standard_normal((40, 3)) * np.array([10.0, 3.0, 1.0])
    h_f = coords @ q[:, [0, 1, 2]].T                    # forget rows span q0, q1, q2
    h_r = coords @ q[:, [0, 3, 4]].T                    # retain rows share q0 (their largest direction)
    same = pure.PureConfig(energy=0.999, retain_energy=None)
    v_f, v_r = pure.layer_bases(h_f, h_r, 1, same)
    assert v_f.shape[1] == 3 and v_r.shape[1] == 3
    assert pure.removed_fraction(h_r, pure.edit_matrix(v_f, v_r)) < 1e-10  # the retain rows are untouched
    v_f, v_r = pure.layer_bases(h_f, h_r, 1, pure.PureConfig(energy=0.999, retain_energy=0.5))
    assert v_f.shape[1] == 3 and v_r.shape[1] == 1     # only the retain side shrank
    assert abs(v_r[:, 0] @ q[:, 0]) > 0.99                  # the dominant, shared direction
    v_f, v_r = pure.layer_bases(h_f, h_r, 1, pure.PureConfig(energy=0.999, retain_energy=0.0))
    assert v_r.shape == (d, 0)
    e = pure.edit_matrix(v_f, v_r)
    np.testing.assert_allclose(e, np.eye(d) - pure.projector(v_f), atol=1e-12)  # E = I − P_F
    assert pure.removed_fraction(h_f, e) == pytest.approx(1.0, abs=1e-10)      # every forget row removed
    with pytest.raises(ValueError, match="retain_energy"):
        pure.PureConfig(retain_energy=1.5)


def test_uce_closed_form_solves_its_least_squares_problem():
    rng = np.random.default_rng(3)
    text, d = 9, 6
    k0 = rng.standard_normal((text, d))
    erase, guide, preserve = rng.standard_normal((4, text)), rng.standard_normal((4, text)), rng.standard_normal((5, text))
    config = uce.UceConfig(lam=0.5, erase_scale=1.0, preserve_scale=2.0)
    a, b = uce.solve(k0, erase, guide, preserve, config)
    k = k0 + a @ b
    # The same problem stacked as ordinary least squares, solved by numpy.
    lhs = np.concatenate([np.sqrt(config.lam) * np.eye(text), np.sqrt(config.erase_scale) * erase,
                          np.sqrt(config.preserve_scale) * preserve])
    rhs = np.concatenate([np.sqrt(config.lam) * k0, np.sqrt(config.erase_scale) * guide @ k0,
                          np.sqrt(config.preserve_scale) * preserve @ k0])
    expected, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    np.testing.assert_allclose(k, expected, atol=1e-10)
    best = uce.objective(k, k0, erase, guide, preserve, config)
    for _ in range(5):
        assert uce.objective(k + 1e-3 * rng.standard_normal(k.shape), k0, erase, guide, preserve, config) > best
    assert a.shape == (text, 4)  # rank: the number of erase rows


@pytest.fixture(scope="module")
def tiny_sd(tiny_pipeline_dir):
    from unguide_jax.loading.diffusers_folder import load_pipeline

    folder, _ = tiny_pipeline_dir("sd1")
    return load_pipeline(folder)


CONCEPT = Concept(name="cat", targets=("a photo of the cat",), references=("a photo of the",),
                  other=("the cat of the", "a photo", ""), forget=("a photo of the cat", "the cat", "cat"),
                  retain=("a photo", "the photo of the", "of the"))


def test_pure_on_values_maps_the_activation_by_its_layers_projector(tiny_sd):
    """With K untouched the attention weights stay, and the edited model's activation before to_out at the
    first cross-attention layer (whose input the edit does not reach) is exactly E·h: the edit acts in the
    space where the subspaces were measured. Exact because E is block-diagonal over the heads (per_head)."""
    config = pure.PureConfig(steps=2, latents=2, energy=0.9, retain_energy=None, edit_keys=False, center=False, per_head=True)
    edit, report = pure.pure_edit(tiny_sd, CONCEPT, config)
    assert report["unet_rows"] == 2 * (3 + 3) * 2 * 2 and all(r["forget"] >= 1 for r in report["ranks"].values())
    sd = tiny_sd
    z = jax.random.normal(jax.random.key(4), (2, *sd.latent_shape(None, None)))
    context = sd.encode_prompts(["a photo of the cat", "of the cat"])
    from unguide_jax.edits.edit import merge_weights

    _, before = pure._capture(sd.unet, sd.params["unet"], z, 400, context)
    _, after = pure._capture(sd.unet, merge_weights(sd.params["unet"], edit), z, 400, context)
    h_f, _ = pure.collect(sd, list(CONCEPT.forget), config)
    h_r, _ = pure.collect(sd, list(CONCEPT.retain), config)
    first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    heads = pure.layer_heads(sd.unet.config, first)
    assert heads == 4
    e = pure.edit_matrix(pure.head_subspace(h_f[first], heads, 0.9), pure.head_subspace(h_r[first], heads, 0.9))
    expected = np.asarray(before[first], np.float64) @ e.T
    assert np.abs(expected - np.asarray(before[first])).max() > 1e-2  # the edit does change this activation
    np.testing.assert_allclose(np.asarray(after[first]), expected, atol=1e-5)


def test_uce_edit_maps_erase_rows_towards_the_guide(tiny_sd):
    config = uce.UceConfig(tokens="subject")
    edit, report = uce.uce_edit(tiny_sd, CONCEPT, config)
    assert report["erase_rows"] == 3 and report["preserve_rows"] == 3
    from unguide_jax.erasers.common import kernel

    adapter, alpha = edit.loras[0]
    h, idx = uce.token_rows(tiny_sd, list(CONCEPT.forget), "subject")
    g, gidx = uce.token_rows(tiny_sd, [""], "subject")
    erase = np.stack([h[k][idx[k]] for k in range(3)])
    guide = g[0][gidx[0]]
    module = next(iter(adapter))
    k0 = kernel(tiny_sd.params["unet"], module)
    k = k0 + float(alpha) * np.asarray(adapter[module]["lora_A"], np.float64) @ np.asarray(adapter[module]["lora_B"], np.float64)
    before = np.linalg.norm(erase @ k0 - guide @ k0)
    after = np.linalg.norm(erase @ k - guide @ k0)
    assert after < 0.5 * before


def test_layer_heads_follow_the_unet_blocks():
    """Per-block heads (2, 4, 4) as SD2: the heads PURE assumes for each layer are the module's own."""
    import flax.linen as nn

    from tests.tiny_models import unet_kwargs
    from unguide_jax.models.unet import Attention, UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(dict(unet_kwargs("sd2"), norm_eps=1e-5))
    unet = UNet2DConditionModel(config)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Attention) and context.module.name == "attn2":
            seen[".".join(context.module.path)] = context.module.heads
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.init_inputs(context_len=3)))
    assert len(seen) == 7 and len(set(seen.values())) == 2
    for layer, heads in seen.items():
        assert pure.layer_heads(config, layer) == heads, layer
