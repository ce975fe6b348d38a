"""Retention: what an erasure keeps of everything else, as one command (``configs/evaluate.py:retention``).

Each method of the table (the base model, the LoRA alone, UnGuide: ``RetentionConfig.methods``) draws one
image per caption of a file the user gives (COCO's ``captions_val2014.json``/``captions_val2017.json``, a
CSV with a ``caption`` column or a text file, one caption per line), caption i with seed ``seed + i``, so
the rows are paired. Two numbers per method:

    CLIP score  100 · max(cos(E_image, E_caption), 0), averaged over the images (mean ± std): CLIPScore,
                Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"
                (their CLIP-S weighs max(cos, 0) by 2.5; the scale 100 is torchmetrics' ``CLIPScore``, which
                text-to-image papers report). Higher is better; an erasure should leave it near the base
                model's. CLIP: ``clip``, sharded over the job's devices (``evaluators.ClipEvaluator``).
    FID         with ``fid_reference`` (a folder of images, e.g. COCO val2014) and ``inception`` (the Inception
                weights file, which the user supplies; nothing is downloaded): the Fréchet distance between the
                2048-d pool features of the method's images and of the references, through torch-fidelity
                (the ``fid`` extra) and its InceptionV3. Each reference is resized (bilinear, the shorter side)
                and centre-cropped to the generated images' size first, as torch-fidelity's
                ``samples_resize_and_crop`` does. Lower is better; FID is biased upwards on few images, so
                compare rows of one run (the same captions and references) only.

Each method samples into its own folder through the sample job (``sampling.run.sample_requests``: PNGs,
manifest.json, probe.json), so a rerun with the same settings reuses the images and the probe's w instead of
drawing them again; the references' FID statistics are kept in ``fid_reference.npz`` for the same reason.
Several processes: every process samples and embeds its share; process 0 reads the PNGs, hands them to the
others for the CLIP score, computes the FID and writes.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from unguide_jax.diffusion.images import slug, versions
from unguide_jax.evaluation.config import Method, check_given
from unguide_jax.evaluation.evaluators import ClipEvaluator
from unguide_jax.evaluation.plan import Plan, Stage, measure_unet_step, probe_unet_rows
from unguide_jax.evaluation.retention_config import RetentionConfig
from unguide_jax.json_files import write_json
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import broadcast_json, check_same_config, is_main_process
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.sampling.prompts import Request, read_text
from unguide_jax.sampling.run import image_name, sample_requests
from unguide_jax.settings import SEED_LIMIT, ConfigError, as_config, to_dict
from unguide_jax.training.sources import concept_targets, load_edit

CLIP_SCORE_SCALE = 100.0  # torchmetrics' CLIPScore (Hessel et al.'s CLIP-S uses 2.5)
GRID_IMAGES = 64          # each method's grid.png: the first images only
READ_CHUNK = 256          # images read from disk (and handed to the other processes) at a time
FID_INSTALL_HINT = "pip install 'unguide-jax[fid]' (torch-fidelity, with a torchvision built for the installed torch)"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF Inception
FID_FEATURES = "2048"     # the pool features every FID uses
FID_BATCH = 32
REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torch-fidelity reads from a folder


# --- captions --------------------------------------------------------------------------------------------


def _coco_captions(path: Path, text: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config.captions: {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                          f"{err.msg})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"config.captions: {path} is not a COCO captions file: it needs an \"annotations\" list of "
                          f"{{image_id, caption}} (as captions_val2014.json has), found {found}")
    first: dict = {}  # image id -> (annotation id, caption): the image's first caption
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ConfigError(f"config.captions: {path} annotations[{i}] needs an image_id and a caption string, "
                              f"got {json.dumps(a)[:80]}")
        order = a.get("id", i)
        if not isinstance(order, int):
            order = i
        image = a["image_id"]
        if image not in first or order < first[image][0]:
            first[image] = (order, a["caption"].strip())
    # Ints before strings, so that a file mixing them still has one order.
    images = sorted(first, key=lambda k: (isinstance(k, str), str(k) if isinstance(k, str) else k))
    for image in images:
        if not first[image][1]:
            raise ConfigError(f"config.captions: {path}: the caption of image_id {image} is empty")
    return [(first[image][1], f"{path.name}:image_id={image}") for image in images]


def _csv_captions(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "caption" not in reader.fieldnames:
        raise ConfigError(f"config.captions: {path} needs a 'caption' column, found {reader.fieldnames} (or give a "
                          ".txt file, one caption per line)")
    out = []
    for i, row in enumerate(reader):
        caption = (row["caption"] or "").strip()
        if not caption:
            raise ConfigError(f"config.captions: {path} row {i + 2}: empty caption")
        out.append((caption, f"{path.name}:{i + 2}"))
    return out


def _text_captions(path: Path, text: str) -> list[tuple[str, str]]:
    return [(line.strip(), f"{path.name}:{i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]


CAPTION_READERS = {".json": _coco_captions, ".csv": _csv_captions, ".txt": _text_captions}


def read_captions(path: str | Path, limit: int = 0) -> list[tuple[str, str]]:
    """(caption, source) of the caption file (see ``CAPTIONS_DOC``), the first ``limit`` (0: all); bad input is a
    one-line ``ConfigError`` naming the file and the problem."""
    if not str(path):
        raise ConfigError("config.captions is empty: give a caption file (COCO's captions_val2014.json, a .csv with "
                          "a caption column or a .txt, one caption per line)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config.captions: no file at {path}")
    reader = CAPTION_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"config.captions: {path}: unknown caption file type {path.suffix or '(no suffix)'!r}: give "
                          "COCO's captions_*.json, a .csv with a 'caption' column or a .txt, one caption per line")
    captions = reader(path, read_text(path, "caption file"))
    if not captions:
        raise ConfigError(f"config.captions: {path} holds no caption")
    return captions[:limit] if limit else captions


# --- the CLIP score -----------------------------------------------------------------------------------


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """100 · max(cos(image_i, text_i), 0) for each row i (pairs, not all against all)."""
    images = np.asarray(image_embeddings, np.float64)
    texts = np.asarray(text_embeddings, np.float64)
    if images.shape != texts.shape or images.ndim != 2:
        raise ValueError(f"need one image embedding per caption embedding, got {images.shape} and {texts.shape}")
    cos = (images * texts).sum(axis=1) / (np.linalg.norm(images, axis=1) * np.linalg.norm(texts, axis=1))
    return CLIP_SCORE_SCALE * np.maximum(cos, 0.0)


def summarize(scores: Sequence[float]) -> dict:
    """mean, std (over images, ddof=1: the spread of one image's score) and n."""
    scores = np.asarray(scores, np.float64)
    std = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    return {"mean": float(scores.mean()), "std": std, "n": int(scores.size)}


# --- FID ---------------------------------------------------------------------------------------------------


class MissingFidPackage(ImportError):
    """torch-fidelity (or a torchvision that works with the installed torch) is missing: the user's to fix."""

    exit_code = 2


def reference_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)


