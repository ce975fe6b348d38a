"""UnGuidePipeline with K = 2 UnGuide exports loaded (issue 38) against our JAX ``ManyProbe`` and ``generate_many`` on
the shipped model: the same D_k(p), D_k(""), thresholds, flags and w from one shared probe, and the same images from
the same seeds under the flagged rule (each prompt applies the LoRAs it flags, or all of them at w_keep); the
probe settings that make the shared draws must agree; one adapter is the one-adapter pipeline."""
import jax
import numpy as np
import pytest
import torch

from unguide_jax.diffusion.many_guidance import generate_many
from unguide_jax.edits.edit import lora_edit
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.erasers.unguide.many_probe import ManyProbe
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.loading.exports import export_edit
from unguide_jax.loading.resolve import load_model
from unguide_jax.publishing.export import write_unguide_settings
from unguide_jax.pytorch import UnGuidePipeline
from unguide_jax.pytorch.unguide_pipeline import AdaptersProbeResult, ProbeResult

ALPHA = 8.0
NAMES = ["arrow", "ring"]
CONCEPTS = [["a photo of the arrow", "an arrow", "a sketch of the arrow"], ["a photo of the ring", "a ring"]]
# With the two random LoRAs below these prompts flag {arrow}, {ring}, nothing and both (D_arrow 86.8, 51.0, 73.1,
# 82.0 against its bar 78.9; D_ring 25.6, 26.9, 26.3, 27.1 against 26.4): every branch of the flagged rule.
PROMPTS = ["a photo of the arrow", "a photo of the circle", "a photo of the star", "a photo of the ring"]
SEEDS = [5, 6, 7, 8]
STEPS = 8
PROBE = ProbeConfig(draws=2, prompt_chunk=1)  # rule calibrated, the default; R = 2 keeps the probe cheap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd():
    return load_model("embedded")


