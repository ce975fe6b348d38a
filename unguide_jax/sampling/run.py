"""The sample job: requests -> (probe) -> batched jitted generation -> PNGs, grid, manifest.

``run_sampling(SampleConfig(...))`` is what ``unguide-sample`` runs; ``sample_requests`` samples a list of
requests with a loaded model (the I2P evaluation shares it).

Modes (``config.mode``, ``unguide_jax.erasers.unguide.modes``) with the edits of ``config.adapters``
(several add up): base, adapter, unguide (w per prompt from the probe), fixed (``config.w``), auto.

Several adapters in mode unguide with ``config.combine`` flagged or sum (issue 38) are K edits, not one: one
``ManyProbe`` gives each prompt a w and a flag per edit (edit k against its own bar, from its own concept's
targets under rule calibrated), and ``diffusion.many_guidance.generate_many`` samples with that rule. probe.json
and each image's manifest record then hold per edit D, D(""), the bar and w, and the edits the prompt
flagged (indices into ``config.adapters``). With one adapter, combine changes nothing: it is the one-edit
job, its images and its fingerprint.

``out_dir`` gets one PNG per image (written as batches finish), ``grid.png``, ``manifest.json`` (the
settings, and per image its prompt, seed, guidance, w, D(p), D("")), and in unguide mode
``probe.json``. A rerun with the same settings skips the images already written and reuses the
probe; a rerun with other settings is an error unless ``overwrite=true``.

An ``out_dir`` belongs to one set of settings, as a training run folder belongs to one run
(``claim_out_dir``): a run holds its lock (``training.run_folder``, on the real folder: a symlink to it
is the same folder) from before the model loads to the last file, so a second run is refused at once;
the settings' fingerprint covers the model's and the adapters' contents, not only their paths: a rerun
whose settings differ only in those contents (a model replaced at the same path, an adapter retrained in
place) makes its images again, with a warning. Images that are not kept (then, and with ``overwrite=true``)
are deleted once the inputs have loaded, before the first new one: an interrupted rerun never leaves them to
pass for the new ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
import warnings
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np
from PIL import Image

from unguide_jax.diffusion.batching import ImageRequest, generate_images
from unguide_jax.diffusion.images import (
    image_grid,
    save_png,
    slug,
    versions,
    write_manifest,
)
from unguide_jax.diffusion.many_guidance import FLAGGED_RULES
from unguide_jax.erasers.unguide.many_probe import ManyProbe
from unguide_jax.erasers.unguide.modes import resolve_mode, weights_for
from unguide_jax.erasers.unguide.probe import WProbe
from unguide_jax.json_files import write_json
from unguide_jax.loading.model_identity import model_fingerprint
from unguide_jax.loading.random_model import ensure_random_model
from unguide_jax.loading.resolve import load_model
from unguide_jax.models.dtypes import dtype_named
from unguide_jax.parallel.hosts import (
    broadcast_json,
    check_same_config,
    is_main_process,
)
from unguide_jax.sampling.config import SampleConfig
from unguide_jax.sampling.prompts import Request, collect_requests
from unguide_jax.settings import ConfigError, as_config, to_dict
from unguide_jax.shapes.classifier import load_evaluator
from unguide_jax.shapes.data import CLASSES, STYLES, class_named_in
from unguide_jax.training.run_folder import RunFolderBusy, run_folder_lock
from unguide_jax.training.sources import concept_targets, load_edit

# Keys that do not change what an image looks like: a rerun may change them and still skip done images.
NOT_IMAGE_KEYS = ("out_dir", "batch_size", "grid_cols", "evaluator", "overwrite", "create_random_model")
# Keys newer than the first manifests: counted only when set, so that adding them kept the default settings'
# fingerprint. (The model's content, counted since, changed every fingerprint: _check_previous_run names
# manifests older than that.)
ONLY_WHEN_SET = ("variant", "revision", "model_config")
# Settings fingerprinted only away from their default, so that folders made before they existed keep their fingerprint.
ONLY_WHEN_CHANGED = {"sampler": "ddim"}


# What a rerun of the same config finds changed when files were replaced at the same paths.
CONTENT_KEYS = {"model_fingerprint": "model", "adapter_digests": "adapters"}


class OutDirTaken(FileExistsError):
    """out_dir holds images of other settings (or of settings it cannot tell), and ``overwrite`` was not given."""


def _content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents): an adapter retrained in place is new."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def model_identity(config: SampleConfig) -> str:
    """The contents' fingerprint of ``config``'s model (``loading.model_identity``)."""
    return model_fingerprint(config.model, revision=config.revision, config_folder=config.model_config or None)


def image_settings(config: SampleConfig, mode: str, model_id: str | None = None) -> dict:
    """What the images depend on; its fingerprint is stored in the manifest and compared on a rerun.
    ``model_id``: ``model_identity(config)`` when the caller has it (None: computed here)."""
    settings = to_dict(config)
    out = {k: v for k, v in settings.items() if k not in NOT_IMAGE_KEYS and k not in ("probe", "w", "mode", "combine")
           and not (k in ONLY_WHEN_SET and not v) and ONLY_WHEN_CHANGED.get(k, object()) != v}
    out["mode"] = mode
    if separate_edits(config, mode):
        out["combine"] = config.combine  # only then: merged runs, and every one-adapter run, keep their fingerprint
    out["model_fingerprint"] = model_id or model_identity(config)
    out["adapter_digests"] = [_content_digest(Path(a)) for a in config.adapters]
    if mode == "unguide":
        out["probe"] = {k: v for k, v in settings["probe"].items() if k != "prompt_chunk"}
    if mode == "fixed":
        out["w"] = config.w
    return out


def separate_edits(config: SampleConfig, mode: str) -> bool:
    """Whether ``config.adapters`` are K edits with one probe (combine flagged or sum, several adapters, mode
    unguide), not one edit."""
    return mode == "unguide" and config.combine != "merged" and len(config.adapters) > 1


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_previous_run(out_dir: Path, settings: dict, fingerprint: str, overwrite: bool) -> bool:
    """Whether images already in out_dir may be kept (``settings``: ``image_settings``); ``OutDirTaken`` if they
    were made with other settings, or the manifest cannot say with which."""
    if not _made_images(out_dir):
        return not overwrite  # a new folder, or a failed run that made no image: nothing to protect
    if overwrite:
        return False
    try:
        previous = json.loads((out_dir / "manifest.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        previous = None
    if not isinstance(previous, dict):
        raise OutDirTaken(f"{out_dir} holds images but no readable manifest.json saying what made them: choose "
                          "another out_dir, or pass --config.overwrite=true to replace them")
    if previous.get("fingerprint") == fingerprint:
        return True
    if "model_fingerprint" not in previous:
        raise OutDirTaken(f"{out_dir} holds images of an older unguide-jax whose manifest.json records the model's "
                          "path, not its contents, so they cannot be told from another model's: pass "
                          "--config.overwrite=true to make them again, or choose another out_dir")
    changed = _changed_keys(previous, settings)
    if changed and set(changed) <= set(CONTENT_KEYS):
        # The same config: the folder is still this run's, and the images are stale, not another run's.
        what = " and ".join(f"the {CONTENT_KEYS[k]} ({previous[k]} -> {settings[k]})" for k in changed)
        warnings.warn(f"{out_dir}: the images there were made with the same settings but other files of {what}: "
                      "making them again", stacklevel=2)
        return False
    raise OutDirTaken(f"{out_dir} holds images made with other settings ("
                      + (f"differing in {', '.join(changed)}; " if changed else "")
                      + f"manifest fingerprint {previous.get('fingerprint')}, now {fingerprint}): choose another "
                      "out_dir, or pass --config.overwrite=true to replace them")


def _changed_keys(previous: Mapping, settings: Mapping) -> list[str]:
    """The keys of ``settings`` on which a manifest's settings disagree, where the manifest records them."""
    now = json.loads(json.dumps(settings, default=str))
    changed = [k for k in ONLY_WHEN_SET if previous.get(k) and k not in now]
    for key, value in now.items():
        if key in previous:
            was = previous[key]
            if key == "probe" and isinstance(was, dict):
                was = {k: v for k, v in was.items() if k != "prompt_chunk"}
            if was != value:
                changed.append(key)
    return sorted(changed)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claimed out_dir: its real path (everything is written there), the images' settings and fingerprint,
    and whether the images already there are kept."""
    out_dir: Path
    mode: str
    settings: dict
    fingerprint: str
    keep_existing: bool


@contextlib.contextmanager
def _main_process_lock(root: Path) -> Iterator[None]:
    """``root``'s lock, held by the main process for the block; the others learn whether it got it."""
    if not is_main_process():
        error = broadcast_json(None)
        if error:
            raise RunFolderBusy(f"process 0 could not lock {root}: {error}")
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_folder_lock(root, "out_dir"))
        except Exception as err:
            broadcast_json(str(err))
            raise
        broadcast_json("")
        yield