def check_fid_settings(config: RetentionConfig) -> None:
    """The FID's inputs exist (before anything loads); nothing to check without ``fid_reference``."""
    if not config.fid_reference:
        return
    if not config.inception:
        raise ConfigError(f"config.inception is empty: the FID (fid_reference={config.fid_reference}) needs the "
                          f"Inception weights file, torch-fidelity's {INCEPTION_FILE}; give its path (nothing is "
                          "downloaded), or set fid_reference=\"\" to skip the FID")
    weights = Path(config.inception)
    if not weights.is_file():
        raise ConfigError(f"config.inception: the FID's Inception weights file {weights} does not exist (torch-"
                          f"fidelity's {INCEPTION_FILE}; nothing is downloaded)")
    folder = Path(config.fid_reference)
    if not folder.is_dir():
        raise ConfigError(f"config.fid_reference: no folder at {folder} (a folder of reference images, e.g. COCO "
                          "val2014)")
    found = len(reference_files(folder))
    if found < 2:  # a covariance needs two
        raise ConfigError(f"config.fid_reference: {folder} holds {found} {'/'.join(REFERENCE_SUFFIXES)} image(s); the "
                          "FID needs at least 2")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFID:
    """torch-fidelity's InceptionV3 (the TF Inception of the FID papers) from a weights file the user gives,
    and its Fréchet distance. Construction fails early, naming what is missing. ``features``: the layer whose
    activations are compared (the FID's is the 2048-d pool; torch-fidelity also offers "64", "192", "768")."""

    def __init__(self, weights: str | Path, features: str = FID_FEATURES):
        weights = Path(weights)
        try:
            import torch
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
            from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        # torchvision built for another torch fails at import with a RuntimeError, not an ImportError.
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise MissingFidPackage(f"the FID needs torch-fidelity ({first}): {FID_INSTALL_HINT}") from None
        if not weights.is_file():
            raise ConfigError(f"config.inception: the FID's Inception weights file {weights} does not exist")
        # torch-fidelity unpickles the file in full; a file that is not plain tensors is refused here first.
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (torch raises several types for a bad file)
            raise ConfigError(f"config.inception: {weights} is not a PyTorch state dict of tensors (torch.load with "
                              f"weights_only=True: {str(err).strip().splitlines()[0] if str(err).strip() else err!r})"
                              ) from None
        try:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", [features],
                                                    feature_extractor_weights_path=str(weights))
        except RuntimeError as err:
            raise ConfigError(f"config.inception: {weights} does not hold torch-fidelity's InceptionV3 weights "
                              f"({INCEPTION_FILE}): {str(err).strip().splitlines()[0]}") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractor = extractor.to(self.device)
        self.weights, self.layer, self.weights_sha256 = weights, features, _file_digest(weights)
        self._torch, self._statistics, self._distance = torch, fid_features_to_statistics, fid_statistics_to_metric

    def describe(self) -> dict:
        try:
            package = version("torch-fidelity")
        except PackageNotFoundError:
            package = None
        return {"package": "torch-fidelity", "version": package, "features": self.layer,
                "inception": str(self.weights), "inception_sha256": self.weights_sha256}

    def features(self, batches: Iterator[np.ndarray]) -> np.ndarray:
        """Pool features of uint8 (N, H, W, 3) batches, one row per image."""
        out = []
        with self._torch.no_grad():
            for images in batches:
                for start in range(0, len(images), FID_BATCH):
                    x = self._torch.from_numpy(np.ascontiguousarray(images[start:start + FID_BATCH]))
                    x = x.permute(0, 3, 1, 2).contiguous().to(self.device)
                    out.append(self.extractor(x)[0].cpu().numpy())
        return np.concatenate(out)

    def statistics(self, features: np.ndarray) -> dict:
        return self._statistics(self._torch.from_numpy(np.asarray(features)))

    def distance(self, a: Mapping, b: Mapping) -> float:
        from torch_fidelity.metric_fid import KEY_METRIC_FID

        return float(self._distance(a, b, False)[KEY_METRIC_FID])


