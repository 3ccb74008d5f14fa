"""tools/study.py --quick: the whole study pipeline (corpus, runs over seeds, measurements, table, figures)
on a tiny model in a minute; the numbers are checked against the run folders they come from."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT
from scipy import stats


def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    p = subprocess.run([sys.executable, "tools/study.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["variants"]) == {"baseline", "l2e"} and summary["seeds"] == [1, 2]
    for fig in ("val_loss.png", "tau.png", "ms_per_layer.png"):
        assert (out / fig).stat().st_size > 1000
    # every number is traceable: the held-out loss is the run's last val_loss; the cell is mean ± t-interval
    runs = summary["variants"]["l2e"]
    for r in runs:
        rows = [json.loads(x) for x in (ROOT / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert r["val_loss"] == [x["val_loss"] for x in rows if "val_loss" in x][-1]
        assert 0 <= r["frac_above"] <= 1 and 0 <= r["fkr"] <= 1 and 0 <= r["ks"] <= 1
    v = np.array([r["val_loss"] for r in runs])
    half = stats.t.ppf(0.975, 1) * v.std(ddof=1) / np.sqrt(2)
    line = next(x for x in summary["table"].splitlines() if x.startswith("| l2e |"))
    assert f"{v.mean():.4f} ± {half:.4f}" in line
    assert summary["variants"]["baseline"][0]["tau"] is None and runs[0]["tau"] is not None
    # re-running skips what is done
    p = subprocess.run([sys.executable, "tools/study.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "4 runs done, 0 to train" in p.stdout
