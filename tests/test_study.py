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
    # the paired table: l2e − same-seed baseline, with scipy's paired t-test
    base = {r["seed"]: r["val_loss"] for r in summary["variants"]["baseline"]}
    d = np.array([r["val_loss"] - base[r["seed"]] for r in runs])
    p_ref = stats.ttest_rel([r["val_loss"] for r in runs], [base[r["seed"]] for r in runs]).pvalue
    half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
    paired = [x for x in summary["table"].splitlines() if x.startswith("| l2e |")][1]
    assert paired == (f"| l2e | {d.mean():+.4f} ± {half:.4f} | {d[0]:+.4f}, {d[1]:+.4f} | {p_ref:.4f} |"), paired
    # re-running skips what is done
    p = subprocess.run([sys.executable, "tools/study.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "4 runs done, 0 to train" in p.stdout
    # --feature-corr reads a run folder on its own and agrees with the study's measurement
    run = ROOT / runs[0]["run"]
    p = subprocess.run([sys.executable, "tools/study.py", "--feature-corr", str(run), str(tmp_path / "nothing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "nothing: not a finished run folder" in p.stderr
    p = subprocess.run([sys.executable, "tools/study.py", "--feature-corr", str(run)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"mean |corr| {runs[0]['feature_corr']:.4f}" in p.stdout


def test_feature_corr_matches_numpy_corrcoef():
    """The study's |corr| measure on a real GPTNeoX against numpy's corrcoef of each block's output."""
    import importlib.util

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    spec = importlib.util.spec_from_file_location("study", ROOT / "tools/study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
                                             num_attention_heads=2, intermediate_size=32)).eval()
    rows = torch.randint(0, 64, (3, 20))
    got = study.feature_corr(model, rows, [0, 1])   # (HF applies the final norm to the last hidden state)
    with torch.no_grad():
        hidden = model(input_ids=rows, output_hidden_states=True).hidden_states   # [embeddings, block 0, …]
    for i in (0, 1):
        z = hidden[i + 1].double().numpy()
        ref = np.mean([np.abs(c[~np.eye(16, dtype=bool)]).mean() for c in (np.corrcoef(x.T) for x in z)])
        assert abs(got[i] - ref) < 1e-6, (i, got[i], ref)
