"""One sampling, probe and scoring job over this process's devices, for tests/test_device_counts.py and for
repeated manual runs (``python tests/device_count_job.py OUT MODEL REPEATS [full]`` under any XLA_FLAGS
device count, or as several processes through tests/devices.launch).

It writes OUT/results.npz (process 0): per repeat, the final latents of 20 requests (10 prompts x 2 seeds,
10 DDIM steps, CFG 7.5) with the base model and with UnGuidance (a w per request); the probe's D, D("") and
w under the paper and calibrated rules; the shipped evaluator's class probabilities of the base images.
``full`` adds the edited model alone and the sequential rule, and probes on every repeat (the suite leaves
them out: each is one more compile per run). Its last line is a JSON record of the devices the job used.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np

from unguide_jax.parallel.hosts import maybe_initialize_distributed

maybe_initialize_distributed()
jax.config.update("jax_default_matmul_precision", "highest")

from unguide_jax.edits.edit import lora_edit  # noqa: E402
from unguide_jax.edits.lora import LoraConfig, init_lora  # noqa: E402
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe  # noqa: E402
from unguide_jax.loading.resolve import load_model  # noqa: E402
from unguide_jax.parallel.hosts import is_main_process  # noqa: E402
from unguide_jax.shapes.classifier import load_evaluator  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green star", "a heart", "an arrow", "a dart", "a ring",
           "a yellow cross", "a crescent", "a pointer"]
SEEDS = [0, 1]


def main(out: Path, model: str, repeats: int, full: bool = False) -> None:
    sd = load_model(model).on_every_device()
    config = LoraConfig(rank=2, alpha=8.0, init="random")
    adapter = init_lora(jax.random.key(0), sd.params["unet"], config)
    # B is zero at init: give it values so that the edit changes the predictions.
    adapter = {k: dict(ab, lora_B=0.3 * jax.random.normal(jax.random.key(i), ab["lora_B"].shape))
               for i, (k, ab) in enumerate(adapter.items())}
    edit = lora_edit(adapter, config.alpha)
    prompts = [p for p in PROMPTS for _ in SEEDS]
    seeds = [s for _ in PROMPTS for s in SEEDS]
    w = np.tile([-1.0, 2.0, 0.5, -1.0], len(prompts) // 4)
    probes = {"paper": ProbeConfig(draws=4, ddim_steps=10, t_enc=7, prompt_chunk=4, rule="paper"),
              "calibrated": ProbeConfig(draws=4, ddim_steps=10, t_enc=7, prompt_chunk=4, rule="calibrated"),
              "sequential": ProbeConfig(draws=4, ddim_steps=10, t_enc=7, prompt_chunk=4, rule="sequential",
                                        round_draws=2)}
    if not full:
        del probes["sequential"]
    results: dict[str, np.ndarray] = {}
    for r in range(repeats):
        results[f"base/{r}"] = sd.generate(prompts, seeds, num_steps=10).latents
        results[f"mixed/{r}"] = sd.generate(prompts, seeds, num_steps=10, edit=edit, w=w).latents
        if full:
            results[f"edited/{r}"] = sd.generate(prompts, seeds, num_steps=10, edit=edit).latents
        if r and not full:
            continue
        for rule, probe_config in probes.items():
            probe = WProbe(sd, edit, probe_config, concept_prompts=["an arrow", "a dart"]).run(PROMPTS)
            suffix = f"/{r}" if r else ""
            results.update({f"probe/{rule}/d{suffix}": probe.d, f"probe/{rule}/d_empty{suffix}": np.asarray(probe.d_empty),
                            f"probe/{rule}/w{suffix}": probe.w})
    images = sd.generate(prompts, seeds, num_steps=10).images
    results["scores"] = load_evaluator().probabilities(images)[0]
    placement = sd.placement()
    if is_main_process():
        np.savez(out / "results.npz", **results)
        print(json.dumps(dict(placement=placement, local_devices=jax.local_device_count())))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), full=sys.argv[4:] == ["full"])
