"""SDXL for PyTorch users, on the tiny random SDXL folder: our PEFT export loads in StableDiffusionXLPipeline and
samples our LoRA-only latents; the kohya export names SDXL modules as kohya's scripts do (after the SGM UNet) and
diffusers reads it as the same LoRA; UnGuideXLPipeline gives our probe's w and our UnGuidance latents; unguide.json
and the model card name the SDXL pipeline classes."""
import json
import re

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

from unguide_jax.edits.edit import lora_edit
from unguide_jax.edits.lora import LoraConfig, init_lora, merge
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
from unguide_jax.loading.edit_files import save_adapter
from unguide_jax.loading.exports import export_edit
from unguide_jax.loading.lora_formats import (
    KOHYA_UNET_PREFIX,
    export_kohya,
    export_peft,
    import_kohya,
    import_lora,
    sgm_module_names,
)
from unguide_jax.loading.resolve import load_model
from unguide_jax.loading.weights import write_safetensors
from unguide_jax.models.unet import unpack_context
from unguide_jax.publishing.export import publish_export
from unguide_jax.publishing.unguide_json import UNGUIDE_JSON

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of the cat", "the ph of cat"]
TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # the tiny SDXL's first cross-attention
ALPHA = 4.0
# R = 2 draws keeps the probe cheap; prompt_chunk 1: our probe traces one shape for every row.
PROBE = ProbeConfig(draws=2, prompt_chunk=1, rule="paper")
CONCEPT = ["a photo of the cat", "a cat"]
# LoRA-adaptable layers (Dense, 1x1 conv) of every kind the SGM UNet names its own way: in transformers, a ResBlock's
# time projection and 1x1 shortcut, the time and add (pooled text + time ids) embeddings.
WIDE = (r"(attn2\.to_[kv]|attn1\.to_out\.0|ff\.net\.2|proj_in|time_emb_proj|conv_shortcut|"
        r"time_embedding\.linear_1|add_embedding\.linear_2)$")


@pytest.fixture(scope="module")
def sd(tiny_sdxl_dir):
    folder, _ = tiny_sdxl_dir
    return load_model(str(folder))


