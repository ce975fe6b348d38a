"""bench/accelerator.sh --tiny end to end: every section runs and the file has the keys docs/benchmarks.md
documents (no timing is checked). Slow: about 5 minutes on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TOP_KEYS = {"device_kind", "platform", "device_count", "devices_used", "jax_version", "jaxlib_version",
            "device_memory_bytes", "peak_bf16_flops_per_device", "wall_s", "sections", "tiny", "model", "latent",
            "budget_s", "xla_flags"}
COMMON = {"status", "error", "section_s", "calls"}
FORWARD = COMMON | {"seconds_per_call", "compile_s", "model_flops", "compiled_flops", "tflops_per_s", "mfu"}
SECTION_KEYS = {
    "unet_forward_bfloat16": FORWARD,
    "unet_forward_float32": FORWARD,
    "sampling": COMMON | {"seconds_per_batch", "images_per_s", "tflops_per_s", "mfu", "first_call_s"},
    "unguide": COMMON | {"plain_cfg_s_per_image", "unguide_s_per_image", "unguide_over_plain",
                         "sampling_only_over_plain", "component_s"},
    "train_step": COMMON | {"seconds_per_iteration", "mean_sampling_steps", "compile_s", "memory_analysis"},
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
    memory = report["sections"]["train_step"]["memory_analysis"]
    assert MEMORY_KEYS <= memory.keys() and memory["total_bytes"] > 0
