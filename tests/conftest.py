import os
from pathlib import Path

from tests.devices import FAST_COMPILE_XLA_FLAGS

# Before jax is imported anywhere: a persistent compilation cache shared by every test run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
# XLA's CPU backend spends most of a cold run compiling tiny models (a jitted tiny-UNet init: 17 s
# optimised, 5 s not). Measured on the whole suite with a cold cache: 1178 s -> 909 s on 2 cores.
# An environment variable, so that the tests' subprocesses (8 CPU devices, CLI runs) compile alike.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The model fingerprints' hash cache (unguide_jax/loading/model_identity.py): the suite's own, not the user's.
os.environ.setdefault("UNGUIDE_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "unguide-jax"))
# A faster compile of the same programs (tests/devices.py says how much); appended, so that a caller's flags
# stay. Subprocesses inherit it (tests/devices.py sets their device count beside it).
if FAST_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_XLA_FLAGS).strip()

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_num_threads(max(1, os.cpu_count() or 1))

from tests import tiny_models  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))


@pytest.fixture(scope="session", params=tiny_models.FLAVOURS)
def flavour(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """flavour -> (folder in diffusers layout, the PyTorch pipeline it was saved from)."""
    cache = {}

    def get(flavour: str):
        if flavour not in cache:
            root = tmp_path_factory.mktemp(f"tiny_{flavour}")
            pipe = tiny_models.build_pipeline(flavour, root / "tokenizer_src")
            pipe.save_pretrained(root / "pipeline", safe_serialization=True)
            cache[flavour] = (root / "pipeline", pipe)
        return cache[flavour]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """(a tiny random SDXL folder in diffusers layout, the PyTorch pipeline it was saved from)."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = tiny_models.build_sdxl_pipeline(root / "tokenizer_src")
    pipe.save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline", pipe


@pytest.fixture(scope="module")
def one_torch_thread():
    """For the tiny models torch's second thread costs more in hand-offs than it gives on a busy 2-core
    machine (8x measured); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
