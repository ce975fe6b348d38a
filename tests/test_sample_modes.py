"""sample.py with edits: base / adapter / unguide / fixed modes, adapter sources, probe records, reruns."""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.loading.edit_files import save_adapter

REPO = Path(__file__).resolve().parent.parent
LORA = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    folder, _ = tiny_pipeline_dir("sd1")
    sd = load_pipeline(folder)
    fresh = init_lora(jax.random.key(0), sd.params["unet"], LORA)
    rng = np.random.default_rng(0)
    adapter = {p: {"lora_A": ab["lora_A"], "lora_B": jnp.asarray(0.05 * rng.standard_normal(ab["lora_B"].shape))}
               for p, ab in fresh.items()}
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(root / "adapter.safetensors", adapter, LORA, extra={"concept": {"name": "cat"}})
    from unguide_jax.loading.lora_formats import export_peft

    export_peft(root / "peft", adapter, LORA.alpha, sd.params["unet"])
    return dict(folder=folder, adapter_file=root / "adapter.safetensors", peft=root / "peft")


def run(setup, out, *overrides):
    assert sample.main(run_args(setup, out, *overrides)) == 0
    return json.loads((Path(out) / "manifest.json").read_text())


def run_args(setup, out, *overrides):
    return ["--config", f"{REPO}/configs/sample.py", f"--config.model={setup['folder']}", "--config.num_steps=3",
            '--config.prompts=["a photo of the cat", "the cat", "of the"]', "--config.batch_size=2",
            "--config.probe.draws=2", "--config.probe.ddim_steps=10", "--config.probe.t_enc=7",
            "--config.probe.rule=paper",  # this adapter names its concept without targets (the default rule's need)
            f"--config.out_dir={out}", *overrides]


def test_unguide_mode_records_w_and_d_and_reruns_skip_done_images(setup, tmp_path, capsys):
    out = tmp_path / "ug"
    manifest = run(setup, out, f"--config.adapters=[\"{setup['adapter_file']}\"]")
    assert manifest["settings"]["mode"] == "unguide" and manifest["settings"]["images_generated"] == 3
    probe = json.loads((out / "probe.json").read_text())["prompts"]
    for record in manifest["images"]:
        assert record["w"] in (-1.0, 2.0)
        assert record["w"] == (-1.0 if record["D"] > record["D_empty"] else 2.0)
        assert probe[f"7.5|{record['prompt']}"]["D"] == record["D"]
    assert len({r["D_empty"] for r in manifest["images"]}) == 1
    assert manifest["settings"]["adapters_loaded"][0]["concept"] == {"name": "cat"}

    (out / manifest["images"][1]["file"]).unlink()
    again = run(setup, out, f"--config.adapters=[\"{setup['adapter_file']}\"]", "--config.batch_size=3")
    assert again["settings"]["images_generated"] == 1 and again["settings"]["images_kept"] == 2
    assert [r["w"] for r in again["images"]] == [r["w"] for r in manifest["images"]]

    assert sample.main(run_args(setup, out, f"--config.adapters=[\"{setup['adapter_file']}\"]",
                                "--config.mode=adapter")) == 2
    assert "holds images made with other settings" in capsys.readouterr().err
    overwritten = run(setup, out, f"--config.adapters=[\"{setup['adapter_file']}\"]", "--config.mode=adapter",
                      "--config.overwrite=true")
    assert overwritten["settings"]["images_generated"] == 3 and "w" not in overwritten["images"][0]


def test_fixed_w_of_one_is_the_base_model_and_zero_the_adapter(setup, tmp_path):
    """w = 1 keeps only CFG_base, w = 0 only CFG_edit: the same images as the base and adapter modes (PNGs are
    rounded to uint8, so equal up to one level)."""
    from PIL import Image

    def images(out, *overrides):
        manifest = run(setup, out, *overrides)
        return np.stack([np.asarray(Image.open(Path(out) / r["file"])).astype(int) for r in manifest["images"]])

    adapters = f"--config.adapters=[\"{setup['peft']}\"]"  # a PEFT export, imported back
    base = images(tmp_path / "base")
    edited = images(tmp_path / "adapter", adapters, "--config.mode=adapter")
    assert np.abs(base - edited).max() > 2
    assert np.abs(images(tmp_path / "w1", adapters, "--config.mode=fixed", "--config.w=1.0") - base).max() <= 1
    assert np.abs(images(tmp_path / "w0", adapters, "--config.mode=fixed", "--config.w=0.0") - edited).max() <= 1
    split = images(tmp_path / "w0split", adapters, "--config.mode=fixed", "--config.w=0.0", "--config.fused=false")
    assert np.abs(split - edited).max() <= 1


CONFIG_ERROR = 2  # a config error: one line on stderr, exit status 2


@pytest.mark.parametrize("overrides, error, message", [
    (["--config.mode=adapter"], ValueError, "mode=adapter needs config.adapters"),
    (["--config.mode=sideways"], CONFIG_ERROR, "config.mode must be one of .*, got 'sideways'"),
    (["--config.adapters=[\"/no/such/adapter.safetensors\"]"], FileNotFoundError, "missing edit source"),
    (["--config.probe.draws=0", "--config.adapters=[\"ADAPTER\"]"], CONFIG_ERROR, "config.probe.draws must be >= 1"),
])
def test_bad_modes_and_adapters_are_named(setup, tmp_path, capsys, overrides, error, message):
    overrides = [o.replace("ADAPTER", str(setup["adapter_file"])) for o in overrides]
    # Every one is bad input: one line on stderr, exit status 2 (the error types: what the library raises).
    args = ["--config", f"{REPO}/configs/sample.py", f"--config.model={setup['folder']}", "--config.prompt=a",
            f"--config.out_dir={tmp_path / 'bad'}", *overrides]
    assert sample.main(args) == CONFIG_ERROR
    assert re.search(message, capsys.readouterr().err)


