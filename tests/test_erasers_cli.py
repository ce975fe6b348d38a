"""Learnable prompts, PURE and UCE through train.py on a tiny SD1 model: run folders, edit files, resume,
exports that diffusers loads, and sampling with each edit (UnGuidance included)."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sample
import train
from unguide_jax.edits.edit import merge_weights
from unguide_jax.loading.diffusers_folder import load_component
from unguide_jax.loading.edit_files import load_edit_file

REPO = Path(__file__).resolve().parent.parent


def run_train(config, folder, run_dir, *extra):
    assert train.main(["--config", f"{REPO}/configs/{config}.py:tiny", f"--config.model={folder}",
                       f"--config.run_dir={run_dir}", *extra]) == 0
    return Path(run_dir)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    folder, _ = tiny_pipeline_dir("sd1")
    unet, params = load_component(folder / "unet", "unet")
    return folder, unet, params


@pytest.fixture(scope="module")
def trained_runs(tiny, tmp_path_factory):
    """method -> its tiny-preset run folder, trained once for every test of this file that needs it."""
    folder, _, _ = tiny
    root, runs = tmp_path_factory.mktemp("runs"), {}

    def get(method: str) -> Path:
        if method not in runs:
            runs[method] = run_train(method, folder, root / method)
        return runs[method]

    return get


def test_learnable_prompts_train_resume_and_export(tiny, trained_runs, tmp_path):
    folder, unet, params = tiny
    straight = trained_runs("learnable_prompts")
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["method"] == "learnable_prompts" and records[0]["prompt_layers"] == 1
    assert records[0]["trained_tensors"] == 4 * 5  # to_q, to_k, to_v, to_out.0 (kernel + bias) of 4 attn2 layers
    assert [r["step"] for r in records[1:]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["prompt_loss"]) for r in records[1:])
    deployed, info = load_edit_file(straight / "edit.safetensors")
    kept, _ = load_edit_file(straight / "edit_with_prompt.safetensors")
    assert info["kind"] == "learnable_prompts" and deployed.memory is None and kept.memory.scope == "mid"
    assert kept.memory.keys.shape == (3, unet.config.cross_attention_dim)
    assert all(".attn2." in path for path in deployed.deltas)
    assert max(float(np.abs(v).max()) for leaves in deployed.deltas.values() for v in leaves.values()) > 0

    # sample.py can also take the run's Orbax checkpoint: the deployed edit (the delta, tokens dropped).
    from unguide_jax.training.sources import load_edit

    from_checkpoint, info = load_edit(straight / "checkpoints", params)
    assert info[0]["kind"] == "learnable_prompts" and info[0]["steps"] == 3 and from_checkpoint.memory is None
    jax.tree.map(np.testing.assert_array_equal, from_checkpoint.deltas, deployed.deltas)

    split = run_train("learnable_prompts", folder, tmp_path / "split", "--config.iterations=2")
    run_train("learnable_prompts", folder, split, "--config.iterations=3", "--config.resume=true")
    resumed, _ = load_edit_file(split / "edit_with_prompt.safetensors")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), resumed, kept)

    # Exports: the edited weights as a diffusers partial state dict, and the documented token file.
    partial = load_file(straight / "export" / "unet_edited.safetensors")
    from unguide_jax.loading.convert import flax_to_torch

    merged = flax_to_torch(jax.device_get(merge_weights(params, deployed)))
    assert set(partial) == {k for k in merged if ".attn2." in k} and len(partial) == 20
    for key, value in partial.items():
        np.testing.assert_array_equal(value, merged[key])
    tokens = load_file(straight / "export" / "prompt_tokens.safetensors")
    np.testing.assert_array_equal(tokens["prompt_keys"], np.asarray(kept.memory.keys))


def _diffusers_unet_with(folder, state_dict=None, lora_folder=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if state_dict is not None:
        missing, unexpected = pipe.unet.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                                                        strict=False)
        assert not unexpected
    if lora_folder is not None:
        pipe.load_lora_weights(str(lora_folder))
    return pipe.unet


@pytest.mark.parametrize("method", ["pure", "uce"])
def test_closed_form_erasers_and_their_exports_in_diffusers(tiny, trained_runs, method):
    folder, unet, params = tiny
    run = trained_runs(method)
    edit, info = load_edit_file(run / "edit.safetensors")
    report = json.loads((run / "report.json").read_text())
    assert info["kind"] == method and report["seconds"] >= 0
    assert len(edit.loras[0][0]) == 8  # to_k and to_v of the 4 cross-attention layers
    rng = np.random.default_rng(0)
    sample_, t = rng.standard_normal((2, 4, 16, 16), dtype=np.float32), np.array([3, 917])
    context = rng.standard_normal((2, 7, unet.config.cross_attention_dim), dtype=np.float32)
    ours = np.asarray(unet.apply({"params": merge_weights(params, edit)}, sample_.transpose(0, 2, 3, 1), t,
                                 context)).transpose(0, 3, 1, 2)
    base = np.asarray(unet.apply({"params": params}, sample_.transpose(0, 2, 3, 1), t, context)).transpose(0, 3, 1, 2)
    assert np.abs(ours - base).max() > 1e-3  # the edit does something
    for torch_unet in (_diffusers_unet_with(folder, load_file(run / "export" / "unet_edited.safetensors")),
                       _diffusers_unet_with(folder, lora_folder=run / "export" / "diffusers")):
        with torch.no_grad():
            theirs = torch_unet(torch.from_numpy(sample_), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_every_edit_samples_with_and_without_unguidance(tiny, trained_runs, tmp_path):
    folder, _, _ = tiny
    prompts = '--config.prompts=["a photo of the cat", "of the"]'
    common = ["--config", f"{REPO}/configs/sample.py", f"--config.model={folder}", "--config.num_steps=2", prompts,
              "--config.batch_size=2", "--config.probe.draws=2", "--config.probe.ddim_steps=10", "--config.probe.t_enc=7"]
    lp, pure = trained_runs("learnable_prompts"), trained_runs("pure")
    # Every edit file once, and both modes (the mode paths are shared by all edits).
    runs = [(lp / "edit_with_prompt.safetensors", "unguide"), (lp / "edit.safetensors", "adapter"),
            (pure / "edit.safetensors", "unguide")]
    for edit_file, mode in runs:
        out = tmp_path / f"{edit_file.parent.name}-{edit_file.stem}-{mode}"
        assert sample.main(common + [f"--config.adapters=[\"{edit_file}\"]", f"--config.mode={mode}",
                                     f"--config.out_dir={out}"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert len(manifest["images"]) == 2 and manifest["settings"]["mode"] == mode
        assert manifest["settings"]["adapters_loaded"][0]["kind"] in ("learnable_prompts", "pure")
        if mode == "unguide":
            assert all(r["w"] in (-1.0, 2.0) and r["D"] >= 0 for r in manifest["images"])
