"""The paper's result tables from lm-eval results JSON files (``tools/make_table.py`` is the CLI).

Input: ``NAME=PATH[,PATH...]``, each PATH a results JSON as ``lm_eval.simple_evaluate`` returns it
(what ``python -m megatron_l2e.eval`` writes) or a folder searched recursively for such files.
Shots come from each file's ``n-shot`` field, accuracy from ``<metric>,none`` (``acc`` by default).

Layouts:
* ``paper`` (Tables 1, 4, 5, 8, 9): one row per run, per shot count one column per task and the
  "↑" column: the relative change of the row's mean accuracy over the tasks against the baseline
  row's mean, ``mean(row) / mean(baseline) − 1``, printed as a signed percentage (``-16.0%``).
* ``scales`` (Tables 6, 7): NAMEs are ``SCALE/METHOD``; one row per (task, shots) and a mean row;
  per scale one column per method and one "↑" per non-baseline method (same formula, per task; on
  the mean row it is the paper's ↑ of the mean). Last, per non-baseline method, "METHOD ↑ (scales)":
  the mean over scales of that row's per-scale ↑ (Table 6's across-scales ↑; see ``scales_table``).

Seeds: a PATH that is a folder holding ``seed<S>/`` folders (what ``tools/sweep.py`` writes for a
sweep with ``seeds:``) makes its NAME a run over seeds; each ``seed<S>/`` is read like a run folder.
With two or more seeds in any row, the paper layout prints per cell the mean over seeds ± the 95 %
confidence half-width (Student t, ``t.ppf(0.975, n−1)·s/√n``, ``s`` the sample standard deviation),
a "Seeds" column (n) and a legend; the ↑ is computed per seed (against the baseline's mean over its
seeds, or with ``paired`` against the same seed's baseline, plus a column of two-sided paired t-test
p-values, ``scipy.stats.ttest_rel`` on the per-seed mean accuracies) and printed as mean ± half-width
over seeds. ``seed_stats`` returns the unrounded numbers. One seed per row prints today's table.

Only the standard library is imported (scipy only for a table over seeds): tables print instantly.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

TASK_LABELS = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "piqa": "PIQA", "sciq": "SciQ",
               "mmlu": "MMLU", "bigbench_lite": "BBL"}
UP = "↑"


class TableError(Exception):
    """A one-line error for the user (bad argument, unreadable or inconsistent results)."""


@dataclass
class Run:
    name: str
    acc: dict[int, dict[str, float]] = field(default_factory=dict)    # shots → task → accuracy
    source: dict[tuple[int, str], Path] = field(default_factory=dict)  # (shots, task) → file
    # a run over seeds (a folder of seed<S>/ folders): seed → that seed's run, and ``acc`` is the
    # per-task mean over the seeds; None for a plain run
    seeds: dict[int, "Run"] | None = None

    def per_seed(self) -> list["Run"]:
        """The seeds' runs in seed order (a plain run: itself)."""
        return [self.seeds[k] for k in sorted(self.seeds)] if self.seeds else [self]


# ----------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------

