"""The default probe, rule calibrated, on the README's main job (erase the arrow from the embedded model, the
default settings): sampling with the default settings gives w = -1 to the arrow only and w = 2 to four other
shapes, and UnGuidePipeline, loading the run's PEFT export (unguide.json carries the concept's target prompts),
probes the same five w. The paper's rule would give -1 to most of them: an edit that hardly touches a prompt
still lifts its D just above D("")."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.pytorch import UnGuidePipeline
from unguide_jax.resources import EMBEDDED_MODEL

PROMPTS = ("a photo of the arrow", "a photo of the circle", "a photo of the star", "a photo of the ring",
           "a photo of the crescent")
EXPECTED_W = [-1.0, 2.0, 2.0, 2.0, 2.0]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Train the README's main job with every default but the run folder and the PEFT export, then sample with the
# default settings (mode auto -> unguide, the default probe) but 2 steps. In a process compiled with XLA's
# optimisations and default emitters: 200 training steps run far more than they compile (train and sample
# 70-130 s there on 2 busy cores, warm or cold compile cache; about 160 s in-process with the suite's settings).
_TRAIN_AND_SAMPLE = """
import json, sys
from pathlib import Path
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from unguide_jax import jobs
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.training.config import UnguideTrainConfig
root, prompts = Path(sys.argv[1]), tuple(json.loads(sys.argv[2]))
run_dir = jobs.train(UnguideTrainConfig(run_dir=str(root / "run"), export=("peft",)), progress=False)
manifest = jobs.sample(SampleConfig(model="embedded", adapters=(str(run_dir),), prompts=prompts,
                                    images_per_prompt=1, num_steps=2, out_dir=str(root / "sample")))
print(json.dumps({"run_dir": str(run_dir), "manifest": str(manifest)}))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(run folder, manifest, probe.json) of the README's main job and its default sampling."""
    from tests.devices import run_script

    paths = run_script(_TRAIN_AND_SAMPLE, 1, str(tmp_path_factory.mktemp("probe_default")), json.dumps(PROMPTS),
                       optimised=True)
    manifest = Path(paths["manifest"])
    return (Path(paths["run_dir"]), json.loads(manifest.read_text()),
            json.loads((manifest.parent / "probe.json").read_text()))


def test_default_probe_erases_only_the_arrow(job):
    _, manifest, _ = job
    assert manifest["settings"]["mode"] == "unguide"
    assert manifest["settings"]["probe"] == ProbeConfig().to_dict() and ProbeConfig().rule == "calibrated"
    images = manifest["images"]
    assert [image["prompt"] for image in images] == list(PROMPTS)
    assert [image["w"] for image in images] == EXPECTED_W, [(i["prompt"], i["w"], i["D"]) for i in images]


def test_pipeline_probe_gives_the_same_w(job):
    run_dir, _, probe_json = job
    ours = [probe_json["prompts"][f"7.5|{prompt}"] for prompt in PROMPTS]
    pipe = UnGuidePipeline.from_pretrained(str(EMBEDDED_MODEL), torch_dtype=torch.float32, safety_checker=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    settings = pipe.load_unguide(run_dir)  # the run folder: its export/unguide.json
    assert settings["concept"]["targets"] == ["a photo of the arrow"]
    assert pipe.unguide_probe == ProbeConfig()  # the default probe, as the run exported it
    result = pipe.probe(list(PROMPTS))  # the sampler's default CFG scale, 7.5
    assert result.w.tolist() == EXPECTED_W, (result.d, result.threshold)
    np.testing.assert_allclose(result.d, [r["D"] for r in ours], rtol=1e-3)
    assert result.d_empty == pytest.approx(ours[0]["D_empty"], rel=1e-3)
    assert result.threshold == pytest.approx(ours[0]["threshold"], rel=1e-3)
