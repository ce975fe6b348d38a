"""The explicit-content evaluation (I2P prompts and NudeNet counts, as the UnGuide paper, ESD and MACE report them), as one command.

The I2P prompts (a CSV in the layout the literature uses), one image per row with the row's own
``evaluation_seed`` and ``evaluation_guidance``, sampled by each method of the table: the base model,
the nudity LoRA alone and UnGuide (the probe picks each prompt's w with R = 10 draws, at the row's own
guidance). NudeNet then counts the exposed body parts (``unguide_jax.evaluation.nudenet``).

Sizes: the CSV's per-row sizes were SD 1.4's (512 px). A 512-px model samples them; another model
samples its own size (``image_size=auto``; ``csv`` or ``model`` force one), and results.json says which.

Each method samples into its own folder with the sample job's machinery (``unguide_jax.cli.sample``:
PNGs written as batches finish, manifest.json with every image's prompt, seed, guidance, size and w,
probe.json), so an interrupted run resumes without redoing finished images or probes (only if the model's
files are the same: the sample job fingerprints them); NudeNet's detections are kept per image in
nudenet.json (by the PNG's hash), so they are not redone either.
Only process 0 writes and runs NudeNet.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from unguide_jax.diffusion.images import slug, versions
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.unguide.modes import weights_for
from unguide_jax.erasers.unguide.probe import ProbeConfig, WProbe
from unguide_jax.evaluation.config import I2PConfig, Method, check_given
from unguide_jax.evaluation.train_first import missing_train_config, planned_training, run_is_missing
from unguide_jax.evaluation.nudenet import (
    CLASS_LABELS,
    DETECTOR_FLOOR,
    EXPOSED_CLASSES,
    ExposedCounts,
    NudeNetDetector,
    count_exposed,
    counts_as_exposed,
)
from unguide_jax.evaluation.plan import Plan, Stage, measure_unet_step, probe_unet_rows
from unguide_jax.evaluation.ring_a_bell import ring_a_bell_prompts
from unguide_jax.evaluation.robustness import ATTACK_LABELS, attack_settings, run_attacks
from unguide_jax.json_files import write_json
from unguide_jax.loading.model_identity import model_fingerprint
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import check_same_config, is_main_process
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.sampling.prompts import Request, read_csv_requests, read_text
from unguide_jax.sampling.run import image_name, sample_requests
from unguide_jax.settings import ConfigError, as_config, to_dict
from unguide_jax.training.config import train_schema
from unguide_jax.training.sources import concept_targets, load_edit

I2P_COLUMNS = ("prompt", "evaluation_seed", "evaluation_guidance")
CSV_SIZE = 512           # the I2P rows' sd_image_width/height are SD 1.4's
DEFAULT_GUIDANCE = 7.5   # only for a row with an empty evaluation_guidance
GRID_IMAGES = 64         # each method's grid.png: the first images only (a full run has thousands)
SAVE_EVERY = 200         # nudenet.json is rewritten after this many new detections (an interrupted run keeps them)
EXPLICIT_CONCEPT = "nudity"  # the attacks' Ring-A-Bell vector: the shipped concept's prompt pairs


def read_i2p_rows(path: str | Path, nudity_only: bool = False, limit: int = 0) -> list[Request]:
    """The CSV's rows as requests (seed, guidance and size from the row), optionally only those with
    nudity_percentage > 0, then the first ``limit`` (0: all)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config.csv: no file at {path} (give the I2P prompt CSV, i2p_prompts_4703.csv)")
    rows = list(csv.DictReader(io.StringIO(read_text(path, "prompt CSV"), newline="")))
    columns = list(rows[0]) if rows else []
    missing = [c for c in I2P_COLUMNS + (("nudity_percentage",) if nudity_only else ()) if c not in columns]
    if missing:
        raise ConfigError(f"config.csv: {path} lacks the I2P column(s) {missing} (it has {columns}): the evaluation "
                          "samples each row with its own seed and guidance")
    requests = read_csv_requests(path, DEFAULT_GUIDANCE)
    if nudity_only:
        def nudity(i: int, row: dict) -> float:
            try:
                return float(row["nudity_percentage"] or 0)
            except ValueError:
                raise ConfigError(f"{path} row {i + 2}: nudity_percentage is not a number: "
                                  f"{row['nudity_percentage']!r}") from None

        requests = [r for i, (r, row) in enumerate(zip(requests, rows)) if nudity(i, row) > 0]
    if limit:
        requests = requests[:limit]
    if not requests:
        raise ConfigError(f"config.csv: {path} has no row to sample" + (" with nudity_percentage > 0" if nudity_only
                                                                        else ""))
    return requests


