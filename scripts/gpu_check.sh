#!/usr/bin/env bash
# make gpu-check: every check that needs a GPU, in one command, within 8 minutes on one H100 host
# (tools/gpu_check.py says what each step does and its time limit). Wheels for what the host lacks
# come from .whl/ (`make gpu-wheels` beforehand, where there is network).
#   scripts/gpu_check.sh [--dry-run] [--only STEP,...] [--budget SECONDS]
#   GPU_CHECK_OUT=DIR    report folder (default runs/gpu-check/)
#   GPU_CHECK_WORK=DIR   scratch for runs, checkpoints and the corpus (default $TMPDIR/megatron-l2e-gpu-check)
#   L2E_PYTHON=PY        the interpreter (default .venv/bin/python if there, else python3)
# Without CUDA it stops at once with one line, exit 2 (--dry-run works anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${L2E_PYTHON:-}"
if [ -z "${PY}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python || true)"; fi
fi
if [ -z "${PY}" ] || ! command -v "${PY}" > /dev/null 2>&1; then
    echo "gpu-check: no Python interpreter (set L2E_PYTHON=/path/to/python)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec "${PY}" tools/gpu_check.py "$@"
