"""One entry point for models from where users keep them: ``load_model(spec)``.

``spec`` is one of

* ``"embedded"`` -- the small shapes model shipped in the package;
* a diffusers folder (it holds ``model_index.json``);
* a single-file SD 1.x / 2.x / SDXL base checkpoint: ``.safetensors``, or a pickled ``.ckpt``/``.pt``/``.pth``/``.bin``
  only with ``allow_pickle``; its configs come from ``config_folder`` (a diffusers folder, or a
  shipped config's name) or else from a shipped config picked from its tensors
  (:func:`unguide_jax.loading.single_file.pick_shipped_config`);
* a Hugging Face hub id ``org/name`` already in the local hub cache (``HF_HUB_CACHE``, or
  ``HF_HOME/hub``, default ``~/.cache/huggingface/hub``): nothing is downloaded; ``revision``
  picks a branch, tag or commit (default ``main``).

A local path wins over a hub id of the same spelling. ``variant`` selects ``*.<variant>.safetensors``
weights of a diffusers folder or hub snapshot (e.g. ``fp16``).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax.numpy as jnp
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import snapshot_download

from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.loading.diffusers_folder import load_pipeline
from unguide_jax.loading.single_file import (
    SingleFileError,
    load_single_file,
    pick_shipped_config,
    shipped_config_named,
)
from unguide_jax.loading.sd_configs import SHIPPED_CONFIGS
from unguide_jax.loading.weights import PICKLE_SUFFIXES
from unguide_jax.resources import EMBEDDED_MODEL

NAMED_MODELS = {"embedded": EMBEDDED_MODEL}

SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
KINDS = ("embedded", "folder", "single_file", "hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# The docs of the four settings that name a model, shared by every job that loads one.
MODEL_DOC = ('"embedded" (the shipped shapes model), a diffusers folder, a single-file SD 1.x/2.x/SDXL base '
             'checkpoint or a hub id in the local Hugging Face cache')
VARIANT_DOC = 'diffusers weight variant, such as fp16 ("": the default weights)'
REVISION_DOC = 'hub revision (branch, tag or commit) of a model given by hub id ("": the default, main)'
MODEL_CONFIG_DOC = ('single-file checkpoints only: a diffusers config folder, or a shipped config: '
                    f'{", ".join(SHIPPED_CONFIGS)} ("": picked from the checkpoint\'s tensors)')


class ModelNotFound(FileNotFoundError):
    """A model spec that names nothing loadable (missing path, hub id not in the cache, ...)."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. ``path``: the diffusers folder (for ``hub``: the cache snapshot) or
    the single file. ``commit``: the snapshot's commit hash, for ``hub``."""

    kind: str
    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def to_json(self) -> dict:
        out = {"kind": self.kind, "spec": self.spec, "path": str(self.path)}
        if self.kind == "hub":
            out.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        return out


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``
    (read by huggingface_hub when it is imported)."""
    return Path(hf_constants.HF_HUB_CACHE).expanduser()


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.endswith(SINGLE_FILE_SUFFIXES) and ".." not in spec


def find_in_hub_cache(repo_id: str, revision: str = "") -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (branch, tag or commit; default main).

    Never downloads (``local_files_only``). A snapshot that huggingface_hub's cached file listing
    calls incomplete (e.g. only the fp16 files were fetched) is still returned: the loader then
    names the files it needs and lacks.
    """
    cache = hub_cache_dir()
    rev = revision or "main"
    try:
        return Path(snapshot_download(repo_id, revision=rev, cache_dir=str(cache), local_files_only=True))
    except getattr(hf_errors, "IncompleteSnapshotError", ()) as e:  # huggingface_hub >= 2.x
        return Path(e.snapshot_path)
    except (hf_errors.LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        storage = cache / f"models--{repo_id.replace('/', '--')}"
        cached = sorted(p.name for p in (storage / "refs").glob("*")) if (storage / "refs").is_dir() else []
        snapshots = sorted(p.name for p in (storage / "snapshots").glob("*")) if (storage / "snapshots").is_dir() else []
        if storage.is_dir():
            detail = (f"{storage} holds no snapshot for revision {rev!r} (refs: {', '.join(cached) or 'none'}; "
                      f"snapshots: {', '.join(s[:12] for s in snapshots) or 'none'})")
        else:
            detail = f"there is no {storage.name} in it"
        raise ModelNotFound(
            f"model {repo_id!r} (revision {rev!r}) is neither a local path nor in the Hugging Face cache at {cache}: "
            f"{detail}. Nothing is downloaded here: fetch it first (`hf download {repo_id}`"
            f"{f' --revision {rev}' if revision else ''}) or point HF_HUB_CACHE / HF_HOME at the cache that holds it."
        ) from e


def resolve_model_source(spec: str | Path, *, revision: str = "") -> ModelSource:
    """Where ``spec`` points, checked: a missing path, a folder without ``model_index.json``, a file of
    an unknown kind and a hub id missing from the cache are errors that say so."""
    text = str(spec)
    if not text:
        raise ValueError("empty model spec: give 'embedded', a diffusers folder, a single-file checkpoint or a hub id")
    if text in NAMED_MODELS and not Path(text).exists():
        _no_revision(revision, text)
        path = NAMED_MODELS[text]
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(f"missing model folder: {path} (the embedded model is not built or installed)")
        return ModelSource("embedded", text, path)
    path = Path(text).expanduser()
    if path.exists():
        _no_revision(revision, text)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelNotFound(_not_a_diffusers_folder(path))
            return ModelSource("folder", text, path)
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"{path}: unknown model file type {path.suffix or '(no suffix)'!r}: expected a diffusers folder, a "
                f"single-file checkpoint (.safetensors; {', '.join(PICKLE_SUFFIXES)} with allow_pickle) or a hub id"
            )
        return ModelSource("single_file", text, path)
    if looks_like_hub_id(text):
        snapshot = find_in_hub_cache(text, revision)
        if not (snapshot / "model_index.json").is_file():
            raise ModelNotFound(f"hub model {text!r}: " + _not_a_diffusers_folder(snapshot))
        return ModelSource("hub", text, snapshot, repo_id=text, revision=revision or "main", commit=snapshot.name)
    raise ModelNotFound(
        f"missing model: {path} does not exist (and {text!r} is not 'embedded' nor a hub id of the form org/name)"
    )