def resolve_image_size(choice: str, model_size: int) -> dict:
    """Which sizes the images get: ``used`` "csv" (the rows' own) or "model" (``model_size`` square), and why."""
    if choice == "csv" or (choice == "auto" and model_size == CSV_SIZE):
        why = (f"a {model_size}-px model samples the rows' own sizes, SD 1.4's" if choice == "auto"
               else "the rows' own sizes (image_size=csv)")
        return {"used": "csv", "model_size": model_size, "why": why}
    if choice == "model":
        why = f"the model's own size, {model_size} px (image_size=model)"
    elif choice == "auto":
        why = (f"the rows' sizes are SD 1.4's ({CSV_SIZE} px), so this model samples its own size, {model_size} px, "
               "which it was trained for")
    else:
        raise ValueError(f"unknown image_size {choice!r}")
    return {"used": "model", "model_size": model_size, "why": why}


def sized(requests: Sequence[Request], size: Mapping) -> list[Request]:
    """The requests with the sizes ``size`` chose: the model's size leaves each request's to the sampler."""
    if size["used"] == "csv":
        return list(requests)
    return [dataclasses.replace(r, height=None, width=None) for r in requests]


def method_probe(config: I2PConfig, method: Method) -> ProbeConfig:
    """The probe of a method: the config's, with the row's own settings where it names them."""
    return method.probe_of(config.probe)


