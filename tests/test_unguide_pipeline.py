"""UnGuidePipeline (diffusers) against our JAX UnGuide sampler on the shipped model: export -> load_unguide -> the
same w per prompt, D(p) and D(""), and the same images within 2 levels of 255 from the same seeds; the calibrated
rule's threshold from the concept's target prompts in unguide.json, as our WProbe sets it."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from unguide_jax.cli.export import parse as parse_export
from unguide_jax.edits.edit import lora_edit
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
from unguide_jax.loading.exports import export_edit
from unguide_jax.loading.resolve import load_model
from unguide_jax.publishing.export import write_unguide_settings
from unguide_jax.publishing.unguide_json import (
    UNGUIDE_JSON,
    UnguideExportError,
    fingerprint_mismatches,
    read_unguide_json,
    weight_fingerprint,
)
from unguide_jax.pytorch import UnGuidePipeline
from unguide_jax.resources import EMBEDDED_MODEL

PROMPTS = ["a photo of the arrow", "a photo of the circle", "a striped star"]
SEEDS = [5, 6, 7]
STEPS = 8
# R = 2 draws keeps the probe cheap (the decisions below hold from R = 2 to 8); t_enc and the timestep mode stay the
# defaults; the paper's rule here, the calibrated rule (the default) in its own tests below. prompt_chunk 1: our
# probe then traces one shape for "", the concept's prompts and the prompts.
PROBE = ProbeConfig(draws=2, prompt_chunk=1, rule="paper")
CALIBRATED = ProbeConfig(draws=2, prompt_chunk=1, rule="calibrated")
# The random LoRA's "concept": D 86.8, 86.7, 87.4 at CFG 5.25, so the threshold √(D(concept) · D("")) is 78.9 against
# D("") 71.6; the four prompts (D 86.9, 51.0, 73.1, 81.9) get w -1, 2, 2, -1 (the paper's rule: -1, 2, -1, -1).
CONCEPT = ["a photo of the arrow", "an arrow", "a sketch of the arrow"]
CALIBRATED_PROMPTS = ["a photo of the arrow", "a photo of the circle", "a photo of the star", "a photo of the ring"]
CALIBRATED_SCALES = [3.0, 7.5, 12.0, 2.0]  # the concept's prompts are probed at their median, 5.25
ALPHA = 8.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd():
    return load_model("embedded")


@pytest.fixture(scope="module")
def edit(sd):
    """A deterministic random LoRA on attn2.to_k/to_v, strong enough that the paper's rule splits these prompts
    (w = -1 for two of them, 2 for one: D(p) 87, 51, 87 against D("") 72 with the default draws' seed)."""
    init = init_lora(jax.random.key(1), sd.params["unet"],
                     LoraConfig(rank=1, alpha=ALPHA, targets="object", init="random"))
    rng = np.random.default_rng(1)
    adapter = {path: {"lora_A": np.asarray(ab["lora_A"]),
                      "lora_B": (0.05 * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
               for path, ab in init.items()}
    return lora_edit(adapter, ALPHA)


@pytest.fixture(scope="module")
def export(sd, edit, tmp_path_factory):
    """export_edit's peft export, then unguide.json as `unguide-export --probe draws=2 rule=paper` writes it."""
    folder = tmp_path_factory.mktemp("export")
    export_edit(["peft"], folder, edit, sd.unet, sd.params["unet"])
    probe = parse_export(["run", "--out", str(folder), "--probe", "draws=2", "rule=paper"]).probe
    assert probe == ProbeConfig(draws=2, rule="paper")
    write_unguide_settings(folder, sd, edit, probe, CONCEPT, cache_empty_probe=False)
    record = json.loads((folder / UNGUIDE_JSON).read_text())
    assert record["lora"]["alpha"] == ALPHA and record["probe"]["rule"] == "paper"
    assert record["concept"] == {"targets": CONCEPT}
    assert record["base_model"]["family"] == "sd" and record["base_model"]["pipeline"] == "StableDiffusionPipeline"
    return folder


@pytest.fixture(scope="module")
def calibrated_export(sd, edit, export, tmp_path_factory):
    """The same LoRA with unguide.json for the calibrated rule (the default rule, R = 2)."""
    folder = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(export, folder, dirs_exist_ok=True)
    write_unguide_settings(folder, sd, edit, ProbeConfig(draws=2), CONCEPT)
    record = json.loads((folder / UNGUIDE_JSON).read_text())
    assert record["probe"]["rule"] == "calibrated" == ProbeConfig().rule
    return folder


@pytest.fixture(scope="module")
def jax_probe(sd, edit):
    return WProbe(sd, edit, PROBE)


@pytest.fixture(scope="module")
def ours(jax_probe):
    """Our probe's D(p), D("") and w for PROMPTS."""
    return jax_probe.run(PROMPTS)


@pytest.fixture(scope="module")
def pipe():
    pipe = UnGuidePipeline.from_pretrained(str(EMBEDDED_MODEL), torch_dtype=torch.float32, safety_checker=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_reproduces_our_unguide_images_and_w(sd, edit, export, ours, pipe):
    assert len(set(ours.w.tolist())) == 2, f"the LoRA must split the prompts for the test to mean anything: {ours.w}"
    expected = sd.generate(PROMPTS, SEEDS, edit=edit, w=ours.w, num_steps=STEPS).images

    pipe.load_unguide(export)
    out = pipe(PROMPTS, seeds=SEEDS, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(out.w, ours.w)
    np.testing.assert_allclose(out.d, ours.d, rtol=1e-4)
    np.testing.assert_allclose(out.d_empty, ours.d_empty, rtol=1e-4)
    got = np.round(out.images * 255).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 2
    # UnGuidance, not the base model: w = 1 (the base alone) draws other images from the same seeds.
    base = pipe(PROMPTS, seeds=SEEDS, num_inference_steps=STEPS, output_type="np", w=1.0)
    assert np.isnan(base.d).all() and np.abs(np.round(base.images * 255) - got).max() > 20


def test_cached_empty_probe_is_used_and_saves_its_rows(sd, edit, export, ours, pipe, tmp_path):
    """D("") stored in unguide.json (``unguide-export --cache-empty-probe``) is taken as is: the probe runs the
    prompts' rows only."""
    folder = tmp_path / "cached"
    shutil.copytree(export, folder)
    write_unguide_settings(folder, sd, edit, PROBE, CONCEPT, cache_empty_probe=True)
    cached = json.loads((folder / UNGUIDE_JSON).read_text())["empty_probe"]
    assert (cached["height"], cached["width"], len(cached["distances"])) == (32, 32, PROBE.draws)
    pipe.load_unguide(folder)
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        result = pipe.probe(PROMPTS)
    finally:
        hook.remove()
    assert result.d_empty == pytest.approx(ours.d_empty, rel=1e-6)
    np.testing.assert_array_equal(result.w, ours.w)
    steps = 9  # the default probe: 9 base CFG steps from t = 981, then base and LoRA at t = 801
    assert sum(rows) == len(PROMPTS) * PROBE.draws * 2 * (steps + 1)  # no row for ""


def test_base_model_fingerprint_tolerates_half_precision_not_other_weights(pipe):
    """The same weights stored in fp16 or bf16 pass the base-model check; a 2 % change of one module's weights, or
    another module's weights, do not."""
    weights = {name: module.weight.detach().float().numpy() for name, module in pipe.unet.named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v")) and hasattr(module, "weight")}
    expected = weight_fingerprint(weights)
    for dtype in (torch.float16, torch.bfloat16):
        cast = {k: torch.from_numpy(v).to(dtype).float().numpy() for k, v in weights.items()}
        assert fingerprint_mismatches(expected, weight_fingerprint(cast)) == [], dtype
    first, second = sorted(weights)[:2]
    changed = dict(weights, **{first: weights[first] * 1.02})
    assert fingerprint_mismatches(expected, weight_fingerprint(changed)) == [first]
    rng = np.random.default_rng(0)
    resampled = dict(weights, **{second: rng.permutation(weights[second].ravel()).reshape(weights[second].shape)})
    assert fingerprint_mismatches(expected, weight_fingerprint(resampled)) == [second]  # same norm, other weights


def test_load_unguide_errors_name_the_problem(export, pipe, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="holds no unguide.json"):
        pipe.load_unguide(tmp_path)
    for pair, message in (("draws=two", "--probe draws='two': cannot parse as int"),
                          ("drawz=2", "unknown config key 'probe.drawz'")):
        with pytest.raises(SystemExit):
            parse_export(["run", "--out", str(tmp_path), "--probe", pair])
        assert message in capsys.readouterr().err

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(export, wrong_shape)
    lora = wrong_shape / "diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "np") as f:
        metadata = f.metadata()
    tensors = load_file(lora)
    first = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[first] = np.zeros((tensors[first].shape[0], tensors[first].shape[1] + 1), np.float32)
    save_file(tensors, lora, metadata)
    with pytest.raises(ValueError, match="does not match this UNet.*lora_A"):
        pipe.load_unguide(wrong_shape)

    # The same LoRA on a UNet whose adapted weights differ (another model, or a fine-tune of it).
    module = pipe.unet.get_submodule(first[len("unet."):-len(".lora_A.weight")])
    layer = getattr(module, "base_layer", module)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(1.05)
    try:
        with pytest.raises(ValueError, match="base-model mismatch"):
            pipe.load_unguide(export)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)


def test_calls_check_their_arguments(export, pipe):
    pipe.load_unguide(export)
    with pytest.raises(ValueError, match="one seed per image"):
        pipe(PROMPTS, seeds=[0], w=1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="at most one of seeds, generator and latents"):
        pipe(PROMPTS, seeds=SEEDS, latents=torch.zeros(3, 8, 16, 16), w=1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPTS, height=33, w=1.0, num_inference_steps=1)
    pipe.disable_lora()
    try:
        with pytest.raises(RuntimeError, match="not active"):
            pipe(PROMPTS, w=1.0, num_inference_steps=1)
    finally:
        pipe.enable_lora()


def test_calibrated_rule_matches_our_probe(sd, edit, calibrated_export, pipe):
    """Rule calibrated: the concept's target prompts from unguide.json probed on the same draws at the median CFG
    scale of the call's prompts, w = w_erase where D(p) > √(D(concept) · D("")): the w, D(p), D(""), D(concept) and
    threshold of our WProbe; D(concept) is kept for the next calls."""
    ours = WProbe(sd, edit, CALIBRATED, concept_prompts=CONCEPT).run(CALIBRATED_PROMPTS, CALIBRATED_SCALES)
    median = float(np.median(CALIBRATED_SCALES))
    concept = WProbe(sd, edit, PROBE).run(CONCEPT, median)  # the concept's per-draw distances at that scale
    paper = WProbe(sd, edit, PROBE).run(CALIBRATED_PROMPTS, CALIBRATED_SCALES)
    np.testing.assert_array_equal(ours.w, [-1, 2, 2, -1])
    assert (ours.w != paper.w).any(), "the rules must differ on these prompts for the test to mean anything"
    assert ours.threshold == pytest.approx(np.sqrt(concept.distances.mean() * ours.d_empty), rel=1e-6)

    pipe.load_unguide(calibrated_export)
    assert pipe.unguide_probe == ProbeConfig(draws=2)
    got = pipe.probe(CALIBRATED_PROMPTS, CALIBRATED_SCALES)
    np.testing.assert_array_equal(got.w, ours.w)
    np.testing.assert_allclose(got.d, ours.d, rtol=1e-4)
    np.testing.assert_allclose(got.distances, ours.distances, rtol=1e-4)
    assert got.d_empty == pytest.approx(ours.d_empty, rel=1e-4)
    assert got.threshold == pytest.approx(ours.threshold, rel=1e-4)
    assert got.concept_guidance_scale == median
    # At the default 7.5 instead of 5.25 the concept's distances move by ~8e-4: this tolerance tells them apart.
    np.testing.assert_allclose(got.concept_distances, concept.distances, rtol=1e-4)

    # Kept: the next call probes its prompt's rows only (no "" and no concept rows), with the same threshold.
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        again = pipe.probe(CALIBRATED_PROMPTS[2:3], 7.5)
    finally:
        hook.remove()
    assert sum(rows) == CALIBRATED.draws * 2 * (9 + 1)  # 9 base CFG steps, then base and LoRA at t
    assert again.threshold == got.threshold and again.w.tolist() == [2.0]
    out = pipe(CALIBRATED_PROMPTS, guidance_scale=CALIBRATED_SCALES, num_inference_steps=1, output_type="latent")
    np.testing.assert_array_equal(out.w, ours.w)
    assert out.threshold == got.threshold


def test_calibrated_export_without_concept_targets_is_refused(sd, edit, calibrated_export, pipe, tmp_path):
    """An unguide.json of an older version (no concept, or no targets) cannot give the calibrated rule its
    reference: load_unguide says so and how to fix it; probe={"rule": "paper"} loads it with the paper's rule."""
    empty_targets, old = tmp_path / "empty_targets", tmp_path / "old"
    shutil.copytree(calibrated_export, empty_targets)
    write_unguide_settings(empty_targets, sd, edit, ProbeConfig(draws=2), [])
    assert json.loads((empty_targets / UNGUIDE_JSON).read_text())["concept"] == {"targets": []}
    shutil.copytree(calibrated_export, old)
    record = json.loads((old / UNGUIDE_JSON).read_text())
    del record["concept"], record["base_model"]["family"], record["base_model"]["pipeline"]  # not in older files
    (old / UNGUIDE_JSON).write_text(json.dumps(record))
    assert read_unguide_json(old)[0]["concept"] == {"targets": []}
    assert read_unguide_json(old)[0]["base_model"]["family"] == "sd"  # the only family then
    for folder in (empty_targets, old):
        with pytest.raises(ValueError, match="no concept target prompts") as err:
            pipe.load_unguide(folder)
        assert "unguide-export RUN --formats peft --out DIR" in str(err.value)
        assert "rule=paper" in str(err.value) and "probe={'rule': 'paper'}" in str(err.value)
        pipe.load_unguide(folder, probe={"rule": "paper"})
        assert pipe.unguide_probe == ProbeConfig(draws=2, rule="paper")

    bad = tmp_path / "bad"
    shutil.copytree(calibrated_export, bad)
    (bad / UNGUIDE_JSON).write_text(json.dumps(dict(record, concept={"targets": "a photo of the arrow"})))
    with pytest.raises(UnguideExportError, match="concept must be .*a list of strings"):
        read_unguide_json(bad)
    with pytest.raises(ValueError, match="drawz"):
        pipe.load_unguide(calibrated_export, probe={"drawz": 2})
