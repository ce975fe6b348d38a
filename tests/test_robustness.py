"""Nothing silent, nothing lost: each test is one reproduction of a way to lose work or trust (it failed on the
code before the fix): non-finite edits and images, strict JSON, run-folder ownership and locks, the divergence
guard, inputs checked before the model loads, and one-line errors with exit status 2 for bad input."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sample
import train
from unguide_jax.cli.config import Command, run_cli
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.json_files import write_json
from unguide_jax.loading.diffusers_folder import load_component
from unguide_jax.loading.edit_files import NonFiniteEdit, load_adapter, save_adapter
from unguide_jax.loading.weights import PickledWeightsRefused, read_pickle
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.training.checkpoints import RunCheckpoints
from unguide_jax.training.loop import Diverged, DivergenceGuard, MetricsLog, train_loop
from unguide_jax.training.run_folder import RunFolderBusy, lock_path, run_folder_lock

REPO = Path(__file__).resolve().parent.parent
LORA = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
BAD_INPUT = 2


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir, tmp_path_factory):
    """One tiny SD1 model folder, and adapters for it: NaN, huge (finite, diverges when sampled), truncated."""
    folder, _ = tiny_pipeline_dir("sd1")
    _, unet_params = load_component(folder / "unet", "unet")
    fresh = init_lora(jax.random.key(0), unet_params, LORA)
    root = tmp_path_factory.mktemp("robust_adapters")
    nan = {p: {"lora_A": ab["lora_A"], "lora_B": jnp.full(ab["lora_B"].shape, jnp.nan)} for p, ab in fresh.items()}
    huge = {p: {"lora_A": ab["lora_A"], "lora_B": jnp.full(ab["lora_B"].shape, 1e38)} for p, ab in fresh.items()}
    good = save_adapter(root / "good.safetensors", fresh, LORA)
    save_adapter(root / "huge.safetensors", huge, LORA)
    # Written as a file of NaNs would be by an older version (save_adapter itself now refuses them).
    from safetensors.numpy import save_file
    tensors = {f"{p}.{k}": np.asarray(v, np.float32) for p, ab in nan.items() for k, v in ab.items()}
    save_file(tensors, str(root / "nan.safetensors"), metadata={"format": "unguide-jax-lora/1", "rank": "1",
                                                                 "alpha": "8.0", "targets": "object"})
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return dict(folder=folder, root=root, fresh=fresh)


def sample_args(tiny, out, *extra):
    return ["--config", f"{REPO}/configs/sample.py", f"--config.model={tiny['folder']}", "--config.num_steps=2",
            "--config.prompt=a photo of the cat", "--config.batch_size=1", f"--config.out_dir={out}", *extra]


def train_args(tiny, preset, run_dir, *extra):
    return ["--config", f"{REPO}/configs/{preset}.py:tiny", f"--config.model={tiny['folder']}",
            f"--config.run_dir={run_dir}", *extra]


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines, err
    return lines[-1]


# --- 1. non-finite edits, images and JSON ---------------------------------------------------------------------


def test_a_nan_adapter_is_refused_when_loaded_naming_file_and_module(tiny, tmp_path, capsys):
    with pytest.raises(NonFiniteEdit, match=r"nan\.safetensors: tensor .*attn2\.to_[kv]\.lora_B holds \d+ non-finite"):
        load_adapter(tiny["root"] / "nan.safetensors")
    out = tmp_path / "out"
    assert sample.main(sample_args(tiny, out, f'--config.adapters=["{tiny["root"] / "nan.safetensors"}"]',
                                   "--config.mode=adapter")) == BAD_INPUT
    message = error_of(capsys)
    assert "nan.safetensors" in message and "lora_B" in message and "Traceback" not in message
    assert not list(out.glob("*.png"))


def test_a_trainer_cannot_save_a_non_finite_edit(tiny, tmp_path):
    bad = {p: {"lora_A": ab["lora_A"], "lora_B": ab["lora_B"].at[0, 0].set(jnp.inf)} for p, ab in tiny["fresh"].items()}
    with pytest.raises(NonFiniteEdit, match="refusing to save the adapter"):
        save_adapter(tmp_path / "adapter.safetensors", bad, LORA)
    assert not (tmp_path / "adapter.safetensors").exists()


def test_non_finite_latents_fail_naming_the_prompt_and_the_edit(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    huge = tiny["root"] / "huge.safetensors"
    assert sample.main(sample_args(tiny, out, f'--config.adapters=["{huge}"]', "--config.mode=adapter")) == 1
    message = error_of(capsys)
    assert "'a photo of the cat'" in message and "non-finite latents" in message and str(huge) in message
    assert not list(out.glob("0*.png"))  # no black image written


def test_every_json_written_is_strict(tmp_path):
    with pytest.raises(ValueError, match=r"probe\.json: prompts\.a\.D is not a finite number"):
        write_json(tmp_path / "probe.json", {"prompts": {"a": {"D": float("nan"), "w": 2.0}}})
    assert not (tmp_path / "probe.json").exists()
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(ValueError, match=r"grad_norm is not a finite number"):
        log({"step": 1, "loss": 0.5, "grad_norm": float("inf")})


# --- 2. a run folder belongs to one run ------------------------------------------------------------------------


def _fake_unguide_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", {"method": "unguide", "concept": "shapes-arrow", "learning_rate": 3e-5})
    (run_dir / "adapter.safetensors").write_bytes(b"an unguide adapter")
    (run_dir / "checkpoints" / "200").mkdir(parents=True)


def test_a_closed_form_eraser_does_not_take_over_another_run(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _fake_unguide_run(run_dir)
    assert train.main(train_args(tiny, "uce", run_dir)) == BAD_INPUT
    message = error_of(capsys)
    assert "holds another run" in message and "method 'unguide'" in message and "overwrite=true" in message
    assert (run_dir / "adapter.safetensors").read_bytes() == b"an unguide adapter"  # untouched

    # overwrite=true: replaced whole (no stale adapter or checkpoints left for sample.py to pick up).
    assert train.main(train_args(tiny, "uce", run_dir, "--config.overwrite=true")) == 0
    outputs = sorted(p.name for p in run_dir.iterdir() if p.name != "tensorboard")  # tensorboard/: with tensorboardX
    assert outputs == ["base_model.json", "config.json", "edit.safetensors", "export", "metrics.jsonl", "report.json"]
    assert json.loads((run_dir / "config.json").read_text())["method"] == "uce"
    assert not list(tmp_path.glob(".run.*"))  # no building folder or lock left behind

    # A second UCE run with other settings is refused; the same run again is fine.
    assert train.main(train_args(tiny, "uce", run_dir, "--config.uce.lam=0.1")) == BAD_INPUT
    assert "differs in uce" in error_of(capsys)
    assert train.main(train_args(tiny, "uce", run_dir)) == 0


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    lock = lock_path(run_dir)
    # A live writer (our parent process, on this host).
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}))
    assert train.main(train_args(tiny, "uce", run_dir)) == BAD_INPUT
    assert f"in use by another run: process {os.getppid()}" in error_of(capsys)
    assert not run_dir.exists()
    # A dead one: taken over with a warning, and released afterwards.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    with pytest.warns(UserWarning, match=f"taking over the stale lock .* of process {dead.pid}"):
        with run_folder_lock(run_dir):
            with pytest.raises(RunFolderBusy, match="in use by another run"):
                with run_folder_lock(run_dir):
                    pass
    assert not lock.exists()


# --- 3. divergence ---------------------------------------------------------------------------------------------


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from tests.test_checkpoints import toy_state, toy_step

    def exploding(state):
        state, metrics = toy_step(state)
        boost = jnp.where(state.step >= 9, 1e6, 1.0)  # the update of step 9 sends the adapter off
        return state.replace(adapter=jax.tree.map(lambda x: x * boost, state.adapter)), metrics

    with RunCheckpoints(tmp_path / "ck", keep=5) as checkpoints:
        log = MetricsLog(tmp_path / "metrics.jsonl")
        with pytest.raises(Diverged, match=r"norm is .* after step 9, more than divergence\.factor=20 x .*last good "
                                           r"checkpoint is step 8"):
            train_loop(toy_state(), exploding, iterations=20, checkpoint_every=4, checkpoints=checkpoints, config={},
                       log=log, progress=False, divergence=DivergenceGuard(factor=20, warmup=3))
        assert checkpoints.steps() == [4, 8]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8


def test_a_single_loss_spike_is_not_divergence_a_sustained_rise_is():
    from unguide_jax.training.loop import DivergenceWatch

    adapter = {"a": jnp.ones(3)}

    def first_problem(losses):
        watch = DivergenceWatch(DivergenceGuard(factor=20, warmup=4), adapter, start=0)
        return next(((i + 1, p) for i, loss in enumerate(losses) if (p := watch.problem(i + 1, loss, adapter))), None)

    early = [0.01, 0.005, 0.008, 0.01]
    assert first_problem(early + [0.02, 0.3, 0.01, 0.02, 0.01]) is None  # one step at 30 x the early range
    step, problem = first_problem(early + [0.9] * 6)  # the window of 4 averages (0.005 + 0.008 + 0.01 + 0.9) / 4
    assert step == 5 and "the loss averages 0.2308 over steps 2-5 (last 0.9)" in problem


def test_a_huge_learning_rate_is_stopped_and_resume_without_checkpoint_says_so(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(train_args(tiny, "unguide", run_dir, "--config.learning_rate=1e30", "--config.iterations=2",
                                 "--config.resume=true")) == 1
    captured = capsys.readouterr().err
    assert "resume=true, but" in captured and "holds no complete checkpoint: starting a new run" in captured
    assert "training diverged: the trained parameters' norm is" in captured and "after step 1" in captured
    assert not (run_dir / "adapter.safetensors").exists()


# --- 4. inputs checked before the model loads; failed runs do not stick --------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("--config.images_per_prompt=-1", "config.images_per_prompt must be > 0"),
    ("--config.height=33", "config.height must be 0 .* or a positive multiple of 8"),
    ("--config.seed=-1", r"config.seed must be in \[0, 2\*\*32\)"),
    ("--config.seed=4294967296", r"config.seed must be in \[0, 2\*\*32\)"),
    ("--config.prompts=[]", "give exactly one of prompt"),
    ("--config.prompt_file=EMPTY", "holds no prompts"),
    ("--config.csv=LATIN1", r"prompt CSV .*latin1\.csv line 3, column 6: byte 0xe9 is not UTF-8"),
    ("--config.out_dir=FILE", "config.out_dir: .* is a file, not a folder"),
])
def test_bad_sample_input_is_refused_before_the_model_loads(tmp_path, capsys, override, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.csv").write_bytes("prompt,seed\na cat,1\na caf\xe9,2\n".encode("latin-1"))
    (tmp_path / "file").write_text("not a folder")
    override = (override.replace("EMPTY", str(tmp_path / "empty.txt")).replace("LATIN1", str(tmp_path / "latin1.csv"))
                .replace("FILE", str(tmp_path / "file")))
    prompt = [] if "prompt" in override or "csv" in override else ["--config.prompt=a cat"]
    args = ["--config", f"{REPO}/configs/sample.py", f"--config.model={tmp_path / 'no-model'}",
            f"--config.out_dir={tmp_path / 'out'}", *prompt, override]
    assert sample.main(args) == BAD_INPUT  # a missing model would fail later, and differently
    assert __import__("re").search(message, error_of(capsys))
    assert not (tmp_path / "out").exists()


def test_seed_plus_images_past_2_32_is_refused():
    with pytest.raises(ValueError, match=r"config.seed \+ images_per_prompt - 1 = 4294967296 is past"):
        SampleConfig(seed=2 ** 32 - 1, images_per_prompt=2)


def test_a_failed_run_does_not_block_its_corrected_rerun_and_long_prompts_are_recorded(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_json(out / "manifest.json", {"settings": {"fingerprint": "0123456789abcdef", "status": "running"},
                                       "images": []})
    long_prompt = " ".join(["cat"] * 100)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the tokenizer's 77 tokens"):
        assert sample.main(sample_args(tiny, out, f"--config.prompt={long_prompt}")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["status"] == "done" and manifest["settings"]["prompts_truncated"] == [long_prompt]
    assert manifest["images"][0]["prompt_tokens"] == 102 and manifest["images"][0]["truncated_to"] == 77


# --- 5. messages -----------------------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_named(tiny, tmp_path, capsys):
    truncated = tiny["root"] / "truncated.safetensors"
    assert sample.main(sample_args(tiny, tmp_path / "out", f'--config.adapters=["{truncated}"]')) == BAD_INPUT
    assert f"{truncated} is not a readable safetensors file" in error_of(capsys)


def test_the_pickle_refusal_names_the_real_option(tmp_path):
    with pytest.raises(PickledWeightsRefused, match=r"--config\.allow_pickle=true"):
        read_pickle(tmp_path / "model.bin", allow_pickle=False)


def test_errors_are_one_line_and_the_traceback_only_with_debug(tmp_path, capsys, monkeypatch):
    command = Command(prog="t", summary="", default_config=f"{REPO}/configs/sample.py", schema=SampleConfig)

    def missing(config):
        raise FileNotFoundError("missing model: /x does not exist")

    def broken(config):
        raise RuntimeError("something inside")

    monkeypatch.delenv("UNGUIDE_DEBUG", raising=False)
    assert run_cli(command, [], missing) == BAD_INPUT
    assert capsys.readouterr().err == "error: missing model: /x does not exist\n"
    assert run_cli(command, [], broken) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: RuntimeError: something inside" and "--debug" in err[1] and len(err) == 2
    with pytest.raises(RuntimeError, match="something inside"):
        run_cli(command, ["--debug"], broken)
    monkeypatch.setenv("UNGUIDE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(command, [], missing)


# --- second pass: symlinked run folders, settings that are not numbers, the export command's errors ------------


def test_a_run_folder_reached_through_a_symlink_takes_the_same_lock(tmp_path):
    """Two spellings of one folder (the folder, a symlink to it) cannot both write it."""
    from unguide_jax.training.run_folder import claim_run_folder

    real = tmp_path / "c2"
    link = tmp_path / "c2link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    with claim_run_folder(real, {"method": "uce"}, trained=False) as folder:
        assert folder.root == real.resolve()
        with pytest.raises(RunFolderBusy, match="in use by another run"):
            with claim_run_folder(link, {"method": "uce"}, trained=False):
                pass


@pytest.mark.parametrize("override, key", [
    ("--config.guidance_scale=nan", "guidance_scale"),
    ("--config.guidance_scale=inf", "guidance_scale"),
    ("--config.w=nan", "w"),
    ("--config.probe.w_keep=-inf", "probe.w_keep"),
])
def test_a_setting_that_is_not_a_finite_number_is_refused_before_anything_loads(tiny, tmp_path, capsys, override, key):
    args = ["--config", f"{REPO}/configs/sample.py", f"--config.model={tiny['folder']}", "--config.prompt=a",
            f"--config.out_dir={tmp_path / 'out'}", override]
    assert sample.main(args) == BAD_INPUT
    assert error_of(capsys).startswith(f"error: config.{key} must be a finite number")
    assert not (tmp_path / "out").exists()


def test_infinity_stays_a_value_where_a_setting_means_it():
    from unguide_jax.erasers.unguide.probe import ProbeConfig
    from unguide_jax.settings import InvalidValue

    assert ProbeConfig(rule="sequential", z=float("inf")).z == float("inf")  # never stop early
    with pytest.raises(InvalidValue, match="config.z must be a finite number, got nan"):
        ProbeConfig(z=float("nan"))


def test_the_export_command_prints_one_error_line_with_exit_2(tiny, tmp_path, capsys):
    from unguide_jax.cli.export import main as export_main

    assert export_main([str(tmp_path / "no-such-run"), "--model", str(tiny["folder"]), "--out",
                        str(tmp_path / "out")]) == BAD_INPUT
    assert error_of(capsys).startswith(f"error: missing edit source: {tmp_path / 'no-such-run'}")
    (tmp_path / "results.json").write_text("[]")
    assert export_main([str(tiny["root"] / "good.safetensors"), "--model", str(tiny["folder"]), "--out", str(tmp_path / "out"),
                        "--evaluation", str(tmp_path / "results.json")]) == BAD_INPUT
    assert "results.json" in error_of(capsys)


def test_an_export_folder_holding_another_export_is_refused_unless_replaced_whole(tiny, tmp_path, capsys):
    from unguide_jax.cli.export import main as export_main

    out = tmp_path / "E"
    good = str(tiny["root"] / "good.safetensors")
    assert export_main([good, "--model", str(tiny["folder"]), "--formats", "peft", "kohya", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (out / "kohya.safetensors").is_file()
    # Another export into the same folder: refused, the first one left as it was.
    assert export_main([good, "--model", str(tiny["folder"]), "--formats", "peft", "--out", str(out)]) == BAD_INPUT
    assert error_of(capsys).startswith(f"error: --out {out} already holds files")
    assert (out / "kohya.safetensors").is_file()
    # --overwrite replaces the folder as a whole: nothing of the first export is left beside the second.
    assert export_main([good, "--model", str(tiny["folder"]), "--formats", "peft", "--out", str(out),
                        "--overwrite"]) == 0
    assert not (out / "kohya.safetensors").exists() and (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert str(out) in (out / "README.md").read_text() and ".building" not in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".E")) == []
