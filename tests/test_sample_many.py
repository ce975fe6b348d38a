"""The sample job with several UnGuide adapters as K edits (issue 38, ``config.combine``): one ManyProbe for
all of them, generate_many with its w and flags; probe.json and the manifest per edit; one adapter is the
one-edit job; bad settings are named."""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import sample
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.loading.edit_files import save_adapter

REPO = Path(__file__).resolve().parent.parent
LORA = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
PROMPTS = ["a photo of the cat", "1234", "of the"]
# Each adapter's concept: its targets are what rule calibrated (the default) sets its own bar with. The random
# LoRAs (key and numpy seed SEEDS[k]) happen to react to their own concept's prompt most, so that each prompt
# flags another set of edits (asserted below).
CONCEPTS = ({"name": "cat", "targets": ["a photo of the cat"]}, {"name": "digits", "targets": ["1234"]})
SEEDS = (0, 2, 1)
PROBE = dict(draws=2, ddim_steps=10, t_enc=7)


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    folder, _ = tiny_pipeline_dir("sd1")
    sd = load_pipeline(folder)
    root = tmp_path_factory.mktemp("many_adapters")
    files = []
    for k, (seed, concept) in enumerate(zip(SEEDS, CONCEPTS + (None,))):
        fresh = init_lora(jax.random.key(seed), sd.params["unet"], LORA)
        rng = np.random.default_rng(seed)
        adapter = {p: {"lora_A": ab["lora_A"], "lora_B": jnp.asarray(0.05 * rng.standard_normal(ab["lora_B"].shape))}
                   for p, ab in fresh.items()}
        files.append(root / f"adapter{k}.safetensors")
        save_adapter(files[-1], adapter, LORA, extra={"concept": concept} if concept else None)
    return dict(folder=folder, sd=sd, adapters=files[:2], no_concept=files[2])


def args(setup, out, adapters, *overrides):
    return ["--config", f"{REPO}/configs/sample.py", f"--config.model={setup['folder']}", "--config.num_steps=3",
            f"--config.prompts={json.dumps(PROMPTS)}", "--config.batch_size=3",
            *[f"--config.probe.{k}={v}" for k, v in PROBE.items()],
            f"--config.adapters={json.dumps([str(a) for a in adapters])}", f"--config.out_dir={out}", *overrides]


def run(setup, out, adapters, *overrides):
    assert sample.main(args(setup, out, adapters, *overrides)) == 0
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    images = np.stack([np.asarray(Image.open(Path(out) / r["file"])) for r in manifest["images"]])
    return manifest, images


@pytest.mark.parametrize("combine", ["flagged", "sum"])
def test_two_adapters_are_two_edits_with_one_probe(setup, tmp_path, capsys, combine):
    """The job's images are generate_many's with ManyProbe's w and flags, from the same seeds; probe.json and the
    manifest hold each edit's D, bar and w and the edits each prompt flags; a rerun reuses both, and another
    combine rule is other settings."""
    from unguide_jax.diffusion.many_guidance import generate_many
    from unguide_jax.erasers.unguide.many_probe import ManyProbe
    from unguide_jax.erasers.unguide.probe import ProbeConfig
    from unguide_jax.training.sources import load_edit

    out = tmp_path / combine
    manifest, images = run(setup, out, setup["adapters"], f"--config.combine={combine}")

    sd = setup["sd"]
    edits = [load_edit(a, sd.params["unet"])[0] for a in setup["adapters"]]
    result = ManyProbe(sd, edits, ProbeConfig(**PROBE), [c["targets"] for c in CONCEPTS]).run(PROMPTS)
    # Each prompt flags another set (its own concept's edit, "of the" none), so that the job's images would differ
    # from generate_many's had it probed or combined otherwise.
    assert result.flagged() == [[0], [1], []]
    expected = generate_many(sd, PROMPTS, [0] * len(PROMPTS), edits=edits, w=result.w, flags=result.flags,
                             combine=combine, num_steps=3).images
    np.testing.assert_array_equal(images, expected)

    probe = json.loads((out / "probe.json").read_text())
    assert probe["edits"] == [str(a) for a in setup["adapters"]]
    for record, expected_record in zip(manifest["images"], result.records()):
        cached = probe["prompts"][f"7.5|{record['prompt']}"]
        assert cached == expected_record
        assert len(cached["D"]) == len(cached["bar"]) == len(cached["w"]) == len(cached["D_empty"]) == 2
        assert {k: record[k] for k in ("D", "D_empty", "bar", "w", "flagged")} == {
            k: cached[k] for k in ("D", "D_empty", "bar", "w", "flagged")}
    settings = manifest["settings"]
    assert settings["combine"] == combine and settings["mode"] == "unguide"
    assert [a["concept"]["name"] for a in settings["adapters_loaded"]] == ["cat", "digits"]

    again, _ = run(setup, out, setup["adapters"], f"--config.combine={combine}")
    assert again["settings"]["images_generated"] == 0 and again["settings"]["probe_unet_rows"] == 0
    other = "sum" if combine == "flagged" else "flagged"
    capsys.readouterr()
    assert sample.main(args(setup, out, setup["adapters"], f"--config.combine={other}")) == 2
    assert "differing in combine" in capsys.readouterr().err


