#!/usr/bin/env python
"""Run a list of training configs one after another, evaluate each final checkpoint, tabulate.

    python tools/sweep.py SWEEP.yml [--dry-run] [--slurm] [--keep-going]

SWEEP.yml (paths relative to the file):

    out: runs/ablation-70m            # run folders are OUT/<name>
    tasks: paper                      # python -m megatron_l2e.eval --tasks
    num_fewshot: [0, 5]
    baseline: baseline                # the table's baseline row [the first run]
    eval_args: [--batch-size, "16"]   # extra eval arguments (optional)
    train_cmd: python -m megatron_l2e.train   # or e.g. "deepspeed --num_gpus 8 --module megatron_l2e.train"
    slurm_args: [--nodes=1, --gpus-per-node=8, --time=48:00:00]   # for --slurm (optional)
    seeds: [1, 2, 3]                  # optional: every run once per seed (train.seed=S)
    table_args: [--paired]            # extra tools/make_table.py arguments (optional)
    runs:
      - name: baseline
        config: ../runs/pythia-70m-baseline.yml
      - name: l2e-thr
        config: ../runs/pythia-70m-l2e.yml
        set: [l2e.ratio=0.02]
        seeds: [1, 2, 3, 4, 5]        # a run's own seeds win over the global ones

Per run: ``<train_cmd> --config C --set output.dir=OUT/<name> [--set ...]`` unless its final
checkpoint ``OUT/<name>/checkpoints/global_step<train.iters>`` exists; then
``python -m megatron_l2e.eval --checkpoint <that> --num-fewshot <missing shots>`` unless every
``OUT/<name>/eval/global_step<iters>/results_<k>shot.json`` exists; finally ``tools/make_table.py``
over all runs (printed and written to OUT/table.md). Re-running skips what is done, so an
interrupted sweep resumes. ``--dry-run`` prints the commands (and what it skips) and runs nothing;
``--slurm`` prints a bash script of ``sbatch`` jobs (one per unfinished run, then the table job
depending on them) instead of running.

Seeds: a run with ``seeds`` (its own, else the file's) is one run per seed S, in ``OUT/<name>/seed<S>``
(in place of ``OUT/<name>`` above), trained with ``--set train.seed=S`` after ``output.dir``; each
(run, seed) is trained, evaluated, skipped and submitted on its own. The table gets ``<name>=OUT/<name>``
for such a run, which ``tools/make_table.py`` groups over the seeds (mean ± 95 % confidence
half-width). A run without seeds (none in the file, or its own ``seeds: null``) is exactly as above.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import yaml  # noqa: E402

from megatron_l2e.config import ConfigError, load_config  # noqa: E402
from megatron_l2e.eval import checkpoint_paths, results_filename  # noqa: E402


class SweepError(Exception):
    """A one-line error for the user."""


@dataclass
class RunSpec:
    name: str
    config: Path
    sets: list[str]
    run_dir: Path
    final_ckpt: Path
    results: dict[int, Path]                      # shots → results JSON
    seed: int | None = None                       # a run over seeds: this one's (run_dir = OUT/<name>/seed<S>)

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name}/seed{self.seed}"

    @property
    def trained(self) -> bool:
        return self.final_ckpt.is_dir()

    def missing_shots(self) -> list[int]:
        return [k for k, p in self.results.items() if not p.is_file()]


@dataclass
class Sweep:
    out: Path
    tasks: str
    num_fewshot: list[int]
    baseline: str
    train_cmd: list[str]
    eval_args: list[str]
    slurm_args: list[str]
    table_args: list[str] = field(default_factory=list)
    runs: list[RunSpec] = field(default_factory=list)           # one per (run, seed)
    seeded: dict[str, Path] = field(default_factory=dict)       # name → OUT/<name> of a run over seeds


def _as_list(value, key: str, src: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise SweepError(f"{src}: {key}: expected a list of strings, got {value!r}")


def _seeds(value, key: str, src: Path) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (not isinstance(value, list) or not value
            or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in value)):
        raise SweepError(f"{src}: {key}: expected a non-empty list of integers ≥ 0, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{src}: {key}: a seed is listed twice in {value!r}")
    return list(value)


def load_sweep(path: Path, python: str) -> Sweep:
    """Read and check a sweep file, and every run config in it, before anything runs."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: expected a mapping with 'runs'")
    known = {"out", "tasks", "num_fewshot", "baseline", "train_cmd", "eval_args", "slurm_args", "runs", "seeds",
             "table_args"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    base = path.parent
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SweepError(f"{path}: runs: expected a non-empty list of {{name, config, set}}")
    shots = doc.get("num_fewshot", [0, 5])
    if isinstance(shots, int):
        shots = [shots]
    if not isinstance(shots, list) or not shots or any(not isinstance(k, int) or k < 0 for k in shots):
        raise SweepError(f"{path}: num_fewshot: expected integers ≥ 0, got {shots!r}")
    out = Path(doc.get("out", "runs/sweep"))
    out = (out if out.is_absolute() else base / out).resolve()
    train_cmd = _as_list(doc.get("train_cmd"), "train_cmd", path) or [python, "-m", "megatron_l2e.train"]
    sweep = Sweep(out=out, tasks=str(doc.get("tasks", "paper")), num_fewshot=sorted(set(shots)),
                  baseline=str(doc.get("baseline") or ""), train_cmd=train_cmd,
                  eval_args=_as_list(doc.get("eval_args"), "eval_args", path),
                  slurm_args=_as_list(doc.get("slurm_args"), "slurm_args", path),
                  table_args=_as_list(doc.get("table_args"), "table_args", path))
    all_seeds = _seeds(doc.get("seeds"), "seeds", path)
    names = set()
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("config"), str):
            raise SweepError(f"{path}: runs[{i}]: expected a mapping with string 'name' and 'config'")
        extra = sorted(set(r) - {"name", "config", "set", "seeds"})
        if extra:
            raise SweepError(f"{path}: runs[{i}]: unknown key '{extra[0]}' (known: config, name, seeds, set)")
        name = r["name"]
        if name in names or "/" in name or not name.strip():
            raise SweepError(f"{path}: runs[{i}]: name '{name}' is empty, has a '/', or is used twice")
        names.add(name)
        cfg_path = Path(r["config"])
        cfg_path = (cfg_path if cfg_path.is_absolute() else base / cfg_path).resolve()
        sets = _as_list(r.get("set"), f"runs[{i}].set", path)
        seeds = _seeds(r.get("seeds"), f"runs[{i}].seeds", path) if "seeds" in r else all_seeds
        if seeds is not None:
            clash = [x for x in sets if re.match(r"\s*train\.seed\s*=", x)]
            if clash:
                raise SweepError(f"{path}: runs[{i}]: set '{clash[0]}' conflicts with seeds {seeds} "
                                 f"(each seed's run gets --set train.seed=S)")
            sweep.seeded[name] = out / name
        for seed in (seeds if seeds is not None else [None]):
            run_dir = out / name if seed is None else out / name / f"seed{seed}"
            seed_set = [] if seed is None else [f"train.seed={seed}"]
            label = name if seed is None else f"{name}/seed{seed}"
            try:
                cfg = load_config(cfg_path, sets + [f"output.dir={run_dir}"] + seed_set)
            except ConfigError as exc:
                raise SweepError(f"run '{label}': {exc.errors[0]}") from None
            iters, ck = cfg.train.iters, cfg.checkpoint
            if not ck.save_final and not (ck.interval and iters % ck.interval == 0):
                raise SweepError(f"run '{label}': checkpoint.save_final is false and {iters} is not a multiple "
                                 f"of checkpoint.interval, so the run leaves no final checkpoint to evaluate")
            final = run_dir / "checkpoints" / f"global_step{iters}"
            _, eval_dir = checkpoint_paths(final)
            sweep.runs.append(RunSpec(name, cfg_path, sets, run_dir, final,
                                      {k: eval_dir / results_filename(k) for k in sweep.num_fewshot}, seed))
    if sweep.baseline and sweep.baseline not in names:
        raise SweepError(f"{path}: baseline '{sweep.baseline}' is not one of the runs")
    sweep.baseline = sweep.baseline or sweep.runs[0].name
    return sweep


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def train_command(sweep: Sweep, run: RunSpec) -> list[str]:
    cmd = sweep.train_cmd + ["--config", str(run.config), "--set", f"output.dir={run.run_dir}"]
    if run.seed is not None:
        cmd += ["--set", f"train.seed={run.seed}"]
    for s in run.sets:
        cmd += ["--set", s]
    return cmd


