"""Nothing lost, nothing silent (second part): each test reproduces, as a user meets it, a way a run lost its work
or a command misled: an interrupted overwrite=true run, an export against another base model, UnGuidePipeline
arguments found wrong only after the probe, a full disk, a malicious pickle, a process of a multi-host job that
dies. Each failed on the code before its fix."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import sample
import train
from tests.devices import free_port, with_device_count
from unguide_jax.cli.export import main as export_main
from unguide_jax.training.run_folder import building_path, claim_run_folder, lock_path

REPO = Path(__file__).resolve().parent.parent
BAD_INPUT, FAILED = 2, 1


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def train_args(model, run_dir, *extra):
    return ["--config", f"{REPO}/configs/unguide.py:tiny", f"--config.model={model}", f"--config.run_dir={run_dir}",
            *extra]


def subprocess_env(**extra) -> dict:
    return dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 1), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax")),
                **extra)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    folder, _ = tiny_pipeline_dir("sd1")
    return folder


def other_model(tiny: Path, where: Path, modules=("attn2.to_k",)) -> Path:
    """A copy of the tiny model with other weights in some modules: the same shapes, another model."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny, where)
    weights = where / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    rng = np.random.default_rng(7)
    changed = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * v.std()) if any(m in k for m in modules) else v
               for k, v in tensors.items()}
    save_file(changed, str(weights))
    return where


# --- 5. an interrupted overwrite=true run --------------------------------------------------------------------------


def _killed_overwrite(tiny: Path, run_dir: Path, timeout: float = 120) -> list[int]:
    """``overwrite=true`` into a folder of another run, killed (-9) once its building folder holds a checkpoint."""
    building = building_path(run_dir.resolve())
    run = subprocess.Popen([sys.executable, "train.py", *train_args(tiny, run_dir, "--config.overwrite=true",
                                                                    "--config.iterations=1000",
                                                                    "--config.checkpoint_every=1", "--config.keep=3")],
                           cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not list(building.glob("checkpoints/*/unguide_checkpoint.json")):
            assert run.poll() is None, f"the overwrite run ended early ({run.returncode})"
            assert time.monotonic() < deadline, "no checkpoint in the building folder"
            time.sleep(0.1)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    return sorted(int(p.parent.name) for p in building.glob("checkpoints/*/unguide_checkpoint.json"))


def test_an_interrupted_overwrite_is_resumed_and_swapped_in(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "200").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "unguide", "concept": "shapes-arrow",
                                                     "learning_rate": 0.5}))
    (run_dir / "adapter.safetensors").write_bytes(b"the old run's adapter")
    steps = _killed_overwrite(tiny, run_dir)
    building = building_path(run_dir.resolve())
    assert steps and (run_dir / "adapter.safetensors").read_bytes() == b"the old run's adapter"  # untouched

    # resume=true alone: the old run in run_dir has other settings; the refusal points at the building folder.
    with pytest.warns(UserWarning, match="taking over the stale lock"):  # the killed run's
        assert train.main(train_args(tiny, run_dir, "--config.resume=true")) == BAD_INPUT
    (message,) = error_lines(capsys.readouterr().err)
    assert "trained with other settings" in message and str(building) in message
    assert "--config.overwrite=true --config.resume=true continues it" in message

    # overwrite=true resume=true: the building folder's checkpoints go on, then it replaces run_dir.
    last = steps[-1] + 2
    assert train.main(train_args(tiny, run_dir, "--config.overwrite=true", "--config.resume=true",
                                 f"--config.iterations={last}", "--config.checkpoint_every=1",
                                 "--config.keep=3")) == 0
    out, err = capsys.readouterr()
    assert f"continuing the interrupted replacement of {run_dir.resolve()}" in err
    assert f"resuming {building} from step {steps[-1]}" in out
    assert f"{run_dir.resolve()} replaced by the new run; deleted with the previous one: its checkpoint 200" in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(last + 1))  # one line per step, across the kill
    assert json.loads((run_dir / "config.json").read_text())["learning_rate"] == 1e-3
    assert (run_dir / "adapter.safetensors").read_bytes() != b"the old run's adapter"
    assert not building.exists() and not lock_path(run_dir.resolve()).exists()


