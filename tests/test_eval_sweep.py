"""tools/sweep.py: the commands it plans, what it skips (resume), its errors; real processes."""

from __future__ import annotations

import csv
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from _eval_helpers import REPO, lm_eval_json

SWEEP = REPO / "tools" / "sweep.py"


def sweep_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def write_sweep(tmp: Path, extra: str = "") -> Path:
    (tmp / "configs").mkdir()
    (tmp / "configs" / "base.yml").write_text("data:\n  path: /data/pile/document\ntrain:\n  iters: 30\n"
                                              "checkpoint:\n  interval: 10\n")
    p = tmp / "sweeps" / "grid.yml"
    p.parent.mkdir()
    p.write_text(f"""out: ../runs
tasks: arc_challenge,piqa
num_fewshot: [0, 5]
baseline: base
eval_args: [--batch-size, "4"]
{extra}runs:
  - name: base
    config: ../configs/base.yml
  - name: l2e
    config: ../configs/base.yml
    set: [l2e.enabled=true, l2e.ratio=0.01]
  - name: dropout
    config: ../configs/base.yml
    set: ["model.hidden_dropout=0.2", "train.iters=20"]
""")
    return p


def finish(tmp: Path, name: str, step: int, shots=(0, 5), accs=(0.2, 0.6)):
    run = tmp / "runs" / name
    (run / "checkpoints" / f"global_step{step}").mkdir(parents=True)
    for k in shots:
        p = run / "eval" / f"global_step{step}" / f"results_{k}shot.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(lm_eval_json(k, dict(zip(("arc_challenge", "piqa"), accs)))))