def fit_reference(image: Image.Image, height: int, width: int) -> np.ndarray:
    """``image`` scaled (bilinear) to cover height x width, then centre-cropped to it: torchvision's
    Resize + CenterCrop, which torch-fidelity's ``samples_resize_and_crop`` applies."""
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, int(image.width * scale)), max(height, int(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
    return np.asarray(image.crop((left, top, left + width, top + height)))


def _read_pngs(folder: Path, names: Sequence[str]) -> np.ndarray:
    def load(name: str) -> np.ndarray:
        with Image.open(folder / name) as png:
            return np.asarray(png.convert("RGB"))
    return np.stack([load(n) for n in names])


def _chunks(items: Sequence, size: int = READ_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def reference_statistics(fid: InceptionFID, folder: Path, height: int, width: int, cache_file: Path) -> tuple[dict, int]:
    """FID statistics of every image in ``folder`` (fitted to height x width) and how many; kept in ``cache_file``
    with what they were computed from (file names, sizes and times, the size, the weights), so a rerun reuses them."""
    files = reference_files(folder)
    key = json.dumps({"files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files], "size": [height, width],
                      "fid": fid.describe()}, sort_keys=True)
    if cache_file.is_file():
        with np.load(cache_file) as saved:
            if str(saved["key"]) == key:
                return {"mu": saved["mu"], "sigma": saved["sigma"]}, len(files)

    def batches():
        for chunk in _chunks(files):
            fitted = []
            for path in chunk:
                try:
                    with Image.open(path) as image:
                        fitted.append(fit_reference(image, height, width))
                except OSError as err:
                    raise ConfigError(f"config.fid_reference: cannot read {path} as an image: {err}") from None
            yield np.stack(fitted)

    stats = fid.statistics(fid.features(batches()))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, key=np.asarray(key), mu=stats["mu"], sigma=stats["sigma"])
    return stats, len(files)


# --- the job -----------------------------------------------------------------------------------------------


def method_sample_config(config: RetentionConfig, method: Method, rows: int) -> SampleConfig:
    """The sample job of one method: its folder, edit and mode; the caption file is recorded as its prompt file
    (each image's caption and seed are in its file name and its manifest record)."""
    return SampleConfig(
        model=config.model, variant=config.variant, revision=config.revision, model_config=config.model_config,
        prompt_file=config.captions, seed=config.seed, guidance_scale=config.guidance_scale,
        num_steps=config.num_steps, eta=config.eta, batch_size=min(config.batch_size, rows), dtype=config.dtype,
        adapters=tuple(config.edits[method.edit]) if method.edit else (), mode=method.mode, w=method.w,
        probe=config.probe, fused=config.fused, overwrite=config.overwrite,
        out_dir=str(Path(config.out_dir) / slug(method.name)))


def _shared_images(folder: Path, names: Sequence[str]) -> np.ndarray:
    """The PNGs ``names`` (written by process 0) as one uint8 array on every process."""
    images = _read_pngs(folder, names) if is_main_process() else None
    if jax.process_count() == 1:
        return images
    shape = broadcast_json(list(images.shape) if is_main_process() else None)
    buffer = images if is_main_process() else np.zeros(shape, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))


SCORES_FILE = "clip_scores.json"  # per method folder: each image's CLIP score, kept for reruns


def _png_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _scored(folder: Path, names: Sequence[str], requests: Sequence[Request], clip_label: str,
            texts: np.ndarray, evaluator: ClipEvaluator) -> np.ndarray:
    """The CLIP score of each image of ``folder``; one process: an image whose bytes, caption and CLIP are those
    of a score in clip_scores.json is not embedded again (several processes embed every image: each holds a
    share)."""
    single = jax.process_count() == 1
    kept = {}
    if single:
        try:
            record = json.loads((folder / SCORES_FILE).read_text())
            kept = record["scores"] if record.get("clip") == clip_label else {}
        except (OSError, ValueError, KeyError, TypeError):
            kept = {}
    digests = [_png_digest(folder / name) for name in names] if single else [None] * len(names)
    todo = [i for i, (name, request) in enumerate(zip(names, requests))
            if not single or kept.get(name, {}).get("png") != digests[i]
            or kept.get(name, {}).get("caption") != request.prompt]
    scores = np.zeros(len(names), np.float64)
    todo_set = set(todo)
    for i, name in enumerate(names):
        if i not in todo_set:
            scores[i] = kept[name]["score"]
    todo_names = [names[i] for i in todo]
    if todo_names:
        embeddings = np.concatenate([evaluator.image_embeddings(_shared_images(folder, chunk))
                                     for chunk in _chunks(todo_names)])
        scores[todo] = clip_scores(embeddings, texts[todo])
    if single and is_main_process():
        write_json(folder / SCORES_FILE, {"clip": clip_label, "scores": {
            name: {"png": digest, "caption": request.prompt, "score": float(score)}
            for name, digest, request, score in zip(names, digests, requests, scores)}})
    return scores


def _main_process_fid(config: RetentionConfig) -> InceptionFID | None:
    """The FID's network on process 0 (which alone computes the FID), with ``fid_reference``; a failure to build
    it stops every process, not only the one that has it."""
    if not config.fid_reference:
        return None
    fid, error = None, None
    if is_main_process():
        try:
            fid = InceptionFID(config.inception)
        except (ConfigError, MissingFidPackage) as err:
            error = err
    problem = broadcast_json(("" if error is None else str(error)) if is_main_process() else None)
    if error is not None:
        raise error
    if problem:
        raise ConfigError(f"process 0: {problem}")
    return fid


def run_retention(config: RetentionConfig | Mapping) -> Path:
    """The retention job (``config``: a RetentionConfig or a dict validated into one); results.json and results.md
    in ``config.out_dir``, each method's images and manifest in a folder of its own."""
    config = as_config(config, RetentionConfig)
    check_given(config)
    methods = config.method_rows()
    captions = read_captions(config.captions, config.limit)  # bad input fails before anything loads
    if config.seed + len(captions) - 1 >= SEED_LIMIT:
        raise ConfigError(f"config.seed: seed + {len(captions)} captions - 1 is past 2**32 - 1 (seeds are uint32)")
    check_fid_settings(config)
    if config.fid_reference and len(captions) < 2:
        raise ConfigError("config.limit: the FID needs at least 2 images per method (a covariance), there is 1 "
                          "caption: give more, or set fid_reference=\"\"")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config.out_dir: {out_dir} is a file, not a folder")
    # Before the first collective: processes with other settings would embed other captions.
    check_same_config(to_dict(config), "retention config")
    fid = _main_process_fid(config)
    started = time.perf_counter()
    evaluator = ClipEvaluator(config.clip)
    clip_label = f"CLIP {config.clip} ({evaluator.clip.weights})"
    texts = evaluator.text_embeddings([c for c, _ in captions])
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    requests = [Request(caption, config.seed + i, config.guidance_scale, source=source)
                for i, (caption, source) in enumerate(captions)]
    names = [image_name(i, r) for i, r in enumerate(requests)]
    edits = {}
    for name in sorted({m.edit for m in methods if m.edit}):
        edit, info = load_edit(list(config.edits[name]), sd.params["unet"])
        edits[name] = (sd.put_replicated(edit), info)
    reference, fid_info = None, None
    results = {}
    for method in methods:
        method_started = time.perf_counter()
        sample_config = method_sample_config(config, method, len(requests))
        manifest_file = sample_requests(sd, sample_config, requests, edits.get(method.edit, (None, [])),
                                        grid_limit=GRID_IMAGES)
        folder = Path(sample_config.out_dir)
        scores = _scored(folder, names, requests, clip_label, texts, evaluator)
        if not is_main_process():
            continue
        manifest = json.loads(manifest_file.read_text())
        settings = manifest["settings"]
        result = dict(mode=method.mode, edit=method.edit, folder=folder.name, clip_score=summarize(scores),
                      images_generated=settings["images_generated"], images_kept=settings["images_kept"],
                      sampling_seconds=settings["seconds"])
        if "probe_seconds" in settings:
            result["probe_seconds"] = settings["probe_seconds"]
        if method.mode == "unguide":
            result["captions_to_edit"] = sum(r.get("w") == config.probe.w_erase for r in manifest["images"])
        if fid is not None:
            height, width = _read_pngs(folder, names[:1]).shape[1:3]
            if reference is None:
                reference, count = reference_statistics(fid, Path(config.fid_reference), height, width,
                                                        out_dir / "fid_reference.npz")
                fid_info = dict(fid.describe(), reference=config.fid_reference, reference_images=count,
                                size=[int(height), int(width)])
            features = fid.features(_read_pngs(folder, chunk) for chunk in _chunks(names))
            result["fid"] = fid.distance(fid.statistics(features), reference)
        result.update(seconds=round(time.perf_counter() - method_started, 2), clip_scores=[float(s) for s in scores])
        results[method.name] = result
    if not is_main_process():  # every process sampled and embedded its share; one writes
        return out_dir
    settings = {k: v for k, v in to_dict(config).items() if k != "job"}
    settings.update(captions_sha256=_file_digest(Path(config.captions)), captions_used=len(captions),
                    clip_model=clip_label, clip_score=f"{CLIP_SCORE_SCALE:g} * max(cos, 0)", fid=fid_info,
                    versions=versions(), edits={name: info for name, (_, info) in edits.items()},
                    seconds=round(time.perf_counter() - started, 1), **sd.placement())
    rows = [dict(caption=r.prompt, seed=r.seed, source=r.source, file=n) for r, n in zip(requests, names)]
    write_json(out_dir / "results.json", {"settings": settings, "methods": results, "captions": rows})
    (out_dir / "results.md").write_text(results_text(config, len(captions), clip_label, fid_info, results) + "\n")
    return out_dir


def plan_retention(config: RetentionConfig | Mapping, measure: bool = True) -> Plan:
    """The job's dry run (``unguide_jax.evaluation.plan``): per method, the images to sample and those already in
    its folder (kept by the sample job when they were made with the same settings), the probe's UNet rows, the
    images CLIP has not scored (clip_scores.json); with ``measure``, one UNet step and one CLIP call timed here.
    Samples, scores and trains nothing."""
    config = as_config(config, RetentionConfig)
    check_given(config)
    captions = read_captions(config.captions, config.limit)
    check_fid_settings(config)
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    requests = [Request(caption, config.seed + i, config.guidance_scale, source=source)
                for i, (caption, source) in enumerate(captions)]
    names = [image_name(i, r) for i, r in enumerate(requests)]
    batch = padded_rows(min(config.batch_size, len(requests)), sd.mesh)
    stages = []
    for method in config.method_rows():
        unguidance = method.mode in ("unguide", "fixed", "oracle")
        stage = Stage(method.name, steps=config.num_steps, batch=batch, branches=4 if unguidance else 2,
                      calls_per_step=2 if unguidance and not config.fused else 1)
        folder = Path(method_sample_config(config, method, len(requests)).out_dir)
        stage.found = sum((folder / name).is_file() for name in names)
        stage.add_images(len(requests) - stage.found)
        try:
            kept = json.loads((folder / SCORES_FILE).read_text())["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            kept = {}
        stage.scores_found = sum(name in kept and (folder / name).is_file() for name in names)
        stage.scores = len(names) - stage.scores_found
        if method.mode == "unguide":
            # one probe per distinct caption (the concept's own targets set the calibrated threshold: counted as
            # a reference prompt each, from the edit's record)
            references = 1 + (len(concept_targets(load_edit(list(config.edits[method.edit]),
                                                            sd.params["unet"])[1]))
                              if config.probe.rule == "calibrated" else 0)
            stage.probe_rows = probe_unet_rows(config.probe, len({c for c, _ in captions}), references, sd.mesh)
        stages.append(stage)
    timing = None
    if measure:
        timing = measure_unet_step(sd, batch)
        evaluator = ClipEvaluator(config.clip)
        pixels = np.random.default_rng(0).integers(0, 256, (16, sd.default_size, sd.default_size, 3), np.uint8)
        evaluator.image_embeddings(pixels)  # compiled first
        started = time.perf_counter()
        evaluator.image_embeddings(pixels)
        timing = dataclasses.replace(timing, evaluator_images=16, evaluator_seconds=time.perf_counter() - started)
    summary = (f"{len(captions)} captions of {Path(config.captions).name} × {len(stages)} method(s); "
               f"{config.num_steps} DDIM steps, batches of {batch}; out_dir {config.out_dir}.")
    notes = ["The FID (fid_reference) runs on the CPU after sampling: not timed."] if config.fid_reference else []
    return Plan(job="retention", summary=summary, stages=stages, timing=timing, evaluator="CLIP", notes=notes)


def format_table(results: Mapping[str, dict]) -> str:
    with_fid = any("fid" in r for r in results.values())
    lines = ["| method | CLIP score ↑ |" + (" FID ↓ |" if with_fid else ""), "|---|---|" + ("---|" if with_fid else "")]
    for name, r in results.items():
        score = r["clip_score"]
        row = f"| {name} | {score['mean']:.2f} ± {score['std']:.2f} |"
        if with_fid:
            row += f" {r['fid']:.2f} |" if "fid" in r else " – |"
        lines.append(row)
    return "\n".join(lines)


def results_text(config: RetentionConfig, captions: int, clip_name: str, fid_info: Mapping | None,
                 results: Mapping[str, dict]) -> str:
    model = "the embedded shapes model" if config.model == "embedded" else config.model
    lines = [(f"Retention on {model}: {captions} captions of {Path(config.captions).name}, one image each (caption i: "
              f"seed {config.seed} + i), CFG {config.guidance_scale}, {config.num_steps} DDIM steps."),
             (f"CLIP score: {CLIP_SCORE_SCALE:g} · max(cos(image, caption), 0), mean ± std over the images "
              f"(CLIPScore, Hessel et al. 2021; torchmetrics' scale), with the {clip_name}.")]
    if fid_info:
        lines.append(f"FID: against the {fid_info['reference_images']} images of {fid_info['reference']} (fitted to "
                     f"{fid_info['size'][0]}x{fid_info['size'][1]} px), torch-fidelity {fid_info['version']}'s "
                     f"InceptionV3 ({Path(fid_info['inception']).name}); biased upwards on few images: compare the "
                     "rows of one run only.")
    lines += ["", format_table(results)]
    for name, r in results.items():
        if "captions_to_edit" in r:
            lines += ["", (f"{name}: the probe sent {r['captions_to_edit']} of {r['clip_score']['n']} captions to the "
                           f"edit (w = {config.probe.w_erase}).")]
    return "\n".join(lines)
