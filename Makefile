# Two commands: `make smoke` and `make test`. Both build .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: the local CPU wheel (never a multi-GB CUDA build on a CPU machine).
TORCH  ?= torch==2.13.0

.PHONY: venv smoke study test test-slow test-gpu test-multinode smoke-gpu image bench-l2e bench-data bench-gpu \
        bench-overhead gpu-wheels gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/cpu-constraints.txt -e '.[dev]'
	@touch $@

smoke: venv
	$(PY) -m megatron_l2e.smoke

test: venv
	$(PY) -m pytest -q --durations=15 tests

test-multinode: venv
	$(PY) -m pytest -q tests/test_multinode_train.py tests/test_multinode_launch.py

# Benchmarks (scripts that print ratios measured side by side; not tests)
bench-l2e: venv
	mkdir -p runs/bench && $(PY) tools/bench_l2e.py --json runs/bench/bench_l2e.json

bench-data: venv
	$(PY) tools/bench_data.py

# The small-scale study (docs/study.md): ~7 variants × 3 seeds on 2 CPU cores, results under runs/study/.
study: venv
	$(PY) tools/study.py --out runs/study

# Pipeline overhead (P4): our training step ÷ a bare PyTorch loop of the same model, on CPU.
bench-overhead: venv
	mkdir -p runs/bench && $(PY) tools/bench_overhead.py --json runs/bench/bench_overhead.json

test-slow: venv
	$(PY) -m pytest -q --durations=15 -m slow tests

# GPU targets use the image's python (NVIDIA's CUDA torch), never the CPU .venv.
GPU_PY = $(shell test -x $(PY) && echo $(PY) || echo python)

image:
	scripts/build_image.sh

smoke-gpu:
	L2E_PYTHON=$(GPU_PY) scripts/smoke_gpu.sh

test-gpu:
	$(GPU_PY) -m pytest -q -m gpu -rs tests

bench-gpu:
	mkdir -p runs/bench && $(GPU_PY) tools/bench_train.py --json runs/bench/bench_train.json

# The device check (docs/gpu-bench.md). `gpu-wheels` needs the network and runs here, beforehand: it
# fills the ignored .whl/ with what the GPU host lacks (DeepSpeed built as a wheel, pydantic-core for
# CPython 3.12, ...). `gpu-check` runs on the GPU host with no network, ≤ 8 minutes, report in
# GPU_CHECK_OUT; without CUDA it stops at once (exit 2). GPU_CHECK_ARGS="--dry-run" prints the commands.
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=

gpu-wheels: venv
	L2E_PYTHON=$(PY) scripts/gpu_wheels.sh

gpu-check:
	GPU_CHECK_OUT="$(GPU_CHECK_OUT)" scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf runs/smoke
