"""Where the packaged presets and concept files are, in a checkout and in an installed wheel alike.

``configs/`` at the repository root is installed as the package ``unguide_jax.configs``
(``pyproject.toml`` maps it), so presets and concepts travel with ``pip install .``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_configs() -> Path:
    """The folder of the shipped presets (``unguide.py``, ``sample.py``, ...)."""
    try:
        return Path(str(resources.files("unguide_jax.configs")))
    except ModuleNotFoundError:
        # A checkout on sys.path without an install: the repository's own configs/.
        return Path(__file__).resolve().parent.parent / "configs"


def packaged_concepts() -> Path:
    """The folder of the shipped concept files (``<name>.json``)."""
    return packaged_configs() / "concepts"


# The shipped embedded shapes model and its evaluator, inside the package (unguide_jax/assets/).
ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "shapes-sd"
EVALUATOR = ASSETS / "shapes-classifier"
RECIPE_RECORD = ASSETS / "recipe"