def _is_results(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "n-shot" in data


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TableError(f"{path}: not a readable JSON file ({exc})") from None


def results_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the lm-eval results JSONs under a folder (recursively)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise TableError(f"{p}: no such file or directory")
    found = []
    for f in sorted(p.rglob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue                            # other JSON in a run folder (configs, metrics)
        if _is_results(data):
            found.append(f)
    if not found:
        raise TableError(f"{p}: no lm-eval results JSON (with 'results' and 'n-shot') found in it")
    return found


def _shots_of(task: str, data: dict, path: Path) -> int:
    """A task's shot count; a group's is its subtasks' (lm-eval lists only leaf tasks in n-shot)."""
    nshot, subtasks = data.get("n-shot", {}), data.get("group_subtasks", {})
    todo, seen = [task], set()
    while todo:
        t = todo.pop(0)
        if t in seen:
            continue
        seen.add(t)
        if t in nshot:
            return int(nshot[t])
        todo.extend(subtasks.get(t, []))
    raise TableError(f"{path}: task '{task}' has no 'n-shot' entry")


def read_results(path: Path, metric: str = "acc") -> dict[tuple[int, str], float]:
    """{(shots, task): accuracy} for the top-level tasks and groups of one results file (the
    subtasks of a group, e.g. MMLU's 57, are left out)."""
    data = _load_json(path)
    if not _is_results(data):
        raise TableError(f"{path}: not an lm-eval results JSON (no 'results' and 'n-shot')")
    children = {c for kids in data.get("group_subtasks", {}).values() for c in kids}
    out = {}
    for task, row in data["results"].items():
        if task in children:
            continue
        key = f"{metric},none"
        if not isinstance(row.get(key), (int, float)):
            raise TableError(f"{path}: task '{task}' has no '{key}' (metrics: "
                             f"{', '.join(k for k in row if k.endswith(',none') and '_stderr' not in k)})")
        out[(_shots_of(task, data, path), task)] = float(row[key])
    return out


def load_run(name: str, paths: list[str | Path], metric: str = "acc") -> Run:
    run = Run(name)
    for p in paths:
        for f in results_files(p):
            for (shots, task), v in read_results(f, metric).items():
                if (shots, task) in run.source:
                    raise TableError(f"{name}: {task} {shots}-shot is in both {run.source[(shots, task)]} "
                                     f"and {f}; name one file")
                run.acc.setdefault(shots, {})[task] = v
                run.source[(shots, task)] = f
    return run


SEED_DIR = re.compile(r"seed(\d+)")


def seed_dirs(path: str | Path) -> dict[int, Path]:
    """{S: path/seed<S>} for the ``seed<S>/`` folders directly under a folder ({} otherwise)."""
    p = Path(path)
    if not p.is_dir():
        return {}
    out: dict[int, Path] = {}
    for c in sorted(p.iterdir()):
        m = SEED_DIR.fullmatch(c.name)
        if m and c.is_dir():
            k = int(m.group(1))
            if k in out:
                raise TableError(f"{p}: {out[k].name} and {c.name} are the same seed")
            out[k] = c
    return out


def _results_outside(p: Path, inside: set[Path]) -> list[Path]:
    found = []
    for c in sorted(p.iterdir()):
        if c in inside:
            continue
        if c.is_dir():
            try:
                found += results_files(c)
            except TableError:
                pass                              # no results there
        elif c.suffix == ".json":
            try:
                if _is_results(json.loads(c.read_text(encoding="utf-8"))):
                    found.append(c)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                pass
    return found


def load_spec(name: str, paths: list[str | Path], metric: str = "acc") -> Run:
    """A row: a plain run (``load_run``), or a run over seeds when its one PATH holds ``seed<S>/``
    folders (each read as a run folder; every seed must have the same tasks and shots)."""
    seeded = {str(p): seed_dirs(p) for p in paths}
    if not any(seeded.values()):
        return load_run(name, paths, metric)
    if len(paths) > 1:
        raise TableError(f"{name}: a folder of seed<S>/ folders must be the only PATH of its NAME")
    root = Path(paths[0])
    dirs = seeded[str(paths[0])]
    outside = _results_outside(root, set(dirs.values()))
    if outside:
        raise TableError(f"{name}: {root} holds results both in seed<S>/ folders and outside them ({outside[0]})")
    runs = {k: load_run(f"{name}/{d.name}", [d], metric) for k, d in dirs.items()}
    first_seed, first = next(iter(runs.items()))
    keys = set(first.source)
    for k, r in runs.items():
        diff = keys ^ set(r.source)
        if diff:
            shots, task = min(diff)
            has, lacks = (r, first) if (shots, task) in r.source else (first, r)
            raise TableError(f"{name}: {lacks.name} has no {task} {shots}-shot result, {has.name} has one; "
                             f"every seed needs the same tasks and shots")
    run = Run(name, seeds=runs)
    for shots, task in sorted(keys):
        vals = [r.acc[shots][task] for r in runs.values()]
        run.acc.setdefault(shots, {})[task] = sum(vals) / len(vals)
        run.source[(shots, task)] = first.source[(shots, task)]
    return run


def parse_spec(spec: str) -> tuple[str, list[str]]:
    name, sep, paths = spec.partition("=")
    if not sep or not name or not paths:
        raise TableError(f"'{spec}': expected NAME=PATH[,PATH...]")
    return name, [p for p in paths.split(",") if p]


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

def relative_change(row: dict[str, float], base: dict[str, float]) -> float | None:
    """The paper's ↑: mean accuracy of ``row`` over the baseline's tasks / the baseline's − 1
    (None when the row lacks one of those tasks or the baseline's mean is 0)."""
    tasks = list(base)
    if not tasks or any(t not in row for t in tasks):
        return None
    mean_row = sum(row[t] for t in tasks) / len(tasks)
    mean_base = sum(base[t] for t in tasks) / len(tasks)
    if mean_base == 0:
        return None                             # a change relative to 0 is undefined: n/a, not a crash
    return mean_row / mean_base - 1.0


def fmt_pct(x: float | None) -> str:
    """Signed percentage, one decimal: ``+2.3%``, ``-16.0%`` (``n/a`` when not computable)."""
    if x is None:
        return "n/a"
    v = round(100.0 * x, 1)
    return f"{(v if v != 0 else 0.0):+.1f}%"


def fmt_acc(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def task_label(task: str) -> str:
    return TASK_LABELS.get(task, task)


def _ordered_tasks(tasks: set[str]) -> list[str]:
    known = [t for t in TASK_LABELS if t in tasks]
    return known + sorted(tasks - set(known))


# ----------------------------------------------------------------------------------------------
# Seeds: intervals and paired tests (scipy, imported only here)
# ----------------------------------------------------------------------------------------------

@dataclass
class Interval:
    """Mean over seeds and the 95 % Student-t confidence half-width (None when n < 2)."""
    mean: float
    half_width: float | None
    n: int


def t_interval(values: list[float]) -> Interval:
    """mean ± ``scipy.stats.t.ppf(0.975, n−1)·s/√n`` (``s``: sample standard deviation, ddof 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    from scipy import stats

    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n), n)


def paired_p(row: list[float], base: list[float]) -> float | None:
    """Two-sided paired t-test p-value (``scipy.stats.ttest_rel``); None when n < 2 or undefined
    (all differences equal to zero)."""
    if len(row) < 2:
        return None
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # identical samples: nan, reported as n/a
        p = float(stats.ttest_rel(row, base).pvalue)
    return None if math.isnan(p) else p


def _mean_acc(acc: dict[str, float], tasks: list[str]) -> float | None:
    if not tasks or any(t not in acc for t in tasks):
        return None
    return sum(acc[t] for t in tasks) / len(tasks)


def check_paired(runs: list[Run], baseline: str) -> None:
    """Under --paired every row must have the baseline's seeds."""
    base = next(r for r in runs if r.name == baseline)
    want = sorted(base.seeds) if base.seeds else None
    for r in runs:
        have = sorted(r.seeds) if r.seeds else None
        if have != want:
            show = lambda x: "no seed folders" if x is None else "seeds " + ",".join(map(str, x))  # noqa: E731
            raise TableError(f"--paired: {r.name} has {show(have)} but the baseline {baseline} has {show(want)}")


def seed_stats(runs: list[Run], baseline: str, paired: bool = False) -> dict[str, dict[int, dict]]:
    """Unrounded numbers of the table over seeds: row name → shots →
    ``{"acc": {task: Interval}, "up": Interval | None, "p": float | None}``.

    ``acc``: the task's accuracy over the row's seeds. ``up``: per seed, the relative change of the
    seed's mean accuracy (over the baseline's tasks) against the baseline's mean over its seeds — or,
    ``paired``, against the same seed's baseline — then the interval over seeds (None for the
    baseline row, or when a task is missing / the baseline's mean is 0). ``p`` (``paired`` only):
    ``ttest_rel`` of the row's per-seed mean accuracies against the baseline's, same seeds.
    A plain run counts as one seed.
    """
    base = next(r for r in runs if r.name == baseline)
    if paired:
        check_paired(runs, baseline)
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        out[r.name] = {}
        for s in sorted({k for x in runs for k in x.acc}):
            seeds = r.per_seed()
            tasks = sorted(r.acc.get(s, {}))
            cell: dict = {"acc": {t: t_interval([x.acc[s][t] for x in seeds]) for t in tasks}, "up": None, "p": None}
            if r is not base:
                if paired:
                    ups = [relative_change(x.acc.get(s, {}), b.acc.get(s, {})) for x, b in zip(seeds, base.per_seed())]
                else:
                    ups = [relative_change(x.acc.get(s, {}), base.acc.get(s, {})) for x in seeds]
                if ups and all(u is not None for u in ups):
                    cell["up"] = t_interval(ups)
                    if paired:
                        btasks = list(base.acc.get(s, {}))
                        cell["p"] = paired_p([_mean_acc(x.acc[s], btasks) for x in seeds],
                                             [_mean_acc(b.acc[s], btasks) for b in base.per_seed()])
            out[r.name][s] = cell
    return out


def fmt_interval(iv: Interval | None) -> str:
    """``0.1834 ± 0.0123`` (4 decimals as the plain table; no ± with one seed)."""
    if iv is None:
        return "–"
    return fmt_acc(iv.mean) if iv.half_width is None else f"{iv.mean:.4f} ± {iv.half_width:.4f}"


def fmt_pct_hw(x: float | None) -> str:
    """A half-width in percent, one decimal (``1.1%``)."""
    return "" if x is None else f"{round(100.0 * x, 1):.1f}%"


def fmt_pct_interval(iv: Interval | None) -> str:
    """``+2.3% ± 1.1%`` (``n/a`` when not computable; no ± with one seed)."""
    if iv is None:
        return "n/a"
    return fmt_pct(iv.mean) if iv.half_width is None else f"{fmt_pct(iv.mean)} ± {fmt_pct_hw(iv.half_width)}"


def fmt_p(p: float | None) -> str:
    """A p-value with 4 decimals (``<0.0001`` below that; ``n/a`` when not computable)."""
    if p is None:
        return "n/a"
    return "<0.0001" if p < 0.00005 else f"{p:.4f}"


def seeds_legend(paired: bool) -> str:
    up = ("per seed, the relative change of the row's mean accuracy over the tasks against the same seed's "
          "baseline (--paired)" if paired else
          "per seed, the relative change of the row's mean accuracy over the tasks against the baseline's "
          "mean over its seeds")
    text = ("Cells: mean over seeds ± 95 % confidence half-width (Student t: t.ppf(0.975, n−1)·s/√n, "
            "s = sample standard deviation, n = Seeds; no ± where n = 1). "
            f"{UP}: {up}, as mean ± half-width over seeds.")
    if paired:
        text += (" p: two-sided paired t-test (scipy.stats.ttest_rel) of the row's per-seed mean accuracies "
                 "against the baseline's.")
    return text


def seeded_paper_table(runs: list[Run], baseline: str, paired: bool = False,
                       as_csv: bool = False) -> tuple[list[str], list[list[str]]]:
    """The paper layout over seeds: "Run", "Seeds" (n), per shot count the tasks, ↑ (and p with
    ``paired``). Markdown cells hold ``mean ± half-width``; CSV cells split them into a column
    ``<col>`` (the mean) and ``<col> ±`` (the half-width, empty with one seed)."""
    stats = seed_stats(runs, baseline, paired)
    all_shots = sorted({s for r in runs for s in r.acc})
    header = ["Run", "Seeds"]
    rows = [[r.name, str(len(r.per_seed()))] for r in runs]
    for s in all_shots:
        tasks = _ordered_tasks({t for r in runs for t in r.acc.get(s, {})})
        cols = [f"{task_label(t)} {s}-shot" for t in tasks] + [f"{UP} {s}-shot"]
        header += [c for col in cols for c in ((col, f"{col} ±") if as_csv else (col,))]
        if paired:
            header.append(f"p {s}-shot")
        for r, row in zip(runs, rows):
            cell = stats[r.name][s]
            for t in tasks:
                iv = cell["acc"].get(t)
                if as_csv:
                    row += [fmt_acc(iv.mean if iv else None),
                            "" if iv is None or iv.half_width is None else f"{iv.half_width:.4f}"]
                else:
                    row.append(fmt_interval(iv))
            up = cell["up"]
            if r.name == baseline:
                row += ["–", ""] if as_csv else ["–"]
            elif as_csv:
                row += [fmt_pct(up.mean if up else None), fmt_pct_hw(up.half_width if up else None)]
            else:
                row.append(fmt_pct_interval(up))
            if paired:
                row.append("–" if r.name == baseline else fmt_p(cell["p"]))
    return header, rows


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------

def paper_table(runs: list[Run], baseline: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) in the layout of the paper's Table 1."""
    base = next(r for r in runs if r.name == baseline)
    all_shots = sorted({s for r in runs for s in r.acc})
    header, rows = ["Run"], [[r.name] for r in runs]
    for s in all_shots:
        tasks = _ordered_tasks({t for r in runs for t in r.acc.get(s, {})})
        header += [f"{task_label(t)} {s}-shot" for t in tasks] + [f"{UP} {s}-shot"]
        for r, row in zip(runs, rows):
            accs = r.acc.get(s, {})
            row += [fmt_acc(accs.get(t)) for t in tasks]
            row.append("–" if r is base else fmt_pct(relative_change(accs, base.acc.get(s, {}))))
    return header, rows


def scales_table(runs: list[Run], baseline_method: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) in the layout of the paper's Tables 6/7: tasks as rows, scales as columns.

    After the per-scale columns, one "METHOD ↑ (scales)" per non-baseline method: the mean over the
    scales of the row's per-scale ↑ (METHOD acc / baseline acc − 1), as the paper's Table 6 averages
    it. BBL 5-shot: +4.4 %, −4.7 %, +3.0 % → +0.9 %; this is not the ratio of the means over scales
    (mean L2E acc / mean baseline acc − 1, +0.8 % there), which would weight the scales by their
    baseline accuracy. It is computed from the unrounded per-scale changes, so it can differ in the
    last digit from the mean of the printed ones. On a Mean row it is the mean over scales of that
    row's per-scale ↑ (the ↑ of the mean), so the column is always the mean of the ↑ cells to its
    left. A scale where the method or the baseline lacks the task is left out of the mean; with no
    scale left the cell is ``n/a``, like a per-scale ↑ that cannot be computed.
    """
    grid: dict[str, dict[str, Run]] = {}                      # scale → method → run
    for r in runs:
        scale, sep, method = r.name.partition("/")
        if not sep or not scale or not method:
            raise TableError(f"'{r.name}': with --layout scales, names are SCALE/METHOD (e.g. 70M/L2E)")
        grid.setdefault(scale, {})[method] = r
    methods = list(dict.fromkeys(r.name.partition("/")[2] for r in runs))
    if baseline_method not in methods:
        raise TableError(f"--baseline {baseline_method}: no run named SCALE/{baseline_method}")
    others = [m for m in methods if m != baseline_method]
    header = ["Task"]
    for scale in grid:
        header += [f"{scale} {m}" for m in methods] + [f"{scale} {m} {UP}" for m in others]
    header += [f"{m} {UP} (scales)" for m in others]
    rows = []
    all_shots = sorted({s for r in runs for s in r.acc})
    for s in all_shots:
        tasks = _ordered_tasks({t for r in runs for t in r.acc.get(s, {})})
        for t in tasks + [None]:                                # None: the mean row
            row = [f"{task_label(t)} {s}-shot" if t else f"Mean {s}-shot"]
            per_scale_up: dict[str, list[float]] = {m: [] for m in others}   # unrounded, for (scales)
            for scale, by_method in grid.items():
                base = by_method.get(baseline_method)
                base_acc = base.acc.get(s, {}) if base else {}
                accs = {m: (by_method[m].acc.get(s, {}) if m in by_method else {}) for m in methods}
                if t is None:
                    for m in methods:
                        a = accs[m]
                        row.append(fmt_acc(sum(a[x] for x in base_acc) / len(base_acc))
                                   if base_acc and all(x in a for x in base_acc) else "–")
                    ups = {m: relative_change(accs[m], base_acc) for m in others}
                else:
                    row += [fmt_acc(accs[m].get(t)) for m in methods]
                    ups = {m: relative_change({t: accs[m][t]}, {t: base_acc[t]})
                           if t in accs[m] and t in base_acc else None for m in others}
                row += [fmt_pct(ups[m]) for m in others]
                for m in others:
                    if ups[m] is not None:
                        per_scale_up[m].append(ups[m])
            row += [fmt_pct(sum(u) / len(u) if u else None) for u in per_scale_up.values()]
            rows.append(row)
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tools/make_table.py", description="Print the paper's result tables from lm-eval "
                "results JSON files (or run folders holding them).")
    p.add_argument("runs", nargs="+", metavar="NAME=PATH[,PATH...]",
                   help="a row (paper layout) or SCALE/METHOD (scales layout) and its results files/folders")
    p.add_argument("--baseline", default=None,
                   help="baseline row NAME (scales layout: baseline METHOD) [the first one]")
    p.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    p.add_argument("--metric", choices=("acc", "acc_norm"), default="acc", help="accuracy field [acc]")
    p.add_argument("--layout", choices=("paper", "scales"), default="paper",
                   help="paper: runs as rows (Table 1); scales: tasks as rows, scales as columns (Tables 6/7)")
    p.add_argument("--paired", action="store_true",
                   help="runs over seeds (NAME=DIR of seed<S>/ folders): the ↑ of each seed against the same "
                        "seed's baseline and a paired t-test p-value (every row needs the baseline's seeds)")
    return p


def make_table(specs: list[str], *, baseline: str | None = None, metric: str = "acc",
               layout: str = "paper", as_csv: bool = False, paired: bool = False) -> str:
    parsed = [parse_spec(s) for s in specs]
    names = [n for n, _ in parsed]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TableError(f"run name given twice: {', '.join(sorted(dup))}")
    runs = [load_spec(n, paths, metric) for n, paths in parsed]
    multi = [r for r in runs if len(r.per_seed()) >= 2]      # any row over ≥ 2 seeds: the table over seeds
    if layout == "scales":
        if multi:
            raise TableError(f"--layout scales takes one seed per run ({multi[0].name} has "
                             f"{len(multi[0].per_seed())} seed folders): print one paper-layout table per scale")
        base = baseline or names[0].partition("/")[2]
        if paired:
            for scale in dict.fromkeys(n.partition("/")[0] for n in names):
                group = [r for r in runs if r.name.partition("/")[0] == scale]
                if any(r.name == f"{scale}/{base}" for r in group):
                    check_paired(group, f"{scale}/{base}")
        header, rows = scales_table(runs, base)
        return to_csv(header, rows) if as_csv else to_markdown(header, rows)
    base = baseline or names[0]
    if base not in names:
        raise TableError(f"--baseline {base}: not one of the runs ({', '.join(names)})")
    if paired:
        check_paired(runs, base)
    if not multi:
        header, rows = paper_table(runs, base)
        return to_csv(header, rows) if as_csv else to_markdown(header, rows)
    header, rows = seeded_paper_table(runs, base, paired, as_csv)
    return to_csv(header, rows) if as_csv else to_markdown(header, rows) + "\n\n" + seeds_legend(paired)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(make_table(args.runs, baseline=args.baseline, metric=args.metric, layout=args.layout,
                         as_csv=args.csv, paired=args.paired))
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
