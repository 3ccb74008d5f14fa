#!/usr/bin/env python
"""The small-scale study: does inhibiting monosemantic neurons help, hurt, or do nothing — and how sure are we?

    python tools/study.py [--out runs/study] [--jobs 2] [--seeds 1,2,3]      # make study
    python tools/study.py --quick --out /tmp/q                               # 2 variants × 2 seeds, a few steps
    python tools/study.py --feature-corr RUN [RUN ...]                       # mean |corr| at the sites of runs

One Pythia-architecture model scaled down (configs/study/base.yml) trained on text already on every machine
(the Python stdlib's sources, a held-out split), in these variants, each with every seed:

    baseline       L2E off
    monitor        statistics and τ only (training bit-identical to baseline: a built-in check)
    l2e            L2E's regularizer at the λ a scan picks
    encourage      the same mechanism with −λ (the opposite hypothesis, L2E's own machinery)
    memel          MEmeL: per-sample exact top-k + Reverse Deactivation
    dropout        model-wide hidden + attention dropout 0.2 (the paper's baseline; sites monitor τ)
    decorrelation  Yan et al.'s feature decorrelation at the same sites, at the λ a scan picks

The λ scans use seed 0 (not a study seed) and pick the λ with the lowest final held-out loss. Per run the
study records the held-out loss curve, the final τ, and — from the trained weights, on a labelled feature
set of stdlib text (10 packages) with the analysis toolkit's functions — the fraction of site neurons whose
MS φ_ℓ* (eq. 1–3, no compensation) is ≥ a fixed threshold, the FKR at 2 % (eq. 4), the mean K-S statistic
of 200 random site neurons, the MS per layer, the mean |off-diagonal feature correlation| at the sites, and
the median step time. Per variant: mean ± 95 % Student-t half-width over seeds. Everything lands under
OUT (runs, study.json, table.md, PNGs); re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BASE = ROOT / "configs/study/base.yml"
VARIANTS = {   # name → --set overrides (λ placeholders filled after the scans)
    "baseline": ["l2e.enabled=false"],
    "monitor": ["l2e.inhibition=none"],
    "l2e": ["l2e.inhibition=regularizer", "l2e.lam={lam}"],
    "encourage": ["l2e.inhibition=regularizer", "l2e.lam=-{lam}"],
    "memel": ["l2e.inhibition=reverse_deactivation", "l2e.selection=topk"],
    "dropout": ["l2e.inhibition=none", "model.hidden_dropout=0.2", "model.attention_dropout=0.2"],
    "decorrelation": ["l2e.inhibition=decorrelation", "l2e.lam={lam_dec}"],
}
L2E_SCAN = (1e-6, 1e-5, 3e-5, 1e-4)
DEC_SCAN = (0.01, 0.1, 1.0)
SCAN_SEED = 0
MS_THRESHOLD = 2.0          # the fixed MS threshold: φ_ℓ* ≥ 2 (twice the mean MS of an average input)
FKR_RATIO = 0.02
KS_NEURONS = 200
QUICK = ["train.iters=12", "validation.interval=4", "validation.iters=2", "checkpoint.extra_steps=[12]",
         "model.hidden_size=32", "model.num_attention_heads=2", "model.num_layers=2", "model.vocab_size=320",
         "model.seq_length=32", "data.smoke_max_files=40", "l2e.late_start=2", "l2e.warmup_steps=2",
         "logging.interval=1"]


class StudyError(Exception):
    """A one-line error for the user."""


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def run_sets(out: Path, name: str, seed: int, sets: list[str], extra: list[str]) -> list[str]:
    return [f"output.dir={out / 'runs' / name / f'seed{seed}'}", f"train.seed={seed}",
            f"data.path={out / 'data' / 'corpus'}", *sets, *extra]


def final_folder(run: Path, iters: int) -> Path:
    return run / "checkpoints" / f"hf_step{iters}"


def train(run_dir: Path, sets: list[str], iters: int, log: Path) -> float:
    """One training run (skipped if its final weights exist); returns its wall seconds (0 if skipped)."""
    if final_folder(run_dir, iters).is_dir():
        return 0.0
    cmd = [sys.executable, "-m", "megatron_l2e.train", "--config", str(BASE)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("STUDY_THREADS", "1"), "WANDB_MODE": "disabled"}
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise StudyError(f"training {run_dir} failed (exit {p.returncode}): {tail[0]} — see {log}")
    return time.time() - t0


def run_many(jobs: list[tuple[Path, list[str]]], iters: int, workers: int) -> None:
    todo = [(r, s) for r, s in jobs if not final_folder(r, iters).is_dir()]
    for r, _ in todo:
        r.mkdir(parents=True, exist_ok=True)
    print(f"[study] {len(jobs) - len(todo)} runs done, {len(todo)} to train ({workers} at a time)", flush=True)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(train, r, s, iters, r / "train.log"): r for r, s in todo}
        for fut in cf.as_completed(futs):
            print(f"[study] trained {futs[fut].relative_to(futs[fut].parents[2])} in {fut.result():.0f} s", flush=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def val_curve(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}


# ----------------------------------------------------------------------------------------------
# Measurements on the trained weights
# ----------------------------------------------------------------------------------------------

def measure(folder: Path, feats, sites: list[int], valid_rows, seed: int) -> dict:
    """MS profile, φ_ℓ* ≥ threshold, FKR, K-S and feature correlation of one trained model (CPU, fp32)."""
    import torch

    from megatron_l2e.analysis.activations import capture_activations, load_model, neuron_view
    from megatron_l2e.analysis.stats import (feature_means, fkr_curve, ks_statistic, ms_matrix, relative_feature,
                                             sample_neurons)

    model, _ = load_model(folder, torch.device("cpu"), torch.float32, need_tokenizer=False, progress=False)
    n_layers = len(model.gpt_neox.layers)
    cap = capture_activations(model, feats, list(range(n_layers)), {"block"}, batch_size=32, progress=False)
    profile, frac, fkr, scored, phis, lstars = {}, [], [], {}, {}, {}
    for layer in range(n_layers):
        values, mask = neuron_view(cap, feats, layer, "block")
        phi = ms_matrix(values, mask, compensation=0.0)
        l_star, best = relative_feature(feature_means(phi, feats.labels, feats.n_classes)[0])
        ok = ~torch.isnan(best)
        profile[layer] = float(best[ok].mean())
        if layer in sites:
            frac.append(float((best[ok] >= MS_THRESHOLD).double().mean()))
            fkr.append(fkr_curve(phi, feats.labels, l_star, [FKR_RATIO])[0].fkr)
            scored[layer] = np.flatnonzero(ok.numpy())
            phis[layer], lstars[layer] = phi, l_star
    rng = np.random.default_rng(seed)
    ks = [ks_statistic(phis[layer][:, j], feats.labels, int(lstars[layer][j]))[0]
          for layer, j in sample_neurons(rng, scored, KS_NEURONS)]
    corr = feature_corr(model, valid_rows, sites)
    return {"ms_profile": profile, "frac_above": float(np.mean(frac)), "fkr": float(np.mean(fkr)),
            "ks": float(np.mean(ks)), "feature_corr": float(np.mean(list(corr.values())))}


def feature_corr(model, rows, sites: list[int]) -> dict[int, float]:
    """Mean |off-diagonal correlation| of each site's H features over a row's S tokens, averaged over rows.

    rows: [B, S] whole token rows (no padding). The correlation matrix per row is the one
    ``l2e.inhibition: decorrelation`` penalises (C_ij², mean over i≠j); here its absolute value is reported.
    """
    import torch

    out: dict[int, torch.Tensor] = {}
    hooks = [model.gpt_neox.layers[i].register_forward_hook(
        lambda m, a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o)) for i in sites]
    try:
        with torch.no_grad():
            model.base_model(input_ids=rows)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for i in sites:
        z = out[i].double()                                             # [B, S, H]
        zc = z - z.mean(1, keepdim=True)
        zn = zc / zc.square().mean(1, keepdim=True).add(1e-12).sqrt()
        c = torch.bmm(zn.transpose(1, 2), zn) / z.shape[1]               # [B, H, H]
        h = c.shape[-1]
        off = c.abs().sum((1, 2)) - c.diagonal(dim1=1, dim2=2).abs().sum(1)
        result[i] = float(off.mean() / (h * (h - 1)))
    return result


def run_summary(run: Path, iters: int) -> dict:
    rows = metrics(run)
    taus = {k: v for r in rows if r.get("step") == iters for k, v in r.items() if k.endswith("/tau")}
    steps = [r["step_seconds"] for r in rows if "step_seconds" in r]
    curve = val_curve(run)
    return {"val_loss": curve[max(curve)], "val_curve": curve,
            "tau": float(np.mean(list(taus.values()))) if taus else None,
            "tau_curve": {r["step"]: float(np.mean([v for k, v in r.items() if k.endswith("/tau")]))
                          for r in rows if any(k.endswith("/tau") for k in r)},
            "step_seconds": float(np.median(steps)) if steps else None}


# ----------------------------------------------------------------------------------------------
# Statistics and output
# ----------------------------------------------------------------------------------------------

def t_interval(xs: list[float]) -> tuple[float, float | None]:
    """(mean, 95 % Student-t half-width) over seeds, missing values dropped; half-width None for one seed."""
    from megatron_l2e.tables import t_interval as interval

    a = [float(x) for x in xs if x is not None]
    if not a:
        return math.nan, None
    iv = interval(a)
    return iv.mean, iv.half_width


def fmt(mean: float, half: float | None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


COLUMNS = [("val_loss", "held-out loss", 4), ("tau", "final τ", 3),
           ("frac_above", f"φ_ℓ* ≥ {MS_THRESHOLD:g} (share)", 4),
           ("fkr", f"FKR @ {FKR_RATIO:.0%}", 4), ("ks", "K-S", 4), ("feature_corr", "mean |corr|", 4),
           ("step_ratio", "step time ÷ baseline", 3)]


def table(results: dict[str, list[dict]]) -> str:
    head = "| variant | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, runs in results.items():
        cells = [fmt(*t_interval([r.get(key) for r in runs]), digits) for key, _, digits in COLUMNS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, list[dict]]) -> str:
    """Held-out loss minus the same seed's baseline: mean ± t-interval, per-seed values, paired t-test p."""
    from megatron_l2e.tables import paired_p

    base = {r["seed"]: r["val_loss"] for r in results["baseline"]}
    lines = ["| variant | Δ held-out loss vs same-seed baseline | per seed | paired t-test p |", "|---|---|---|---|"]
    for name, runs in results.items():
        if name == "baseline":
            continue
        runs = [r for r in runs if r["seed"] in base]
        d = [r["val_loss"] - base[r["seed"]] for r in runs]
        p = paired_p([r["val_loss"] for r in runs], [base[r["seed"]] for r in runs])
        mean, half = t_interval(d)
        per_seed = ", ".join(f"{x:+.4f}" for x in d)
        cell = ("0 (identical)" if all(x == 0 for x in d)
                else f"{mean:+.4f}" + ("" if half is None else f" ± {half:.4f}"))
        lines.append(f"| {name} | {cell} | {per_seed} | {'n/a' if p is None else f'{p:.4f}'} |")
    return "\n".join(lines)


