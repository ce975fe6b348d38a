"""sample.py end to end, and the config-file/override machinery shared by the CLIs."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from unguide_jax.cli.config import ConfigKeyError, apply_overrides, parse_cli
from unguide_jax.diffusion.prompts import read_csv_requests

REPO = Path(__file__).resolve().parent.parent


def test_overrides_parse_to_the_existing_type_and_reject_unknown_keys():
    base = {"steps": 50, "scale": 7.5, "name": "x", "flag": False, "seeds": [1, 2], "model": {"dim": 4}}
    out = apply_overrides(base, {"steps": "20", "scale": "3", "flag": "true", "seeds": "[5]", "model.dim": "8"})
    assert out == {"steps": 20, "scale": 3.0, "name": "x", "flag": True, "seeds": [5], "model": {"dim": 8}}
    assert base["steps"] == 50  # the input is not modified
    with pytest.raises(ConfigKeyError, match="unknown config key 'stepz'"):
        apply_overrides(base, {"stepz": "1"})
    with pytest.raises(ConfigKeyError, match="unknown config key 'model.width'"):
        apply_overrides(base, {"model.width": "1"})
    with pytest.raises(ValueError, match="cannot parse as int"):
        apply_overrides(base, {"steps": "many"})


def test_parse_cli_reads_presets_and_overrides():
    config = parse_cli(["--config", f"{REPO}/configs/sample.py:smoke", "--config.num_steps=3"], "unused")
    assert config["create_random_model"] is True and config["num_steps"] == 3
    with pytest.raises(ValueError, match="unknown argument"):
        parse_cli(["--steps=3"], f"{REPO}/configs/sample.py")
    with pytest.raises(FileNotFoundError, match="missing config file"):
        parse_cli(["--config", "nope.py"], "unused")


def test_i2p_csv_layout(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,categories,nudity_percentage,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height\n"
        '"a cat, sitting",sexual,0.0,42,7,64,32\n'
        "a dog,,0.0,,,,\n"
    )
    rows = read_csv_requests(csv, default_guidance=7.5, default_seed=100)
    assert [(r.prompt, r.seed, r.guidance_scale, r.width, r.height) for r in rows] == [
        ("a cat, sitting", 42, 7.0, 64, 32), ("a dog", 101, 7.5, None, None)]
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        read_csv_requests(tmp_path / "bad.csv", 7.5)


def test_sample_cli_writes_pngs_grid_and_manifest(tiny_pipeline_dir, tmp_path):
    folder, _ = tiny_pipeline_dir("sd1")
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance\na photo of the cat,5,3.0\nthe cat,6,9.0\nof the,7,\n")
    out = tmp_path / "out"
    assert sample.main(["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", f"--config.csv={csv}",
                        "--config.num_steps=3", "--config.batch_size=2", f"--config.out_dir={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["prompt"], r["seed"], r["guidance_scale"]) for r in manifest["images"]] == [
        ("a photo of the cat", 5, 3.0), ("the cat", 6, 9.0), ("of the", 7, 7.5)]
    assert manifest["settings"]["num_steps"] == 3 and manifest["settings"]["versions"]["jax"]
    for record in manifest["images"]:
        assert np.asarray(Image.open(out / record["file"])).shape == (32, 32, 3)
    assert Image.open(out / "grid.png").size[0] > 32


def test_smoke_preset_builds_a_random_model_and_samples(tmp_path):
    out = tmp_path / "smoke"
    sample.main(["--config", f"{REPO}/configs/sample.py:smoke", f"--config.model={tmp_path / 'model'}",
                 f"--config.out_dir={out}", "--config.num_steps=2", "--config.images_per_prompt=1"])
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 4


def test_sample_cli_rejects_conflicting_inputs(tiny_pipeline_dir, tmp_path):
    folder, _ = tiny_pipeline_dir("sd1")
    with pytest.raises(ValueError, match="exactly one of prompt"):
        sample.main(["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", "--config.prompt=a",
                     "--config.prompt_file=x.txt", f"--config.out_dir={tmp_path}"])


def test_embedded_preset_samples_the_shipped_model_and_classifies_its_images(tmp_path, capsys):
    out = tmp_path / "embedded"
    assert sample.main(["--config", f"{REPO}/configs/sample.py:embedded", f"--config.out_dir={out}",
                        "--config.num_steps=10", "--config.images_per_prompt=1", "--config.batch_size=10"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 10 and (out / "grid.png").is_file()
    first = manifest["images"][0]
    assert first["prompted_class"] == "circle" and first["predicted_class"] and first["predicted_style"]
    evaluation = manifest["settings"]["evaluation"]
    assert evaluation["images_naming_a_class"] == 10
    assert f"{evaluation['classified_as_prompted']} of 10 images" in capsys.readouterr().out


def test_unknown_evaluator_is_an_error(tiny_pipeline_dir, tmp_path):
    folder, _ = tiny_pipeline_dir("sd1")
    with pytest.raises(ValueError, match="unknown evaluator 'clip'"):
        sample.main(["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", "--config.prompt=a",
                     "--config.num_steps=1", "--config.evaluator=clip", f"--config.out_dir={tmp_path}"])
