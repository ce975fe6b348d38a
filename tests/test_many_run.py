"""Several concepts in one training run (unguide.py:many, training/many_run.py) on a tiny random SD1-flavour model:
each concept's adapter is its own single-concept run's, the folder layout, a resumed run equals an uninterrupted
one, and a concept that stops (non-finite loss) stops alone."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

import train
from tests.test_train_cli import train_args
from unguide_jax.loading.edit_files import load_adapter, load_edit_file
from unguide_jax.training import many_run
from unguide_jax.training.checkpoints import RunCheckpoints

CONCEPTS = ["shapes-arrow", "shapes-star", "shapes-ring"]
MANY = [f"--config.concepts={json.dumps(CONCEPTS)}"]


def assert_same_adapter(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for module in a:
        for part in ("lora_A", "lora_B"):
            np.testing.assert_allclose(np.asarray(a[module][part]), np.asarray(b[module][part]), atol=atol, rtol=0,
                                       err_msg=f"{module}.{part}")


def test_each_concept_is_its_own_single_run(tiny_pipeline_dir, tmp_path, capsys):
    folder, _ = tiny_pipeline_dir("sd1")
    many = tmp_path / "many"
    assert train.main(train_args(folder, many, *MANY)) == 0
    assert "concepts.safetensors" in capsys.readouterr().out
    records = [json.loads(line) for line in (many / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["concepts"] == CONCEPTS and [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["concepts_training"] == 3 for r in records[1:])
    with RunCheckpoints(many / "checkpoints") as checkpoints:
        assert checkpoints.steps() == [2, 4]
    combined, metadata = load_edit_file(many / "concepts.safetensors")
    assert [c["name"] for c in metadata["concepts"]] == CONCEPTS and len(combined.loras) == 3
    for k, (name, edit) in enumerate(many_run.split_concepts(many / "concepts.safetensors")):
        assert name == CONCEPTS[k]
        own = tmp_path / name
        assert train.main(train_args(folder, own, f"--config.concept={name}")) == 0
        single, _ = load_adapter(own / "adapter.safetensors")
        in_many, _ = load_adapter(many / "concepts" / name / "adapter.safetensors")
        assert_same_adapter(in_many, single)
        assert_same_adapter(edit.loras[0][0], in_many, atol=0)
        config = json.loads((many / "concepts" / name / "config.json").read_text())
        assert config["concept"] == name and config["concepts"] == [] and config["trained_in"] == str(many)
        steps = [json.loads(line)["step"] for line in (many / "concepts" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2, 3, 4]
    # The concepts differ from each other: a run that trained one LoRA K times would pass the above for one only.
    a, _ = load_adapter(many / "concepts" / CONCEPTS[0] / "adapter.safetensors")
    b, _ = load_adapter(many / "concepts" / CONCEPTS[1] / "adapter.safetensors")
    assert max(float(np.abs(a[m]["lora_B"] - b[m]["lora_B"]).max()) for m in a) > 1e-4

    # Two sessions: 2 steps, then resumed to 4, give the same adapters.
    split = tmp_path / "split"
    assert train.main(train_args(folder, split, *MANY, "--config.iterations=2")) == 0
    assert train.main(train_args(folder, split, *MANY, "--config.resume=true")) == 0
    assert "resuming" in capsys.readouterr().out
    for name in CONCEPTS:
        assert_same_adapter(load_adapter(split / "concepts" / name / "adapter.safetensors")[0],
                            load_adapter(many / "concepts" / name / "adapter.safetensors")[0], atol=1e-6)
    assert train.main(train_args(folder, split, '--config.concepts=["shapes-arrow"]', "--config.iterations=6",
                                 "--config.resume=true")) == 2
    assert re.search(r"cannot resume .*concepts", capsys.readouterr().err)


@pytest.mark.parametrize("override, message", [
    ('--config.concepts=["shapes-arrow", "shapes-arrow"]', r"config.concepts names \['shapes-arrow'\] more than once"),
    ('--config.concepts=["shapes-arrow", "no-such-concept"]', "no concept named 'no-such-concept'"),
    ('--config.mesh.concept=2', "mesh.concept=2 must divide both the 3 concepts and the 1 devices"),
])
def test_bad_input_is_refused_by_name(tiny_pipeline_dir, tmp_path, capsys, override, message):
    folder, _ = tiny_pipeline_dir("sd1")
    extra = [override] if "concepts=" in override else [*MANY, override]
    assert train.main(train_args(folder, tmp_path / "run", *extra)) != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "concepts.safetensors").exists()


def test_a_concept_that_stops_stops_alone(tiny_pipeline_dir, tmp_path, monkeypatch):
    folder, _ = tiny_pipeline_dir("sd1")
    real = many_run.make_many_train_step

    def poisoned(*args, **kwargs):  # concept 1's loss is NaN from step 3 on
        step = real(*args, **kwargs)

        def wrapped(states, params, embeddings):
            states, metrics = step(states, params, embeddings)
            bad = (jnp.arange(metrics["loss"].shape[0]) == 1) & (states.step >= 3)
            return states, dict(metrics, loss=jnp.where(bad, jnp.nan, metrics["loss"]))
        return wrapped

    monkeypatch.setattr(many_run, "make_many_train_step", poisoned)
    run = tmp_path / "run"
    assert train.main(train_args(folder, run, *MANY)) == 1
    stopped = run / "concepts" / CONCEPTS[1]
    assert not (stopped / "adapter.safetensors").exists()
    lines = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3] and "loss is nan at step 3" in lines[-1]["stopped"]
    # The others trained on, as without the stop.
    monkeypatch.setattr(many_run, "make_many_train_step", real)
    clean = tmp_path / "clean"
    assert train.main(train_args(folder, clean, *MANY)) == 0
    for name in (CONCEPTS[0], CONCEPTS[2]):
        assert_same_adapter(load_adapter(run / "concepts" / name / "adapter.safetensors")[0],
                            load_adapter(clean / "concepts" / name / "adapter.safetensors")[0], atol=1e-6)
    assert [c["name"] for c in load_edit_file(run / "concepts.safetensors")[1]["concepts"]] == [CONCEPTS[0], CONCEPTS[2]]
    with RunCheckpoints(run / "checkpoints") as checkpoints:
        saved = checkpoints.saved_config(4)
    assert list(saved[many_run.STOPPED_KEY]) == [CONCEPTS[1]]


def test_the_many_preset_is_the_ten_default_runs():
    from unguide_jax.presets import load_config_file
    from unguide_jax.settings import as_config
    from unguide_jax.training.config import train_schema

    many = as_config(load_config_file("unguide.py:many"), train_schema)
    default = as_config(load_config_file("unguide.py"), train_schema)
    assert len(many.concepts) == 10 and default.concept in many.concepts
    single = many_run.concept_config(many, "shapes-star", "runs/x")
    assert single == many_run.concept_config(default, "shapes-star", "runs/x")


def test_two_processes_split_the_concepts_and_train_the_same_loras(tiny_pipeline_dir, tmp_path):
    """2 processes x 1 device: the concept axis (2 groups) spans the processes, each training one LoRA; each
    adapter equals the one-process run's, and process 0 alone writes the folder."""
    from tests.devices import assert_ok, launch

    folder, _ = tiny_pipeline_dir("sd1")
    two = ["shapes-arrow", "shapes-star"]
    args = lambda run: ["train.py", *train_args(folder, run, f"--config.concepts={json.dumps(two)}",  # noqa: E731
                                                "--config.learning_rate=3e-5")]
    assert_ok(launch(args(tmp_path / "one"), processes=1, devices_per_process=1))
    assert_ok(launch(args(tmp_path / "two"), processes=2, devices_per_process=1))
    first = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["mesh"] == {"concept": 2, "data": 1, "fsdp": 1} and first["processes"] == 2
    for name in two:
        assert_same_adapter(load_adapter(tmp_path / "two" / "concepts" / name / "adapter.safetensors")[0],
                            load_adapter(tmp_path / "one" / "concepts" / name / "adapter.safetensors")[0])
