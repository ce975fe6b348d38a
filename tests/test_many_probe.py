"""One probe for K edits (issue 38) on the embedded model: at K = 1 ManyProbe is WProbe (D, D(""), threshold, w);
at K = 2 each edit's column is what that edit's own WProbe gives, a null edit flags nothing; UnGuidance with K
edits is today's at K = 1, and an edit at w = 1 drops out."""
import jax
import numpy as np
import pytest

from unguide_jax.diffusion.many_guidance import generate_many
from unguide_jax.edits.edit import Edit, combine, lora_edit
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.erasers.unguide.many_probe import ManyProbe
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
from unguide_jax.loading.resolve import load_model

ALPHA = 8.0
PROMPTS = ["a photo of the arrow", "a photo of the circle", "a photo of the star", "a photo of the ring"]
SCALES = [3.0, 7.5, 12.0, 2.0]
CONCEPTS = [["a photo of the arrow", "an arrow"], ["a photo of the ring", "a ring"]]
# R = 2 draws and chunks of 1 prompt: one compiled shape serves "", the concept prompts and the prompts.
COMMON = dict(draws=2, prompt_chunk=1)


@pytest.fixture(scope="module")
def sd():
    return load_model("embedded")


def random_edit(sd, seed: int, b_scale: float = 0.05):
    """A deterministic random rank-1 LoRA on attn2.to_k/to_v with B ≠ 0 (B = 0 would be the base model)."""
    init = init_lora(jax.random.key(seed), sd.params["unet"], LoraConfig(rank=1, alpha=ALPHA, init="random"))
    rng = np.random.default_rng(seed)
    return lora_edit({path: {"lora_A": np.asarray(ab["lora_A"]),
                             "lora_B": (b_scale * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
                      for path, ab in init.items()}, ALPHA)


@pytest.fixture(scope="module")
def edits(sd):
    return [random_edit(sd, 1), random_edit(sd, 2)]


@pytest.mark.parametrize("rule", ["calibrated", "paper"])
def test_one_edit_is_wprobe(sd, edits, rule):
    config = ProbeConfig(**COMMON, rule=rule)
    concept = CONCEPTS[0] if rule == "calibrated" else ()
    ours = WProbe(sd, edits[0], config, concept_prompts=concept).run(PROMPTS, SCALES)
    many = ManyProbe(sd, edits[:1], config, [concept]).run(PROMPTS, SCALES)
    one = many.for_edit(0)
    # Bitwise: the same program on the same rows in the same chunks.
    np.testing.assert_array_equal(one.distances, ours.distances)
    np.testing.assert_array_equal(one.d, ours.d)
    np.testing.assert_array_equal(one.w, ours.w)
    assert one.d_empty == ours.d_empty and one.threshold == ours.threshold
    np.testing.assert_array_equal(many.flags[:, 0], ours.w == config.w_erase)


def test_two_edits_decide_as_their_own_probes(sd, edits):
    """Every column is its edit's own WProbe (the same draws and trajectory; ≤ 1e-6 relative: the two edits'
    UNet calls are one program now). A null edit (B = 0) changes nothing, so it flags no prompt."""
    config = ProbeConfig(**COMMON)
    null = random_edit(sd, 3, b_scale=0.0)
    probe = ManyProbe(sd, edits + [null], config, CONCEPTS + [CONCEPTS[0]])
    many = probe.run(PROMPTS, SCALES)
    singles = [WProbe(sd, e, config, concept_prompts=c).run(PROMPTS, SCALES)
               for e, c in zip(edits + [null], CONCEPTS + [CONCEPTS[0]])]
    for k, single in enumerate(singles):
        one = many.for_edit(k)
        np.testing.assert_allclose(one.distances, single.distances, rtol=1e-6, atol=1e-6)
        assert one.d_empty == pytest.approx(single.d_empty, rel=1e-6)
        if single.threshold is not None:
            assert one.threshold == pytest.approx(single.threshold, rel=1e-6, abs=1e-9)
        np.testing.assert_array_equal(one.w, single.w, err_msg=f"edit {k}")
    # Edit 0 clearly (D 86.9, 51.0, 73.1, 81.9 against its threshold 78.8): the arrow and the ring. Edit 1 sits
    # within 3% of its bar (D 25.9-27.2 against 26.5), so it is held to its WProbe above, not to a pattern.
    assert many.flagged() == [[0] + ([1] if f else []) if e else ([1] if f else [])
                              for e, f in zip([True, False, False, True], many.flags[:, 1])]
    assert not many.flags[:, 2].any() and (many.w[:, 2] == config.w_keep).all()
    np.testing.assert_array_equal(many.flags, many.w == config.w_erase)
    assert many.flagged() == [np.flatnonzero(row).tolist() for row in many.w == config.w_erase]


def test_sampling_with_one_edit_is_todays_unguidance(sd, edits):
    prompts, seeds, w = PROMPTS[:2], [5, 6], np.array([[-1.0], [2.0]], np.float32)
    common = dict(num_steps=3, height=32, width=32)
    for fused in (True, False):
        today = sd.generate(prompts, seeds, edit=edits[0], w=w[:, 0], fused=fused, **common)
        ours = generate_many(sd, prompts, seeds, edits=edits[:1], w=w, fused=fused, **common)
        np.testing.assert_array_equal(ours.latents, today.latents, err_msg=f"fused={fused}")
        np.testing.assert_array_equal(ours.images, today.images)
    # K = 2, the second edit at w = 1: its term (1 − w)·CFG vanishes, leaving edit 0's UnGuidance (split form).
    both = generate_many(sd, prompts, seeds, edits=edits, w=np.concatenate([w, np.ones_like(w)], axis=1),
                         combine="sum", **common)
    today = sd.generate(prompts, seeds, edit=edits[0], w=w[:, 0], fused=False, **common)
    np.testing.assert_allclose(both.latents, today.latents, rtol=0, atol=1e-5 * np.abs(today.latents).max())


def test_flagged_rule_applies_the_flagged_loras(sd, edits):
    """The flagged rules: a prompt applies the LoRAs it flags (w_erase), or pushes away from all of them together
    ("flagged") or from their mean ("flagged-mean", the default) (w_keep); each row as the one-edit sampler makes
    it with that edit."""
    prompts, seeds = PROMPTS, [5, 6, 7, 8]
    flags = np.array([[True, False], [False, True], [False, False], [True, True]])
    w = np.where(flags, -1.0, 2.0).astype(np.float32)
    common = dict(num_steps=3, height=32, width=32)
    both = combine(edits)
    mean = Edit(loras=tuple((adapter, alpha / 2) for adapter, alpha in both.loras))
    expected = {"flagged": [(edits[0], -1.0), (edits[1], -1.0), (both, 2.0), (both, -1.0)],
                "flagged-mean": [(edits[0], -1.0), (edits[1], -1.0), (mean, 2.0), (both, -1.0)]}
    for rule, fused in [("flagged", True), ("flagged", False), ("flagged-mean", True)]:
        ours = generate_many(sd, prompts, seeds, edits=edits, w=w, flags=flags, fused=fused, combine=rule, **common)
        assert ours.settings["combine"] == rule
        for i, (edit, w_i) in enumerate(expected[rule]):
            alone = sd.generate(prompts[i:i + 1], seeds[i:i + 1], edit=edit, w=[w_i], **common)
            np.testing.assert_allclose(ours.latents[i], alone.latents[0], rtol=0,
                                       atol=1e-5 * np.abs(alone.latents).max(), err_msg=f"prompt {i}, {rule}, fused={fused}")
    # The flagged rows differ from the sum rule's where two edits meet (row 3), and a wrong flag is seen.
    summed = generate_many(sd, prompts, seeds, edits=edits, w=w, combine="sum", **common)
    assert np.abs(summed.latents[3] - ours.latents[3]).max() > 1e-4
    with pytest.raises(ValueError, match="needs the probe's flags"):
        generate_many(sd, prompts, seeds, edits=edits, w=w, **common)
    with pytest.raises(ValueError, match="different w"):
        generate_many(sd, prompts, seeds, edits=edits, w=np.where(flags, [[-1.0, -0.5]], 2.0), flags=flags, **common)
