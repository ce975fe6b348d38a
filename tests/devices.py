"""Running code on several (fake CPU) devices or as several processes of one JAX job: XLA_FLAGS must
be set before jax is imported, so these run subprocesses."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, devices_per_process: int, extra_env=None, per_process_args=None,
           timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """``python args...`` as ``processes`` processes of one JAX job (one plain process when 1)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               JAX_PLATFORMS="cpu", **(extra_env or {}))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    port = free_port()
    running = []
    for i in range(processes):
        process_env = dict(env) if processes == 1 else dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                            JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        command = [sys.executable, *args, *((per_process_args or {}).get(i, []))]
        running.append(subprocess.Popen(command, cwd=REPO, env=process_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    results = []
    for p in running:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in running:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def assert_ok(results):
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"



def run_script(script: str, devices: int, *args: str) -> dict:
    """``python -c script args...`` on ``devices`` CPU devices; the JSON object its last line prints."""
    (result,) = launch(["-c", script, *args], processes=1, devices_per_process=devices, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
