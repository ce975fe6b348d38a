"""What sampling writes: one PNG per image, a grid, and a JSON manifest of what was made how."""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from unguide_jax.json_files import naming_the_file, write_json


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def image_grid(images: Sequence[np.ndarray], cols: int = 0, pad: int = 2) -> np.ndarray:
    """uint8 images (H, W, 3) of one size -> one grid image, white padding."""
    if not len(images):
        raise ValueError("no images for a grid")
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w, c = images[0].shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with naming_the_file(path):
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
    return path


def write_manifest(out_dir: str | Path, settings: dict, records: list[dict]) -> Path:
    return write_json(Path(out_dir) / "manifest.json", {"settings": settings, "images": records})


def versions() -> dict:
    """The versions of the packages that decide what an image looks like, for manifests."""
    out = {}
    for package in ("unguide-jax", "jax", "jaxlib", "flax", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