def test_dry_run_plans_and_skips_finished(tmp_path):
    sweep = write_sweep(tmp_path)
    finish(tmp_path, "base", 30)                       # trained and evaluated
    finish(tmp_path, "dropout", 20, shots=(0,))        # trained, 5-shot missing
    res = sweep_cli(str(sweep), "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = (tmp_path / "runs").resolve()
    cfg = (tmp_path / "configs" / "base.yml").resolve()
    py = sys.executable
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"# skip train base: final checkpoint {runs}/base/checkpoints/global_step30 exists"
    assert lines[1].startswith("# skip eval base: results ")
    assert shlex.split(lines[2]) == [py, "-m", "megatron_l2e.train", "--config", str(cfg), "--set",
                                     f"output.dir={runs}/l2e", "--set", "l2e.enabled=true", "--set", "l2e.ratio=0.01"]
    assert shlex.split(lines[3]) == [py, "-m", "megatron_l2e.eval", "--checkpoint", f"{runs}/l2e/checkpoints/global_step30",
                                     "--tasks", "arc_challenge,piqa", "--num-fewshot", "0,5", "--batch-size", "4"]
    assert lines[4] == f"# skip train dropout: final checkpoint {runs}/dropout/checkpoints/global_step20 exists"
    assert shlex.split(lines[5])[:9] == [py, "-m", "megatron_l2e.eval", "--checkpoint",
                                         f"{runs}/dropout/checkpoints/global_step20", "--tasks", "arc_challenge,piqa",
                                         "--num-fewshot", "5"]
    table = shlex.split(lines[6])
    assert table[:4] == [py, str(REPO / "tools" / "make_table.py"), "--baseline", "base"]
    assert table[4] == f"base={runs}/base/eval/global_step30/results_0shot.json,{runs}/base/eval/global_step30/results_5shot.json"
    assert len(lines) == 7
    assert not (runs / "l2e").exists(), "a dry run creates nothing"


def test_finished_sweep_only_tabulates(tmp_path):
    sweep = write_sweep(tmp_path)
    finish(tmp_path, "base", 30, accs=(0.2, 0.6))
    finish(tmp_path, "l2e", 30, accs=(0.22, 0.62))
    finish(tmp_path, "dropout", 20, accs=(0.2, 0.5))
    res = sweep_cli(str(sweep), cwd=tmp_path)          # real run: nothing left but the table
    assert res.returncode == 0, res.stderr
    assert "skip train l2e" in res.stdout and "skip eval dropout" in res.stdout
    table = (tmp_path / "runs" / "table.md").read_text()
    assert table in res.stdout
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert list(rows) == ["base", "l2e", "dropout"]
    assert "+5.0%" in rows["l2e"] and "-12.5%" in rows["dropout"]   # 0.84/0.8 − 1, 0.7/0.8 − 1


def test_slurm_script(tmp_path):
    sweep = write_sweep(tmp_path, extra="slurm_args: [--gpus-per-node=8, --time=48:00:00]\n")
    finish(tmp_path, "base", 30)
    res = sweep_cli(str(sweep), "--slurm", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "# skip base: trained and evaluated" in lines
    jobs = [ln for ln in lines if ln.startswith("deps+=($(sbatch")]
    assert len(jobs) == 2 and "--job-name=l2e-l2e" in jobs[0] and "--gpus-per-node=8" in jobs[0]
    assert "megatron_l2e.train" in jobs[0] and "&& " in jobs[0] and "megatron_l2e.eval" in jobs[0]
    assert lines[-1].startswith('sbatch "${dep_arg[@]}" --job-name=l2e-table')
    assert subprocess.run(["bash", "-n"], input=res.stdout, text=True).returncode == 0   # valid bash


def test_bad_sweep_files_one_line_exit_2(tmp_path):
    sweep = write_sweep(tmp_path)
    cases = {
        "runs: []\n": "runs: expected a non-empty list",
        "runz: []\n": "unknown key 'runz'",
        "runs:\n  - name: a\n    config: ../configs/base.yml\n    set: [train.iterz=3]\n": "train.iterz: unknown key",
        "runs:\n  - name: a\n    config: ../configs/none.yml\n": "none.yml",
        "num_fewshot: [-1]\nruns:\n  - name: a\n    config: ../configs/base.yml\n": "num_fewshot: expected integers ≥ 0",
        "baseline: z\nruns:\n  - name: a\n    config: ../configs/base.yml\n": "baseline 'z' is not one of the runs",
        "runs:\n  - name: a\n    config: ../configs/base.yml\n    set: [checkpoint.save_final=false, "
        "checkpoint.interval=7]\n": "leaves no final checkpoint",
        "runs: [: x\n": "not valid YAML",
    }
    for text, message in cases.items():
        sweep.write_text(text)
        res = sweep_cli(str(sweep), "--dry-run", cwd=tmp_path)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and message in err[0], (text, res.stderr)
    res = sweep_cli(str(tmp_path / "missing.yml"), cwd=tmp_path)
    assert res.returncode == 2 and "no such sweep file" in res.stderr


def test_shell_wrapper(tmp_path):
    sweep = write_sweep(tmp_path)
    res = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh"), str(sweep), "--dry-run"], capture_output=True,
                         text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("megatron_l2e.train") == 3


# ----------------------------------------------------------------------------------------------
# Seeds: OUT/<name>/seed<S>, --set train.seed=S, resumable per seed, the table over seed folders
# ----------------------------------------------------------------------------------------------

SEEDS_EXTRA = "seeds: [1, 2]\n"


def write_seeded_sweep(tmp: Path) -> Path:
    """base and l2e over the global seeds [1, 2]; dropout over its own [3]; plain has none."""
    sweep = write_sweep(tmp, extra=SEEDS_EXTRA)
    text = sweep.read_text().replace('set: ["model.hidden_dropout=0.2", "train.iters=20"]\n',
                                     'set: ["model.hidden_dropout=0.2", "train.iters=20"]\n    seeds: 3\n')
    sweep.write_text(text)
    return sweep


def sweep_main(capsys, *args: str) -> tuple[int, str, str]:
    """tools/sweep.py's main() in this process (no interpreter start-up: the tests stay quick)."""
    import importlib.util

    mod = sys.modules.get("_sweep_tool")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_sweep_tool", SWEEP)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_sweep_tool"] = mod               # dataclasses look their module up there
        spec.loader.exec_module(mod)
    rc = mod.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_seeds_dry_run_folders_and_resume(tmp_path, capsys):
    sweep = write_seeded_sweep(tmp_path)
    finish(tmp_path, "base/seed1", 30)                   # trained and evaluated
    finish(tmp_path, "l2e/seed2", 30, shots=(0,))        # trained, 5-shot missing
    rc, out, err = sweep_main(capsys, str(sweep), "--dry-run")
    assert rc == 0, err
    runs = (tmp_path / "runs").resolve()
    cfg = str((tmp_path / "configs" / "base.yml").resolve())
    py = sys.executable
    lines = out.strip().splitlines()
    assert lines[0] == f"# skip train base/seed1: final checkpoint {runs}/base/seed1/checkpoints/global_step30 exists"
    assert lines[1].startswith("# skip eval base/seed1: results ")
    assert shlex.split(lines[2]) == [py, "-m", "megatron_l2e.train", "--config", cfg, "--set",
                                     f"output.dir={runs}/base/seed2", "--set", "train.seed=2"]
    assert shlex.split(lines[3])[:4] == [py, "-m", "megatron_l2e.eval", "--checkpoint"]
    assert shlex.split(lines[3])[4] == f"{runs}/base/seed2/checkpoints/global_step30"
    assert shlex.split(lines[4]) == [py, "-m", "megatron_l2e.train", "--config", cfg, "--set",
                                     f"output.dir={runs}/l2e/seed1", "--set", "train.seed=1",
                                     "--set", "l2e.enabled=true", "--set", "l2e.ratio=0.01"]
    assert lines[6] == f"# skip train l2e/seed2: final checkpoint {runs}/l2e/seed2/checkpoints/global_step30 exists"
    assert shlex.split(lines[7])[4:9] == [f"{runs}/l2e/seed2/checkpoints/global_step30", "--tasks",
                                          "arc_challenge,piqa", "--num-fewshot", "5"]
    assert shlex.split(lines[8])[6:] == [f"output.dir={runs}/dropout/seed3", "--set", "train.seed=3", "--set",
                                         "model.hidden_dropout=0.2", "--set", "train.iters=20"]   # per-run seeds win
    table = shlex.split(lines[10])
    assert table[2:] == ["--baseline", "base", f"base={runs}/base", f"l2e={runs}/l2e", f"dropout={runs}/dropout"]
    assert len(lines) == 11
    assert not (runs / "base" / "seed2").exists(), "a dry run creates nothing"


def test_seeds_slurm_and_plain_runs_unchanged(tmp_path, capsys):
    sweep = write_seeded_sweep(tmp_path)
    finish(tmp_path, "l2e/seed1", 30)
    rc, out, err = sweep_main(capsys, str(sweep), "--slurm")
    assert rc == 0, err
    lines = out.splitlines()
    assert "# skip l2e/seed1: trained and evaluated" in lines
    jobs = [ln for ln in lines if ln.startswith("deps+=($(sbatch")]
    assert [j.split("--job-name=")[1].split()[0] for j in jobs] == ["l2e-base-seed1", "l2e-base-seed2",
                                                                    "l2e-l2e-seed2", "l2e-dropout-seed3"]
    assert "train.seed=2" in jobs[1] and "/runs/base/seed2/slurm-%j.out" in jobs[1]
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    # a run's own seeds without global ones; the others keep OUT/<name> and the exact old commands
    (tmp_path / "p").mkdir()
    text = write_sweep(tmp_path / "p").read_text().replace("  - name: l2e\n", "  - name: l2e\n    seeds: [5, 6]\n")
    (tmp_path / "p" / "sweeps" / "grid.yml").write_text(text)
    rc, out, err = sweep_main(capsys, str(tmp_path / "p" / "sweeps" / "grid.yml"), "--dry-run")
    runs = (tmp_path / "p" / "runs").resolve()
    cmds = [shlex.split(ln) for ln in out.strip().splitlines()]
    assert rc == 0 and cmds[0][-2:] == ["--set", f"output.dir={runs}/base"]
    assert cmds[2][6:9] == [f"output.dir={runs}/l2e/seed5", "--set", "train.seed=5"]
    ev = "eval/global_step{}/results_{}shot.json"
    assert cmds[-1][4:] == [f"base={runs}/base/{ev.format(30, 0)},{runs}/base/{ev.format(30, 5)}", f"l2e={runs}/l2e",
                            f"dropout={runs}/dropout/{ev.format(20, 0)},{runs}/dropout/{ev.format(20, 5)}"]


def test_seeds_finished_sweep_tabulates_over_seeds(tmp_path, capsys):
    sweep = write_seeded_sweep(tmp_path)
    sweep.write_text(sweep.read_text().replace(SEEDS_EXTRA, SEEDS_EXTRA + "table_args: [--csv]\n"))
    for s, accs in ((1, (0.20, 0.60)), (2, (0.22, 0.62))):
        finish(tmp_path, f"base/seed{s}", 30, accs=accs)
    for s, accs in ((1, (0.22, 0.62)), (2, (0.25, 0.63))):
        finish(tmp_path, f"l2e/seed{s}", 30, accs=accs)
    finish(tmp_path, "dropout/seed3", 20, accs=(0.2, 0.5))
    rc, out, err = sweep_main(capsys, str(sweep))
    assert rc == 0, err
    assert "skip train l2e/seed2" in out and "skip eval dropout/seed3" in out
    rows = {r[0]: r for r in csv.reader(io.StringIO((tmp_path / "runs" / "table.md").read_text()))}
    assert rows["Run"][:4] == ["Run", "Seeds", "ARC-C 0-shot", "ARC-C 0-shot ±"]
    hw = stats.t.ppf(0.975, 1) * np.std([0.2, 0.22], ddof=1) / np.sqrt(2)
    assert rows["base"][1:4] == ["2", "0.2100", f"{hw:.4f}"]
    assert rows["dropout"][1:4] == ["1", "0.2000", ""]


def test_seeds_bad_sweep_files(tmp_path, capsys):
    sweep = write_sweep(tmp_path)
    base = "runs:\n  - name: a\n    config: ../configs/base.yml\n"
    cases = {
        "seeds: []\n" + base: "seeds: expected a non-empty list of integers ≥ 0",
        "seeds: [1, -2]\n" + base: "seeds: expected a non-empty list of integers ≥ 0",
        "seeds: [1, 1]\n" + base: "seeds: a seed is listed twice",
        base + "    seeds: [x]\n": "runs[0].seeds: expected a non-empty list",
        "seeds: [1]\n" + base + "    set: [train.seed=4]\n": "set 'train.seed=4' conflicts with seeds [1]",
        "table_args: {a: 1}\n" + base: "table_args: expected a list of strings",
    }
    for text, message in cases.items():
        sweep.write_text(text)
        rc, out, err = sweep_main(capsys, str(sweep), "--dry-run")
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], (text, err)


def test_seeds_null_opts_a_run_out(tmp_path, capsys):
    sweep = write_sweep(tmp_path, extra=SEEDS_EXTRA)
    sweep.write_text(sweep.read_text().replace("  - name: base\n", "  - name: base\n    seeds: null\n"))
    rc, out, err = sweep_main(capsys, str(sweep), "--dry-run")
    runs = (tmp_path / "runs").resolve()
    cmds = [shlex.split(ln) for ln in out.strip().splitlines()]
    assert rc == 0, err
    assert cmds[0][-2:] == ["--set", f"output.dir={runs}/base"]                     # plain, as without seeds
    assert [c[6] for c in cmds if "megatron_l2e.train" in c][1:] == [
        f"output.dir={runs}/{n}/seed{s}" for n in ("l2e", "dropout") for s in (1, 2)]