def test_one_adapter_is_the_one_edit_job_whatever_combine_says(setup, tmp_path):
    """combine=flagged with one adapter: the default job's probe, images (bitwise) and fingerprint."""
    merged, merged_images = run(setup, tmp_path / "merged", setup["adapters"][:1])
    flagged, flagged_images = run(setup, tmp_path / "flagged", setup["adapters"][:1], "--config.combine=flagged")
    np.testing.assert_array_equal(flagged_images, merged_images)
    assert flagged["settings"]["fingerprint"] == merged["settings"]["fingerprint"]
    assert [r["w"] for r in flagged["images"]] == [r["w"] for r in merged["images"]]
    assert all(isinstance(r["w"], float) and "flagged" not in r for r in flagged["images"])
    assert (tmp_path / "flagged" / "probe.json").read_text() == (tmp_path / "merged" / "probe.json").read_text()


@pytest.mark.parametrize("overrides, message", [
    (["--config.combine=each"], r"config.combine must be one of \('merged', 'flagged', 'flagged-mean', 'sum'\), got 'each'"),
    (["--config.combine=flagged", "--config.mode=fixed"], "config.combine must be 'merged' with mode=fixed"),
    (["--config.combine=sum", "--config.probe.rule=sequential", "--config.probe.round_draws=2"],
     "config.combine must be 'merged' with probe.rule=sequential"),
    (["--config.combine=flagged", "NO_CONCEPT"], r"config.adapters: \S*adapter2.safetensors carries no concept targets"),
])
def test_bad_combine_settings_are_named(setup, tmp_path, capsys, overrides, message):
    adapters = list(setup["adapters"])
    if "NO_CONCEPT" in overrides:
        overrides, adapters = [o for o in overrides if o != "NO_CONCEPT"], adapters + [setup["no_concept"]]
    assert sample.main(args(setup, tmp_path / "bad", adapters, *overrides)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not any((tmp_path / "bad").glob("*.png"))


@pytest.mark.slow  # 60 s on 2 cores: two processes start, load and compile
def test_two_processes_sample_the_images_of_one(setup, tmp_path):
    """combine=flagged as 2 processes x 1 device (the rows split over the mesh's data axis): the probe's flags and
    w, and the images (within one level: another row split), of one process."""
    from tests.devices import assert_ok, launch

    one, one_images = run(setup, tmp_path / "one", setup["adapters"], "--config.combine=flagged")
    two = tmp_path / "two"
    assert_ok(launch(["sample.py", *args(setup, two, setup["adapters"], "--config.combine=flagged")], processes=2,
                     devices_per_process=1))
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["settings"]["processes"] == 2 and manifest["settings"]["mesh"] == {"data": 2, "fsdp": 1}
    for record, reference, image in zip(manifest["images"], one["images"], one_images):
        assert (record["flagged"], record["w"]) == (reference["flagged"], reference["w"])
        np.testing.assert_allclose(record["D"], reference["D"], rtol=1e-4)
        written = np.asarray(Image.open(two / record["file"]), int)
        assert np.abs(written - image.astype(int)).max() <= 1, record["file"]
