"""What a model *is*, not where it lies: a fingerprint of its files' contents.

Anything reused across runs on the strength of "same model" (sampling's kept images, the evaluation's
image and score cache, an export's base check) compares ``model_fingerprint``, never the path: a folder
replaced at the same path is another model. Hashing a 4 GB checkpoint takes seconds, so each file's hash is
cached by (resolved path, size, mtime_ns, ctime_ns, inode): a file rewritten in place, or replaced by a copy that
kept its source's mtime (``cp -a``, ``rsync -a``, ``shutil.copytree``), is hashed again.
The cache lives in ``$UNGUIDE_JAX_CACHE`` (default ``~/.cache/unguide-jax``) as ``file-hashes.json``; a cache
that cannot be read or written only costs the hashing, never a wrong answer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from unguide_jax.loading.resolve import resolve_model_source

CACHE_ENV = "UNGUIDE_JAX_CACHE"
_CACHE_FILE = "file-hashes.json"
# Files that say nothing about the weights (hub bookkeeping, editor litter).
_IGNORED_NAMES = {".gitattributes", "README.md", ".DS_Store"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5"}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unguide-jax").expanduser()


def _load_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict) -> None:
    # Entries of files that are gone (a temporary model, a replaced snapshot) would pile up forever.
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the next call hashes again
        pass


def file_sha256(path: str | Path, cache: dict | None = None) -> str:
    """sha256 of one file's bytes; ``cache`` (resolved path -> [size, mtime_ns, ctime_ns, inode, hash]) is read
    and updated."""
    real = Path(path).resolve()
    stat = real.stat()
    key = str(real)
    # mtime alone misses a same-size copy that kept its source's mtime; ctime and the inode cannot be carried over.
    seen = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    if cache is not None:
        hit = cache.get(key)
        if isinstance(hit, list) and len(hit) == 5 and hit[:4] == seen:
            return hit[4]
    with open(real, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache is not None:
        cache[key] = seen + [digest]
    return digest


def _folder_files(root: Path) -> list[Path]:
    """Every file under ``root`` but hidden ones and ``_IGNORED_NAMES``, through symlinked subfolders too (a
    model assembled from links to shared components is made of their files; ``Path.rglob`` skips them)."""
    found: list[Path] = []

    def walk(folder: str, ancestors: frozenset) -> None:
        real = os.path.realpath(folder)
        if real in ancestors:  # a link back up the tree
            return
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in _IGNORED_NAMES:
                    continue
                if entry.is_dir():
                    walk(entry.path, ancestors | {real})
                elif entry.is_file():
                    found.append(Path(entry.path))

    walk(str(root), frozenset())
    return sorted(found)


def model_files(spec: str | Path, *, revision: str = "") -> tuple[Path, list[Path]]:
    """The root and the files that make up the model ``spec`` names (every file of a folder or snapshot,
    following the hub cache's symlinks; the file itself for a single-file checkpoint)."""
    source = resolve_model_source(spec, revision=revision)
    if source.path.is_file():
        return source.path.parent, [source.path]
    return source.path, _folder_files(source.path)


def model_fingerprint(spec: str | Path, *, revision: str = "", config_folder: str | Path | None = None) -> str:
    """A short hex digest of the model's contents: its files' names (relative to the model's root) and bytes,
    and for a single file the config folder it is read with. Equal digests: the same weights and configs."""
    root, files = model_files(spec, revision=revision)
    cache_path = cache_dir() / _CACHE_FILE
    cache = _load_cache(cache_path)
    before = dict(cache)
    whole = hashlib.sha256()
    for path in files:
        whole.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path, cache)}\n".encode())
    if config_folder:
        folder = Path(config_folder).expanduser()
        if folder.is_dir():
            # Its configs and tokenizer, whatever the folder holds besides (a config folder needs no
            # model_index.json, and the weights of a whole model used as one are not read).
            for path in _folder_files(folder):
                if path.suffix not in _WEIGHT_SUFFIXES:
                    whole.update(f"config:{path.relative_to(folder).as_posix()}\0{file_sha256(path, cache)}\n"
                                 .encode())
        else:  # a shipped config's name
            whole.update(f"config:{config_folder}".encode())
    if cache != before:
        _save_cache(cache_path, cache)
    return whole.hexdigest()[:16]
