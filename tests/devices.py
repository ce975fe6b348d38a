"""Running code on several (fake CPU) devices or as several processes of one JAX job: XLA_FLAGS must
be set before jax is imported, so these run subprocesses."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The suite compiles with XLA's older CPU loop emitters (set in conftest, inherited by subprocesses): a tiny
# UNet's train step compiles in 9.7 s against 16.4 s, a sampler in 1.8 s against 2.9 s. They run slower, so
# ``optimised`` runs leave them out.
FAST_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """``xla_flags`` (the suite's own, see conftest) with the host platform's device count set to ``devices``."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def launch(args: list[str], processes: int, devices_per_process: int, extra_env=None, per_process_args=None,
           timeout: int = 600, optimised: bool = False) -> list[subprocess.CompletedProcess]:
    """``python args...`` as ``processes`` processes of one JAX job (one plain process when 1). ``optimised``:
    with XLA's optimisations and its default emitters, for a run that executes much more than it compiles."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if optimised:
        xla_flags = xla_flags.replace(FAST_COMPILE_XLA_FLAGS, "")
        extra_env = dict(extra_env or {}, JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    env = dict(os.environ, XLA_FLAGS=with_device_count(xla_flags, devices_per_process), JAX_PLATFORMS="cpu",
               **(extra_env or {}))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    port = free_port()
    running = []
    with tempfile.TemporaryDirectory() as logs:
        # Output to files, not pipes: a process blocked on a full pipe that nobody reads yet would stall the
        # collectives of the others.
        for i in range(processes):
            process_env = dict(env) if processes == 1 else dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                                JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
            command = [sys.executable, *args, *((per_process_args or {}).get(i, []))]
            out, err = open(Path(logs) / f"{i}.out", "w+"), open(Path(logs) / f"{i}.err", "w+")
            running.append((subprocess.Popen(command, cwd=REPO, env=process_env, stdout=out, stderr=err, text=True),
                            out, err))
        deadline = time.monotonic() + timeout
        results = []
        for p, out, err in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q, _, _ in running:
                    q.kill()
                raise
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
            out.close(), err.close()
    return results


def assert_ok(results):
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"



# For tests of the placement logic (partition rules, resharding), whose programs need every CPU device of
# one process: the package otherwise uses one per process on the CPU (parallel.mesh.job_devices, and
# docs/xla-cpu-concurrent-devices.md for why). The name is parallel.mesh.ALL_CPU_DEVICES_ENV, written out:
# conftest imports this module before it sets jax's environment, so it must not import jax.
ALL_CPU_DEVICES = {"UNGUIDE_ALL_CPU_DEVICES": "1"}


def run_script(script: str, devices: int, *args: str, optimised: bool = False, extra_env=None):
    """``python -c script args...`` on ``devices`` CPU devices; the JSON value its last line prints."""
    (result,) = launch(["-c", script, *args], processes=1, devices_per_process=devices, timeout=900,
                       optimised=optimised, extra_env=extra_env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
