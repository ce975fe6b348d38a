"""Sampling folders, reproduced as a user would meet them (issue 37; each test failed on the code before the fix):
an ``out_dir`` belongs to one set of settings (a lock while a run uses it, also through a symlink; other settings
refused without ``overwrite``), and the model is known by its files' contents, not its path (a model replaced at
the same path makes its images again, in the sample command and the I2P evaluation)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sample
from unguide_jax.json_files import write_json
from unguide_jax.loading.model_identity import model_files, model_fingerprint

REPO = Path(__file__).resolve().parent.parent
BAD_INPUT = 2
PROMPT = "a photo of the cat"


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    """The file-hash cache of loading.model_identity in the test's folder, not the user's."""
    monkeypatch.setenv("UNGUIDE_JAX_CACHE", str(tmp_path / "hash-cache"))


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    folder, _ = tiny_pipeline_dir("sd1")
    return folder


def sample_args(model, out, *extra):
    return ["--config", f"{REPO}/configs/sample.py", f"--config.model={model}", "--config.num_steps=2",
            f"--config.prompt={PROMPT}", "--config.batch_size=1", f"--config.out_dir={out}", *extra]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines, err
    return lines[-1]


def another_model(model: Path, path: Path) -> Path:
    """A copy of ``model`` with other UNet weights, every file of the same size."""
    shutil.copytree(model, path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + np.float32(0.5)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


# --- case 1: an out_dir belongs to one set of settings ---------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_or_of_other_settings_is_refused_also_through_a_symlink(tiny, tmp_path,
                                                                                                   capsys):
    real, link = tmp_path.resolve() / "samples", tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    lock = real.parent / ".samples.lock"
    # The first run, held still (SIGSTOP) once it has taken the lock, so that the second surely meets it.
    first = subprocess.Popen([sys.executable, "sample.py", *sample_args(tiny, real, "--config.guidance_scale=7.5")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        assert lock.exists() and first.poll() is None, "the first run never held the lock"
        started = time.monotonic()
        assert sample.main(sample_args(tiny, link, "--config.guidance_scale=1.0")) == BAD_INPUT
        message = error_of(capsys)
        assert f"{real} is in use by another run: process {first.pid}" in message
        assert message.endswith("choose another out_dir")  # the setting to change is sampling's
        assert time.monotonic() - started < 5  # at once: before the model loads
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert manifest_of(real)["settings"]["guidance_scale"] == 7.5 and not lock.exists()

    # Afterwards: other settings are refused, through the symlink or not, naming what differs; nothing is touched.
    made = (real / manifest_of(real)["images"][0]["file"]).read_bytes()
    for out in (link, real):
        assert sample.main(sample_args(tiny, out, "--config.guidance_scale=1.0")) == BAD_INPUT
        message = error_of(capsys)
        assert f"{real} holds images made with other settings (differing in guidance_scale" in message
        assert "overwrite=true" in message
    assert (real / manifest_of(real)["images"][0]["file"]).read_bytes() == made
    # The same settings through the symlink: the first run's image is kept.
    assert sample.main(sample_args(tiny, link, "--config.guidance_scale=7.5")) == 0
    assert manifest_of(real)["settings"]["images_kept"] == 1
    # overwrite=true replaces the images, but not before the new run's inputs have loaded.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter")
    assert sample.main(sample_args(tiny, link, "--config.guidance_scale=1.0", "--config.overwrite=true",
                                   f'--config.adapters=["{bad}"]', "--config.mode=adapter")) == BAD_INPUT
    assert "bad.safetensors" in error_of(capsys)
    assert (real / manifest_of(real)["images"][0]["file"]).read_bytes() == made
    assert manifest_of(real)["settings"]["status"] == "done"
    assert sample.main(sample_args(tiny, link, "--config.guidance_scale=1.0", "--config.overwrite=true")) == 0
    replaced = manifest_of(real)["settings"]
    assert replaced["guidance_scale"] == 1.0 and replaced["images_generated"] == 1
    assert sample.main(sample_args(tiny, real, "--config.guidance_scale=7.5")) == BAD_INPUT
    assert not lock.exists()


def test_images_without_a_manifest_or_of_an_older_manifest_are_not_claimed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000_a_photo_of_the_cat_s0.png").write_bytes(b"made by someone")
    assert sample.main(sample_args("embedded", out)) == BAD_INPUT  # refused before the model loads
    assert "holds images but no readable manifest.json" in error_of(capsys)
    # A manifest of a version that fingerprinted the model's path only.
    write_json(out / "manifest.json", {"settings": {"fingerprint": "af6ba90c04bb78b6", "status": "done"},
                                       "images": []})
    assert sample.main(sample_args("embedded", out)) == BAD_INPUT
    message = error_of(capsys)
    assert "older unguide-jax" in message and "the model's path, not its contents" in message
    assert "overwrite=true" in message and str(out) in message
    assert (out / "00000_a_photo_of_the_cat_s0.png").read_bytes() == b"made by someone"
    assert not (tmp_path / ".out.lock").exists()


# --- case 2: the model is known by its contents ----------------------------------------------------------------


def test_a_model_replaced_at_the_same_path_makes_its_images_again(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    other = another_model(tiny, tmp_path / "other")
    out = tmp_path / "out"
    assert sample.main(sample_args(model, out)) == 0
    before = manifest_of(out)["settings"]
    assert before["model_fingerprint"] == model_fingerprint(tiny) and before["images_generated"] == 1

    shutil.rmtree(model)
    shutil.copytree(other, model)  # copy2 keeps each file's mtime; the sizes are the same too
    with pytest.warns(UserWarning, match=r"same settings but other files of the model \(\w+ -> \w+\): making them"):
        assert sample.main(sample_args(model, out)) == 0
    after = manifest_of(out)["settings"]
    assert after["images_generated"] == 1 and after["images_kept"] == 0
    assert after["model_fingerprint"] == model_fingerprint(other) != before["model_fingerprint"]
    assert after["fingerprint"] != before["fingerprint"]


def test_the_i2p_evaluation_samples_a_replaced_model_again(tiny, tmp_path, monkeypatch):
    from tests.test_i2p import write_i2p_csv
    from unguide_jax.evaluation import i2p

    class NoDetector:
        def detect(self, image):
            return []

        def describe(self):
            return {"detector": "none", "version": "0", "model_file": "none"}

    monkeypatch.setattr(i2p, "NudeNetDetector", NoDetector)
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    csv = write_i2p_csv(tmp_path / "i2p.csv", [("a photo of the cat", 30.0, 11, 7, 512, 512)])
    config = dict(job="i2p", model=str(model), csv=str(csv), num_steps=2, out_dir=str(tmp_path / "eval"),
                  methods=[{"name": "base model", "mode": "base"}], edits={})

    def run() -> dict:
        return json.loads((i2p.run_i2p(config) / "results.json").read_text())

    first = run()
    assert first["settings"]["model_fingerprint"] == model_fingerprint(model)
    assert run()["methods"]["base model"]["images_kept"] == 1  # the same model: reused
    shutil.rmtree(model)
    another_model(tiny, model)
    with pytest.warns(UserWarning, match="other files of the model"):
        again = run()
    assert again["methods"]["base model"]["images_generated"] == 1
    assert again["settings"]["model_fingerprint"] == model_fingerprint(model) != first["settings"]["model_fingerprint"]


def test_the_fingerprint_follows_symlinked_components_and_the_config_folder(tmp_path):
    model, shared = tmp_path / "model", tmp_path / "shared-vae"
    (model / "unet").mkdir(parents=True)
    shared.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "w.safetensors").write_bytes(b"unet")
    (shared / "w.safetensors").write_bytes(b"vae one")
    (model / "vae").symlink_to(shared, target_is_directory=True)
    (shared / "loop").symlink_to(shared, target_is_directory=True)  # not walked forever
    assert [p.relative_to(model).as_posix() for p in model_files(model)[1]] == [
        "model_index.json", "unet/w.safetensors", "vae/w.safetensors"]
    before = model_fingerprint(model)
    (shared / "w.safetensors").write_bytes(b"vae two")
    assert model_fingerprint(model) != before

    checkpoint, configs = tmp_path / "sd.safetensors", tmp_path / "configs"
    checkpoint.write_bytes(b"weights")
    (configs / "unet").mkdir(parents=True)  # a config folder needs no model_index.json
    (configs / "unet" / "config.json").write_text('{"sample_size": 64}')
    with_configs = model_fingerprint(checkpoint, config_folder=configs)
    (configs / "unet" / "config.json").write_text('{"sample_size": 96}')
    assert model_fingerprint(checkpoint, config_folder=configs) != with_configs
    assert json.loads((tmp_path / "hash-cache" / "file-hashes.json").read_text())  # cached where the env says
    assert os.environ["UNGUIDE_JAX_CACHE"] == str(tmp_path / "hash-cache")


def test_a_full_disk_names_the_json_or_png_it_could_not_write(tmp_path, monkeypatch):
    """A write refused by a full disk has no file name in its error: the JSON and PNG writers add theirs."""
    import errno
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from unguide_jax.diffusion.images import save_png
    from unguide_jax.json_files import write_json

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*manifest\.json'"):
        write_json(tmp_path / "manifest.json", {"a": 1})
    with pytest.raises(OSError, match=r"No space left on device: '.*00000_x_s0\.png'") as caught:
        save_png(tmp_path / "00000_x_s0.png", np.zeros((8, 8, 3), np.uint8))
    assert caught.value.errno == errno.ENOSPC
