"""tools/bench_train.py: runs on CPU (a tiny model, --quick) and reports every figure; FLOPs formula
against Pythia-70M's published parameter count; bad arguments fail with one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

TOOL = ROOT / "tools/bench_train.py"


def run_tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_train", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod              # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_quick_cpu_run_reports_table_2_layout(tmp_path):
    out = tmp_path / "bench.json"
    p = run_tool("--model-config", str(ROOT / "configs/smoke/cpu.yml"), "--quick", "--micro-batch", "2",
                 "--set", "model.seq_length=32", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "CPU FIGURE" in p.stdout
    assert "| model | GPUs | L2E | step time (s) | tokens/s | MFU | overhead vs off |" in p.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["cpu_figure"] is True and "CPU figure" in report["note"]
    assert report["world_size"] == 1 and report["peak_tflops_per_device"] is None
    (res,) = report["results"]
    assert res["seq_length"] == 32 and res["micro_batch_size"] == 2 and res["tokens_per_step"] == 64
    assert res["precision"] == "fp32" and res["zero_stage"] == 1
    assert list(res["modes"]) == ["off", "memel", "topk", "threshold"]
    # Every timed step ran in its mode's phase (priming reached it).
    assert [res["modes"][m]["phase"] for m in res["modes"]] == ["off", "exact top-k", "exact top-k", "threshold"]
    # Table 2's MEmeL row is memel.yml's method: exact top-k + Reverse Deactivation.
    assert res["modes"]["memel"]["l2e"] == {"inhibition": "reverse_deactivation", "selection": "topk"}
    assert res["modes"]["topk"]["l2e"] == {"inhibition": "regularizer", "selection": "topk"}
    for name, r in res["modes"].items():
        assert set(r) >= {"step_time_s", "step_times_s", "tokens_per_s", "mfu", "overhead_pct", "phase",
                          "peak_memory_gb"}
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["step_time_s"] == pytest.approx(sorted(r["step_times_s"])[0] / 2 + sorted(r["step_times_s"])[1] / 2)
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_time_s"])
        assert r["mfu"] is None                               # no peak for a CPU
        base = res["modes"]["off"]["step_time_s"]
        assert r["overhead_pct"] == pytest.approx(100 * (r["step_time_s"] / base - 1))
    assert res["modes"]["off"]["overhead_pct"] == 0.0


def test_flops_per_token_of_pythia_70m():
    """6·N + 12·L·H·S with N = Pythia-70M's published 70,426,624 parameters less the input embedding."""
    from megatron_l2e.config import load_config
    from megatron_l2e.model import build_model

    tool = load_tool()
    cfg = load_config(ROOT / "configs/pythia/70m.yml")
    n, fpt = tool.flops_per_token(build_model(cfg.model, meta=True), cfg)
    assert n == 70_426_624 - 50304 * 512
    assert fpt == 6 * n + 12 * 6 * 512 * 2048


def test_mfu_peak_table():
    import torch

    tool = load_tool()
    assert tool.peak_tflops(torch.device("cpu"), "bf16", None) is None
    assert tool.peak_tflops(torch.device("cpu"), "bf16", 100.0) == 100.0
    names = dict(tool.PEAK_TFLOPS)
    assert names["H100"] == names["H200"] == 989.0 and names["A100"] == 312.0


@pytest.mark.parametrize("args,culprit", [
    (["--models", "7b"], "--models"),
    (["--modes", "off,nothr"], "--modes"),
    (["--warmup", "1"], "--warmup"),
    (["--model-config", "/nonexistent/x.yml"], "/nonexistent/x.yml"),
])
def test_bad_arguments_fail_with_one_line(args, culprit, capsys):
    """In process (argparse exits with 2; a bad config file returns 2 before any engine is built)."""
    tool = load_tool()
    try:
        rc = tool.main(args)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert any(culprit in ln for ln in err) and "Traceback" not in "\n".join(err), err
