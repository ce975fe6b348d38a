"""LoRA interchange with PyTorch: our exports load in diffusers/PEFT and match our merged UNet; imports are exact."""
import jax
import jax.numpy as jnp
import numpy as np
import peft  # noqa: F401  (the test extra; diffusers loads LoRA through it)
import pytest
import torch
from safetensors.numpy import load_file

from unguide_jax.edits.lora import LoraConfig, init_lora, merge
from unguide_jax.loading.diffusers_folder import load_component
from unguide_jax.loading.lora_formats import (
    LoraFileError,
    export_kohya,
    export_merged_unet,
    export_peft,
    export_peft_adapters,
    import_kohya,
    import_lora,
    import_peft,
)
from unguide_jax.loading.weights import write_safetensors

ATOL = 1e-4  # fp32 on CPU
OBJECT_AND_PROJ_IN = r"(\.attn2\.to_[kv]|\.proj_in)$"  # proj_in is a 1x1 conv on SD1
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"


@pytest.fixture(scope="module")
def sd1(tiny_pipeline_dir):
    """(diffusers folder, our UNet module, its params, a jitted forward, fixed inputs)."""
    folder, _ = tiny_pipeline_dir("sd1")
    unet, params = load_component(folder / "unet", "unet")
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 4, 16, 8), dtype=np.float32), np.array([3, 917]),
              rng.standard_normal((2, 7, unet.config.cross_attention_dim), dtype=np.float32))
    forward = jax.jit(unet.apply)
    return folder, unet, params, forward, inputs


def jax_output(sd1, params):
    _, _, _, forward, (sample, timesteps, context) = sd1
    out = forward({"params": params}, sample.transpose(0, 2, 3, 1), timesteps, context)
    return np.asarray(out).transpose(0, 3, 1, 2)


def torch_output(torch_unet, sd1):
    sample, timesteps, context = sd1[-1]
    with torch.no_grad():
        out = torch_unet(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
    return out.sample.numpy()


def fresh_torch_pipeline(folder):
    """A pipeline of its own: load_lora_weights mutates it, and the fixture's pipeline is shared."""
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def random_adapter(params, targets, seed, ranks=(2,)):
    """Non-zero A and B; module i gets rank ranks[i % len(ranks)]."""
    base = init_lora(jax.random.key(seed), params, LoraConfig(rank=1, targets=targets, init="random"))
    adapter = {}
    for i, path in enumerate(sorted(base)):
        fan_in, fan_out, rank = base[path]["lora_A"].shape[0], base[path]["lora_B"].shape[1], ranks[i % len(ranks)]
        ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        adapter[path] = {"lora_A": jax.random.normal(ka, (fan_in, rank)) / rank,
                         "lora_B": 0.2 * jax.random.normal(kb, (rank, fan_out))}
    return adapter


def count_peft_layers(torch_unet):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) for m in torch_unet.modules())


def assert_same_adapter(got, expected):
    assert sorted(got) == sorted(expected)
    for path in expected:
        for half in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(np.asarray(got[path][half]), np.asarray(expected[path][half]), err_msg=path)


# ------------------------------------------------------------------------------------- diffusers loads ours


