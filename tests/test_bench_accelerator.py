"""bench/accelerator.sh --tiny end to end: every section runs and the file has the keys docs/benchmarks.md
documents (no timing is checked). Slow: 45 s on the 2 idle cores, several minutes when they are
loaded. And, quick: --only's groups, the SDXL sections' packed context and remat weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bench.bench_accelerator import (
    GROUPS,
    SECTIONS,
    Bench,
    selected_sections,
    tiny_sdxl_settings,
)

ROOT = Path(__file__).resolve().parent.parent

TOP_KEYS = {"device_kind", "platform", "device_count", "devices_used", "jax_version", "jaxlib_version",
            "device_memory_bytes", "peak_bf16_flops_per_device", "wall_s", "sections", "tiny", "model", "latent",
            "budget_s", "xla_flags", "sdxl_model", "sdxl_latent"}
COMMON = {"status", "error", "section_s", "calls"}
FORWARD = COMMON | {"seconds_per_call", "compile_s", "model_flops", "compiled_flops", "tflops_per_s", "mfu",
                    "context_tokens"}
TRAIN = COMMON | {"seconds_per_iteration", "mean_sampling_steps", "compile_s", "memory_analysis", "remat",
                  "context_tokens"}
SECTION_KEYS = {
    "unet_forward_bfloat16": FORWARD,
    "unet_forward_float32": FORWARD,
    "sampling": COMMON | {"seconds_per_batch", "images_per_s", "tflops_per_s", "mfu", "first_call_s"},
    "unguide": COMMON | {"plain_cfg_s_per_image", "unguide_s_per_image", "unguide_over_plain",
                         "sampling_only_over_plain", "component_s"},
    "train_step": TRAIN,
    "sdxl_unet_forward_bfloat16": FORWARD,
    "sdxl_train_step": TRAIN,
}
MEMORY_KEYS = {"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes"}


@pytest.mark.slow
def test_tiny_run_writes_every_documented_key(tmp_path):
    out = tmp_path / "acc.json"
    result = subprocess.run(["bash", str(ROOT / "bench" / "accelerator.sh"), "--tiny", str(out)], capture_output=True,
                            text=True, timeout=1800, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert TOP_KEYS <= report.keys(), TOP_KEYS - report.keys()
    assert report["tiny"] is True and report["device_count"] >= 1
    assert set(report["sections"]) == set(SECTION_KEYS)
    for name, keys in SECTION_KEYS.items():
        entry = report["sections"][name]
        assert entry["status"] == "ok", (name, entry["error"])
        assert keys <= entry.keys(), (name, keys - entry.keys())
        assert entry["calls"] >= 1
    forward = report["sections"]["unet_forward_float32"]
    assert forward["model_flops"] > 0 and forward["compiled_flops"] > 0
    # The same model, so the same model FLOPs whatever the dtype.
    assert report["sections"]["unet_forward_bfloat16"]["model_flops"] == forward["model_flops"]
    if report["peak_bf16_flops_per_device"] is None:
        assert forward["mfu"] is None
    for name in ("train_step", "sdxl_train_step"):
        memory = report["sections"][name]["memory_analysis"]
        assert MEMORY_KEYS <= memory.keys() and memory["total_bytes"] > 0
    sections = report["sections"]
    # The SDXL sections ran the SDXL-layout UNet on its packed context (77 + 1 tokens), the step with remat.
    assert sections["sdxl_unet_forward_bfloat16"]["context_tokens"] == 78
    assert sections["sdxl_train_step"]["context_tokens"] == 78 and sections["train_step"]["context_tokens"] == 77
    assert sections["sdxl_train_step"]["remat"] == "blocks" and sections["train_step"]["remat"] == "off"
    assert sections["sdxl_unet_forward_bfloat16"]["model_flops"] > 0
    assert sections["sdxl_unet_forward_bfloat16"]["model_flops"] != forward["model_flops"]


def test_only_takes_sections_and_groups():
    assert selected_sections("") == []
    assert selected_sections("sdxl") == ["sdxl_unet_forward_bfloat16", "sdxl_train_step"]
    assert selected_sections("sdxl_train_step,unet_forward_float32") == ["unet_forward_float32", "sdxl_train_step"]
    assert selected_sections("sd15,sdxl") == list(SECTIONS)
    assert set(GROUPS["sd15"]) | set(GROUPS["sdxl"]) == set(SECTIONS)
    with pytest.raises(ValueError, match="unknown"):
        selected_sections("sdxl_forward")


def test_sdxl_prompts_are_packed_contexts():
    """The SDXL sections' conditioning: 77 text tokens and the pooled embedding + time ids in one more."""
    from unguide_jax.models.unet import unpack_context

    bench = Bench(tiny_sdxl_settings())
    cond, uncond, x_T = bench.prompts(2)
    assert cond.shape == uncond.shape == (2, 78, 64) and bench.tokens == 78
    assert x_T.shape == (2, 8, 8, 4)
    states, added = unpack_context(cond, bench.config.pooled_dim)
    assert states.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 24)
    np.testing.assert_array_equal(added["time_ids"], np.tile([64, 64, 0, 0, 64, 64], (2, 1)))


def test_remat_unet_takes_the_same_weights():
    """sdxl_train_step runs the remat UNet on the weights drawn for the plain one."""
    from unguide_jax.models.layers import abstract_params

    bench = Bench(tiny_sdxl_settings())
    plain, remat = bench.unet("bfloat16"), bench.unet("bfloat16", "blocks")
    shapes = [jax.tree_util.tree_structure(abstract_params(u, *u.init_inputs())) for u in (plain, remat)]
    assert shapes[0] == shapes[1]
