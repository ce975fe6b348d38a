"""The erasers on a tiny random SDXL folder, through train.py and sample.py: UnGuide's LoRA on the cross-attention
K/V (which read the two encoders' concatenated states), the probe and UnGuidance; learnable prompts, PURE and UCE."""
import json
from pathlib import Path

import numpy as np
import pytest

import sample
import train
from unguide_jax.edits.edit import lora_edit
from unguide_jax.loading.edit_files import load_adapter, load_edit_file
from unguide_jax.loading.resolve import load_model

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of the cat", "of the ph"]


def run_train(config, folder, run_dir, *extra):
    assert train.main(["--config", f"{REPO}/configs/{config}.py:tiny", f"--config.model={folder}",
                       f"--config.run_dir={run_dir}", *extra]) == 0
    return Path(run_dir)


@pytest.fixture(scope="module")
def unguide_run(tiny_sdxl_dir, tmp_path_factory):
    folder, _ = tiny_sdxl_dir
    # A learning rate that moves the LoRA well beyond the parity tolerance in the tiny preset's 4 steps.
    return run_train("unguide", folder, tmp_path_factory.mktemp("sdxl") / "unguide", "--config.learning_rate=0.05",
                     '--config.export=["peft"]')


def test_unguide_lora_on_sdxl_reads_the_concatenated_context(tiny_sdxl_dir, unguide_run):
    folder, torch_pipe = tiny_sdxl_dir
    records = [json.loads(line) for line in (unguide_run / "metrics.jsonl").read_text().splitlines()]
    attention_blocks = sum(1 for name, _ in torch_pipe.unet.named_modules() if name.endswith(".attn2"))
    assert records[0]["lora_modules"] == 2 * attention_blocks  # to_k and to_v of every transformer block
    assert all(np.isfinite(r["loss"]) for r in records[1:])
    adapter, _ = load_adapter(unguide_run / "adapter.safetensors")
    width = torch_pipe.text_encoder.config.hidden_size + torch_pipe.text_encoder_2.config.hidden_size
    assert {ab["lora_A"].shape[0] for ab in adapter.values()} == {width}
    assert any(np.abs(ab["lora_B"]).max() > 0 for ab in adapter.values())


def test_unguidance_on_sdxl_mixes_the_base_and_the_lora_prediction(tiny_sdxl_dir, unguide_run, tmp_path):
    folder, _ = tiny_sdxl_dir
    sd = load_model(str(folder))
    adapter, lora = load_adapter(unguide_run / "adapter.safetensors")
    edit = lora_edit(adapter, lora.alpha)
    kw = dict(seeds=[0, 1], guidance_scale=5.0, num_steps=4)
    base, edited = sd.generate(PROMPTS, **kw), sd.generate(PROMPTS, edit=edit, **kw)
    assert np.abs(base.latents - edited.latents).max() > 1e-6
    np.testing.assert_allclose(sd.generate(PROMPTS, edit=edit, w=[1.0, 0.0], **kw).latents,
                               np.stack([base.latents[0], edited.latents[1]]), atol=1e-4, rtol=0)
    # The command: the probe picks a w per prompt, the manifest records it.
    out = tmp_path / "unguided"
    assert sample.main(["--config", f"{REPO}/configs/sample.py:sdxl", f"--config.model={folder}", "--config.num_steps=2",
                        '--config.prompts=["a photo of the cat", "of the ph"]', "--config.dtype=float32",
                        "--config.param_dtype=float32", f"--config.adapters=[\"{unguide_run}\"]", "--config.mode=unguide",
                        "--config.probe.draws=2", "--config.probe.ddim_steps=10", "--config.probe.t_enc=7",
                        f"--config.out_dir={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 2 and all(np.isfinite(r["w"]) and r["D"] >= 0 for r in manifest["images"])


def test_the_trained_lora_exported_for_diffusers_samples_as_our_lora_only_sampler(tiny_sdxl_dir, unguide_run, rng):
    """Train, export (PEFT), load into StableDiffusionXLPipeline: its 20-step DDIM latents with CFG 5 are our
    LoRA-only sampler's from the same x_T, within 1e-3."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    folder, _ = tiny_sdxl_dir
    sd = load_model(str(folder))
    adapter, lora = load_adapter(unguide_run / "adapter.safetensors")
    h, w, c = sd.latent_shape(None, None)
    x_t = rng.standard_normal((2, h, w, c), dtype=np.float32)
    ours = sd.generate(PROMPTS, [0, 1], guidance_scale=5.0, num_steps=20, latents=x_t, edit=lora_edit(adapter, lora.alpha))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(unguide_run / "export" / "diffusers")

    def theirs():
        with torch.no_grad():
            out = pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                       latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())).images.numpy()
        return out.transpose(0, 2, 3, 1)

    with_lora = theirs()
    np.testing.assert_allclose(ours.latents, with_lora, atol=1e-3, rtol=0)
    pipe.unload_lora_weights()
    assert np.abs(theirs() - with_lora).max() > 1e-2  # the LoRA is in the file and moves the sample


@pytest.mark.parametrize("method", ["learnable_prompts", "pure", "uce"])
def test_the_other_erasers_on_sdxl(tiny_sdxl_dir, tmp_path, method):
    folder, _ = tiny_sdxl_dir
    run = run_train(method, folder, tmp_path / method)
    edit, info = load_edit_file(run / "edit.safetensors")
    assert info["kind"] == method
    width = 64  # the tiny SDXL's cross_attention_dim: the two encoders' 32 + 32
    if method == "learnable_prompts":  # trained through the UNet on packed contexts; sampling an edit is shared code
        kept, _ = load_edit_file(run / "edit_with_prompt.safetensors")
        assert kept.memory.keys.shape[-1] == width
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["prompt_loss"]) for r in records[1:])
        assert all(".attn2." in path for path in edit.deltas)
        return
    assert all(".attn2." in path for path in (edit.deltas or {})) or edit.loras
    sd = load_model(str(folder))
    out = sd.generate(PROMPTS, [0, 1], num_steps=2, edit=edit)
    assert np.isfinite(out.latents).all()
    assert np.abs(out.latents - sd.generate(PROMPTS, [0, 1], num_steps=2).latents).max() > 1e-7