@pytest.mark.parametrize("targets", ["object", OBJECT_AND_PROJ_IN])
def test_peft_export_loads_in_diffusers_and_matches_our_merged_unet(sd1, tmp_path, targets):
    folder, _, params, _, _ = sd1
    adapter, alpha = random_adapter(params, targets, seed=1), 0.7
    export_peft(tmp_path / "lora", adapter, alpha, params)
    pipe = fresh_torch_pipeline(folder)
    base = torch_output(pipe.unet, sd1)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert count_peft_layers(pipe.unet) == len(adapter)  # every module adapted, nothing silently dropped
    expected = torch_output(pipe.unet, sd1)
    got = jax_output(sd1, merge(params, [(adapter, alpha)]))
    assert np.abs(expected - base).max() > 100 * ATOL  # the adapter changes the output well beyond tolerance
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_several_adapters_mixed_ranks_export_one_file_each(sd1, tmp_path):
    """Mixed ranks go through PEFT's rank_pattern/alpha_pattern; diffusers sums the two active adapters."""
    folder, _, params, _, _ = sd1
    first = random_adapter(params, "object", seed=2)
    second = random_adapter(params, OBJECT_AND_PROJ_IN, seed=3, ranks=(3, 1, 3))
    files = export_peft_adapters(tmp_path, {"first": (first, 0.5), "second": (second, -1.3)}, params)
    assert sorted(p.name for p in files.values()) == ["first.safetensors", "second.safetensors"]
    pipe = fresh_torch_pipeline(folder)
    for name, file in files.items():
        pipe.load_lora_weights(str(file), adapter_name=name)
    pipe.set_adapters(["first", "second"], [1.0, 1.0])
    expected = torch_output(pipe.unet, sd1)
    got = jax_output(sd1, merge(params, [(first, 0.5), (second, -1.3)]))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    back, alpha = import_peft(files["second"], params)  # and the mixed ranks come back exactly
    assert alpha == -1.3
    assert_same_adapter(back, second)


def test_kohya_export_loads_in_diffusers_and_round_trips(sd1, tmp_path):
    folder, _, params, _, _ = sd1
    adapter, alpha = random_adapter(params, OBJECT_AND_PROJ_IN, seed=4), 0.3
    file = export_kohya(tmp_path / "style.safetensors", adapter, alpha, params)
    pipe = fresh_torch_pipeline(folder)
    pipe.load_lora_weights(str(file))  # diffusers' own kohya converter: an independent reading of our names/alphas
    assert count_peft_layers(pipe.unet) == len(adapter)
    np.testing.assert_allclose(jax_output(sd1, merge(params, [(adapter, alpha)])), torch_output(pipe.unet, sd1),
                               atol=ATOL, rtol=0)
    # Mixed ranks (one .alpha per module) only round trip here: diffusers 0.42.1 mis-keys a kohya file's
    # per-module alphas (its alpha_pattern keys name "...processor.to_k_lora.down.weight") and ignores them.
    mixed = random_adapter(params, OBJECT_AND_PROJ_IN, seed=5, ranks=(2, 4))
    mixed_file = export_kohya(tmp_path / "mixed.safetensors", mixed, alpha, params)
    for importer, (source, expected) in ((import_kohya, (file, adapter)), (import_lora, (mixed_file, mixed))):
        back, back_alpha = importer(source, params)
        assert back_alpha == alpha
        assert_same_adapter(back, expected)
    assert import_kohya(mixed_file, params)[1] == alpha