def random_edit(sd, seed: int):
    """A deterministic random rank-1 LoRA on attn2.to_k/to_v (as tests/test_unguide_pipeline.py's)."""
    init = init_lora(jax.random.key(seed), sd.params["unet"],
                     LoraConfig(rank=1, alpha=ALPHA, targets="object", init="random"))
    rng = np.random.default_rng(seed)
    return lora_edit({path: {"lora_A": np.asarray(ab["lora_A"]),
                             "lora_B": (0.05 * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
                      for path, ab in init.items()}, ALPHA)


@pytest.fixture(scope="module")
def edits(sd):
    return [random_edit(sd, 1), random_edit(sd, 2)]


@pytest.fixture(scope="module")
def exports(sd, edits, tmp_path_factory):
    """Each edit's peft export with its unguide.json (R = 2, rule calibrated, its own concept's targets)."""
    folders = []
    for name, edit, concept in zip(NAMES, edits, CONCEPTS):
        folder = tmp_path_factory.mktemp(name)
        export_edit(["peft"], folder, edit, sd.unet, sd.params["unet"])
        write_unguide_settings(folder, sd, edit, ProbeConfig(draws=2), concept, cache_empty_probe=False)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def ours(sd, edits):
    return ManyProbe(sd, edits, PROBE, CONCEPTS).run(PROMPTS)


@pytest.fixture(scope="module")
def pipe():
    from unguide_jax.resources import EMBEDDED_MODEL

    pipe = UnGuidePipeline.from_pretrained(str(EMBEDDED_MODEL), torch_dtype=torch.float32, safety_checker=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def two(pipe, exports):
    pipe.unload_unguide()
    for name, folder in zip(NAMES, exports):
        pipe.load_unguide(folder, adapter_name=name)
    yield pipe
    pipe.unload_unguide()


def test_two_adapters_probe_and_sample_as_many_probe_and_generate_many(sd, edits, exports, ours, two):
    assert ours.flagged() == [[0], [1], [], [0, 1]], "the prompts must take every branch of the flagged rule"
    got = two.probe(PROMPTS)
    assert isinstance(got, AdaptersProbeResult) and got.adapters == NAMES
    np.testing.assert_array_equal(got.flags, ours.flags)
    np.testing.assert_array_equal(got.w, ours.w)
    assert got.flagged() == [["arrow"], ["ring"], [], ["arrow", "ring"]]
    np.testing.assert_allclose(got.d, ours.d, rtol=1e-4)
    np.testing.assert_allclose(got.distances, ours.distances, rtol=1e-4)
    np.testing.assert_allclose(got.d_empty, ours.d_empty, rtol=1e-4)
    np.testing.assert_allclose(got.thresholds, ours.thresholds, rtol=1e-4)
    # Each adapter's bar is its own: the two thresholds are far apart (78.9 and 26.4).
    assert got.thresholds[0] > 2 * got.thresholds[1]

    # One base trajectory per (prompt, draw) for both adapters, then the base and each LoRA alone at t; the
    # references are kept: 2 draws x (2 x 9 CFG steps + 3) rows, where two probes would take 2 x 2 x (2 x 9 + 2).
    rows = []
    hook = two.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        again = two.probe(PROMPTS[2:3])
    finally:
        hook.remove()
    assert sum(rows) == PROBE.draws * (2 * 9 + 3)
    np.testing.assert_array_equal(again.w, got.w[2:3])
    assert again.for_adapter("ring").threshold == got.thresholds[1]

    expected = generate_many(sd, PROMPTS, SEEDS, edits=edits, w=ours.w, flags=ours.flags, num_steps=STEPS)
    out = two(PROMPTS, seeds=SEEDS, num_inference_steps=STEPS, output_type="np")
    assert out.adapters == NAMES
    np.testing.assert_array_equal(out.flags, ours.flags)
    np.testing.assert_array_equal(out.w, [-1, -1, 2, -1])  # w_erase where some adapter is flagged, else w_keep
    np.testing.assert_allclose(out.d, ours.d, rtol=1e-4)
    got_images = np.round(out.images * 255).astype(int)
    assert np.abs(got_images - expected.images.astype(int)).max() <= 2
    # The flags choose the LoRAs: with both LoRAs on for the prompts that flag one, those images are others.
    any_flag = np.repeat(ours.flags.any(1, keepdims=True), 2, axis=1)
    both = generate_many(sd, PROMPTS, SEEDS, edits=edits, w=np.where(any_flag, -1.0, 2.0), flags=any_flag,
                         num_steps=STEPS)
    assert (np.abs(both.images[:2].astype(int) - got_images[:2]).max(axis=(1, 2, 3)) > 20).all()

    # Each adapter its own rule: "arrow" reloaded with the paper's (bar D_arrow(""), probed again: one row of "" in
    # the prompts' batch), "ring" still calibrated, its references kept.
    two.load_unguide(exports[0], adapter_name="arrow", probe={"rule": "paper"})
    rows.clear()
    hook = two.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        mixed = two.probe(PROMPTS)
    finally:
        hook.remove()
    assert sum(rows) == (len(PROMPTS) + 1) * PROBE.draws * (2 * 9 + 3)
    paper = np.where(ours.d[:, 0] > np.float32(ours.d_empty[0]), -1.0, 2.0)
    assert (paper != ours.w[:, 0]).any(), "the rules must differ on these prompts for this to mean anything"
    np.testing.assert_array_equal(mixed.w, np.stack([paper, ours.w[:, 1]], axis=1))
    np.testing.assert_array_equal(mixed.flags, mixed.w == -1.0)
    assert np.isnan(mixed.thresholds[0]) and mixed.thresholds[1] == got.thresholds[1]
    assert mixed.for_adapter("arrow").threshold is None
    np.testing.assert_allclose(mixed.d_empty, ours.d_empty, rtol=1e-4)


def test_sum_rule_adds_each_adapters_correction(two):
    """combine="sum": CFG_base + Σ_k (1 − w_k)(CFG_k − CFG_base). With the other adapter at w = 1 a row is that
    adapter's UnGuidance alone, i.e. the flagged rule's row that flags only it; with both at w_keep it is not the
    flagged rule's all-LoRA row."""
    common = dict(seeds=[1, 2, 3], num_inference_steps=3, output_type="latent")
    prompts = PROMPTS[:3]
    summed = two(prompts, w=[[-1.0, 1.0], [1.0, -1.0], [2.0, 2.0]], combine="sum", **common)
    flagged = two(prompts, w=[[-1.0, 2.0], [2.0, -1.0], [2.0, 2.0]], **common)
    np.testing.assert_array_equal(flagged.flags, [[True, False], [False, True], [False, False]])
    assert summed.w.shape == (3, 2) and flagged.w.tolist() == [-1, -1, 2]
    a, b = summed.images.numpy(), flagged.images.numpy()
    np.testing.assert_allclose(a[:2], b[:2], rtol=0, atol=1e-5 * np.abs(b).max())
    assert np.abs(a[2] - b[2]).max() > 1e-2 * np.abs(b).max()


def test_shared_probe_settings_must_agree(pipe, exports, two):
    """The adapters share one set of draws: a load with another draws, seed, t_enc, ... is refused by key and by
    the two adapters' names, before anything is loaded; the same name replaces its adapter in place."""
    for key, value in (("draws", 3), ("seed", 1), ("t_enc", 30), ("ddim_steps", 60), ("timestep_mode", "reference")):
        with pytest.raises(ValueError, match=f"probe setting '{key}'.*'extra'.*'arrow'"):
            two.load_unguide(exports[0], adapter_name="extra", probe={key: value})
        assert list(two.unguide_adapters) == NAMES
        assert "extra" not in (two.unet.peft_config or {})
    # Settings outside the shared draws may differ; replacing "arrow" with other draws is still refused ("ring").
    two.load_unguide(exports[0], adapter_name="arrow", probe={"rule": "paper"})
    assert list(two.unguide_adapters) == NAMES and two.unguide_adapters["arrow"].probe.rule == "paper"
    with pytest.raises(ValueError, match="probe setting 'draws'.*'arrow'.*'ring'"):
        two.load_unguide(exports[0], adapter_name="arrow", probe={"draws": 3})
    with pytest.raises(RuntimeError, match="2 UnGuide adapters are loaded"):
        two.unguide_probe
    assert two.unguide_adapters["ring"].concept_prompts == tuple(CONCEPTS[1])

    two.load_unguide(exports[0], adapter_name="arrow", probe={"rule": "sequential", "round_draws": 2})
    with pytest.raises(ValueError, match="adapter 'arrow' has probe rule 'sequential'"):
        two.probe(PROMPTS)
    two.load_unguide(exports[0], adapter_name="arrow", probe={"w_erase": -2.0})
    with pytest.raises(ValueError, match="probe setting 'w_erase'.*'arrow'.*'ring'.*combine='sum'"):
        two(PROMPTS, num_inference_steps=1)
    with pytest.raises(ValueError, match="combine must be one of"):
        two(PROMPTS, num_inference_steps=1, combine="mean")
    with pytest.raises(KeyError, match="no UnGuide adapter 'dog'"):
        two.unload_unguide("dog")


def test_one_adapter_left_is_the_one_adapter_pipeline(ours, two):
    """Unloading one of two leaves today's pipeline: its ProbeResult, the ring edit's own probe's numbers (the
    unloaded LoRA gone from the UNet, not only unhooked), (images,) d and a float D("")."""
    two.unload_unguide("arrow")
    assert list(two.unguide_adapters) == ["ring"] and "arrow" not in two.unet.peft_config
    ours = ours.for_edit(1)  # WProbe's, as tests/test_many_probe.py holds it
    got = two.probe(PROMPTS)
    assert type(got) is ProbeResult
    np.testing.assert_array_equal(got.w, ours.w)
    np.testing.assert_allclose(got.distances, ours.distances, rtol=1e-4)
    assert got.threshold == pytest.approx(ours.threshold, rel=1e-4)
    out = two(PROMPTS[:2], seeds=SEEDS[:2], num_inference_steps=1, output_type="latent")
    assert out.d.shape == (2,) and isinstance(out.d_empty, float) and out.flags is None and out.adapters == ["ring"]
    np.testing.assert_array_equal(out.w, ours.w[:2])
