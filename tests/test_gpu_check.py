"""The device check (``make gpu-check``) where no GPU is: one line and exit 2 without CUDA, ``--dry-run``
prints every step's command, the wheel folder's checks (missing wheel, size limit, duplicates, what
is installed), and the step outputs read into the report. No test here needs CUDA or the network."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts/gpu_check.sh"
STEPS = ["wheels", "env", "kernels", "data", "smoke_bf16", "smoke_fp16", "bench_train", "memory_plan",
         "pytest_gpu", "bench_loss"]


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod              # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "L2E_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=full)


def test_without_cuda_one_line_and_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run_script(GPU_CHECK_OUT=str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check needs a CUDA GPU: "), p.stderr
    assert not (tmp_path / "out").exists()           # stopped before any work


def test_dry_run_prints_every_command(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = run_script("--dry-run", GPU_CHECK_OUT=str(out), GPU_CHECK_WORK=str(work))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("[gpu-check] dry run: 10 steps, budget 450 s")
    heads = [ln for ln in lines[1:] if not ln.startswith("    ")]
    cmds = [ln.strip() for ln in lines[1:] if ln.startswith("    $ ")]
    assert [h.split()[1] for h in heads] == STEPS
    assert len(cmds) == len(STEPS)
    budgets = [int(h.split("[")[1].split(" s]")[0]) for h in heads]
    assert all(b > 0 for b in budgets)
    c = dict(zip(STEPS, cmds))
    assert "pip install --no-index --find-links .whl --no-deps" in c["wheels"]
    assert "tools/gpu_check.py --probe" in c["env"]
    assert "pytest -q -rs -m gpu tests/test_gpu_kernels.py" in c["kernels"]
    assert f"--build-data {work}/data" in c["data"]
    for name, cfg in (("smoke_bf16", "gpu-70m.yml"), ("smoke_fp16", "gpu-70m-fp16.yml")):
        assert f"-m megatron_l2e.train --config configs/smoke/{cfg}" in c[name]
        assert "--set train.iters=30" in c[name] and f"--set output.dir={work}/{name}" in c[name]
        assert f"--set data.path={work}/data/train" in c[name]
    assert "tools/bench_train.py --models 70m" in c["bench_train"]
    assert c["bench_train"].endswith(f"--json {out}/bench_train.json")
    assert "-m megatron_l2e.train --dry-run --config configs/pythia/70m.yml" in c["memory_plan"]
    if (ROOT / "tools/bench_loss.py").is_file():
        assert "tools/bench_loss.py" in c["bench_loss"] and f"--json {out}/bench_loss.json" in c["bench_loss"]
    else:
        assert "(not run: missing" in c["bench_loss"]
    assert c["pytest_gpu"].startswith(f"$ MEGATRON_L2E_GPU_SMOKE_DATA={work}/data ")
    assert "pytest -q -rs -m gpu --continue-on-collection-errors tests --ignore tests/test_gpu_kernels.py" in c["pytest_gpu"]
    assert not out.exists() and not work.exists()    # a dry run writes nothing


def _fake_wheel(folder, name: str, version: str, size: int = 100, tag: str = "py3-none-any"):
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n" + "x" * size)
    return path


def test_wheel_folder_checks(tmp_path, capsys):
    tool = load_tool()
    required = [("deepspeed", "0.19.8"), ("pydantic-core", "2.50.5"), ("hjson", "3.1.0")]
    # No folder: every wheel missing, and the message says what to run.
    c = tool.check_wheels(tmp_path / "none", required)
    assert not c.ok and "make gpu-wheels" in c.message() and "needs the network" in c.message()
    folder = tmp_path / "whl"
    folder.mkdir()
    _fake_wheel(folder, "deepspeed", "0.19.8")
    _fake_wheel(folder, "pydantic_core", "2.50.5", tag="cp312-cp312-manylinux2014_x86_64")
    c = tool.check_wheels(folder, required)
    assert c.missing == ["hjson==3.1.0"] and not c.ok
    assert "missing wheel(s) hjson==3.1.0: run `make gpu-wheels`" in c.message()
    _fake_wheel(folder, "hjson", "3.1.0")
    c = tool.check_wheels(folder, required)
    assert c.ok and c.message().endswith("(complete)") and "3 wheels" in c.message()
    # Over the size limit.
    c = tool.check_wheels(folder, required, max_mb=1e-4)
    assert not c.ok and "over the 0.0001 MB limit" in c.message()
    # Two versions of one package: pip would refuse the install.
    _fake_wheel(folder, "hjson", "3.0.0")
    c = tool.check_wheels(folder, required)
    assert c.duplicates == ["hjson"] and not c.ok and "several versions of hjson" in c.message()
    # The CLI: one line, exit 1 when not ok.
    assert tool.main(["--check-wheels", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().out.count("\n") == 1


def test_the_pinned_wheel_list():
    tool = load_tool()
    req = dict(tool.wheel_requirements())
    assert req["deepspeed"] == "0.19.8"
    # DeepSpeed's own needs that a bare host may lack, and the compiled one for CPython 3.12.
    assert {"hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "megatron-core"} <= set(req)
    assert not set(req) & tool.PROTECTED          # never torch / transformers / triton from .whl


def test_only_missing_or_older_packages_are_installed(tmp_path):
    tool = load_tool()
    folder = tmp_path / "whl"
    folder.mkdir()
    keep = _fake_wheel(folder, "surely_not_installed_pkg", "1.0")
    _fake_wheel(folder, "pyyaml", "0.0.1")             # installed here at a higher version
    _fake_wheel(folder, "torch", "99.0")               # the host's own, never from .whl
    c = tool.check_wheels(folder, [])
    assert c.protected == ["torch"] and "ignored (the host's own): torch" in c.message()
    assert tool.wheels_to_install(c) == [keep]


def test_step_outputs_are_read_into_the_report(tmp_path):
    tool = load_tool()
    r = tool.parse_pytest("x\nSKIPPED [2] tests/test_gpu_attention.py:40: flash-attn not installed\n"
                          "FAILED tests/test_gpu_train.py::test_resume - AssertionError\n"
                          "1 failed, 5 passed, 2 skipped in 61.20s (0:01:01)\n")
    assert r["counts"] == {"failed": 1, "passed": 5, "skipped": 2}
    assert r["failed_tests"] == ["tests/test_gpu_train.py::test_resume"]
    assert r["skipped_reasons"] == ["tests/test_gpu_attention.py:40: flash-attn not installed"]

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "lm_loss": 10.8 - 0.1 * s, "loss": 10.8 - 0.1 * s, "tokens_per_s": 1000.0 + s,
             "step_seconds": 0.1, "step_applied": 1, "grad_norm": 1.0, "l2e/layer2/tau": 0.5} for s in range(1, 31)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    s = tool.summarize_smoke(run)
    assert s["steps"] == 30 and s["steps_applied"] == 30 and s["last_lm_loss"] == pytest.approx(7.8)
    assert s["median_tokens_per_s"] == pytest.approx(1016.0)   # step 1 (start-up) left out and s["l2e_last"] == {"l2e/layer2/tau": 0.5}

    plan = ("model:\n  checkpoint_activations: true\n"
            "memory plan per GPU (80 GB): weights 0.1 GB, gradients 0.1 GB, optimizer 0.8 GB, activations 40.0 GB "
            "(checkpointed 2.0 GB), loss 20.0 GB\nlargest micro-batch that fits: 32 without checkpointing\n")
    bench = {"results": [{"model": "70m", "modes": {"off": {"peak_memory_gb": 25.0 / 1.073741824}}}]}
    m = tool.summarize_memory(plan, bench)
    assert m["status"] == "ok" and m["checkpointing"] is True and m["largest_micro_batch"] == "32"
    assert m["planned_total_gb"] == pytest.approx(23.0) and m["measured_peak_gb"] == pytest.approx(25.0)
    assert m["planned_over_measured"] == pytest.approx(0.92) and m["within_25_percent"]
    # The plan's own peak line wins where it is printed; its checkpointing verdict too.
    m = tool.summarize_memory(plan + "peak 61.0 GB without checkpointing, 23.5 GB with, of 70 GB usable; "
                                     "activation checkpointing off (auto: fits)\n", bench)
    assert m["checkpointing"] is False and m["planned_total_gb"] == pytest.approx(61.0)
    assert tool.summarize_memory("no plan here", bench)["status"] == "missing"
    assert tool.summarize_memory(plan, None)["measured_peak_gb"] is None


def test_runner_times_each_step_and_goes_on_past_failures(tmp_path, monkeypatch):
    """The runner with stand-in steps: ok, failed, over its limit (killed), not runnable; one JSON, one
    Markdown report and the log, and exit 1 because steps failed."""
    tool = load_tool()
    py = sys.executable
    env_line = json.dumps({"gpu": "Fake GPU", "driver": "1.0", "torch": "2.11.0", "deepspeed": "0.19.8"})
    steps = [tool.Step("env", 10, "probe", [py, "-c", f"print({env_line!r})"]),
             tool.Step("kernels", 10, "kernels", [py, "-c", "print('12 passed, 1 skipped in 3.2s')"]),
             tool.Step("smoke_bf16", 10, "smoke", [py, "-c", "import sys; print('boom'); sys.exit(3)"],
                       needs_deepspeed=True),
             tool.Step("bench_train", 1, "slow", [py, "-c", "import time; time.sleep(60)"]),
             tool.Step("bench_loss", 10, "loss", None, skip="missing (no tools/bench_loss.py)")]
    monkeypatch.setattr(tool, "cuda_problem", lambda: None)
    monkeypatch.setattr(tool, "plan", lambda *a, **k: steps)
    monkeypatch.setattr(tool, "MIN_STEP_S", 0.5)
    out, work = tmp_path / "out", tmp_path / "work"
    assert tool.main(["--out", str(out), "--work", str(work), "--budget", "60"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    got = {s["name"]: s["status"] for s in report["steps"]}
    assert got == {"env": "ok", "kernels": "ok", "smoke_bf16": "failed", "bench_train": "timeout",
                   "bench_loss": "skipped"}
    by = {s["name"]: s for s in report["steps"]}
    assert report["env"]["gpu"] == "Fake GPU" and by["smoke_bf16"]["returncode"] == 3
    assert by["kernels"]["result"]["counts"] == {"passed": 12, "skipped": 1}
    assert by["bench_train"]["seconds"] < 20 and "over its 1 s limit" in by["bench_train"]["reason"]
    assert report["failed"] == ["smoke_bf16", "bench_train"] and report["total_seconds"] < 30
    md = (out / "gpu_check.md").read_text()
    assert "Fake GPU" in md and "| smoke_bf16 | failed |" in md and "missing (no tools/bench_loss.py)" in md
    assert "===== smoke_bf16" in (out / "gpu_check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    # A budget spent: nothing more is started.
    assert tool.main(["--out", str(out), "--work", str(work), "--budget", "0.1"]) == 0
    assert {s["status"] for s in json.loads((out / "gpu_check.json").read_text())["steps"]} == {"skipped"}
