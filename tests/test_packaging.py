"""The package as ``pip install .`` (not editable) leaves it: the package list in pyproject.toml holds
every subpackage; the wheel ships the presets, the concept files, py.typed and the embedded model
(not the recipe's phase history); installed into a fresh environment, ``unguide-train --help`` and a
tiny train work from a folder outside the repository, importing the installed copy only."""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import unguide_jax
from unguide_jax.loading.edit_files import load_adapter, read_adapter_metadata

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "unguide_jax"
SCRIPTS = {"unguide-train": "unguide_jax.cli.train:main", "unguide-sample": "unguide_jax.cli.sample:main",
           "unguide-export": "unguide_jax.cli.export:main"}
# Build outputs and caches that must not reach the build (a stale build/lib would end up in the wheel).
NOT_SOURCES = (".git", ".cache", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_package_list_holds_every_subpackage():
    """setuptools is given an explicit list (configs/ installs as unguide_jax.configs), so a new
    subpackage left out of it would be missing from the wheel: the list must equal the source tree."""
    setuptools = pyproject()["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(REPO).parts) for init in PACKAGE.rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(found | {"unguide_jax.configs"})
    assert setuptools["package-dir"] == {"unguide_jax.configs": "configs"}
    assert (REPO / "configs" / "__init__.py").is_file() and (PACKAGE / "py.typed").is_file()
    assert pyproject()["project"]["scripts"] == SCRIPTS
    # The lazily imported public API: __all__ and the name -> module table agree.
    assert set(unguide_jax.__all__) == set(unguide_jax._EXPORTS) | {"__version__"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built, offline and with the installed setuptools, from a copy of the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_SOURCES))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(root / "dist"), str(root / "src")], check=True, env=_clean_env())
    (built,) = (root / "dist").glob("unguide_jax-*.whl")
    return built


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment holding the wheel, non-editable, that sees this interpreter's
    site-packages for the heavy dependencies but not the editable install of this checkout.

    ``--system-site-packages`` would run the base environment's .pth files, among them the editable
    install's finder, which answers for any ``unguide_jax.*`` module the wheel lacks. Instead the
    base site-packages folders are appended to sys.path as plain .pth lines: their own .pth files
    are not processed, so no finder is installed."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    # Installed before the base environment becomes visible, so pip does not see the editable one.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=_clean_env())
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    base = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        base.append(site.getusersitepackages())
    lines = dict.fromkeys(p for p in base if Path(p).is_dir())
    (Path(purelib) / "_base_site_packages.pth").write_text("".join(f"{p}\n" for p in lines))
    return root


# Run by the installed interpreter: the public API and the console scripts' targets import, a tiny
# random SD model is built into argv[1], and where every unguide_jax module came from is reported.
PREPARE = """
import importlib.metadata as md, json, sys
import unguide_jax as ug
from unguide_jax.loading.random_model import ensure_random_model
api = {name: type(getattr(ug, name)).__name__ for name in ug.__all__}
scripts = {ep.name: ep.value for ep in md.entry_points(group="console_scripts") if ep.name.startswith("unguide-")}
assert all(callable(ep.load()) for ep in md.entry_points(group="console_scripts") if ep.name in scripts)
ensure_random_model(sys.argv[1])
files = {name: m.__file__ for name, m in list(sys.modules.items()) if name.split(".")[0] == "unguide_jax"}
print(json.dumps(dict(api=api, scripts=scripts, version=ug.__version__, files=files, sys_path=sys.path,
                      meta_path=[getattr(f, "__name__", type(f).__name__) for f in sys.meta_path])))
"""


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "unguide_jax/configs/unguide.py" in names and "unguide_jax/configs/__init__.py" in names
    concepts = {f"unguide_jax/configs/concepts/{p.name}" for p in (REPO / "configs" / "concepts").glob("*.json")}
    assert concepts and concepts <= names
    assert {"unguide_jax/py.typed", "unguide_jax/assets/shapes-sd/model_index.json",
            "unguide_jax/assets/shapes-classifier/model.safetensors"} <= names
    assert not [n for n in names if n.startswith("unguide_jax/assets/recipe/") and "_phase" in n]
    # Every file of the source tree ships (a new data file outside package-data would not).
    def tree(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}

    sources = {f"unguide_jax/{f}" for f in tree(PACKAGE)} | {f"unguide_jax/configs/{f}" for f in tree(REPO / "configs")}
    assert sources <= names, sorted(sources - names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    listed = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{name} = {target}" in listed for name, target in SCRIPTS.items()), listed


def test_installed_wheel_runs_from_another_folder(venv, tmp_path):
    env, elsewhere = _clean_env(), tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = venv / "bin"

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], check=False, cwd=elsewhere, env=env, capture_output=True,
                              text=True)

    model, run_dir = tmp_path / "model", tmp_path / "run"
    prepared = run(bin_dir / "python", "-c", PREPARE, model)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report = json.loads(prepared.stdout.splitlines()[-1])
    installed = (venv / "lib").resolve()
    outside = {m: f for m, f in report["files"].items() if not Path(f).resolve().is_relative_to(installed)}
    assert len(report["files"]) > 20 and not outside, f"imported from outside the installed wheel: {outside}"
    assert "_EditableFinder" not in report["meta_path"]
    assert not [p for p in report["sys_path"] if p and Path(p).resolve().is_relative_to(REPO)]
    assert report["version"] == pyproject()["project"]["version"]
    assert report["scripts"] == SCRIPTS
    assert set(report["api"]) == {"__version__", "StableDiffusion", "load_model", "load_pipeline", "Edit", "load_edit",
                                  "save_adapter", "load_adapter", "save_edit", "load_edit_file", "export_edit"}

    helped = run(bin_dir / "unguide-train", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "concept" in helped.stdout and "run_dir" in helped.stdout

    # The tiny preset found by name among the installed presets, the concept among the installed files.
    trained = run(bin_dir / "unguide-train", "--config", "unguide.py:tiny", f"--config.model={model}",
                  f"--config.run_dir={run_dir}", "--config.iterations=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "wrote" in trained.stdout and not (elsewhere / "runs").exists()
    adapter, lora_config = load_adapter(run_dir / "adapter.safetensors")
    assert lora_config.rank == 1 and adapter and all(np.abs(ab["lora_B"]).max() > 0 for ab in adapter.values())
    assert read_adapter_metadata(run_dir / "adapter.safetensors")["concept"]["name"] == "shapes-arrow"