def test_no_command_deletes_checkpoints_without_saying_so(tmp_path, capsys):
    """overwrite=true without resume starts over: the building folder's checkpoints are deleted, named."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"method": "uce", "concept": "a"}))
    building = building_path(root.resolve())
    for step in (50, 100):
        (building / "checkpoints" / str(step)).mkdir(parents=True)
    (building / "config.json").write_text(json.dumps({"method": "unguide", "concept": "b"}))
    with claim_run_folder(root, {"method": "unguide", "concept": "b"}, overwrite=True) as folder:
        assert folder.work == building and not (building / "checkpoints").exists()
    err = capsys.readouterr().err
    assert f"note: deleting {building}" in err and "checkpoints 50, 100" in err
    assert "--config.overwrite=true --config.resume=true" in err


# --- 6. exporting against another base model ------------------------------------------------------------------------


def test_an_export_against_another_base_model_is_refused_by_name(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    other = other_model(tiny, tmp_path / "other")
    run_dir = tmp_path / "run"
    assert train.main(train_args(model, run_dir, "--config.iterations=2", "--config.checkpoint_every=1")) == 0
    record = json.loads((run_dir / "base_model.json").read_text())
    assert record["model"] == str(model) and len(record["fingerprint"]) == len(record["modules"]) > 0
    capsys.readouterr()

    out = tmp_path / "export"
    for source in (run_dir, run_dir / "checkpoints" / "2", run_dir / "adapter.safetensors"):
        assert export_main([str(source), "--model", str(other), "--out", str(out)]) == BAD_INPUT
        (message,) = error_lines(capsys.readouterr().err)
        assert f"was trained on {str(model)!r}" in message and f"--model {other} has other weights" in message
        assert "adapted modules differ (" in message and "attn2.to_k" in message and "attn2.to_v" not in message
        assert "--allow-other-base" in message and not out.exists()

    assert export_main([str(run_dir), "--model", str(model), "--out", str(out)]) == 0
    written = json.loads((out / "unguide.json").read_text())["base_model"]["fingerprint"]
    assert written.keys() == record["fingerprint"].keys()
    assert export_main([str(run_dir), "--model", str(other), "--out", str(tmp_path / "forced"),
                        "--allow-other-base"]) == 0
    assert "warning:" in capsys.readouterr().err

    # An adapter file without its run folder: nothing to check against, said so.
    shutil.copy(run_dir / "adapter.safetensors", tmp_path / "loose.safetensors")
    assert export_main([str(tmp_path / "loose.safetensors"), "--model", str(other), "--out",
                        str(tmp_path / "loose")]) == 0
    assert "carries no record of the base model" in capsys.readouterr().err

    # The same path with other weights: a resume is refused too (the checkpoints belong to the old weights).
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", model / "unet")
    assert train.main(train_args(model, run_dir, "--config.resume=true", "--config.iterations=3")) == BAD_INPUT
    (message,) = error_lines(capsys.readouterr().err)
    assert "its checkpoints were trained on" in message and "adapted modules differ" in message


# --- 7. UnGuidePipeline checks every argument before the probe -----------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import torch

    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.lora import LoraConfig, init_lora
    from unguide_jax.erasers.unguide.probe import ProbeConfig
    from unguide_jax.loading.exports import export_edit
    from unguide_jax.loading.resolve import load_model
    from unguide_jax.publishing.export import write_unguide_settings
    from unguide_jax.pytorch import UnGuidePipeline
    from unguide_jax.resources import EMBEDDED_MODEL

    sd = load_model("embedded")
    edit = lora_edit(init_lora(jax.random.key(1), sd.params["unet"], LoraConfig(rank=1, targets="object",
                                                                                 init="random")), 8.0)
    folder = tmp_path_factory.mktemp("export")
    export_edit(["peft"], folder, edit, sd.unet, sd.params["unet"])
    write_unguide_settings(folder, sd, edit, ProbeConfig(draws=2, rule="paper"), ["an arrow"])
    pipe = UnGuidePipeline.from_pretrained(str(EMBEDDED_MODEL), torch_dtype=torch.float32, safety_checker=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_unguide(folder)
    return pipe


@pytest.mark.parametrize("arguments, named", [
    (dict(guidance_scale=float("nan")), "guidance_scale must be finite"),
    (dict(guidance_scale=[7.5, float("inf")]), "guidance_scale must be finite"),
    (dict(guidance_scale=[1.0, 2.0, 3.0]), r"guidance_scale: one value or one per prompt \(2\)"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer in"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer in"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
    (dict(seeds=[0, 1, 2]), "seeds: need one seed per image: 2 images, 3 seeds"),
    (dict(seeds=[0, -1]), r"seeds must be integers in \[0, 2\*\*32\)"),
    (dict(height=-16), "height must be a positive multiple"),
    (dict(latents=np.full((2, 4, 16, 16), np.nan, np.float32)), "latents holds 2048 non-finite values"),
    (dict(negative_prompt=["a", "b", "c"]), r"negative_prompt: one string or one per prompt \(2\)"),
    (dict(output_type="jpg"), "output_type must be one of"),
    (dict(probe_batch_size=0), "probe_batch_size must be an integer >= 1"),
    (dict(w=float("nan")), "w must be finite"),
])
def test_pipeline_arguments_are_checked_before_the_probe(pipe, monkeypatch, arguments, named):
    def probe(*args, **kwargs):
        raise AssertionError("the probe ran before the arguments were checked")

    monkeypatch.setattr(pipe, "probe", probe)
    with pytest.raises(ValueError, match=named):
        pipe(["a photo of the arrow", "a photo of the ring"], **arguments)


# --- 8. one error line naming the file ---------------------------------------------------------------------------


def _in_a_small_tmpfs(command: list[str], mount: Path, size: str, env: dict) -> subprocess.CompletedProcess:
    mount.mkdir()
    script = f"mount -t tmpfs -o size={size} none {mount} && exec \"$@\""
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", *command], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _tmpfs_works(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    return subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=8k none {probe}"],
                          capture_output=True).returncode == 0


def test_a_full_disk_names_the_checkpoint_in_one_line(tiny, tmp_path):
    if not _tmpfs_works(tmp_path):
        pytest.skip("needs unshare and a tmpfs mount in a user namespace")
    disk = tmp_path / "disk"
    result = _in_a_small_tmpfs([sys.executable, "train.py", *train_args(tiny, disk / "run", "--config.iterations=40",
                                                                        "--config.checkpoint_every=1",
                                                                        "--config.keep=40")],
                               disk, "200k", subprocess_env())
    assert result.returncode == FAILED, result.stderr[-3000:]
    (message,) = error_lines(result.stderr)
    assert message.startswith(f"error: could not write checkpoint {disk / 'run' / 'checkpoints'}/") \
        or message.startswith(f"error: could not write into the run folder {disk / 'run'}"), message
    assert "No space left on device (errno 28)" in message
    for noise in ("_SignalingThread", "Event loop is closed", "exception was never retrieved", "RESOURCE_EXHAUSTED"):
        assert noise not in result.stderr, result.stderr[-3000:]


def test_a_malicious_pickle_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this should never run",))

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    evil = model / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": Payload()}, evil)
    args = ["--config", f"{REPO}/configs/sample.py", f"--config.model={model}", "--config.prompt=a cat",
            "--config.allow_pickle=true", f"--config.out_dir={tmp_path / 'out'}", "--config.num_steps=1"]
    assert sample.main(args) == BAD_INPUT
    captured = capsys.readouterr()
    (message,) = error_lines(captured.err)
    assert str(evil) in message and "GLOBAL posix.system" in message and "weights_only=True" in message
    assert "Weights only load failed" not in captured.err and "should never run" not in captured.out


WATCHED_JOB = textwrap.dedent("""
    import sys, time
    from unguide_jax.cli.config import error_lines, exit_code_of
    from unguide_jax.parallel.hosts import broadcast_json, maybe_initialize_distributed
    from unguide_jax.parallel.supervise import report_progress

    maybe_initialize_distributed()
    try:
        for i in range(100000):
            broadcast_json({"step": i})
            report_progress(f"step {i}")
            if i == 0:
                print("running", file=sys.stderr, flush=True)
            time.sleep(0.02)
    except Exception as err:
        print("\\n".join(error_lines(err)), file=sys.stderr)
        sys.exit(exit_code_of(err))