def method_sample_config(config: I2PConfig, method: Method, size: Mapping, rows: int) -> SampleConfig:
    """The sample job of one method: its folder, edit and mode. The model's size goes into height/width,
    so that images of the rows' own sizes and of the model's never pass for each other on a rerun."""
    side = size["model_size"] if size["used"] == "model" else 0
    return SampleConfig(
        model=config.model, variant=config.variant, revision=config.revision, model_config=config.model_config,
        csv=config.csv, guidance_scale=DEFAULT_GUIDANCE, num_steps=config.num_steps, eta=config.eta,
        height=side, width=side, batch_size=min(config.batch_size, rows), dtype=config.dtype,
        adapters=tuple(config.edits[method.edit]) if method.edit else (), mode=method.mode, w=method.w,
        probe=method_probe(config, method), fused=config.fused, overwrite=config.overwrite,
        out_dir=str(Path(config.out_dir) / slug(method.name)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def detect_folder(detect: Callable[[np.ndarray], list[dict]], describe: Mapping, folder: Path,
                  files: Sequence[str], cache_file: Path | None = None) -> tuple[dict[str, list[dict]], int]:
    """Detections of every PNG in ``files`` (names under ``folder``); returns them and how many images were
    run through ``detect``. ``cache_file`` (JSON) keeps each image's detections by the PNG's hash, for the
    detector ``describe`` names: an image already detected is not detected again."""
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            saved = json.loads(cache_file.read_text())
        except ValueError:
            saved = {}
        if saved.get("detector") == dict(describe):
            cache = saved.get("images", {})
    out, fresh = {}, 0

    def save():
        if cache_file is not None:
            write_json(cache_file, {"detector": dict(describe), "images": cache})

    for name in files:
        path = folder / name
        digest = _sha256(path)
        entry = cache.get(name)
        if entry is None or entry.get("sha256") != digest:
            with Image.open(path) as png:
                image = np.asarray(png.convert("RGB"))
            cache[name] = entry = {"sha256": digest, "detections": detect(image)}
            fresh += 1
            if fresh % SAVE_EVERY == 0:
                save()
        out[name] = entry["detections"]
    if fresh:
        save()
    return out, fresh


def _table(counts: Mapping[str, ExposedCounts], field: str) -> str:
    last = "any class" if field == "images" else "total"
    lines = ["| method | " + " | ".join(CLASS_LABELS[c] for c in EXPOSED_CLASSES) + f" | {last} |",
             "|---" * (len(EXPOSED_CLASSES) + 2) + "|"]
    for name, c in counts.items():
        per_class = getattr(c, field)
        total = c.images_with_any if field == "images" else c.total_detections
        lines.append(f"| {name} | " + " | ".join(str(per_class[k]) for k in EXPOSED_CLASSES) + f" | {total} |")
    return "\n".join(lines)


def format_tables(counts: Mapping[str, ExposedCounts]) -> str:
    """The paper's table per method: images with each exposed class, then boxes (as MACE's script counts)."""
    if not counts:
        raise ValueError("no method to tabulate")
    first = next(iter(counts.values()))
    return "\n".join([f"Images with each exposed class (of {first.total_images}):", "", _table(counts, "images"), "",
                      "Detections (every box, as MACE's script counts):", "", _table(counts, "detections")])


def _probe_summary(records: list[dict], method: Method, config: I2PConfig) -> dict:
    if method.mode != "unguide":
        return {}
    ws = [r["w"] for r in records]
    return {"prompts_to_edit": sum(w == config.probe.w_erase for w in ws), "prompts": len(ws),
            "D_empty": records[0].get("D_empty") if records else None}


def attack_rows(sd, config: I2PConfig, method: Method, edit, info: list[dict], requests: Sequence[Request],
                exposed: Callable[[np.ndarray], bool], targets: Callable[[Request], np.ndarray],
                ring: Callable[[Request], object]) -> dict[str, dict]:
    """The attacks of ``config.attack.kinds`` on one method, each of ``requests`` its own target (the base model's
    image of the row's prompt, seed and guidance): {kind: {success_rate, per_row}}. ``exposed(image)``: NudeNet sees
    an exposed class at the threshold; ``ring(request)``: the Ring-A-Bell prompt of the row (the concept's vector
    added to the row's own prompt), shared by every method."""
    probe_config = method_probe(config, method)
    probe = (WProbe(sd, edit, probe_config, concept_prompts=concept_targets(info))
             if method.mode == "unguide" else None)
    settings = attack_settings(config.attack.settings, "explicit", config.attack.explicit_prefix_tokens)
    per_row = []
    for i, request in enumerate(requests):
        guidance = request.guidance_scale
        bar = None
        if probe is not None:
            bar = probe.threshold(guidance)
            bar = probe.d_empty if bar is None else bar

        def ws_of(texts, contexts, guidance=guidance):
            # The row's own mode; the oracle's w is w_erase, since an attacked I2P prompt still asks for the concept.
            ws = weights_for(method.mode, len(texts), fixed_w=method.w, oracle=[probe_config.w_erase] * len(texts),
                             probe=lambda: probe.run(texts, guidance, prompt_embeddings=contexts).w)
            return None if all(w is None for w in ws) else ws

        def sample(texts, contexts, w, request=request):
            return sd.generate(texts, [request.seed], guidance_scale=request.guidance_scale,
                               num_steps=config.num_steps, edit=edit, w=w, fused=config.fused,
                               prompt_embeddings=contexts).images

        per_row.append(run_attacks(
            sd, edit, method.mode, probe_config, bar, method.w, config.attack.kinds, settings, request.prompt,
            targets(request), [request.seed], ws_of=ws_of, is_erased=lambda images: [exposed(i) for i in images],
            ring=lambda request=request: ring(request), sample=sample, guidance_scale=guidance,
            pipeline_draws=config.attack.pipeline_draws, pipeline_temperature=config.attack.pipeline_temperature,
            label=f"{method.name}: row {i + 1} of {len(requests)}"))
    return {kind: dict(success_rate=float(np.mean([row[kind]["success_rate"] for row in per_row])),
                       per_row=[dict(prompts=row[kind]["prompts"], w=row[kind]["w"],
                                     success=row[kind]["success_rate"]) for row in per_row])
            for kind in config.attack.kinds}


def run_i2p(config: I2PConfig | Mapping, train_runner=None) -> Path:
    """The I2P job (``config``: an I2PConfig or a dict validated into one); results.json and results.md in
    ``config.out_dir``, each method's images and manifest in a folder of its own. ``train_runner`` trains a
    missing edit (``train_missing``; default ``run_training``: ``unguide_jax.jobs.i2p`` passes the train job)."""
    config = as_config(config, I2PConfig)
    check_given(config)
    if not config.csv:
        raise ConfigError("config.csv is empty: give the I2P prompt CSV (i2p_prompts_4703.csv)")
    methods = config.method_rows()
    requests = read_i2p_rows(config.csv, config.nudity_only, config.limit)  # bad input fails before the model loads
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config.out_dir: {out_dir} is a file, not a folder")
    detector = NudeNetDetector() if is_main_process() else None  # missing: an error before the sampling
    trained = train_missing_runs(config, train_runner)
    started = time.perf_counter()
    # Before loading: a model replaced meanwhile costs a rerun, never images credited to the wrong model.
    model_id = model_fingerprint(config.model, revision=config.revision, config_folder=config.model_config or None)
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    check_same_config(to_dict(config), "I2P config")
    size = resolve_image_size(config.image_size, sd.default_size)
    requests = sized(requests, size)
    edits = {}
    for name in sorted({m.edit for m in methods if m.edit}):
        edit, info = load_edit(list(config.edits[name]), sd.params["unet"])
        edits[name] = (sd.put_replicated(edit), info)
        off = [i["source"] for i in info if i.get("kind") == "lora" and i.get("targets") != "explicit"]
        if off:
            warnings.warn(f"edit {name!r}: {off} adapt other layers than the paper's explicit-content LoRA "
                          "(lora.targets=explicit, ESD-u style)", stacklevel=2)
    results, counts = {}, {}
    attacked = list(requests[:config.attack.images]) if config.attack.enabled else []
    base_latents: dict[int, np.ndarray] = {}
    ring_prompts: dict[int, object] = {}

    def attack_target(request: Request) -> np.ndarray:
        key = attacked.index(request)
        if key not in base_latents:
            base_latents[key] = sd.generate([request.prompt], [request.seed], guidance_scale=request.guidance_scale,
                                            num_steps=config.num_steps).latents
        return base_latents[key]

    def ring(request: Request):
        key = attacked.index(request)
        if key not in ring_prompts:
            ring_prompts[key] = ring_a_bell_prompts(sd, config.attack.ring_a_bell, load_concept(EXPLICIT_CONCEPT),
                                                    request.prompt, 1)
        return ring_prompts[key]

    def exposed(image: np.ndarray) -> bool:  # NudeNet runs on process 0 only; the others' answers are not kept
        if detector is None:
            return False
        return any(counts_as_exposed(d, config.threshold) for d in detector.detect(np.asarray(image)))

    for method in methods:
        method_started = time.perf_counter()
        sample_config = method_sample_config(config, method, size, len(requests))
        manifest_file = sample_requests(sd, sample_config, requests, edits.get(method.edit, (None, [])),
                                        grid_limit=GRID_IMAGES, model_id=model_id)
        attacks = {}
        if attacked and method.edit:
            edit, info = edits[method.edit]
            attacks = attack_rows(sd, config, method, edit, info, attacked, exposed, attack_target, ring)
        if not is_main_process():
            continue
        manifest = json.loads(manifest_file.read_text())
        records = manifest["images"]
        folder = Path(sample_config.out_dir)
        detections, detected = detect_folder(detector.detect, detector.describe(), folder,
                                             [r["file"] for r in records], folder / "nudenet.json")
        counts[method.name] = count_exposed((detections[r["file"]] for r in records), config.threshold)
        flagged = {}  # image -> the exposed classes counted in it
        for r in records:
            found = sorted({d["class"] for d in detections[r["file"]] if counts_as_exposed(d, config.threshold)})
            if found:
                flagged[r["file"]] = found
        settings = manifest["settings"]
        results[method.name] = dict(
            mode=method.mode, edit=method.edit, counts=counts[method.name].to_dict(), flagged=flagged,
            folder=folder.name, images_generated=settings["images_generated"], images_kept=settings["images_kept"],
            sampling_seconds=settings["seconds"], images_detected=detected,
            seconds=round(time.perf_counter() - method_started, 2), **_probe_summary(records, method, config))
        if "probe_seconds" in settings:
            results[method.name].update(probe_seconds=settings["probe_seconds"])
        if attacks:
            before = float(np.mean([r["file"] in flagged for r in records[:len(attacked)]]))
            results[method.name]["attacks"] = {kind: dict(found, before=before) for kind, found in attacks.items()}
    if not is_main_process():  # every process sampled its share; one writes
        return out_dir
    rows = [dict(source=r.source, prompt=r.prompt, seed=r.seed, guidance_scale=r.guidance_scale,
                 height=r.height or size["model_size"], width=r.width or size["model_size"]) for r in requests]
    settings = {k: v for k, v in to_dict(config).items() if k != "job"}
    settings.update(csv_sha256=_sha256(Path(config.csv)), model_fingerprint=model_id, rows=len(requests),
                    image_size=size, detector=detector.describe(), threshold=config.threshold, versions=versions(),
                    edits={name: info for name, (_, info) in edits.items()},
                    seconds=round(time.perf_counter() - started, 1), **sd.placement())
    settings["trained_first"] = trained
    write_json(out_dir / "results.json", {"settings": settings, "methods": results, "rows": rows})
    (out_dir / "results.md").write_text(results_text(config, size, detector.describe(), counts, results) + "\n")
    return out_dir


def results_text(config: I2PConfig, size: Mapping, detector: Mapping, counts: Mapping[str, ExposedCounts],
                 results: Mapping[str, dict]) -> str:
    n = next(iter(counts.values())).total_images
    subset = " with nudity_percentage > 0" if config.nudity_only else ""
    first = f", the first {config.limit}" if config.limit else ""
    lines = [(f"I2P explicit content: {n} prompts of {Path(config.csv).name}{subset}{first}; one image each with "
              f"the row's seed and guidance, {config.num_steps} DDIM steps. Sizes: {size['why']}."),
             (f"NudeNet {detector['version']} ({detector['model_file']}): a box counts at score >= "
              f"{config.threshold} (the detector keeps >= {DETECTOR_FLOOR})."), "", format_tables(counts)]
    attacked = [(name, r["attacks"]) for name, r in results.items() if "attacks" in r]
    if attacked:
        kinds = list(attacked[0][1])
        lines += ["", f"Attacks on the first {config.attack.images} rows (an image counts when NudeNet finds an exposed "
                      f"class at {config.threshold}): before → after",
                  "", "| method | " + " | ".join(ATTACK_LABELS[k] for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{a[k]['before']:.0%} → {a[k]['success_rate']:.0%}" for k in kinds) + " |"
                  for name, a in attacked]
    for name, result in results.items():
        if "prompts_to_edit" in result:
            lines += ["", (f"{name}: the probe (R = {config.probe.draws}) sent {result['prompts_to_edit']} of "
                           f"{result['prompts']} prompts to the edit (w = {config.probe.w_erase}).")]
    return "\n".join(lines)


def train_missing_runs(config: I2PConfig, train_runner=None) -> list[str]:
    """Train every ``train_missing`` edit whose run folder is missing (its train config, with its own concept,
    on the model under evaluation); returns the folders trained. ``train_runner``: ``run_training`` unless given."""
    from unguide_jax.training.run import run_training

    train_runner = train_runner or (lambda c: run_training(c, progress=False))
    trained = []
    for name, spec in config.train_missing.items():
        run_dir = Path(config.edits[name][0])
        if run_is_missing(run_dir):
            if is_main_process():
                print(f"training {name}: {spec} -> {run_dir}", flush=True)
            train_runner(missing_train_config(spec, run_dir, config))
            trained.append(str(run_dir))
    return trained


def _probed_keys(folder: Path) -> set[str]:
    """The (guidance|prompt) keys of the sample job's probe.json in ``folder`` (reused if its settings match)."""
    try:
        return set(json.loads((folder / "probe.json").read_text()).get("prompts", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def _detected_files(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / "nudenet.json").read_text()).get("images", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def plan_i2p(config: I2PConfig | Mapping, measure: bool = True) -> Plan:
    """The job's dry run (``unguide_jax.evaluation.plan``): per method, the images to sample and those already in
    its folder (kept by the sample job when they were made with the same settings), the probe's UNet rows for
    the prompts probe.json lacks, the images NudeNet has not seen; the runs to train first; with ``measure``, one
    UNet step timed here (NudeNet runs on the CPU: not timed). Samples, detects and trains nothing."""
    config = as_config(config, I2PConfig)
    check_given(config)
    if not config.csv:
        raise ConfigError("config.csv is empty: give the I2P prompt CSV (i2p_prompts_4703.csv)")
    methods = config.method_rows()
    requests = read_i2p_rows(config.csv, config.nudity_only, config.limit)
    missing = {name: missing_train_config(spec, config.edits[name][0], config)
               for name, spec in config.train_missing.items() if run_is_missing(config.edits[name][0])}
    trainings = [planned_training(name, config.train_missing[name], train_config)
                 for name, train_config in missing.items()]
    sd = load_model(config.model, dtype=dtype_named(config.dtype), variant=config.variant, revision=config.revision,
                    config_folder=config.model_config or None).on_every_device()
    size = resolve_image_size(config.image_size, sd.default_size)
    requests = sized(requests, size)
    batch = padded_rows(min(config.batch_size, len(requests)), sd.mesh)
    stages = []
    for method in methods:
        unguidance = method.mode in ("unguide", "fixed", "oracle")
        stage = Stage(method.name, steps=config.num_steps, batch=batch, branches=4 if unguidance else 2,
                      calls_per_step=2 if unguidance and not config.fused else 1)
        folder = Path(method_sample_config(config, method, size, len(requests)).out_dir)
        names = [image_name(i, r) for i, r in enumerate(requests)]
        stage.found = sum((folder / name).is_file() for name in names)
        stage.add_images(len(requests) - stage.found)
        detected = _detected_files(folder)
        stage.scores_found = sum(name in detected for name in names)
        stage.scores = len(names) - stage.scores_found
        if method.mode == "unguide":
            probed = _probed_keys(folder)
            prompts = {f"{r.guidance_scale}|{r.prompt}" for r in requests}
            todo = len(prompts - probed)
            stage.probes_found = len(prompts) - todo
            references = 1
            probe = method_probe(config, method)
            if probe.rule == "calibrated":  # the edit's own target prompts set the threshold
                if method.edit in missing:
                    concept = as_config(missing[method.edit], train_schema).concept
                    references += len(load_concept(concept).targets)
                else:
                    references += len(concept_targets(load_edit(list(config.edits[method.edit]),
                                                                sd.params["unet"])[1]))
            stage.probe_rows = probe_unet_rows(probe, todo, references, sd.mesh)
        stages.append(stage)
    timing = None
    if measure:
        side = CSV_SIZE if size["used"] == "csv" else None
        timing = measure_unet_step(sd, batch, side, side)
    subset = " with nudity_percentage > 0" if config.nudity_only else ""
    summary = (f"{len(requests)} I2P rows of {Path(config.csv).name}{subset} × {len(methods)} method(s); "
               f"{config.num_steps} DDIM steps, batches of {batch}; sizes: {size['why']}; out_dir {config.out_dir}.")
    notes = ["NudeNet runs on the CPU after sampling: not timed."]
    return Plan(job="i2p", summary=summary, stages=stages, trainings=trainings, timing=timing, evaluator="NudeNet",
                notes=notes)
