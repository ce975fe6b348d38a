"""Multi-host jobs, run as several processes on this machine (``jax.distributed`` over localhost, gloo
collectives on the CPU): each process sees its own 2 CPU devices, and the job uses the first of each
(``parallel.mesh.job_devices``: several devices of one CPU process compute wrong values).

Training: the default UnGuide settings give the same adapter (<= 1e-5) on 1 device and on 2 processes
x 2 devices, across a stop after the step-2 checkpoint and a resume on 2 processes; the run folder's
files are written once.
Sampling: 2 processes x 2 devices draw the images and make the w decisions of 1 process.
Start-up: processes with different configs stop with an error naming the difference; an unreachable
coordinator ends in a clear error within the timeout.
"""
import json

import numpy as np
import pytest
from PIL import Image

from tests.devices import assert_ok, free_port, launch
from unguide_jax.loading.edit_files import load_adapter


def train_args(folder, run_dir, *more):
    # The default preset's learning rate (the tiny preset's 1e-3 lets Adam, which normalises each
    # gradient element, turn a reduction-order difference of a near-zero gradient into ~1e-5).
    return ["train.py", "--config", "configs/unguide.py:tiny", f"--config.model={folder}", f"--config.run_dir={run_dir}",
            "--config.learning_rate=3e-5", *more]


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir, tmp_path_factory):
    """The shipped UnGuide preset's settings on the tiny model: on 1 device, and on 2 processes x 2
    devices (the job uses one device per process; the mesh derives itself: 1 x 2 fsdp), stopped after the step-2 checkpoint,
    then resumed to step 4 on 2 processes."""
    folder, _ = tiny_pipeline_dir("sd1")
    root = tmp_path_factory.mktemp("multihost")
    one = root / "one-device"
    assert_ok(launch(train_args(folder, one), processes=1, devices_per_process=1))
    two = root / "two-processes"
    first = launch(train_args(folder, two, "--config.iterations=2"), processes=2, devices_per_process=2)
    assert_ok(first)
    resumed = launch(train_args(folder, two, "--config.resume=true", '--config.export=["peft"]'), processes=2,
                     devices_per_process=2)
    assert_ok(resumed)
    return one, two, first, resumed


def assert_same_adapter(run_dir, reference_dir):
    reference, _ = load_adapter(reference_dir / "adapter.safetensors")
    adapter, _ = load_adapter(run_dir / "adapter.safetensors")
    assert adapter.keys() == reference.keys()
    for module, ab in reference.items():
        for part in ("lora_A", "lora_B"):
            np.testing.assert_allclose(adapter[module][part], ab[part], atol=1e-5, err_msg=f"{module}.{part}")
    assert max(float(np.abs(ab["lora_B"]).max()) for ab in reference.values()) > 1e-6  # it trained


def test_the_default_unguide_config_trains_the_same_adapter_on_one_device_and_on_two_processes(trained):
    """The same adapter on 1 device and on 2 processes x 2 devices, across a resume (<= 1e-5)."""
    one, two, _, _ = trained
    for run_dir, devices, processes in ((one, 1, 1), (two, 2, 2)):
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert first["devices"] == devices and first["processes"] == processes
        assert first["mesh"] == {"data": 1, "fsdp": devices}
    assert_same_adapter(two, one)


def test_the_main_process_writes_the_run_folder_once(trained):
    _, two, first, resumed = trained
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # once each: one writer, resumed after step 2
    assert (two / "export" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((two / "config.json").read_text())["iterations"] == 4
    for results in (first, resumed):  # one progress bar, on process 0
        assert "step/s" in results[0].stderr and "step/s" not in results[1].stderr
    assert "resuming" in resumed[0].stdout


def test_two_processes_sample_the_images_of_one(trained, tiny_pipeline_dir, tmp_path):
    """The unguide mode (probe, then UnGuidance) with the 2-process adapter: each process generates its
    share, process 0 writes the PNGs and the manifest; the probe's D, the w decisions and the images are
    those of this (one-device) process."""
    from unguide_jax.diffusion.batching import ImageRequest, generate_images
    from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
    from unguide_jax.loading.resolve import load_model
    from unguide_jax.training.sources import load_edit

    folder, _ = tiny_pipeline_dir("sd1")
    _, two, _, _ = trained
    prompts = ["a photo of the arrow", "a photo of the ring", "a red star"]
    out = tmp_path / "samples"
    assert_ok(launch(["sample.py", "--config", "configs/sample.py", f"--config.model={folder}",
                      f"--config.prompts={json.dumps(prompts)}", "--config.num_steps=3", "--config.batch_size=2",
                      "--config.mode=unguide", f"--config.adapters={json.dumps([str(two)])}", "--config.probe.draws=2",
                      "--config.probe.ddim_steps=10", "--config.probe.t_enc=7", f"--config.out_dir={out}"],
                     processes=2, devices_per_process=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["processes"] == 2 and manifest["settings"]["devices"] == 2  # one per process
    assert manifest["settings"]["mesh"] == {"data": 2, "fsdp": 1}
    records = manifest["images"]
    assert [r["prompt"] for r in records] == prompts

    sd = load_model(str(folder))
    edit, _ = load_edit([str(two)], sd.params["unet"])
    probe = WProbe(sd, edit, ProbeConfig(draws=2, ddim_steps=10, t_enc=7, rule="paper")).run(prompts)
    np.testing.assert_allclose([r["D"] for r in records], probe.d, rtol=1e-4)
    assert [r["w"] for r in records] == probe.w.tolist()
    images = generate_images(sd, [ImageRequest(r["prompt"], r["seed"], r["guidance_scale"], r["w"]) for r in records],
                             batch_size=2, num_steps=3, edit=edit, progress=False)
    for record, image in zip(records, images):
        written = np.asarray(Image.open(out / record["file"]), int)
        assert np.abs(written - image.astype(int)).max() <= 1, record["file"]


def test_processes_with_different_configs_stop_with_a_clear_error(tiny_pipeline_dir, tmp_path):
    folder, _ = tiny_pipeline_dir("sd1")
    results = launch(train_args(folder, tmp_path / "run", "--config.iterations=1"), processes=2, devices_per_process=1,
                     per_process_args={1: ["--config.seed=7"]}, timeout=300)
    for r in results:
        assert r.returncode != 0
        assert "started with different training configs" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    """Process 1 of 2 whose coordinator (process 0) never starts."""
    env = {"JAX_COORDINATOR_TIMEOUT": "5", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    (result,) = launch(["train.py", "--config", "configs/unguide.py:tiny", "--config.model=embedded",
                        f"--config.run_dir={tmp_path / 'run'}"], processes=1, devices_per_process=1, extra_env=env,
                       timeout=120)
    assert result.returncode != 0
    assert "could not reach the coordinator at 127.0.0.1:" in result.stderr and "within 5 s" in result.stderr, \
        result.stderr[-2000:]
