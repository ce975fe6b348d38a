"""train.py end to end on a tiny random SD1-flavour model: the run folder, resume == uninterrupted,
and bad input that stops before any training with a message naming the problem."""
import importlib.util
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from tests.test_tensorboard import logged_scalars, read_event_files, shown_scalars
from unguide_jax.edits.lora import LoraConfig
from unguide_jax.loading.edit_files import load_adapter, read_adapter_metadata
from unguide_jax.training.checkpoints import RunCheckpoints

REPO = Path(__file__).resolve().parent.parent
TINY = f"{REPO}/configs/unguide.py:tiny"
HAS_TENSORBOARDX = importlib.util.find_spec("tensorboardX") is not None  # the test extra installs it


def train_args(folder, run_dir, *extra):
    return ["--config", TINY, f"--config.model={folder}", f"--config.run_dir={run_dir}", *extra]


def test_run_folder_and_a_resumed_run_matches_an_uninterrupted_one(tiny_pipeline_dir, tmp_path, capsys):
    folder, _ = tiny_pipeline_dir("sd1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(train_args(folder, straight, '--config.export=["peft", "kohya", "merged_unet"]')) == 0
    assert "wrote" in capsys.readouterr().out

    config = json.loads((straight / "config.json").read_text())
    assert config["model"] == str(folder) and config["iterations"] == 4
    assert config["export"] == ["peft", "kohya", "merged_unet"]
    assert config["derived"] == {"transfer": "none", "learning_rate": 1e-3, "paper_learning_rate": 1e-3}  # tiny: as given
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["lora_modules"] == 8  # attn2.to_k/to_v of 4 transformer blocks
    steps = records[1:]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["t_enc"] in range(4) and r["t"] in range(1000) for r in steps)
    with RunCheckpoints(straight / "checkpoints") as checkpoints:
        assert checkpoints.steps() == [2, 4]  # checkpoint_every=2, keep=2
    adapter, lora_config = load_adapter(straight / "adapter.safetensors")
    assert lora_config == LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    assert len(adapter) == 8 and all(np.abs(ab["lora_B"]).max() > 0 for ab in adapter.values())  # it trained
    metadata = read_adapter_metadata(straight / "adapter.safetensors")
    assert metadata["steps"] == 4 and metadata["concept"]["name"] == "shapes-arrow"
    assert (straight / "export" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert (straight / "export" / "kohya.safetensors").is_file()
    assert (straight / "export" / "unet" / "config.json").is_file()
    if HAS_TENSORBOARDX:  # TensorBoard shows what metrics.jsonl holds, step for step
        assert shown_scalars(straight / "tensorboard") == logged_scalars(straight)
    # sample.py's adapter loader reads the Orbax checkpoint too: the same adapter as the final file.
    from unguide_jax.loading.diffusers_folder import load_component
    from unguide_jax.training.sources import load_edit

    _, unet_params = load_component(folder / "unet", "unet")
    edit, info = load_edit(straight / "checkpoints" / "4", unet_params)
    assert info[0]["steps"] == 4 and float(edit.loras[0][1]) == 8.0
    for module, ab in adapter.items():
        np.testing.assert_array_equal(np.asarray(edit.loras[0][0][module]["lora_B"]), ab["lora_B"])
    # Exported later from the checkpoint: the same PEFT file as the run's own export.
    from safetensors.numpy import load_file

    from unguide_jax.cli.export import main as export_main

    assert export_main([str(straight / "checkpoints" / "4"), "--model", str(folder), "--formats", "peft",
                        "--out", str(tmp_path / "later")]) == 0
    later = load_file(tmp_path / "later" / "diffusers" / "pytorch_lora_weights.safetensors")
    own = load_file(straight / "export" / "diffusers" / "pytorch_lora_weights.safetensors")
    assert later.keys() == own.keys() and all(np.array_equal(later[k], own[k]) for k in own)

    # The same run in two sessions: 2 steps, then resumed to 4 from the step-2 checkpoint.
    assert train.main(train_args(folder, split, "--config.iterations=2")) == 0
    assert train.main(train_args(folder, split, "--config.iterations=4")) == 2  # bad input: one line, status 2
    assert re.search("already holds checkpoints.*resume=true", capsys.readouterr().err)
    assert train.main(train_args(folder, split, "--config.iterations=4", "--config.resume=true")) == 0
    assert "resuming" in capsys.readouterr().out
    resumed, _ = load_adapter(split / "adapter.safetensors")
    for module, ab in adapter.items():
        for part in ("lora_A", "lora_B"):
            np.testing.assert_allclose(resumed[module][part], ab[part], atol=1e-6, rtol=0)
    assert [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    if HAS_TENSORBOARDX:  # two events files; the resumed one opens with a purge mark at step 3
        assert len(read_event_files(split / "tensorboard")) == 2
        assert shown_scalars(split / "tensorboard") == logged_scalars(split)

    assert train.main(train_args(folder, split, "--config.iterations=6", "--config.resume=true",
                                 "--config.learning_rate=0.5")) == 2
    assert re.search(r"cannot resume .*learning_rate: 0\.001 -> 0\.5", capsys.readouterr().err)


CONFIG_ERROR = 2  # a config error: one line on stderr, exit status 2


@pytest.mark.parametrize("override, error, message", [
    ("--config.concept={bad_concept}", ValueError, "unknown field.* colour"),
    ("--config.concept=no-such-concept", FileNotFoundError, "no concept named 'no-such-concept'"),
    ("--config.lora.targets=attn9", ValueError, "'attn9' .* matches no layer"),
    ('--config.export=["onnx"]', CONFIG_ERROR, r"unknown export format\(s\) \['onnx'\]"),
    ("--config.iterations=0", CONFIG_ERROR, "config.iterations must be > 0"),
    ("--config.learning_rate=nan", CONFIG_ERROR, "config.learning_rate must be a finite number, got nan"),
    ("--config.objective.timestep_mode=exact", CONFIG_ERROR, "timestep_mode must be one of"),
])
def test_bad_input_stops_before_training_and_names_the_problem(tiny_pipeline_dir, tmp_path, capsys, override, error,
                                                               message):
    folder, _ = tiny_pipeline_dir("sd1")
    bad_concept = tmp_path / "bad.json"
    bad_concept.write_text(json.dumps({"name": "x", "targets": ["a cat"], "references": ["a dog"], "colour": "red"}))
    args = train_args(folder, tmp_path / "run", override.format(bad_concept=bad_concept))
    # Every one is bad input: one line on stderr, exit status 2 (the error types: what the library raises).
    assert train.main(args) == CONFIG_ERROR
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_missing_model_folder_and_unknown_keys_are_errors(tmp_path, capsys):
    assert train.main(train_args(tmp_path / "nope", tmp_path / "run")) == CONFIG_ERROR
    assert f"error: missing model: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert train.main(train_args(tmp_path, tmp_path / "run", "--config.lora.dropout=0.1")) == CONFIG_ERROR
    assert "unknown config key 'lora.dropout'" in capsys.readouterr().err
    assert train.main(["--config", f"{REPO}/configs/unguide.py:sd99"]) == CONFIG_ERROR
    assert "unknown preset 'sd99'" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["default", "paper", "tiny", "sd15-object", "sd15-nudity"])
def test_presets_name_existing_concepts_and_target_rules(preset):
    from unguide_jax.edits.lora import TARGET_RULES
    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.erasers.unguide.objective import ObjectiveConfig
    from unguide_jax.presets import load_config_file
    from unguide_jax.settings import as_config, to_dict
    from unguide_jax.training.config import train_schema

    config = to_dict(as_config(load_config_file(f"{REPO}/configs/unguide.py:{preset}"), train_schema))
    load_concept(config["concept"])
    ObjectiveConfig(**config["objective"])
    assert config["lora"]["targets"] in TARGET_RULES
    assert jax.tree.leaves(config)  # a plain nested dict of values
    # The paper's settings exactly on SD 1.x and in the paper preset; the embedded default transfers them.
    paper = preset in ("paper", "sd15-object", "sd15-nudity", "tiny")
    assert (config["transfer"], config["lora"]["init"]) == (("none", "random") if paper else ("kv_scale", "concept"))
    # ... and the authors' timesteps, except in the test preset and the embedded default.
    authors = preset in ("paper", "sd15-object", "sd15-nudity")
    assert config["objective"]["timestep_mode"] == ("reference" if authors else "corrected")
    assert (config["learning_rate"], config["lora"]["rank"], config["lora"]["alpha"]) == (
        (1e-3 if preset == "tiny" else 3e-5), 1, 8.0)
