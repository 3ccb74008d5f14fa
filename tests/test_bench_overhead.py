"""tools/bench_overhead.py --quick: both shapes run, and the JSON carries every figure (never a timed
assertion: the ratio itself is a benchmark's result, not a test's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "overhead.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools/bench_overhead.py"), "--quick", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("| shape | layers × hidden | vocab | seq | micro × accum | clock | ours (ms) | bare (ms) | ratio | paired |"
            in p.stdout)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["threads"] == 1 and report["quick"] is True
    assert report["reps"] == 2 and report["steps"] == 1 and "deepspeed" in report
    assert [r["shape"] for r in report["results"]] == ["smoke", "70m"]
    smoke, big = report["results"]
    assert (smoke["num_layers"], smoke["hidden_size"], smoke["vocab_size"]) == (4, 128, 1024)
    assert (big["num_layers"], big["hidden_size"], big["num_attention_heads"], big["vocab_size"]) == (6, 512, 8, 1024)
    for r in report["results"]:
        assert r["precision"] == "fp32" and r["zero_stage"] == 1 and r["grad_clip"] == 1.0
        assert r["grad_accum"] == 2 and r["clock"] == "cpu" and r["target_ratio"] == 1.05
        for clock in ("wall", "cpu"):
            c = r[clock]
            assert len(c["ours_s"]) == len(c["bare_s"]) == 2 and all(t > 0 for t in c["ours_s"] + c["bare_s"])
            assert c["ratio"] == pytest.approx(c["ours_median_s"] / c["bare_median_s"])
            assert len(c["per_rep_ratios"]) == 2 and c["paired_ratio"] > 0
        assert r["ours_median_s"] == r["cpu"]["ours_median_s"] and r["ratio"] == r["cpu"]["ratio"]
        assert r["paired_ratio"] == r["cpu"]["paired_ratio"]
        assert r["meets_target"] == (r["ratio"] <= 1.05)
        # Same init, same batches, same math: the bare loop is the same training.
        assert r["steps_compared"] == 1 + 2 * (1 + 1) and r["max_loss_diff"] < 1e-4
