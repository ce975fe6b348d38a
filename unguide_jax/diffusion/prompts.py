"""Prompt inputs: one prompt, a prompt file (one per line), or a CSV in the I2P layout."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    guidance_scale: float
    height: int | None = None
    width: int | None = None
    source: str = ""


def _number(row: dict, key: str, cast, default, where: str):
    value = (row.get(key) or "").strip()
    if not value:
        return default
    try:
        return cast(float(value))
    except ValueError:
        raise ValueError(f"{where}: column {key!r} is not a number: {value!r}") from None


def read_csv_requests(path: str | Path, default_guidance: float, default_seed: int = 0) -> list[Request]:
    """Rows with a ``prompt`` column; ``evaluation_seed``/``seed``, ``evaluation_guidance``/``guidance``,
    ``sd_image_width``/``sd_image_height`` are used when present (the I2P layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing prompt CSV: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a 'prompt' column, found {reader.fieldnames}")
        out = []
        for i, row in enumerate(reader):
            where = f"{path} row {i + 2}"
            seed_key = "evaluation_seed" if "evaluation_seed" in row else "seed"
            scale_key = "evaluation_guidance" if "evaluation_guidance" in row else "guidance"
            out.append(Request(
                prompt=row["prompt"] or "",
                seed=_number(row, seed_key, int, default_seed + i, where),
                guidance_scale=_number(row, scale_key, float, default_guidance, where),
                height=_number(row, "sd_image_height", int, None, where),
                width=_number(row, "sd_image_width", int, None, where),
                source=f"{path.name}:{i + 2}",
            ))
    return out


def collect_requests(config: dict) -> list[Request]:
    sources = [k for k in ("prompt", "prompts", "prompt_file", "csv") if config.get(k)]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of prompt, prompts, prompt_file or csv (got: {sources or 'none'})")
    scale, seed, n = float(config["guidance_scale"]), int(config["seed"]), int(config["images_per_prompt"])
    if sources[0] == "csv":
        return read_csv_requests(config["csv"], scale, seed)
    if sources[0] == "prompt_file":
        file = Path(config["prompt_file"])
        if not file.is_file():
            raise FileNotFoundError(f"missing prompt file: {file}")
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif sources[0] == "prompt":
        prompts = [config["prompt"]]
    else:
        prompts = list(config["prompts"])
    # Image j of every prompt shares seed + j: paired comparisons across prompts, as the papers do.
    return [Request(p, seed + j, scale, source=sources[0]) for p in prompts for j in range(n)]
