#!/usr/bin/env bash
# One script for an accelerator host: the accelerator figures in one JSON file per run, each run in under
# 10 minutes on an H100/H200-class GPU (the time bound is explained in bench/bench_accelerator.py): the
# SD 1.5 sections in the first, the SDXL sections (2.6 B UNet at 1024 px) in a second.
#
#   bash bench/accelerator.sh [OUT.json]                # default OUT: bench-accelerator.json
#   bash bench/accelerator.sh --only sdxl sdxl.json     # the SDXL sections: forward and train step
#   bash bench/accelerator.sh --tiny /tmp/acc.json      # tiny UNets: checks the run on any host, CPU included
#
# Other flags go to bench/bench_accelerator.py (--budget-s, --only; see its --help). Exit status 1 only
# when no section ran; a failed section is recorded in the file with its error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

echo "host: $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -c 'import jax; print("JAX", jax.__version__, "devices:", jax.devices())'

exec "$python" "$here/bench_accelerator.py" "$@"