@contextlib.contextmanager
def claim_out_dir(config: SampleConfig, mode: str, model_id: str | None = None) -> Iterator[Claim]:
    """Hold ``config.out_dir`` for the block: locked (``RunFolderBusy`` if another run holds it), then checked
    against the settings of the images already there (``OutDirTaken``); see the module doc. Several
    processes: the main one locks, decides and writes; the others follow, or fail with its reason."""
    root = Path(config.out_dir).resolve()
    with _main_process_lock(root):
        # Hashed under the lock: a second run is refused before it spends time on the model's files.
        settings = image_settings(config, mode, model_id)
        fingerprint = _fingerprint(settings)
        check_same_config(settings, "sample config")
        decided = None
        if is_main_process():
            try:
                decided = {"keep": _check_previous_run(root, settings, fingerprint, config.overwrite)}
            except OutDirTaken as err:
                decided = {"error": str(err)}
        decided = broadcast_json(decided)
        if "error" in decided:
            raise OutDirTaken(decided["error"] if is_main_process() else f"process 0: {decided['error']}")
        yield Claim(root, mode, settings, fingerprint, decided["keep"])


def _made_images(out_dir: Path) -> bool:
    return any(IMAGE_FILE.match(p.name) for p in out_dir.iterdir()) if out_dir.is_dir() else False