def eval_command(sweep: Sweep, run: RunSpec, python: str, shots: list[int]) -> list[str]:
    return [python, "-m", "megatron_l2e.eval", "--checkpoint", str(run.final_ckpt), "--tasks", sweep.tasks,
            "--num-fewshot", ",".join(map(str, shots))] + sweep.eval_args


def table_command(sweep: Sweep, python: str) -> list[str]:
    """make_table over all runs: a run's results files, or OUT/<name> for a run over seeds."""
    specs = []
    for r in sweep.runs:
        if r.name in sweep.seeded:
            spec = f"{r.name}={sweep.seeded[r.name]}"
            if spec not in specs:
                specs.append(spec)
        else:
            specs.append(f"{r.name}={','.join(str(p) for p in r.results.values())}")
    return [python, str(ROOT / "tools" / "make_table.py"), "--baseline", sweep.baseline] + sweep.table_args + specs


def plan(sweep: Sweep, python: str) -> list[tuple[str, RunSpec | None, list[str] | None, str]]:
    """(step, run, command or None when skipped, why) in execution order."""
    steps = []
    for run in sweep.runs:
        if run.trained:
            steps.append(("train", run, None, f"final checkpoint {run.final_ckpt} exists"))
        else:
            steps.append(("train", run, train_command(sweep, run), ""))
        missing = [k for k in sweep.num_fewshot if k in run.missing_shots()]
        if missing:
            steps.append(("eval", run, eval_command(sweep, run, python, missing), ""))
        else:
            steps.append(("eval", run, None, "results " + ", ".join(str(p) for p in run.results.values())
                          + " exist"))
    steps.append(("table", None, table_command(sweep, python), ""))
    return steps


