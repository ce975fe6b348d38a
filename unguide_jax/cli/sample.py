"""``unguide-sample`` (and ``python sample.py``): requests -> (probe) -> batched jitted generation ->
PNGs, grid, manifest; or, with an evaluation config, the erasure table (``job="evaluate"``), the I2P
explicit-content table (``job="i2p"``) or the retention table (``job="retention"``: CLIP score, FID).

    unguide-sample --config sample.py:embedded
    unguide-sample --config sample.py --config.model=PATH --config.prompt="a photo of a cat"
    unguide-sample --config sample.py:embedded --config.adapters='["runs/unguide-shapes-arrow"]'
    unguide-sample --config evaluate.py          # the erasure evaluation table
    unguide-sample --config evaluate.py:i2p --config.csv=i2p_prompts_4703.csv   # I2P + NudeNet (job="i2p")
    unguide-sample --config evaluate.py:retention --config.model=PATH --config.captions=FILE --config.clip=CLIP
    unguide-sample --config evaluate.py:many     # K classes erased at once (job="many")
    unguide-sample --config evaluate.py --help   # every key: its value in this preset, its doc
    unguide-sample --config evaluate.py:sd14-table1 --config.model=PATH --config.evaluator=clip:CLIP --dry-run
                                                 # the plan: images, UNet and evaluator calls, time estimated here

Keys: ``unguide_jax.sampling.config.SampleConfig``; ``unguide_jax.evaluation.config.EvaluateConfig`` for a
config with job="evaluate", ``I2PConfig`` for job="i2p", ``unguide_jax.evaluation.retention_config.RetentionConfig``
for job="retention". The jobs: ``unguide_jax.jobs``.
"""
from __future__ import annotations

import json
import sys
from typing import Mapping

from unguide_jax.cli.config import Command, run_cli
from unguide_jax.cli.runtime import setup_runtime
from unguide_jax.evaluation.config import EvaluateConfig, I2PConfig
from unguide_jax.evaluation.many_config import ManyTableConfig
from unguide_jax.evaluation.retention_config import RetentionConfig
from unguide_jax.jobs import evaluate, i2p, many_table, plan, retention, sample
from unguide_jax.parallel.hosts import is_main_process, maybe_initialize_distributed
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.settings import Config, ConfigError

JOB_SCHEMAS: dict[str, type[Config]] = {"sample": SampleConfig, "evaluate": EvaluateConfig, "i2p": I2PConfig,
                                       "retention": RetentionConfig, "many": ManyTableConfig}


def sample_or_evaluate(raw: Mapping) -> type[Config]:
    """unguide-sample's schema by the config's ``job``: EvaluateConfig (evaluate), I2PConfig (i2p),
    RetentionConfig (retention), else SampleConfig."""
    job = raw.get("job", "sample")
    if job not in JOB_SCHEMAS:
        raise ConfigError(f"config.job must be 'evaluate', 'i2p', 'retention' or 'many' (or absent: sampling), got "
                          f"{job!r}")
    return JOB_SCHEMAS[job]


def dry_run(config) -> int:
    """--dry-run: the evaluation job's plan, printed; nothing is generated, scored or trained."""
    setup_runtime()
    maybe_initialize_distributed()
    text = plan(config).text()
    if is_main_process():
        print(text)
    return 0


COMMAND = Command(prog="unguide-sample", summary="Sample images (with or without edits, UnGuidance), or evaluate "
                  "erasures (a config with job=\"evaluate\", \"i2p\" or \"retention\").", default_config="sample.py",
                  schema=sample_or_evaluate, dry_run=dry_run)


def sample_or_evaluate_job(config: SampleConfig | EvaluateConfig | I2PConfig | RetentionConfig) -> int:
    setup_runtime()
    maybe_initialize_distributed()
    if isinstance(config, (EvaluateConfig, I2PConfig, RetentionConfig, ManyTableConfig)):
        run = {I2PConfig: i2p, RetentionConfig: retention, ManyTableConfig: many_table}.get(type(config), evaluate)
        out_dir = run(config)
        if not is_main_process():
            return 0
        print((out_dir / "results.md").read_text())
        print(f"wrote {out_dir / 'results.json'} and the images under {out_dir}")
        return 0
    manifest = sample(config)
    if not is_main_process():
        return 0
    print(f"wrote {manifest}")
    evaluation = json.loads(manifest.read_text())["settings"].get("evaluation")
    if evaluation and evaluation["images_naming_a_class"]:
        print(f"evaluator: {evaluation['classified_as_prompted']} of {evaluation['images_naming_a_class']} images "
              f"are classified as the class their prompt names ({evaluation['accuracy']:.0%})")
    return 0


def main(argv=None) -> int:
    return run_cli(COMMAND, argv, sample_or_evaluate_job)


if __name__ == "__main__":
    sys.exit(main())
