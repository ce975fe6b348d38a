"""The embedded shapes model's pretraining recipe, stage by stage, resumable (``unguide_jax.shapes.recipe``).

    python -m unguide_jax.cli.recipe --config configs/embedded.py
    python -m unguide_jax.cli.recipe --config configs/embedded.py:tiny --config.work_dir=/tmp/recipe
"""
from __future__ import annotations

import sys

from unguide_jax.cli.config import Command, run_cli
from unguide_jax.cli.runtime import setup_runtime
from unguide_jax.jobs import recipe
from unguide_jax.resources import ASSETS
from unguide_jax.shapes.recipe import publish
from unguide_jax.shapes.recipe_config import RecipeConfig

COMMAND = Command(prog="python -m unguide_jax.cli.recipe", summary="Pretrain the embedded shapes model, stage by "
                  "stage (resumable).", default_config="embedded.py", schema=RecipeConfig)


def recipe_job(config: RecipeConfig) -> int:
    setup_runtime()
    work = recipe(config)
    print(f"recipe outputs in {work}")
    if config.publish:
        publish(work, ASSETS)
        print(f"published to {ASSETS}")
    return 0


def main(argv=None) -> int:
    return run_cli(COMMAND, argv, recipe_job)


if __name__ == "__main__":
    sys.exit(main())