def test_merged_unet_folder_loads_in_diffusers_and_matches(sd1, tmp_path):
    from diffusers import UNet2DConditionModel

    _, unet, params, _, _ = sd1
    adapters = [(random_adapter(params, OBJECT_AND_PROJ_IN, seed=5), 0.9)]
    export_merged_unet(tmp_path / "unet", unet.config, params, adapters)
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    np.testing.assert_allclose(jax_output(sd1, merge(params, adapters)), torch_output(torch_unet, sd1),
                               atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ we load theirs


def test_peft_round_trip_is_exact(sd1, tmp_path):
    _, _, params, _, _ = sd1
    adapter = random_adapter(params, OBJECT_AND_PROJ_IN, seed=6, ranks=(1, 2))
    for alpha in (0.1, 3.0):  # 0.1 * r / r is not 0.1 in floating point: the exact alpha must survive anyway
        export_peft(tmp_path / f"a{alpha}.safetensors", adapter, alpha, params)
        for importer in (import_peft, import_lora):
            back, back_alpha = importer(tmp_path / f"a{alpha}.safetensors", params)
            assert back_alpha == alpha
            assert_same_adapter(back, adapter)


def test_a_peft_adapter_saved_by_diffusers_with_per_module_rank_and_alpha(sd1, tmp_path):
    """A file we did not write: several scales in one adapter are folded into B; the merged UNet matches torch."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig as PeftLoraConfig

    folder, _, params, _, _ = sd1
    torch_unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    to_q, to_v = TO_K.replace("to_k", "to_q"), TO_K.replace("to_k", "to_v")
    torch_unet.add_adapter(PeftLoraConfig(  # scales: to_q, to_k 3/2; to_v 5/2; proj_in 8/4
        r=2, lora_alpha=3.0, target_modules=[to_q, TO_K, to_v, PROJ_IN],
        rank_pattern={f"^{PROJ_IN}": 4}, alpha_pattern={f"^{PROJ_IN}": 8.0, f"^{to_v}": 5.0}))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in torch_unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    torch_unet.save_lora_adapter(tmp_path / "saved")  # unprefixed keys, config unprefixed in the metadata
    adapter, alpha = import_peft(tmp_path / "saved", params)
    assert sorted(adapter) == sorted([to_q, TO_K, to_v, PROJ_IN])
    assert alpha == 1.5 and adapter[PROJ_IN]["lora_A"].shape == (32, 4)  # the common scale; the others fold into B
    np.testing.assert_allclose(jax_output(sd1, merge(params, [(adapter, alpha)])), torch_output(torch_unet, sd1),
                               atol=ATOL, rtol=0)


def test_kohya_names_resolve_and_per_module_alphas_fold_exactly(sd1, tmp_path):
    """'.' -> '_' names map back to dotted paths (to_out.0, ff.net.0.proj); alpha/r per module, none = scale 1."""
    _, _, params, _, _ = sd1
    rng = np.random.default_rng(3)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    modules = {  # path: (rank, in, out, kohya alpha or None, 1x1 conv)
        f"{block}.attn2.to_k": (2, 32, 32, 1.0, False),
        f"{block}.attn1.to_out.0": (3, 32, 32, 6.0, False),
        f"{block}.ff.net.0.proj": (2, 32, 256, None, False),
        PROJ_IN: (1, 32, 32, 0.5, True),
    }
    tensors, expected_delta = {}, {}
    for path, (rank, fan_in, fan_out, kalpha, conv) in modules.items():
        down = rng.standard_normal((rank, fan_in)).astype(np.float32)
        up = rng.standard_normal((fan_out, rank)).astype(np.float32)
        key = "lora_unet_" + path.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down[:, :, None, None] if conv else down
        tensors[f"{key}.lora_up.weight"] = up[:, :, None, None] if conv else up
        if kalpha is not None:
            tensors[f"{key}.alpha"] = np.asarray(kalpha, np.float16)
        expected_delta[path] = (1.0 if kalpha is None else kalpha / rank) * (up @ down).T.astype(np.float64)
    write_safetensors(tmp_path / "k.safetensors", tensors)
    adapter, alpha = import_kohya(tmp_path / "k.safetensors", params)
    assert sorted(adapter) == sorted(modules)
    assert alpha == 0.5  # to_k 1/2 and proj_in 0.5/1 share it; to_out (6/3) and ff (no alpha: 1) are folded into B
    for path, delta in expected_delta.items():
        ab = adapter[path]
        got = alpha * np.asarray(ab["lora_A"], np.float64) @ np.asarray(ab["lora_B"], np.float64)
        np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-6, err_msg=path)


def test_peft_file_without_metadata_means_scale_one(sd1, tmp_path):
    """diffusers' convention for a bare PEFT state dict: lora_alpha = r, whatever the ranks."""
    _, _, params, _, _ = sd1
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 32)).astype(np.float32)
    b = rng.standard_normal((32, 3)).astype(np.float32)
    write_safetensors(tmp_path / "bare.safetensors", {f"unet.{TO_K}.lora_A.weight": a, f"unet.{TO_K}.lora_B.weight": b})
    adapter, alpha = import_peft(tmp_path / "bare.safetensors", params)
    assert alpha == 1.0
    np.testing.assert_array_equal(np.asarray(adapter[TO_K]["lora_A"]), a.T)
    np.testing.assert_array_equal(np.asarray(adapter[TO_K]["lora_B"]), b.T)