def _remove_images(out_dir: Path) -> None:
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if IMAGE_FILE.match(path.name):
                path.unlink()


IMAGE_FILE = re.compile(r"^\d{5}_.*_s\d+\.png$")  # what image_name writes


def _check_sizes(sd, requests: list[Request], height: int | None, width: int | None) -> None:
    """Every request's size fits the model (before anything is written)."""
    for size in sorted({(r.height or height, r.width or width, r.source) for r in requests}, key=str):
        try:
            sd.latent_shape(size[0], size[1])
        except ValueError as err:
            where = f" ({size[2]})" if size[2] and ":" in size[2] else ""
            raise ConfigError(f"config.height/width{where}: {err}") from None


def _long_prompts(sd, prompts: list[str]) -> dict[str, int]:
    """Prompts longer than the tokenizer's limit (the text encoder sees only the first tokens): prompt ->
    its token count (start and end tokens included)."""
    limit = sd.tokenizer.model_max_length
    counts = {p: len(sd.tokenizer(p, truncation=False).input_ids) for p in sorted(set(prompts))}
    return {p: n for p, n in counts.items() if n > limit}


def image_name(index: int, request: Request) -> str:
    return f"{index:05d}_{slug(request.prompt)}_s{request.seed}.png"


def _probe_weights(config: SampleConfig, fingerprint: str, sd, edit, requests: list[Request],
                   out_dir: Path, concept_prompts: list[str] = ()) -> tuple[list[dict], dict]:
    """The probe's record per request (its w among them), each distinct prompt and guidance probed once;
    cached in probe.json."""
    return _cached_probe(fingerprint, sd, requests, out_dir, lambda shape: WProbe(
        sd, edit, config.probe, latent_shape=shape, concept_prompts=concept_prompts))


def _probe_many(config: SampleConfig, fingerprint: str, sd, edits: tuple, requests: list[Request], out_dir: Path,
                concept_prompts: list[list[str]]) -> tuple[list[dict], dict]:
    """``_probe_weights`` for K edits: ``ManyProbeResult.records()`` per request (D, bar, w per edit, the edits
    flagged), one probe for all of them."""
    return _cached_probe(fingerprint, sd, requests, out_dir, lambda shape: ManyProbe(
        sd, edits, config.probe, concept_prompts_per_edit=concept_prompts, latent_shape=shape),
        extra={"edits": list(config.adapters)})