def test_an_adapter_of_another_model_is_refused(setup, tmp_path, capsys):
    other = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
             {"lora_A": np.zeros((7, 1), np.float32), "lora_B": np.zeros((1, 64), np.float32)}}
    save_adapter(tmp_path / "other.safetensors", other, LORA)
    assert sample.main(run_args(setup, tmp_path / "out", f"--config.adapters=[\"{tmp_path / 'other.safetensors'}\"]")) == 2
    assert "does not fit down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in capsys.readouterr().err


def test_sequential_probe_is_the_paper_probe_on_fewer_draws(setup):
    """The sequential rule (ours) sees the same draws in the same order: with z = inf it is the paper's rule, with
    z = 0 it stops after one round; whatever it stops at, D(p) is the mean of the paper probe's first draws."""
    from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
    from unguide_jax.training.sources import load_edit

    sd = load_pipeline(setup["folder"])
    edit, _ = load_edit(setup["adapter_file"], sd.params["unet"])
    prompts = ["a photo of the cat", "of the"]
    common = dict(draws=4, ddim_steps=10, t_enc=7, prompt_chunk=2)
    paper_probe = WProbe(sd, edit, ProbeConfig(**common, rule="paper"))
    paper = paper_probe.run(prompts)
    assert list(paper.draws_used) == [4, 4]
    for z, expected_draws in ((float("inf"), 4), (0.0, 2)):
        probe = WProbe(sd, edit, ProbeConfig(**common, rule="sequential", round_draws=2, z=z))
        seq = probe.run(prompts)
        assert list(seq.draws_used) == [expected_draws] * 2
        np.testing.assert_allclose(seq.distances[:, :expected_draws], paper.distances[:, :expected_draws], rtol=1e-5)
        np.testing.assert_allclose(seq.d, paper.distances[:, :expected_draws].mean(axis=1), rtol=1e-5)
        if expected_draws == 4:
            np.testing.assert_array_equal(seq.w, paper.w)
            assert seq.d_empty == pytest.approx(paper.d_empty, rel=1e-6)
        else:
            assert probe.unet_calls < paper_probe.unet_calls


def test_calibrated_probe_thresholds_halfway_between_the_concept_and_nothing(setup):
    """Rule calibrated (ours): the same draws and D(p) as the paper's probe, a threshold √(D(concept) · D("")) from
    the edit's own targets on those draws; without concept prompts it is refused by name."""
    from unguide_jax.erasers.unguide.probe import (
        ProbeConfig,
        WProbe,
    )
    from unguide_jax.training.sources import load_edit

    sd = load_pipeline(setup["folder"])
    edit, _ = load_edit(setup["adapter_file"], sd.params["unet"])
    prompts, concept = ["a photo of the cat", "of the"], ["a photo of the cat"]
    common = dict(draws=3, ddim_steps=10, t_enc=7, prompt_chunk=1)  # one compiled shape for "", prompts, concept
    paper = WProbe(sd, edit, ProbeConfig(**common, rule="paper")).run(prompts)
    result = WProbe(sd, edit, ProbeConfig(**common, rule="calibrated"), concept_prompts=concept).run(prompts)
    np.testing.assert_allclose(result.distances, paper.distances, rtol=1e-5)
    expected = np.sqrt(paper.d[0] * paper.d_empty)  # the concept prompt is the first prompt here
    assert result.threshold == pytest.approx(expected, rel=1e-5)
    np.testing.assert_array_equal(result.w, np.where(paper.d > expected, -1.0, 2.0))
    assert result.records()[0]["threshold"] == result.threshold
    with pytest.raises(ValueError, match="needs the edit's concept prompts"):
        WProbe(sd, edit, ProbeConfig(**common, rule="calibrated"))


def test_decision_rules_by_hand():
    from unguide_jax.erasers.unguide.probe import (
        ProbeConfig,
        calibrated_threshold,
        decide,
    )

    distances = np.array([[3.0, 2.8], [0.6, 0.7], [0.5, 0.5]], np.float32)
    empty = np.array([0.5, 0.4], np.float32)
    d, w, used = decide(distances, empty, ProbeConfig(draws=2, rule="paper"))
    np.testing.assert_allclose(d, [2.9, 0.65, 0.5])
    np.testing.assert_array_equal(w, [-1, -1, -1])  # the paper: everything above D("") = 0.45
    threshold = calibrated_threshold(distances[:1], empty)
    assert threshold == pytest.approx(np.sqrt(2.9 * 0.45))
    _, w, _ = decide(distances, empty, ProbeConfig(draws=2, rule="calibrated"), threshold)
    np.testing.assert_array_equal(w, [-1, 2, 2])
    with pytest.raises(ValueError, match="needs the threshold"):
        decide(distances, empty, ProbeConfig(draws=2, rule="calibrated"))