""")


def _kill_one_of_two(tmp_path, victim: int) -> tuple[int, float, str, list]:
    """WATCHED_JOB on 2 processes; once the survivor runs, process ``victim`` is killed (-9). Returns the
    survivor's exit status, seconds from the kill to its exit, its stderr, and the processes."""
    survivor = 1 - victim
    (tmp_path / "job.py").write_text(WATCHED_JOB)
    port = free_port()
    processes = []
    for i in range(2):
        env = subprocess_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                             PYTHONPATH=str(REPO))
        env.pop("UNGUIDE_DEBUG", None)  # debugging turns the supervisor of processes > 0 off
        processes.append(subprocess.Popen([sys.executable, str(tmp_path / "job.py")], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{i}.err", "w")))
    watched = tmp_path / f"{survivor}.err"
    try:
        deadline = time.monotonic() + 60
        while "running" not in watched.read_text():
            assert processes[survivor].poll() is None, watched.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        processes[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = processes[survivor].wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return status, took, watched.read_text(), processes


def test_when_a_process_dies_the_others_stop_with_one_line_naming_it(tmp_path):
    """Process 1 of 2 is killed (-9) mid-job: process 0 stops at once with exit status 1 and one error line naming
    process 1 (before: the collectives' socket error, then, at exit, 100 s of waiting for the dead process and a
    C++ abort, status 134)."""
    status, took, stderr, processes = _kill_one_of_two(tmp_path, victim=1)
    assert status == FAILED and took < 10, (status, took, stderr[-3000:])
    (message,) = error_lines(stderr)
    assert f"process 1 (pid {processes[1].pid} on " in message and ") of 2 stopped" in message
    assert "cannot go on without it after step " in message  # and the last step it completed
    assert "Check failure stack trace" not in stderr


def test_when_the_coordinator_dies_the_others_stop_with_one_line_naming_it(tmp_path):
    """Process 0 of 2, the coordinator, is killed (-9) mid-job: process 1 stops with exit status 1 and one error line
    naming process 0 (before: jaxlib's coordination agent aborted it from a C++ thread, status 134 and a C++ stack
    dump; now a supervising parent, parallel/supervise.py, holds the dump back and says it in one line)."""
    status, took, stderr, _ = _kill_one_of_two(tmp_path, victim=0)
    assert status == FAILED and took < 10, (status, took, stderr[-3000:])
    (message,) = error_lines(stderr)
    assert "process 0 (" in message and ("the coordinator" in message or ") of 2 stopped" in message), message
    if "the coordinator" in message:  # the supervisor's line names the last step the job completed
        assert "the job stopped after step " in message, message
    assert "Check failure stack trace" not in stderr and "Terminating process" not in stderr, stderr[-3000:]