def _cached_probe(fingerprint: str, sd, requests: list[Request], out_dir: Path, make_probe,
                  extra: Mapping | None = None) -> tuple[list[dict], dict]:
    """Each distinct prompt and guidance probed once, by ``make_probe(latent_shape)``'s probe (one per image size),
    its records cached in probe.json under ``fingerprint`` (with ``extra``, for readers of the file)."""
    cache_file = out_dir / "probe.json"
    key_of = lambda r: f"{r.guidance_scale}|{r.prompt}"  # noqa: E731
    cached = broadcast_json(json.loads(cache_file.read_text()) if is_main_process() and cache_file.is_file() else {})
    if cached.get("fingerprint") != fingerprint:
        cached = {"fingerprint": fingerprint, **(extra or {}), "prompts": {}}
    probes: dict[tuple, object] = {}
    todo: dict[tuple, dict[str, Request]] = {}
    for r in requests:
        if key_of(r) not in cached["prompts"]:
            todo.setdefault(sd.latent_shape(r.height, r.width), {})[key_of(r)] = r
    started = time.perf_counter()
    for shape, by_key in todo.items():
        probe = probes.setdefault(shape, make_probe(shape))
        result = probe.run([r.prompt for r in by_key.values()], [r.guidance_scale for r in by_key.values()])
        for key, record in zip(by_key, result.records()):
            cached["prompts"][key] = record
        if is_main_process():
            write_json(cache_file, cached)
    summary = {"probe_seconds": round(time.perf_counter() - started, 2),
               "probe_unet_rows": sum(p.unet_calls for p in probes.values())}
    return [cached["prompts"][key_of(r)] for r in requests], summary


def run_sampling(config: SampleConfig | Mapping) -> Path:
    """The sample job (``config``: a SampleConfig, or a dict validated into one); returns the manifest."""
    config = as_config(config, SampleConfig)
    if config.create_random_model:
        ensure_random_model(config.model, seed=config.seed)
    if not config.model:
        raise ConfigError("config.model is empty: give a diffusers-layout Stable Diffusion folder or 'embedded'")
    requests = collect_requests(config)  # an empty or unreadable prompt source fails here, before the model loads
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config.out_dir: {out_dir} is a file, not a folder")
    # Claimed before the model loads (load_edit gives an edit exactly when there are adapters): a run into a
    # folder in use, or holding other settings' images, is refused at once.
    with claim_out_dir(config, resolve_mode(config.mode, bool(config.adapters))) as claim:
        sd = load_model(config.model, dtype=dtype_named(config.dtype), param_dtype=dtype_named(config.param_dtype),
                        allow_pickle=config.allow_pickle, clip_skip=config.clip_skip, variant=config.variant,
                        revision=config.revision, config_folder=config.model_config or None).on_every_device()
        return _sample_claimed(sd, config, requests, claim, _prepare(sd, config, requests, None))


def sample_requests(sd, config: SampleConfig, requests: list[Request], loaded_edit: tuple | None = None, *,
                    grid_limit: int | None = None, model_id: str | None = None) -> Path:
    """``requests`` sampled with ``sd`` as ``config`` says into ``config.out_dir`` (PNGs, grid, manifest; a
    rerun keeps the images of the same settings); returns the manifest. The caller owns the prompt source
    and the model (config's model keys are recorded and its files fingerprinted, not loaded). ``loaded_edit``:
    (edit placed on sd's devices, its info) of ``config.adapters``, for callers that share one edit between
    runs (None: loaded here). ``grid_limit``: grid.png shows the first N images (None: all). ``model_id``:
    ``model_identity(config)``, taken before the model was loaded (None: taken here)."""
    prepared = _prepare(sd, config, requests, loaded_edit)
    with claim_out_dir(config, prepared.mode, model_id) as claim:
        return _sample_claimed(sd, config, requests, claim, prepared, grid_limit)


class _Prepared(NamedTuple):
    edit: object            # the adapters as one edit (None: no adapters, or K edits)
    adapter_info: list
    mode: str
    long_prompts: dict
    edits: tuple = ()       # ``separate_edits``: one edit per adapter, in order
    concepts: tuple = ()    # then each one's concept target prompts


