#!/usr/bin/env bash
# The prepared GPU run on a node without Ray (the project's H200 machine: Python 3.12 with
# torch and torchvision, no network): installs the offline bundle that bench/gpu_bundle.sh
# built into .gpu-bundle (carried there beside the working tree), then runs
# `python -m bench.gpu_run OUTDIR [flags]` (see its --help). Where Ray imports already (this
# project's .venv), the bundle is not needed and not installed.
#
#   bench/gpu_run.sh OUTDIR [--quick] [--images N] [--write-docs]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import ray" 2>/dev/null; then
  SITE=${GPU_RUN_SITE:-/tmp/site}
  bench/gpu_bundle.sh install .gpu-bundle "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" -m bench.gpu_run "$@"