def figures(results: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, name, ylabel, title in (
            ("val_curve", "val_loss.png", "held-out loss (nat)", "Held-out loss, mean ± 95 % CI over seeds"),
            ("tau_curve", "tau.png", "τ (mean over the sites)", "Threshold trajectories (Fig. 12 at study scale)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, runs in results.items():
            if not runs[0][key]:            # no τ without L2E
                continue
            steps = sorted(set.intersection(*[set(r[key]) for r in runs]))
            stats_ = [t_interval([r[key][s] for r in runs]) for s in steps]
            m = np.array([s[0] for s in stats_])
            h = np.array([s[1] or 0.0 for s in stats_])
            ax.plot(steps, m, label=v)
            ax.fill_between(steps, m - h, m + h, alpha=0.2)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        names.append(name)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, runs in results.items():
        layers = sorted(runs[0]["ms_profile"], key=int)
        stats_ = [t_interval([r["ms_profile"][layer] for r in runs]) for layer in layers]
        ax.errorbar([int(x) for x in layers], [s[0] for s in stats_], yerr=[s[1] or 0.0 for s in stats_],
                    label=v, marker="o", capsize=3)
    ax.set(xlabel="block", ylabel="mean φ_ℓ* (block outputs)", title="MS per layer (eq. 1–3), mean ± 95 % CI")
    ax.set_xticks(sorted(int(x) for x in layers))
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "ms_per_layer.png", dpi=120)
    names.append("ms_per_layer.png")
    plt.close(fig)
    return names


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/study.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs/study"), help="output folder (default runs/study)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated study seeds (default 1,2,3)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time, 1 thread each (default 2)")
    p.add_argument("--quick", action="store_true", help="baseline and l2e × 2 seeds × 12 steps of a tiny model")
    p.add_argument("--feature-corr", nargs="+", metavar="RUN", default=None,
                   help="instead of the study: print the mean |off-diagonal feature correlation| at the L2E sites "
                        "of each run folder (its latest checkpoint, 32 rows of its held-out data)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected integers like 1,2,3, got {args.seeds!r}")
    if not args.seeds or SCAN_SEED in args.seeds:
        p.error(f"--seeds: give at least one seed, not {SCAN_SEED} (the λ scans use it)")
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    return args


def feature_corr_of_runs(runs: list[str]) -> int:
    """--feature-corr: one line per run folder, its sites' mean |corr| on its own held-out rows."""
    import torch

    from megatron_l2e.analysis.activations import load_model
    from megatron_l2e.config import ConfigError, load_config
    from megatron_l2e.data.index import DataError
    from megatron_l2e.data.rows import TokenRows
    from megatron_l2e.checkpoint import WEIGHTS_TAG_RE, CheckpointError, step_of
    from megatron_l2e.export import export_checkpoint, is_hf_folder
    from megatron_l2e.l2e.config import resolve_layers

    found = []
    for run in map(Path, runs):       # every check first, then the work
        saves = {}                    # step → folder: the full save `latest` names, then weights-only ones
        latest = run / "checkpoints" / "latest"      # (a newer global_step without `latest` may be half-written)
        if latest.is_file() and step_of(latest.read_text().strip()) is not None:
            saves[step_of(latest.read_text().strip())] = run / "checkpoints" / latest.read_text().strip()
        for d in sorted((run / "checkpoints").glob("hf_step*")):
            if WEIGHTS_TAG_RE.match(d.name) and is_hf_folder(d):
                saves[int(WEIGHTS_TAG_RE.match(d.name).group(1))] = d
        if not saves or not (run / "config.yaml").is_file():
            raise StudyError(f"--feature-corr {run}: not a finished run folder "
                             "(needs config.yaml and checkpoints/global_step<N> or hf_step<N>)")
        try:
            cfg = load_config(run / "config.yaml")
        except ConfigError as exc:
            raise StudyError(f"--feature-corr {run}: {exc}") from None
        ckpt = saves[max(saves)]
        if not cfg.data.valid_path:
            raise StudyError(f"--feature-corr {run}: its config has no data.valid_path (held-out rows)")
        try:
            held = TokenRows(cfg.data.valid_path, cfg.model.seq_length)
        except DataError as exc:
            raise StudyError(f"--feature-corr {run}: {exc}") from None
        found.append((run, ckpt, cfg, held))
    for run, folder, cfg, held in found:
        sites = resolve_layers(cfg.l2e.layers, cfg.model.num_layers)
        rows = held.rows(0, min(32, held.num_rows))[:, :-1]
        with tempfile.TemporaryDirectory() as tmp:   # the latest checkpoint, as fp32 HF weights
            try:
                weights = folder if is_hf_folder(folder) else export_checkpoint(folder, tmp)
            except CheckpointError as exc:
                raise StudyError(f"--feature-corr {run}: {exc}") from None
            model, _ = load_model(weights, torch.device("cpu"), torch.float32, need_tokenizer=False, progress=False)
        corr = feature_corr(model, rows, sites)
        per_site = ", ".join(f"block {i} {v:.4f}" for i, v in corr.items())
        print(f"{run}: {folder.name}, mean |corr| {np.mean(list(corr.values())):.4f} ({per_site}; "
              f"{rows.shape[0]} held-out rows × {rows.shape[1]} tokens)", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.feature_corr:
        return feature_corr_of_runs(args.feature_corr)
    t_start = time.time()
    out = Path(args.out).resolve()
    extra = QUICK if args.quick else []
    seeds = args.seeds[:2] if args.quick else args.seeds
    from megatron_l2e.config import load_config
    from megatron_l2e.data import build_smoke_data
    from megatron_l2e.analysis.features import build_stdlib_dataset, write_jsonl

    cfg = load_config(BASE, run_sets(out, "probe", 1, [], extra))
    iters = cfg.train.iters
    print(f"[study] corpus and tokenizer → {out / 'data'} (cached)", flush=True)
    data = build_smoke_data(out / "data", vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length,
                            max_files=cfg.data.smoke_max_files)
    feats_file = out / "features.jsonl"
    if not feats_file.is_file():
        write_jsonl(build_stdlib_dataset(per_class=20 if not args.quick else 4, chars=600, seed=0), feats_file)

    # 1. λ scans (seed 0), unless quick
    scan = {}
    if args.quick:
        lam, lam_dec = 1e-5, 0.1
    else:
        jobs = [(out / "scan" / f"l2e-{v:g}" / f"seed{SCAN_SEED}",
                 run_sets(out, f"../scan/l2e-{v:g}", SCAN_SEED, ["l2e.inhibition=regularizer", f"l2e.lam={v}"], extra))
                for v in L2E_SCAN]
        jobs += [(out / "scan" / f"decorrelation-{v:g}" / f"seed{SCAN_SEED}",
                  run_sets(out, f"../scan/decorrelation-{v:g}", SCAN_SEED,
                           ["l2e.inhibition=decorrelation", f"l2e.lam={v}"], extra)) for v in DEC_SCAN]
        jobs = [(r, [s if not s.startswith("output.dir=") else f"output.dir={r}" for s in sets]) for r, sets in jobs]
        run_many(jobs, iters, args.jobs)
        for r, _ in jobs:
            scan[r.parent.name] = run_summary(r, iters)["val_loss"]
        lam = min(L2E_SCAN, key=lambda v: scan[f"l2e-{v:g}"])
        lam_dec = min(DEC_SCAN, key=lambda v: scan[f"decorrelation-{v:g}"])
        print(f"[study] scans: {scan}; picked λ = {lam:g} (L2E), {lam_dec:g} (decorrelation)", flush=True)

    # 2. the variants × seeds
    variants = {"baseline": VARIANTS["baseline"], "l2e": VARIANTS["l2e"]} if args.quick else VARIANTS
    jobs, index = [], []
    for name, sets in variants.items():
        sets = [s.format(lam=lam, lam_dec=lam_dec) for s in sets]
        for seed in seeds:
            run = out / "runs" / name / f"seed{seed}"
            jobs.append((run, run_sets(out, name, seed, sets, extra)))
            index.append((name, seed, run))
    run_many(jobs, iters, args.jobs)

    # 3. measurements
    import torch

    from transformers import AutoTokenizer

    from megatron_l2e.analysis.features import FeatureError, encode_features, read_features
    from megatron_l2e.data.rows import TokenRows
    from megatron_l2e.l2e.config import resolve_layers

    sites = resolve_layers(cfg.l2e.layers, cfg.model.num_layers)
    try:       # every run shares the study's tokenizer: encode once
        tok = AutoTokenizer.from_pretrained(data.tokenizer_dir, local_files_only=True)
        feats = encode_features(read_features(feats_file), cfg.model.seq_length, tok)
    except FeatureError as exc:
        raise StudyError(str(exc)) from None
    held = TokenRows(data.valid_prefix, cfg.model.seq_length)
    valid_rows = held.rows(0, min(32, held.num_rows))[:, :-1]
    results: dict[str, list[dict]] = {}
    for name, seed, run in index:
        cache = run / "study_measures.json"
        if cache.is_file():
            rec = json.loads(cache.read_text())
            for key in ("val_curve", "tau_curve", "ms_profile"):     # JSON object keys are strings: steps/layers
                rec[key] = {int(k): v for k, v in rec[key].items()}
        else:
            rec = {**run_summary(run, iters), **measure(final_folder(run, iters), feats, sites, valid_rows, seed),
                   "seed": seed, "run": str(run)}
            cache.write_text(json.dumps(rec, indent=1))
        results.setdefault(name, []).append(rec)
    base_step = {r["seed"]: r["step_seconds"] for r in results["baseline"]}
    for runs in results.values():
        for r in runs:
            r["step_ratio"] = r["step_seconds"] / base_step[r["seed"]] if base_step.get(r["seed"]) else None

    md = table(results) + "\n\n" + paired_table(results)
    figs = figures(results, out)
    wall = time.time() - t_start
    summary = {"seeds": seeds, "iters": iters, "lambda_l2e": lam, "lambda_decorrelation": lam_dec, "scan": scan,
               "sites": sites, "ms_threshold": MS_THRESHOLD, "fkr_ratio": FKR_RATIO, "ks_neurons": KS_NEURONS,
               "wall_seconds": wall, "quick": args.quick, "figures": figs,
               "variants": {k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in results.items()},
               "table": md, "torch_threads": os.environ.get("STUDY_THREADS", "1"), "jobs": args.jobs,
               "torch": torch.__version__}
    (out / "study.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(f"[study] {out / 'study.json'}, {out / 'table.md'}, {', '.join(figs)}; wall {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