def _prepare(sd, config: SampleConfig, requests: list[Request], loaded_edit: tuple | None) -> _Prepared:
    """What is checked and loaded before sampling."""
    _check_sizes(sd, requests, config.height or None, config.width or None)
    long_prompts = _long_prompts(sd, [r.prompt for r in requests] + [config.negative_prompt])
    if long_prompts:
        first, count = next(iter(long_prompts.items()))
        warnings.warn(f"{len(long_prompts)} prompt(s) are longer than the tokenizer's {sd.tokenizer.model_max_length} "
                      f"tokens and are cut to that (e.g. {first[:60]!r}{'...' if len(first) > 60 else ''}: {count} "
                      "tokens); the manifest records which", stacklevel=2)
    separate = (config.combine != "merged" and len(config.adapters) > 1
                and separate_edits(config, resolve_mode(config.mode, True)))
    if loaded_edit is not None:
        edit, adapter_info = loaded_edit
        if separate and not (isinstance(edit, (tuple, list)) and len(edit) == len(adapter_info) == len(config.adapters)):
            raise ValueError(f"config.combine={config.combine} samples the {len(config.adapters)} adapters as "
                             "separate edits: loaded_edit must hold one edit and one info per adapter (a tuple of "
                             "edits), not one merged edit")
    elif separate:
        loaded = [load_edit(source, sd.params["unet"]) for source in config.adapters]
        edit, adapter_info = tuple(sd.put_replicated(e) for e, _ in loaded), [i for _, info in loaded for i in info]
    else:
        edit, adapter_info = load_edit(list(config.adapters), sd.params["unet"])
        edit = sd.put_replicated(edit)
    if not separate:
        return _Prepared(edit, adapter_info, resolve_mode(config.mode, edit is not None), long_prompts)
    edits = tuple(edit)
    concepts = tuple(concept_targets([info]) for info in adapter_info)
    for source, info, e, targets in zip(config.adapters, adapter_info, edits, concepts):
        if config.probe.rule == "calibrated" and not targets:
            raise ConfigError(f"config.adapters: {source} carries no concept targets, which probe rule calibrated "
                              "(the default) needs for each of several adapters (config.combine="
                              f"{config.combine}); choose the paper's rule (--config.probe.rule=paper)")
        if config.combine in FLAGGED_RULES and (e.deltas or e.memory is not None or not e.loras):
            raise ConfigError(f"config.adapters: {source} is not a LoRA edit ({info.get('kind', 'an edit')} with full "
                              f"weight deltas or a prompt memory), and config.combine={config.combine} applies each "
                              "adapter's LoRAs per prompt: choose combine=sum or merged")
    return _Prepared(None, adapter_info, "unguide", long_prompts, edits, concepts)


