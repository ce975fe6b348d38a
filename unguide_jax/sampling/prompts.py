"""Prompt inputs: one prompt, a prompt file (one per line), or a CSV in the I2P layout."""
from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING

from unguide_jax.settings import ConfigError

if TYPE_CHECKING:
    from unguide_jax.sampling.config import SampleConfig

from unguide_jax.settings import SEED_LIMIT


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped); an undecodable byte is a ``ConfigError`` naming ``what``, the
    file, the line and the column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(f"{what} {path} line {line}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8 "
                          "text (save the file as UTF-8)") from None


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
    reader = csv.DictReader(io.StringIO(read_text(path, "prompt CSV"), newline=""))
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
        seed_value, h, w = out[-1].seed, out[-1].height, out[-1].width
        if not 0 <= seed_value < SEED_LIMIT:
            raise ConfigError(f"{where}: seed {seed_value} is outside [0, 2**32) (seeds are uint32)")
        for name, side in (("sd_image_height", h), ("sd_image_width", w)):
            if side is not None and (side <= 0 or side % 8):
                raise ConfigError(f"{where}: {name} {side} must be a positive multiple of 8")
    if not out:
        raise ConfigError(f"prompt CSV {path} has no rows: nothing to sample")
    return out


def collect_requests(config: SampleConfig) -> list[Request]:
    """The requests of a sample config: its one prompt source, ``images_per_prompt`` seeds each."""
    sources = [k for k in ("prompt", "prompts", "prompt_file", "csv") if getattr(config, k)]
    if len(sources) != 1:
        raise ConfigError(f"give exactly one of prompt, prompts, prompt_file or csv (got: {sources or 'none'})")
    scale, seed, n = config.guidance_scale, config.seed, config.images_per_prompt
    if sources[0] == "csv":
        return read_csv_requests(config.csv, scale, seed)
    if sources[0] == "prompt_file":
        file = Path(config.prompt_file)
        if not file.is_file():
            raise FileNotFoundError(f"missing prompt file: {file}")
        prompts = [line.strip() for line in read_text(file, "prompt file").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"config.prompt_file: {file} holds no prompts (no non-empty lines): nothing to sample")
    elif sources[0] == "prompt":
        prompts = [config.prompt]
    else:
        prompts = list(config.prompts)
    # Image j of every prompt shares seed + j: paired comparisons across prompts, as the papers do.
    return [Request(p, seed + j, scale, source=sources[0]) for p in prompts for j in range(n)]