def resolve_model_path(spec: str | Path, *, revision: str = "") -> Path:
    """``spec`` -> a local path, for callers that take a folder: "embedded" -> the shipped folder, a hub
    id found in the cache -> its snapshot; anything else comes back as ``Path(spec)`` unchecked (the
    caller reports what is missing)."""
    text = str(spec)
    if text in NAMED_MODELS and not Path(text).exists():
        return NAMED_MODELS[text]
    if not Path(text).expanduser().exists() and looks_like_hub_id(text):
        return find_in_hub_cache(text, revision)
    return Path(text)


def load_model(
    spec: str | Path,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    allow_pickle: bool = False,
    clip_skip: int = 0,
    variant: str = "",
    revision: str = "",
    config_folder: str | Path | None = None,
) -> StableDiffusion:
    """Load an SD 1.x / 2.x / SDXL base model from ``spec`` (see the module doc) into Flax.

    ``dtype``/``param_dtype``: compute and stored-parameter dtypes; ``allow_pickle``: accept pickled
    weights (read with ``torch.load(weights_only=True)``); ``clip_skip``: skip the text encoder's last
    N layers; ``variant``: ``*.<variant>.safetensors`` weights (folders and hub ids); ``revision``:
    branch/tag/commit (hub ids only); ``config_folder``: for a single file, a diffusers folder of its
    architecture or a shipped config's name ("sd1", "sd2-base", "sd2-v", "sdxl-base"); by default SD 1.x
    and SDXL base are recognised from the tensors, and SD 2.x needs "sd2-base" (512 px, epsilon) or
    "sd2-v" (768 px, v-prediction) since its weights do not say which. SDXL folders and hub ids load
    like any diffusers folder.
    """
    source = resolve_model_source(spec, revision=revision)
    common = {"dtype": dtype, "param_dtype": param_dtype, "allow_pickle": allow_pickle, "clip_skip": clip_skip}
    if source.kind == "single_file":
        if variant:
            raise ValueError(f"{source.path}: variant={variant!r} applies to diffusers folders and hub ids, not to a single file")
        return load_single_file(source.path, config_folder, **common)
    if config_folder is not None:
        raise ValueError(f"{source.path}: config_folder applies to single-file checkpoints; a diffusers folder has its own configs")
    return load_pipeline(source.path, variant=variant or None, **common)


def describe_model_source(
    spec: str | Path, *, revision: str = "", config_folder: str | Path | None = None, allow_pickle: bool = False,
) -> dict:
    """A JSON-able record of where a model came from, for run manifests: kind (embedded, folder,
    single_file, hub), spec, resolved path; for hub ids repo_id, revision and commit; for single
    files the config used (a folder, or the shipped config's name: read from the safetensors
    header, no weights are loaded; for pickles only with ``allow_pickle``)."""
    source = resolve_model_source(spec, revision=revision)
    out = source.to_json()
    if source.kind == "single_file":
        if config_folder is not None:
            shipped = shipped_config_named(config_folder)
            out["config"] = shipped.name if shipped else str(config_folder)
        elif source.path.suffix == ".safetensors" or allow_pickle:
            try:
                out["config"] = pick_shipped_config(source.path, allow_pickle=allow_pickle).name
            except SingleFileError:
                out["config"] = None  # loading it says why
        else:
            out["config"] = None
    return out


def _no_revision(revision: str, spec: str) -> None:
    if revision:
        raise ValueError(f"revision={revision!r} applies to hub ids only; {spec!r} is a local model")


def _not_a_diffusers_folder(folder: Path) -> str:
    singles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in SINGLE_FILE_SUFFIXES)
    hint = (f"; it holds {', '.join(singles[:5])}: to load a single-file checkpoint, give the file's path"
            if singles else "")
    return f"{folder} is not a diffusers folder (no model_index.json){hint}"

