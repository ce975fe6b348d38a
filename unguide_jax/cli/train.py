"""``unguide-train`` (and ``python train.py``): erase a concept with UnGuide (default), learnable
prompts, PURE or UCE.

    unguide-train --config unguide.py
    unguide-train --config unguide.py:sd15-object --config.model=PATH --config.concept=dog
    unguide-train --config unguide.py --config.resume=true
    unguide-train --config unguide.py:many --config.concepts='["shapes-arrow", "shapes-star"]'   # K LoRAs, one run
    unguide-train --config learnable_prompts.py
    unguide-train --config pure.py        # closed form: seconds, no iterations
    unguide-train --config uce.py
    unguide-train --config pure.py --help            # every key: its value in this preset, its doc
    unguide-train --config unguide.py:tiny --print-config   # the resolved config as JSON

Keys: ``unguide_jax.training.config`` (one class per eraser, chosen by ``method``); the job:
``unguide_jax.jobs.train``.

Run folder (``config.run_dir``):
    config.json            the resolved config (file preset + overrides)
    metrics.jsonl          one line per step (loss, t_enc, t, seconds); closed form: one report line
    checkpoints/<step>/    Orbax: train state + config, every ``checkpoint_every`` steps and the last
    adapter.safetensors    unguide: the final LoRA (``unguide_jax.loading.edit_files.load_adapter`` reads it)
    edit.safetensors       the other erasers: the final edit (``unguide_jax.loading.edit_files.load_edit_file``);
                           learnable prompts also write edit_with_prompt.safetensors (tokens kept)
    export/                the edit for PyTorch users, in the formats config.export names
                           (``unguide_jax.loading.exports``: peft, kohya, partial_unet, merged_unet, prompt)
"""
from __future__ import annotations

import sys

from unguide_jax.cli.config import Command, run_cli
from unguide_jax.cli.runtime import setup_runtime
from unguide_jax.jobs import train as train_job
from unguide_jax.parallel.hosts import maybe_initialize_distributed
from unguide_jax.training.config import TrainConfig, train_schema

COMMAND = Command(prog="unguide-train", summary="Erase a concept: UnGuide (default), learnable prompts, PURE or UCE.",
                  default_config="unguide.py", schema=train_schema)


def train(config: TrainConfig) -> int:
    setup_runtime()
    maybe_initialize_distributed()
    run_dir = train_job(config)
    made = [run_dir / name for name in ("adapter.safetensors", "edit.safetensors", "concepts.safetensors")
            if (run_dir / name).is_file()]
    print(f"wrote {', '.join(str(m) for m in made)}")
    return 0


def main(argv=None) -> int:
    return run_cli(COMMAND, argv, train)


if __name__ == "__main__":
    sys.exit(main())
