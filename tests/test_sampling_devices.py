"""Sampling, the w probe and the sample command on 8 (CPU) devices give what one device gives.

XLA_FLAGS must be set before jax is imported, so the 8-device side is a subprocess. In it, the same
random tiny model and random LoRA sample the same requests without a mesh (the default device) and on
a data mesh over the 8 devices (rows sharded, weights replicated): plain CFG with an odd batch (5 rows
padded to 8), UnGuidance with a w per prompt, the probe's D per prompt; then the sample command runs
the unguide mode and records the devices in its manifest.
"""
import json
import textwrap

import numpy as np
import pytest

from tests.devices import run_script

_EIGHT_DEVICE_SAMPLING = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.files import save_adapter
    from unguide_jax.edits.lora import LoraConfig, init_lora
    from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
    from unguide_jax.loading.random_model import ensure_random_model
    from unguide_jax.loading.resolve import load_model
    from unguide_jax.parallel.batches import data_mesh
    import sample

    assert jax.device_count() == 8, jax.devices()
    out = Path(sys.argv[1])
    folder = ensure_random_model(out / "model", seed=0)
    one = load_model(str(folder))
    config = LoraConfig(rank=2, alpha=8.0)
    adapter = init_lora(jax.random.key(0), one.params["unet"], config)
    adapter = {k: dict(ab, lora_B=0.3 * jax.random.normal(jax.random.key(i), ab["lora_B"].shape))
               for i, (k, ab) in enumerate(adapter.items())}
    save_adapter(out / "adapter.safetensors", adapter, config)
    edit = lora_edit(adapter, config.alpha)
    eight = one.on_mesh(data_mesh())

    prompts = ["a red circle", "a blue square", "an arrow", "a ring", "a star"]
    seeds = [11, 12, 13, 14, 15]
    results = {}
    for name, sd in (("one", one), ("eight", eight)):
        plain = sd.generate(prompts, seeds, num_steps=3)
        mixed = sd.generate(prompts, seeds, num_steps=3, edit=edit, w=[-1.0, 2.0, 0.5, -1.0, 2.0])
        probe = WProbe(sd, edit, ProbeConfig(draws=3, ddim_steps=10, t_enc=7, prompt_chunk=5)).run(prompts)
        results[name] = dict(plain=plain.images, mixed=mixed.images, d=probe.d, d_empty=probe.d_empty)
    np.savez(out / "results.npz", **{f"{name}/{k}": np.asarray(v) for name, r in results.items() for k, v in r.items()})

    code = sample.main(["--config", "configs/sample.py", f"--config.model={folder}", "--config.prompts=" +
                        json.dumps(prompts), "--config.num_steps=3", "--config.batch_size=5", "--config.mode=unguide",
                        f"--config.adapters={json.dumps([str(out / 'adapter.safetensors')])}",
                        "--config.probe.draws=3", "--config.probe.ddim_steps=10", "--config.probe.t_enc=7",
                        f"--config.out_dir={out / 'samples'}"])
    print(json.dumps(dict(code=code, sharding=str(eight.params["unet"]["conv_in"]["kernel"].sharding.spec))))
""")


@pytest.fixture(scope="module")
def eight_device_sampling(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling8")
    report = run_script(_EIGHT_DEVICE_SAMPLING, 8, str(out))
    with np.load(out / "results.npz") as arrays:
        report.update(dict(arrays))
    return out, report


def test_eight_devices_draw_the_images_and_probe_values_of_one(eight_device_sampling):
    _, run = eight_device_sampling
    for kind in ("plain", "mixed"):
        one, eight = run[f"one/{kind}"].astype(int), run[f"eight/{kind}"].astype(int)
        assert one.shape == eight.shape == (5, 32, 32, 3)
        assert np.abs(one - eight).max() <= 1, kind
    assert np.abs(run["one/mixed"].astype(int) - run["one/plain"].astype(int)).max() > 8  # the edit matters
    np.testing.assert_allclose(run["eight/d"], run["one/d"], rtol=1e-4)
    np.testing.assert_allclose(run["eight/d_empty"], run["one/d_empty"], rtol=1e-4)
    assert run["sharding"] in ("P()", "PartitionSpec()")  # weights replicated


def test_sample_command_on_eight_devices_records_them(eight_device_sampling):
    out, run = eight_device_sampling
    assert run["code"] == 0
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["devices"] == 8 and settings["mesh"] == {"data": 8, "fsdp": 1} and settings["processes"] == 1
    assert len(manifest["images"]) == 5 and all("w" in r and "D" in r for r in manifest["images"])
    assert len(list((out / "samples").glob("0000*.png"))) == 5