def _q(cmd: list[str]) -> str:
    return shlex.join(cmd)


def slurm_script(sweep: Sweep, python: str) -> str:
    lines = ["#!/bin/bash", "# sbatch jobs for this sweep: bash this script to submit them", "set -euo pipefail",
             f"cd {shlex.quote(str(Path.cwd()))}", "deps=()"]
    for run in sweep.runs:
        cmds = []
        if not run.trained:
            cmds.append(_q(train_command(sweep, run)))
        missing = run.missing_shots()
        if missing:
            cmds.append(_q(eval_command(sweep, run, python, missing)))
        if not cmds:
            lines.append(f"# skip {run.label}: trained and evaluated")
            continue
        job = run.name if run.seed is None else f"{run.name}-seed{run.seed}"
        sb = ["sbatch", "--parsable", f"--job-name=l2e-{job}", f"--output={run.run_dir}/slurm-%j.out",
              *sweep.slurm_args, "--wrap", " && ".join(cmds)]
        lines += [f"mkdir -p {shlex.quote(str(run.run_dir))}", f"deps+=($({_q(sb)}))"]
    table = ["sbatch", f"--job-name=l2e-table", f"--output={sweep.out}/table-%j.out", "--wrap",
             f"{_q(table_command(sweep, python))} > {shlex.quote(str(sweep.out / 'table.md'))}"]
    lines.append('dep_arg=(); if [ ${#deps[@]} -gt 0 ]; then dep_arg=(--dependency=afterok:$(IFS=:; echo "${deps[*]}")); fi')
    lines.append(f'{_q(table[:1])} "${{dep_arg[@]}}" {_q(table[1:])}')
    return "\n".join(lines)


def execute(sweep: Sweep, python: str, keep_going: bool) -> int:
    failed: list[str] = []
    for step, run, cmd, why in plan(sweep, python):
        if step == "table":
            if failed:
                print(f"sweep: not tabulating: {', '.join(failed)} failed", file=sys.stderr)
                return 1
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr.strip(), file=sys.stderr)
                return res.returncode
            sweep.out.mkdir(parents=True, exist_ok=True)
            (sweep.out / "table.md").write_text(res.stdout)
            print(res.stdout, end="")
            continue
        if run.label in failed:
            continue
        if cmd is None:
            print(f"sweep: skip {step} {run.label}: {why}", flush=True)
            continue
        print(f"sweep: {step} {run.label}: {_q(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"error: run '{run.label}': {step} failed (exit {rc}): {_q(cmd)}", file=sys.stderr)
            if not keep_going:
                return 1
            failed.append(run.label)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="sweep YAML (see this file's docstring)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands and what is skipped; run nothing")
    mode.add_argument("--slurm", action="store_true", help="print a bash script of sbatch jobs instead of running")
    p.add_argument("--keep-going", action="store_true", help="continue with the other runs after a failure")
    p.add_argument("--python", default=sys.executable, help="interpreter for eval and tables [this one]")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.python)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.slurm:
        print(slurm_script(sweep, args.python))
        return 0
    if args.dry_run:
        for step, run, cmd, why in plan(sweep, args.python):
            label = f"{step} {run.label}" if run else step
            print(f"# skip {label}: {why}" if cmd is None else _q(cmd))
        return 0
    return execute(sweep, args.python, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
