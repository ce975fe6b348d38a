"""sample.py end to end, and the config machinery shared by the CLIs: presets, overrides, typed settings
(``unguide_jax.settings``), --help, --print-config and one-line config errors."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
import train
from unguide_jax.cli.config import apply_overrides, parse_cli
from unguide_jax.cli.sample import sample_or_evaluate
from unguide_jax.presets import load_config_file, resolve_config_file
from unguide_jax.resources import packaged_configs
from unguide_jax.sampling.prompts import read_csv_requests
from unguide_jax.settings import ConfigError, ConfigKeyError, as_config, to_dict
from unguide_jax.shapes.recipe_config import RecipeConfig
from unguide_jax.training.config import UnguideTrainConfig, train_schema

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
    config = parse_cli(["--config", f"{REPO}/configs/sample.py:smoke", "--config.num_steps=3"], "unused",
                       sample_or_evaluate)
    assert config.create_random_model is True and config.num_steps == 3
    with pytest.raises(ConfigError, match="unknown argument"):
        parse_cli(["--steps=3"], f"{REPO}/configs/sample.py", sample_or_evaluate)
    with pytest.raises(ConfigError, match="missing config file"):
        parse_cli(["--config", "nope.py"], "unused", sample_or_evaluate)


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


def test_sample_cli_rejects_conflicting_inputs(tiny_pipeline_dir, tmp_path, capsys):
    folder, _ = tiny_pipeline_dir("sd1")
    assert sample.main(["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", "--config.prompt=a",
                        "--config.prompt_file=x.txt", f"--config.out_dir={tmp_path}"]) == 2
    assert "error: give exactly one of prompt" in capsys.readouterr().err


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


def test_unknown_evaluator_is_an_error(tiny_pipeline_dir, tmp_path, capsys):
    folder, _ = tiny_pipeline_dir("sd1")
    assert sample.main(["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", "--config.prompt=a",
                        "--config.num_steps=1", "--config.evaluator=clip", f"--config.out_dir={tmp_path}"]) == 2
    assert "config.evaluator must be one of ('', 'embedded'), got 'clip'" in capsys.readouterr().err


# --- typed configs and the shared command line ------------------------------------------------------

PRESETS = {  # config file -> (schema chooser, its presets)
    "unguide": (train_schema, ["default", "tiny", "sd15-object", "sd15-nudity", "many", "embedded-nudity", "sdxl-object"]),
    "learnable_prompts": (train_schema, ["default", "tiny", "sd15-object", "sd15-nudity", "embedded-nudity"]),
    "pure": (train_schema, ["default", "tiny", "sd15-object", "embedded-nudity"]),
    "uce": (train_schema, ["default", "tiny", "sd15-object", "embedded-nudity"]),
    "sample": (sample_or_evaluate, ["default", "embedded", "smoke", "many", "sdxl"]),
    "evaluate": (sample_or_evaluate, ["default", "all-classes", "held-out", "compare", "robustness", "robustness-i2p", "tiny", "i2p",
                                     "sd14-table1", "sd14-i2p", "retention", "many"]),
    "embedded": (RecipeConfig, ["default", "tiny", "continued", "ninth", "twelfth"]),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_records_json_that_validates_back(name):
    """A preset's dict (only what differs from the defaults) validates into its settings class, which records
    (to_dict, what run folders keep) every key, and that record validates back to the same settings; the default
    preset is the class's defaults."""
    schema, presets = PRESETS[name]
    for preset in presets:
        raw = load_config_file(f"{name}.py:{preset}")
        config = as_config(raw, schema)
        record = to_dict(config)
        assert as_config(json.loads(json.dumps(record)), schema) == config, (name, preset)
        assert as_config(config, schema) is config  # a typed config passes through
        if preset == "default":
            assert config == type(config)(), name


def test_a_partial_sub_config_keeps_the_jobs_own_defaults():
    """learnable prompts' objective defaults to ESD's (start guidance 3, η 1): a preset that sets only ddim_steps
    keeps them, rather than falling back to the objective class's UnGuide values."""
    tiny = as_config(load_config_file("learnable_prompts.py:tiny"), train_schema)
    assert (tiny.objective.ddim_steps, tiny.objective.start_guidance, tiny.objective.negative_guidance) == (4, 3.0, 1.0)
    evaluate_tiny = as_config(load_config_file("evaluate.py:tiny"), sample_or_evaluate)
    assert evaluate_tiny.probe.draws == 2 and evaluate_tiny.probe.prompt_chunk == 16  # the evaluation's own chunk


