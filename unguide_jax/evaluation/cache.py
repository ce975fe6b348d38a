"""The erasure evaluation's cache (``out_dir/cache``): what earlier runs made, keyed by what it depends on, so
that a rerun redoes no image, score, probe or attack (``EvaluationCache``, ``open_cache``)."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from unguide_jax.diffusion.batching import ImageRequest
from unguide_jax.diffusion.images import save_png
from unguide_jax.evaluation.config import EvaluateConfig
from unguide_jax.evaluation.evaluators import PromptSet, ShapesEvaluator
from unguide_jax.json_files import write_json
from unguide_jax.loading.model_identity import file_sha256, model_fingerprint
from unguide_jax.parallel.hosts import is_main_process, process_count, to_numpy
from unguide_jax.training.sources import edit_tensors

CACHE_FOLDER = "cache"


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def edit_digest(edit) -> str | None:
    """What an edit adds to the model, hashed: each tensor's name, dtype, shape and bytes (and a prompt memory's
    scope). The tensors as loaded rather than the source files: a run folder's logs, or a LoRA saved again or in
    another format, do not change the images."""
    if edit is None:
        return None
    digest = hashlib.sha256()
    for name, value in sorted(edit_tensors(edit).items()):
        array = np.ascontiguousarray(to_numpy(value))
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\n".encode())
        digest.update(array.tobytes())
    if edit.memory is not None:
        digest.update(f"memory scope {edit.memory.scope}".encode())
    return digest.hexdigest()[:24]


def _evaluator_files(evaluator) -> list[Path]:
    clip = getattr(evaluator, "clip", None)
    if clip is not None:  # the weights, and the configs and vocabulary beside them
        weights = Path(clip.weights)
        return [weights] + sorted(p for p in weights.parent.iterdir() if p.is_file() and p.suffix in (".json", ".txt"))
    if isinstance(evaluator, ShapesEvaluator):
        from unguide_jax.resources import EVALUATOR

        root = Path(EVALUATOR)
        return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return []


class EvaluationCache:
    """What earlier runs of an evaluation made, under ``root`` (``out_dir/cache``), so that a rerun redoes none
    of it:

        images/<k[:2]>/<k>.png   an image; k: the model's content fingerprint, the edit's digest, prompt, seed,
                                 guidance, w, steps, η, dtype (and ``fused`` for UnGuidance)
        scores-<evaluator>.json  per image and texts scored against: the class and text probabilities
        probes.json              per probe's inputs: its w per prompt and its record
        attacks.json             per attack's inputs: its result

    ``root`` None: this run's memory only (with several processes, one host's files are not the others').
    ``work`` counts what this run made and what it found."""

    def __init__(self, root: Path | None, model_id: str, config: EvaluateConfig, evaluator=None):
        self.root = None if root is None else Path(root)
        self.model_id, self.config = model_id, config
        self._images: dict[str, np.ndarray] = {}
        self._records: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self.work: collections.Counter = collections.Counter()
        self.evaluator_id = "" if evaluator is None else self._evaluator_id(evaluator)

    def _evaluator_id(self, evaluator) -> str:
        hashes = self._kind("file-hashes")  # (size, mtime) -> sha256: a 600 MB CLIP is hashed once
        before = dict(hashes)
        files = [(p.name, file_sha256(p, hashes)) for p in _evaluator_files(evaluator)]
        if hashes != before:
            self._dirty.add("file-hashes")
        return digest([type(evaluator).__name__, files or getattr(evaluator, "name", "")])

    # --- images ---

    def image_key(self, edit_id: str | None, request: ImageRequest) -> str:
        c = self.config
        fields = dict(model=self.model_id, edit=edit_id, prompt=request.prompt, seed=int(request.seed),
                      guidance=float(request.guidance_scale), w=None if request.w is None else float(request.w),
                      steps=c.num_steps, eta=float(c.eta), dtype=c.dtype)
        if request.w is not None:  # one UNet call or two: equal images up to rounding, not bit for bit
            fields["fused"] = bool(c.fused)
        return digest(fields)

    def _image_file(self, key: str) -> Path:
        return self.root / "images" / key[:2] / f"{key}.png"

    def has_image(self, key: str) -> bool:
        return key in self._images if self.root is None else self._image_file(key).is_file()

    def image(self, key: str) -> np.ndarray | None:
        if self.root is None:
            return self._images.get(key)
        path = self._image_file(key)
        if not path.is_file():
            return None
        from PIL import Image

        try:
            with Image.open(path) as png:
                return np.asarray(png.convert("RGB"))
        except OSError:  # a damaged file: drawn again
            return None

    def put_image(self, key: str, image: np.ndarray) -> None:
        if self.root is None:
            self._images[key] = image
        else:
            save_png(self._image_file(key), image)

    def place(self, key: str, image: np.ndarray, dest: Path) -> None:
        """``dest`` holds the image: a hard link to the cached file where the filesystem allows, else a copy."""
        if self.root is not None and self._image_file(key).is_file():
            source = self._image_file(key)
            if dest.exists() and os.path.samefile(source, dest):
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            try:
                tmp.unlink(missing_ok=True)
                os.link(source, tmp)
                tmp.replace(dest)
                return
            except OSError:
                tmp.unlink(missing_ok=True)
        save_png(dest, image)

    # --- records: scores, probes, attacks ---

    def _kind(self, kind: str) -> dict:
        if kind not in self._records:
            data = {}
            if self.root is not None and (self.root / f"{kind}.json").is_file():
                try:
                    data = json.loads((self.root / f"{kind}.json").read_text())
                except (OSError, ValueError):  # unreadable: redone, then written again
                    data = {}
            self._records[kind] = data if isinstance(data, dict) else {}
        return self._records[kind]

    def record(self, kind: str, key: str):
        return self._kind(kind).get(key)

    def put_record(self, kind: str, key: str, value) -> None:
        self._kind(kind)[key] = value
        self._dirty.add(kind)

    def save(self) -> None:
        """Writes the records changed since the last save (the images are written as they are made)."""
        if self.root is None or not is_main_process():
            return
        for kind in sorted(self._dirty):
            try:
                write_json(self.root / f"{kind}.json", self._records[kind])
            except ValueError as err:  # a non-finite value: not kept, so redone next time
                warnings.warn(f"{self.root / kind}.json not written: {err}", stacklevel=2)
        self._dirty.clear()

    # --- scores ---

    def scores_kind(self) -> str:
        return f"scores-{self.evaluator_id[:16]}"

    def texts_id(self, prompt_set: PromptSet) -> str:
        return digest([list(prompt_set.class_names), prompt_set.prompts])

    def has_scores(self, key: str, texts_id: str) -> bool:
        return self.record(self.scores_kind(), f"{key}:{texts_id}") is not None


def open_cache(config: EvaluateConfig, out_dir: Path, evaluator) -> EvaluationCache:
    """The evaluation's cache under ``out_dir/cache`` (memory only with several processes)."""
    model_id = digest(dict(model=model_fingerprint(config.model, revision=config.revision,
                                                    config_folder=config.model_config or None),
                            variant=config.variant, dtype=config.dtype))
    root = out_dir / CACHE_FOLDER if process_count() == 1 else None
    return EvaluationCache(root, model_id, config, evaluator)