def _sample_claimed(sd, config: SampleConfig, requests: list[Request], claim: Claim, prepared: _Prepared,
                    grid_limit: int | None = None) -> Path:
    """The sampling itself, into the claimed folder (only the main process writes)."""
    edit, adapter_info, mode, long_prompts, edits, concepts = prepared
    out_dir, fingerprint, keep_existing = claim.out_dir, claim.fingerprint, claim.keep_existing
    if is_main_process():
        # Only now that the inputs have loaded: a run that fails on them leaves the folder as it was.
        if not keep_existing:
            _remove_images(out_dir)
        # Written before the first image, so that images of an interrupted run are known to belong to these settings.
        write_manifest(out_dir, dict(to_dict(config), mode=mode, model_fingerprint=claim.settings["model_fingerprint"],
                                     adapter_digests=claim.settings["adapter_digests"], fingerprint=fingerprint,
                                     status="running"), [])
    started = time.perf_counter()
    probe_records, probe_summary = [None] * len(requests), {}

    def probe():
        nonlocal probe_records, probe_summary
        probe_records, probe_summary = _probe_weights(config, fingerprint, sd, edit, requests, out_dir,
                                                            concept_targets(adapter_info))
        return [p["w"] for p in probe_records]

    flags = [None] * len(requests)
    if edits:
        probe_records, probe_summary = _probe_many(config, fingerprint, sd, edits, requests, out_dir, list(concepts))
        ws = [tuple(p["w"]) for p in probe_records]
        flags = [tuple(k in p["flagged"] for k in range(len(edits))) for p in probe_records]
        edit = edits
    else:
        ws = weights_for(mode, len(requests), fixed_w=config.w, probe=probe)

    names = [image_name(i, r) for i, r in enumerate(requests)]
    todo = broadcast_json([i for i, name in enumerate(names) if not (keep_existing and (out_dir / name).is_file())]
                          if is_main_process() else None)
    height, width = config.height or None, config.width or None
    image_requests = [ImageRequest(requests[i].prompt, requests[i].seed, requests[i].guidance_scale, ws[i],
                                   requests[i].height or height, requests[i].width or width, flags[i]) for i in todo]

    def save_batch(indices, images):
        if is_main_process():
            for j, image in zip(indices, images):
                save_png(out_dir / names[todo[j]], image)

    generate_images(sd, image_requests, batch_size=config.batch_size, num_steps=config.num_steps, eta=config.eta,
                    negative_prompt=config.negative_prompt, edit=None if mode == "base" else edit, fused=config.fused,
                    on_batch=save_batch, edit_name=", ".join(config.adapters), combine=config.combine,
                    sampler=config.sampler)
    if not is_main_process():
        return out_dir / "manifest.json"
    sizes = []
    for name in names:  # from the PNG headers: a large run's images need not all be held in memory
        with Image.open(out_dir / name) as png:
            sizes.append((png.height, png.width))

    def load(name: str) -> np.ndarray:
        with Image.open(out_dir / name) as png:
            return np.asarray(png.convert("RGB"))

    records = []
    for i, (req, (h, w)) in enumerate(zip(requests, sizes)):
        record = dict(file=names[i], prompt=req.prompt, seed=req.seed, guidance_scale=req.guidance_scale,
                      height=h, width=w, source=req.source, mode=mode)
        if ws[i] is not None:
            record["w"] = list(ws[i]) if edits else ws[i]
        if req.prompt in long_prompts:
            record.update(prompt_tokens=long_prompts[req.prompt], truncated_to=sd.tokenizer.model_max_length)
        if probe_records[i] is not None:
            record.update(D=probe_records[i]["D"], D_empty=probe_records[i]["D_empty"])
            if edits:
                record.update(bar=probe_records[i]["bar"], flagged=probe_records[i]["flagged"])
        records.append(record)
    evaluation = _evaluate(config.evaluator, [load(name) for name in names], records) if config.evaluator else None
    shown = names[:grid_limit]
    if len(set(sizes[:len(shown)])) == 1:
        save_png(out_dir / "grid.png", image_grid([load(name) for name in shown], config.grid_cols))
    summary = to_dict(config)
    summary.update(mode=mode, fingerprint=fingerprint, model_fingerprint=claim.settings["model_fingerprint"],
                   adapter_digests=claim.settings["adapter_digests"], status="done", adapters_loaded=adapter_info,
                   scheduler=dataclasses.asdict(sd.scheduler), versions=versions(),
                   images_generated=len(todo), images_kept=len(requests) - len(todo), **sd.placement(),
                   prompts_truncated=sorted(long_prompts),
                   seconds=round(time.perf_counter() - started, 2), **probe_summary)
    if evaluation:
        summary["evaluation"] = evaluation
    return write_manifest(out_dir, summary, records)


def _evaluate(evaluator: str, images: list[np.ndarray], records: list[dict]) -> dict | None:
    """With the embedded evaluator: each record gets the predicted class and style; returns a summary."""
    if not evaluator:
        return None
    if evaluator != "embedded":
        raise ValueError(f"unknown evaluator {evaluator!r}: the only one is 'embedded' (the shapes classifier)")
    predicted_class, predicted_style = load_evaluator().predict(np.stack(images))
    hits = []
    for record, c, st in zip(records, predicted_class, predicted_style):
        prompted = class_named_in(record["prompt"])
        record.update(predicted_class=CLASSES[c], predicted_style=STYLES[st],
                      prompted_class=None if prompted is None else CLASSES[prompted])
        if prompted is not None:
            hits.append(int(c) == prompted)
    summary = {"evaluator": "embedded shapes classifier", "images_naming_a_class": len(hits),
               "classified_as_prompted": int(sum(hits))}
    if hits:
        summary["accuracy"] = round(float(np.mean(hits)), 4)
    return summary


