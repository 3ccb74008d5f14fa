#!/usr/bin/env bash
# make gpu-wheels: fill .whl/ (git-ignored) with every wheel `make gpu-check` installs on a device host
# that has no network (Python 3.12, torch / triton / transformers preinstalled). Needs the network here.
# The list and the pins: requirements/gpu-check-wheels.txt. Prints the folder's size (limit 60 MB).
#   scripts/gpu_wheels.sh            (GPU_WHEELS_DIR=DIR to fill another folder)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${L2E_PYTHON:-}"
if [ -z "${PY}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || echo python)"; fi
fi
DEST="${GPU_WHEELS_DIR:-.whl}"
LIST=requirements/gpu-check-wheels.txt
mapfile -t REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "${LIST}" | grep -v '^$')

mkdir -p "${DEST}"
rm -f "${DEST}"/*.whl                  # one version of each, always the pinned one
PIP=("${PY}" -m pip --disable-pip-version-check)
others=()
for req in "${REQS[@]}"; do
    if [ "${req%%==*}" = deepspeed ]; then
        # DeepSpeed is a source package only: a pure-Python wheel, no ops prebuilt (JIT on the host).
        echo "gpu-wheels: building ${req} (py3-none-any)"
        DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation "${req}" -w "${DEST}"
    else
        others+=("${req}")
    fi
done
echo "gpu-wheels: downloading ${#others[@]} wheels for CPython 3.12 manylinux x86_64"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "${DEST}" "${others[@]}"
ls -1 "${DEST}"
"${PY}" tools/gpu_check.py --check-wheels "${DEST}"