def random_adapter(params, targets: str, seed: int, rank: int = 2, scale: float = 0.05):
    """Non-zero A and B (B ~ N(0, scale²)) on the modules ``targets`` picks."""
    base = init_lora(jax.random.key(seed), params, LoraConfig(rank=rank, targets=targets, init="random"))
    rng = np.random.default_rng(seed)
    return {path: {"lora_A": np.asarray(ab["lora_A"]),
                   "lora_B": (scale * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
            for path, ab in base.items()}


@pytest.fixture(scope="module")
def edit(sd):
    """An UnGuide LoRA: random non-zero A and B on every attn2.to_k/to_v."""
    return lora_edit(random_adapter(sd.params["unet"], "object", seed=1), ALPHA)


@pytest.fixture(scope="module")
def export(tiny_sdxl_dir, sd, edit, tmp_path_factory):
    """The edit's adapter file exported as the export job does: peft and kohya, then unguide.json and the card."""
    folder, _ = tiny_sdxl_dir
    root = tmp_path_factory.mktemp("sdxl_export")
    adapter, alpha = edit.loras[0]
    source = save_adapter(root / "adapter.safetensors", adapter, LoraConfig(rank=2, alpha=float(alpha)),
                          extra={"concept": {"name": "cat", "kind": "object", "targets": CONCEPT,
                                             "references": ["a photo of a dog"]}, "base_model": str(folder)})
    out = root / "export"
    export_edit(["peft", "kohya"], out, edit, sd.unet, sd.params["unet"])
    publish_export(out, ["peft", "kohya"], [source], sd, edit, CONCEPT, probe=PROBE, base_model=str(folder))
    return out


def fresh_sdxl_pipeline(folder):
    """A pipeline of its own: load_lora_weights mutates it, and the fixture's pipeline is shared."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_peft_layers(torch_unet) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in torch_unet.modules())


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def file_keys(path) -> list[str]:
    with safe_open(str(path), "np") as f:
        return list(f.keys())


# --------------------------------------------------------------------------------------------------- PEFT


def test_peft_export_in_the_sdxl_pipeline_samples_our_lora_only_latents(tiny_sdxl_dir, sd, edit, export, rng):
    """load_lora_weights(our PEFT file) on StableDiffusionXLPipeline, 20 DDIM steps with CFG 5 from the same x_T:
    our LoRA-only sampler's latents within 1e-3."""
    folder, _ = tiny_sdxl_dir
    lora_file = export / "diffusers" / "pytorch_lora_weights.safetensors"
    keys = file_keys(lora_file)
    assert f"unet.{TO_K}.lora_A.weight" in keys and all(k.startswith("unet.") for k in keys)
    pipe = fresh_sdxl_pipeline(folder)
    pipe.load_lora_weights(str(lora_file.parent))
    assert count_peft_layers(pipe.unet) == len(edit.loras[0][0])  # every module adapted, nothing dropped
    h, w, c = sd.latent_shape(None, None)
    x_T = rng.standard_normal((2, h, w, c), dtype=np.float32)
    with torch.no_grad():
        expected = pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                        latents=nchw(x_T)).images.numpy().transpose(0, 2, 3, 1)
        pipe.disable_lora()
        base = pipe(PROMPTS, num_inference_steps=20, guidance_scale=5.0, output_type="latent",
                    latents=nchw(x_T)).images.numpy().transpose(0, 2, 3, 1)
    got = sd.generate(PROMPTS, [0, 1], edit=edit, latents=x_T, num_steps=20, guidance_scale=5.0).latents
    print(f"LoRA-only latents, ours vs diffusers: max |diff| {np.abs(got - expected).max():.2e}; "
          f"the LoRA moves them by {np.abs(expected - base).max():.2e}")
    assert np.abs(expected - base).max() > 0.1  # the LoRA matters far beyond the tolerance
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


# -------------------------------------------------------------------------------------------------- kohya


def test_sgm_names_of_the_real_sdxl_unet_read_back_through_diffusers():
    """SDXL base's layout (2 layers per block, on the meta device: no weights): every Linear/conv gets an SGM name,
    kohya's names for it, and diffusers' own converter reads each back to its diffusers path."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    config = dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
                  attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    paths = [name for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = sgm_module_names(paths)
    assert sorted(names) == sorted(paths)
    block = "transformer_blocks.0.attn2.to_k"
    assert names[f"down_blocks.1.attentions.0.{block}"] == f"input_blocks.4.1.{block}"
    assert names[f"down_blocks.2.attentions.1.{block}"] == f"input_blocks.8.1.{block}"
    assert names[f"mid_block.attentions.0.{block}"] == f"middle_block.1.{block}"
    assert names[f"up_blocks.0.attentions.0.{block}"] == f"output_blocks.0.1.{block}"
    assert names[f"up_blocks.1.attentions.2.{block}"] == f"output_blocks.5.1.{block}"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"

    kohya = {f"{KOHYA_UNET_PREFIX}{sgm.replace('.', '_')}.lora_down.weight": path for path, sgm in names.items()}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), unet.config)
    assert len(mapped) == len(kohya)
    for key, path in mapped.items():
        name = _convert_unet_lora_key(key).replace(".processor", "").replace("to_out_lora", "to_out.0_lora")
        assert re.sub(r"(_lora)?\.(lora\.)?down\.weight$", "", name) == path, key


def test_kohya_export_has_sgm_names_and_diffusers_reads_the_same_lora(tiny_sdxl_dir, sd, tmp_path, rng):
    """A LoRA on transformer, ResBlock and embedding layers: the kohya file names them after the SGM UNet, and
    StableDiffusionXLPipeline.load_lora_weights of it gives the UNet of the PEFT file and of our merged weights."""
    folder, _ = tiny_sdxl_dir
    params = sd.params["unet"]
    adapter, alpha = random_adapter(params, WIDE, seed=2), 0.7
    kohya_file = export_kohya(tmp_path / "kohya.safetensors", adapter, alpha, params)
    peft_file = export_peft(tmp_path / "peft.safetensors", adapter, alpha, params)
    keys = file_keys(kohya_file)
    assert len(keys) == 3 * len(adapter)
    for name in ("input_blocks_3_1_transformer_blocks_0_attn2_to_k", "middle_block_1_transformer_blocks_1_ff_net_2",
                 "output_blocks_0_1_proj_in", "output_blocks_5_0_skip_connection", "input_blocks_1_0_emb_layers_1",
                 "time_embed_0", "label_emb_0_2"):
        assert f"{KOHYA_UNET_PREFIX}{name}.lora_down.weight" in keys, name
    assert not [k for k in keys if re.match(rf"{KOHYA_UNET_PREFIX}(down|mid|up)_block", k)]

    h, w, c = sd.latent_shape(None, None)
    x = rng.standard_normal((2, h, w, c), dtype=np.float32)
    t = np.array([3, 917])
    encoded = np.asarray(sd.encode_prompts(PROMPTS))
    merged = jax.jit(sd.unet.apply)({"params": merge(params, [(adapter, alpha)])}, x, t, encoded)
    context, added = unpack_context(encoded, sd.unet.config.pooled_dim)
    context, added = torch.from_numpy(np.array(context)), {k: torch.from_numpy(np.array(v)) for k, v in added.items()}
    outputs = {}
    for name, file in (("kohya", kohya_file), ("peft", peft_file)):
        pipe = fresh_sdxl_pipeline(folder)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        assert count_peft_layers(pipe.unet) == len(adapter), name
        with torch.no_grad():
            outputs[name] = pipe.unet(nchw(x), torch.from_numpy(t), context, added_cond_kwargs=added).sample.numpy()
    np.testing.assert_allclose(outputs["kohya"], outputs["peft"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["kohya"], np.asarray(merged).transpose(0, 3, 1, 2), atol=1e-4, rtol=0)

    # And back: our reader takes the SGM names, and diffusers-style names of the same modules too.
    for importer in (import_kohya, import_lora):
        back, back_alpha = importer(kohya_file, params)
        assert back_alpha == alpha and sorted(back) == sorted(adapter)
        for path in adapter:
            np.testing.assert_array_equal(np.asarray(back[path]["lora_B"]), adapter[path]["lora_B"], err_msg=path)
    with safe_open(str(kohya_file), "np") as f:
        sgm_to_diffusers = {sgm.replace(".", "_"): path for path, sgm in sgm_module_names(params).items() if path in adapter}
        renamed = {}
        for key in f.keys():
            module, part = key[len(KOHYA_UNET_PREFIX):].split(".", 1)
            renamed[f"{KOHYA_UNET_PREFIX}{sgm_to_diffusers[module].replace('.', '_')}.{part}"] = f.get_tensor(key)
    back, _ = import_kohya(write_safetensors(tmp_path / "diffusers_names.safetensors", renamed), params)
    assert sorted(back) == sorted(adapter)


# ---------------------------------------------------------------------------------------------- UnGuidance

# SDXL's unconditional branch is all zeros (force_zeros_for_empty_prompt), which a K/V LoRA cannot move; D("")'s
# reference row is the text "" on both sides, while a prompt "" samples (and probes) as the unconditional zeros: D 0.
UNGUIDE_PROMPTS = PROMPTS + [""]


@pytest.fixture(scope="module")
def ours(sd, edit):
    """Our JAX probe of UNGUIDE_PROMPTS at CFG 5."""
    return WProbe(sd, edit, PROBE).run(UNGUIDE_PROMPTS, 5.0)


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl_dir, export):
    from unguide_jax.pytorch import UnGuideXLPipeline

    pipe = UnGuideXLPipeline.from_pretrained(tiny_sdxl_dir[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_unguide(export)
    return pipe


def test_unguide_xl_pipeline_probe_matches_ours(ours, xl_pipe):
    """UnGuideXLPipeline.probe: our WProbe's per-draw distances, D(p), D("") and w."""
    got = xl_pipe.probe(UNGUIDE_PROMPTS, 5.0)
    assert ours.d_empty > 0 and got.d_empty == pytest.approx(ours.d_empty, rel=1e-4)
    assert ours.d[-1] == 0.0 and ours.w[-1] == PROBE.w_keep  # the prompt "": the zeros no LoRA moves
    np.testing.assert_array_equal(got.w, ours.w)
    np.testing.assert_allclose(got.distances, ours.distances, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.d, ours.d, rtol=1e-4, atol=1e-6)


def test_unguide_xl_pipeline_samples_our_unguidance_latents(sd, edit, ours, xl_pipe):
    """A call probes and samples with UnGuidance from the same seeds: the w and the latents of our sampler
    (``generate(..., edit=edit, w=w)``) within 1e-3, and its images once decoded."""
    seeds, steps = [3, 4, 5], 10
    expected = sd.generate(UNGUIDE_PROMPTS, seeds, edit=edit, w=ours.w, num_steps=steps, guidance_scale=5.0)
    out = xl_pipe(UNGUIDE_PROMPTS, seeds=seeds, num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
    np.testing.assert_array_equal(out.w, ours.w)
    latents = out.images.numpy().transpose(0, 2, 3, 1)
    print(f"UnGuidance latents, ours vs UnGuideXLPipeline: max |diff| {np.abs(latents - expected.latents).max():.2e}")
    np.testing.assert_allclose(latents, expected.latents, atol=1e-3, rtol=0)
    with torch.no_grad():
        images, nsfw = xl_pipe._decode(out.images, "np", "cpu", torch.float32)
    assert nsfw is None and np.abs(np.round(images * 255) - expected.images.astype(int)).max() <= 2
    # UnGuidance, not the base model: w = 1 (the base alone) gives other latents from the same seeds.
    base = xl_pipe(UNGUIDE_PROMPTS, seeds=seeds, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                   w=1.0)
    assert np.abs(base.images.numpy().transpose(0, 2, 3, 1)[:2] - latents[:2]).max() > 0.1


# ------------------------------------------------------------------------------------------- unguide.json


def test_unguide_json_and_model_card_name_the_sdxl_pipelines(export, tiny_pipeline_dir):
    from unguide_jax.pytorch import UnGuidePipeline

    record = json.loads((export / UNGUIDE_JSON).read_text())
    assert record["base_model"]["family"] == "sdxl"
    assert record["base_model"]["pipeline"] == "StableDiffusionXLPipeline"
    card = (export / "README.md").read_text()
    assert "from unguide_jax.pytorch import UnGuideXLPipeline" in card and "UnGuideXLPipeline.from_pretrained" in card
    assert "from diffusers import StableDiffusionXLPipeline" in card
    assert "StableDiffusionPipeline" not in card and "UnGuidePipeline." not in card
    assert '"stable-diffusion-xl"' in card or "- stable-diffusion-xl" in card

    # The SD 1.x pipeline refuses an SDXL export, naming the class that takes it.
    sd1_folder, _ = tiny_pipeline_dir("sd1")
    sd1_pipe = UnGuidePipeline.from_pretrained(sd1_folder, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="export for a sdxl base model .*load it with UnGuideXLPipeline"):
        sd1_pipe.load_unguide(export)