# ------------------------------------------------------------------------------------------------ errors


def test_text_encoder_tensors_are_an_error_unless_skipped(sd1, tmp_path):
    _, _, params, _, _ = sd1
    adapter = random_adapter(params, "object", seed=8)
    peft_file = export_peft(tmp_path / "p.safetensors", adapter, 1.0, params)
    kohya_file = export_kohya(tmp_path / "k.safetensors", adapter, 1.0, params)
    te = np.zeros((2, 32), np.float32)
    cases = ((peft_file, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", import_peft),
             (kohya_file, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", import_kohya))
    for file, te_key, importer in cases:
        write_safetensors(file, {**load_file(str(file)), te_key: te})
        with pytest.raises(LoraFileError, match=rf"adapts the text encoder .*{te_key}.*skip_text_encoder=True"):
            importer(file, params)
        back, _ = importer(file, params, skip_text_encoder=True)
        assert_same_adapter(back, adapter)


def test_bad_files_fail_with_the_key_named(sd1, tmp_path):
    _, _, params, _, _ = sd1
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        import_peft(tmp_path / "nothing.safetensors", params)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        import_kohya(tmp_path / "nothing.safetensors", params)
    a, b = np.zeros((2, 32), np.float32), np.zeros((32, 2), np.float32)

    def peft_file(tensors):
        return write_safetensors(tmp_path / "bad.safetensors", tensors)

    unknown = f"unet.{TO_K.replace('attn2', 'attn9')}.lora_A.weight"
    with pytest.raises(LoraFileError, match=rf"{unknown}.*does not have"):
        import_peft(peft_file({unknown: a, unknown.replace("lora_A", "lora_B"): b}), params)
    with pytest.raises(LoraFileError, match=rf"unet\.{TO_K}\.lora_B\.weight: shape \(31, 2\)"):
        import_peft(peft_file({f"unet.{TO_K}.lora_A.weight": a, f"unet.{TO_K}.lora_B.weight": b[:31]}), params)
    with pytest.raises(LoraFileError, match=rf"unet\.{TO_K}\.lora_A\.weight has no matching lora_B"):
        import_peft(peft_file({f"unet.{TO_K}.lora_A.weight": a}), params)
    with pytest.raises(LoraFileError, match=r"unet\.conv_in\.lora_A\.weight.*kernel of shape \(3, 3, 4, 32\)"):
        import_peft(peft_file({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b}), params)
    with pytest.raises(LoraFileError, match=rf"unet\.{PROJ_IN}\.lora_A\.weight: shape \(2, 32\) does not fit"):
        import_peft(peft_file({f"unet.{PROJ_IN}.lora_A.weight": a, f"unet.{PROJ_IN}.lora_B.weight": b}), params)
    with pytest.raises(LoraFileError, match=r"unet\.foo\.weight is not a PEFT LoRA weight"):
        import_peft(peft_file({"unet.foo.weight": a}), params)
    kohya = "lora_unet_" + TO_K.replace(".", "_").replace("attn2", "attn9")
    with pytest.raises(LoraFileError, match=rf"{kohya}\.lora_down\.weight matches no module"):
        import_kohya(peft_file({f"{kohya}.lora_down.weight": a, f"{kohya}.lora_up.weight": b}), params)
    kohya = "lora_unet_" + TO_K.replace(".", "_")
    with pytest.raises(LoraFileError, match=rf"{kohya}\.lora_down\.weight: shape \(2, 31\), but .* has 32 inputs"):
        import_kohya(peft_file({f"{kohya}.lora_down.weight": a[:, :31], f"{kohya}.lora_up.weight": b}), params)
    with pytest.raises(ValueError, match=r"adapts down_blocks\.9\.x, which the model does not have"):
        export_peft(tmp_path / "out", {"down_blocks.9.x": {"lora_A": jnp.zeros((2, 1)), "lora_B": jnp.zeros((1, 2))}},
                    1.0, params)