def test_help_lists_every_key_with_its_value_and_doc(capsys):
    assert train.main(["--config", "unguide.py:tiny", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: unguide-train" in out and "schema UnguideTrainConfig" in out
    for field in dataclasses.fields(UnguideTrainConfig):
        assert f"\n  {field.name}" in out, field.name
    assert '  lora.rank = 1\n      LoRA rank' in out
    assert '  iterations = 4\n' in out  # the tiny preset's value
    assert '  variant = ""\n      diffusers weight variant' in out
    assert sample.main(["--config", "evaluate.py", "-h"]) == 0
    out = capsys.readouterr().out
    assert "schema EvaluateConfig" in out and "  attack.settings.prefix_tokens = 3\n" in out


def test_plain_script_help():
    """``python train.py --help`` (the default config, overrides shown) exits 0."""
    done = subprocess.run([sys.executable, "train.py", "--help", "--config.lora.rank=2"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "  lora.rank = 2\n" in done.stdout and "configs/unguide.py" in done.stdout
    # (a config error's one line and exit status 2: test_a_config_error_is_one_line_naming_the_key_and_exit_2)


@pytest.mark.parametrize("args, message", [
    (["--config.stepz=3"], "error: unknown config key 'stepz'"),
    (["--config.iterations=many"], "error: --config.iterations='many': cannot parse as int"),
    (["--config.iterations=0"], "error: config.iterations must be > 0, got 0"),
    (['--config.lora={"rank": "two"}'], "error: config.lora.rank: expected int, got 'two' (str)"),
    (["--config.dtype=float64"], "error: config.dtype must be one of ('float32', 'bfloat16'), got 'float64'"),
    (["--config", "nope.py"], "error: --config: missing config file 'nope.py'"),
    (["--config", "unguide.py:sd99"], "error: --config unguide.py:sd99: unknown preset 'sd99'"),
    (["--config.method=esd"], "error: config.method must be one of"),
    (["--steps=3"], "error: unknown argument '--steps=3'"),
])
def test_a_config_error_is_one_line_naming_the_key_and_exit_2(capsys, args, message):
    assert train.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(message), captured.err


def test_print_config_and_sub_config_merge(capsys):
    assert train.main(["--config", "unguide.py:tiny", '--config.lora={"rank": 2}', "--config.objective.ddim_steps",
                       "6", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    merged = {"rank": 2, "alpha": 8.0, "targets": "object", "init": "random"}
    assert printed["lora"] == merged  # merged: alpha, targets, init kept
    assert printed["objective"]["ddim_steps"] == 6 and printed["iterations"] == 4
    expected = to_dict(as_config(load_config_file("unguide.py:tiny"), train_schema))
    expected["lora"], expected["objective"] = merged, dict(expected["objective"], ddim_steps=6)
    assert printed == expected
    # a free-form dict is replaced, not merged; null for an optional value
    assert train.main(["--config", "pure.py", "--config.pure.retain_energy=null", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["pure"]["retain_energy"] is None
    from unguide_jax.cli.recipe import main as recipe_main

    assert recipe_main(["--config", "embedded.py:seventh", '--config.diffusion.class_weights={"cross": 3}',
                        "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["diffusion"]["class_weights"] == {"cross": 3.0}


def test_config_files_resolve_as_paths_or_packaged_preset_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout: only the packaged presets are found by name
    packaged = packaged_configs() / "unguide.py"
    for name in ("unguide.py", "unguide", "configs/unguide.py"):
        assert resolve_config_file(name) == packaged
    assert load_config_file("unguide:tiny")["iterations"] == 4
    own = tmp_path / "mine.py"
    own.write_text("def get_config(preset):\n    return dict(method='uce', model='m', run_dir='r', preset=preset)\n")
    assert resolve_config_file("mine.py") == Path("mine.py")
    assert load_config_file("mine.py:x")["preset"] == "x"
    (tmp_path / "sample.py").write_text("print('not a config')\n")  # like the repository's sample.py wrapper
    assert resolve_config_file("sample.py") == packaged_configs() / "sample.py"
    with pytest.raises(ConfigError, match="missing config file 'nothing'"):
        resolve_config_file("nothing")


def test_the_sample_fingerprint_is_unchanged():
    """The images' fingerprint (manifest.json) of the same settings as before typed configs: reruns of existing
    out_dirs keep their images. (All three changed when the model's content fingerprint joined the settings, issue
    37: images an older release made are regenerated once; they depend on the embedded model's bytes.)"""
    from unguide_jax.sampling.run import _fingerprint, image_settings

    config = parse_cli(["--config", "sample.py:embedded"], "sample.py", sample_or_evaluate)
    assert _fingerprint(image_settings(config, "base")) == "b1121cd0f70a90c2"
    assert _fingerprint(image_settings(config, "unguide")) == "65148fe9ba6e1590"
    assert _fingerprint(image_settings(config, "fixed")) == "ef381f27da7d37f4"
    fp16 = dataclasses.replace(config, variant="fp16")  # a new key counts once it is set
    assert _fingerprint(image_settings(fp16, "base")) != "b1121cd0f70a90c2"


def test_jobs_take_a_dict_or_the_typed_config():
    raw = load_config_file("unguide.py:tiny")
    typed = as_config(raw, train_schema)
    assert isinstance(typed, UnguideTrainConfig) and typed.lora.rank == 1
    with pytest.raises(ConfigKeyError, match="unknown config key 'lora.dropout'"):
        as_config(dict(raw, lora=dict(raw["lora"], dropout=0.1)), train_schema)
    with pytest.raises(ConfigError, match=r"config.prompt.tokens: expected int, got 2.5"):
        as_config(dict(load_config_file("learnable_prompts.py"), prompt={"tokens": 2.5}), train_schema)
    # older records (a checkpoint's config) may lack keys (defaults) or hold ones since removed (strict=False)
    old = {k: v for k, v in to_dict(typed).items() if k not in ("variant", "revision")}
    assert as_config(dict(old, retired_key=1), train_schema, strict=False) == typed
