"""The analysis commands: each turns captured activations into a JSON section and figures.

A :class:`Context` holds one :class:`ModelData` per ``--model`` (activations on the same feature
set) and memoises φ, per-feature statistics and probes per (neuron kind, layer), so ``report``
computes each of them once however many commands use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import plots, stats
from .activations import Capture, neuron_view
from .features import FeatureSet
from .trajectory import read_tau_series

__all__ = ["DEFAULT_RATIOS", "DEFAULT_NEURONS", "ALL_NEURONS", "Preset", "PRESETS", "Settings", "ModelData",
           "Context", "Section", "COMMANDS"]

# 0.1 % … 10 %, denser around the paper's 1–2 %.
DEFAULT_RATIOS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1)
# Which neurons each command looks at unless --neurons says otherwise (issue 8).
DEFAULT_NEURONS = {"probe": "mlp", "validate": "mlp", "ks": "mlp", "layers": "mlp", "fkr": "block"}
# A random-neuron count meaning "every scored neuron, no draw" (`--random-neurons all` or 0).
ALL_NEURONS = 0


@dataclass(frozen=True)
class Preset:
    """Defaults of the settings that differ between the paper's analysis and a quick look."""

    seq_length: int
    top_k: int
    compensation: float
    random_neurons: dict[str, int]      # per command that draws neurons; ALL_NEURONS = no draw


PRESETS = {
    # The paper's Section 3 settings: 512-token sequences (its Table 3), the top 10 probed neurons per
    # feature, 10 random neurons in the Fig. 3b box plot, 1,000 random neurons for the K-S test
    # (Fig. 4) and per layer for Fig. 5, and eq. 1's plain (z − z̄)²/S² (no compensation term).
    "paper": Preset(seq_length=512, top_k=10, compensation=0.0,
                    random_neurons={"validate": 10, "ks": 1000, "layers": 1000}),
    # The toolkit's original small settings, sized for the smoke model (128 positions, 4 blocks):
    # MEmeL's compensation 0.01 (what L2E trains with), and `layers` averages every neuron.
    "quick": Preset(seq_length=128, top_k=5, compensation=0.01,
                    random_neurons={"validate": 100, "ks": 100, "layers": ALL_NEURONS}),
}


def _num(x) -> float | None:
    """A JSON-safe float (NaN/inf → null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nan(x: float | None) -> float:
    """JSON null back to NaN, for plotting."""
    return float("nan") if x is None else x


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass(frozen=True)
class Settings:
    out: Path
    neurons: str | None = None
    preset: str = "paper"
    compensation: float = PRESETS["paper"].compensation
    top_k: int = PRESETS["paper"].top_k
    # One count for every command that draws neurons (`--random-neurons`), or None: each command's
    # own default from the preset (validate's box plot uses far fewer than ks and layers).
    random_neurons: int | None = None
    pooled: bool = False                # ks: also one K-S test on the pooled samples of all drawn neurons
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    seed: int = 0
    runs: tuple[Path, ...] = ()
    baseline_runs: tuple[Path, ...] = ()

    def n_random(self, command: str) -> int:
        """Random neurons ``command`` draws (:data:`ALL_NEURONS`: all of them)."""
        if self.random_neurons is not None:
            return self.random_neurons
        return PRESETS[self.preset].random_neurons[command]


def _count_json(n: int) -> int | str:
    return "all" if n == ALL_NEURONS else n


@dataclass(frozen=True)
class FeatureStats:
    phi_l: torch.Tensor      # [L, N] eq. 2
    phi_not: torch.Tensor    # [L, N] eq. 2, complement
    l_star: torch.Tensor     # [N]    eq. 3
    phi_star: torch.Tensor   # [N]


class ModelData:
    """One model's activations on the feature set, with memoised statistics per (kind, layer)."""

    def __init__(self, capture: Capture, feats: FeatureSet, compensation: float):
        self.capture, self.feats, self.compensation = capture, feats, compensation
        self._cache: dict = {}

    @property
    def name(self) -> str:
        return self.capture.name

    @property
    def layers(self) -> list[int]:
        return self.capture.layers

    def _memo(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def release(self, kind: str, layer: int) -> None:
        """Drop the memoised φ ``[X, N]`` of a layer (block φ of a large model is GBs per layer)."""
        self._cache.pop(("phi", kind, layer), None)

    def view(self, kind: str, layer: int):
        return neuron_view(self.capture, self.feats, layer, kind)

    def phi(self, kind: str, layer: int) -> torch.Tensor:
        """φ ``[X, N]`` with the dataset's moments (NaN: padded / unscored)."""
        return self._memo(("phi", kind, layer),
                          lambda: stats.ms_matrix(*self.view(kind, layer), self.compensation))

    def feature_stats(self, kind: str, layer: int) -> FeatureStats:
        def compute():
            phi_l, phi_not = stats.feature_means(self.phi(kind, layer), self.feats.labels, self.feats.n_classes)
            l_star, phi_star = stats.relative_feature(phi_l)
            return FeatureStats(phi_l, phi_not, l_star, phi_star)
        return self._memo(("fstats", kind, layer), compute)

    def probe(self, kind: str, layer: int) -> stats.ProbeResult:
        def compute():
            values, mask = self.view(kind, layer)
            return stats.probe_f1(values, self.feats.labels, self.feats.n_classes, mask)
        return self._memo(("probe", kind, layer), compute)

    def scored(self, kind: str) -> dict[int, np.ndarray]:
        """Neurons with a score (≥ 2 valid inputs), per layer."""
        return {layer: torch.nonzero(~torch.isnan(self.feature_stats(kind, layer).phi_star))[:, 0].numpy()
                for layer in self.layers}

    def describe(self, kind: str, layer: int, j: int) -> dict:
        d = {"layer": layer, "neuron": int(j)}
        if kind == "block":
            h = self.capture.block[layer].shape[2]
            d.update(position=int(j) // h, channel=int(j) % h)
        return d


@dataclass
class Context:
    models: list[ModelData]
    classes: list[str]
    settings: Settings
    features: str = ""

    def kind(self, command: str) -> str:
        return self.settings.neurons or DEFAULT_NEURONS[command]

    def rng(self, command: str, model_index: int) -> np.random.Generator:
        # Independent, reproducible streams per (seed, command, model).
        return np.random.default_rng([self.settings.seed, sum(map(ord, command)), model_index])

    def png(self, command: str, model: str | None = None) -> Path:
        return self.settings.out / (f"{command}_{_slug(model)}.png" if model else f"{command}.png")


@dataclass
class Section:
    command: str
    data: dict
    figures: list[dict] = field(default_factory=list)
    markdown: str = ""


# --------------------------------------------------------------------------------------------- probe

def _top_probed(m: ModelData, kind: str, k: int) -> dict[int, list[dict]]:
    """Per feature: the k neurons (over all layers) whose single-neuron probe has the best F1."""
    out = {}
    for c in range(m.feats.n_classes):
        rows = []
        for layer in m.layers:
            pr = m.probe(kind, layer)
            f1 = pr.f1[c]
            # stable descending order: ties keep the lower neuron index (deterministic)
            for j in torch.argsort(-f1, stable=True)[:k].tolist():
                rows.append((-float(f1[j]), layer, j, pr))
        rows.sort(key=lambda r: r[:3])
        out[c] = [dict(m.describe(kind, layer, j), f1=-negf1,
                       direction="high" if int(pr.direction[c, j]) > 0 else "low",
                       threshold=_num(pr.threshold[c, j]))
                  for negf1, layer, j, pr in rows[:k]]
    return out


def cmd_probe(ctx: Context) -> Section:
    kind = ctx.kind("probe")
    data = {"neurons": kind, "top_k": ctx.settings.top_k, "models": {}}
    figures, md = [], [f"Single-neuron sparse probing on {kind} neurons: best F1 per feature.\n",
                        "| model | feature | best F1 | layer | neuron |", "|---|---|---|---|---|"]
    for m in ctx.models:
        top = _top_probed(m, kind, ctx.settings.top_k)
        best = {ctx.classes[c]: [float(m.probe(kind, layer).f1[c].max()) for layer in m.layers]
                for c in range(len(ctx.classes))}
        data["models"][m.name] = {
            "layers": m.layers,
            "best_f1": {f: dict(zip(map(str, m.layers), v)) for f, v in best.items()},
            "top": {ctx.classes[c]: rows for c, rows in top.items()},
        }
        figures.append(plots.save_figure(plots.probe_figure(m.name, m.layers, best, kind),
                                         ctx.png("probe", m.name)))
        md += [f"| {m.name} | {ctx.classes[c]} | {rows[0]['f1']:.3f} | {rows[0]['layer']} | {rows[0]['neuron']} |"
               for c, rows in top.items()]
    return Section("probe", data, figures, "\n".join(md))


# ------------------------------------------------------------------------------------------ validate

def cmd_validate(ctx: Context) -> Section:
    kind = ctx.kind("validate")
    s = ctx.settings
    n_random = s.n_random("validate")
    data = {"neurons": kind, "top_k": s.top_k, "random_neurons": _count_json(n_random), "models": {}}
    figures, md = [], ["φ_ℓ (inputs with the probed feature ℓ) vs φ_ℓ⁻ (inputs without it), and φ_ℓ* of "
                       "probed vs random neurons.\n",
                       "| model | probed | share φ_ℓ > φ_ℓ⁻ | mean φ_ℓ | mean φ_ℓ⁻ | mean φ_ℓ* probed | "
                       "mean φ_ℓ* random |", "|---|---|---|---|---|---|---|"]
    for mi, m in enumerate(ctx.models):
        probed = []
        for c, rows in _top_probed(m, kind, s.top_k).items():
            for row in rows:
                fs = m.feature_stats(kind, row["layer"])
                j = row["neuron"]
                probed.append(dict(row, feature=ctx.classes[c], phi_l=_num(fs.phi_l[c, j]),
                                   phi_not_l=_num(fs.phi_not[c, j]), phi_star=_num(fs.phi_star[j]),
                                   l_star=ctx.classes[int(fs.l_star[j])]))
        random = []
        for layer, j in stats.sample_neurons(ctx.rng("validate", mi), m.scored(kind), n_random):
            fs = m.feature_stats(kind, layer)
            random.append(dict(m.describe(kind, layer, j), phi_star=_num(fs.phi_star[j]),
                               l_star=ctx.classes[int(fs.l_star[j])]))
        pairs = [(p["phi_l"], p["phi_not_l"]) for p in probed if None not in (p["phi_l"], p["phi_not_l"])]
        summary = {
            "n_probed": len(probed),
            "share_phi_l_gt_phi_not_l": _num(np.mean([a > b for a, b in pairs])) if pairs else None,
            "mean_phi_l": _mean(a for a, _ in pairs),
            "mean_phi_not_l": _mean(b for _, b in pairs),
            "mean_phi_star_probed": _mean(p["phi_star"] for p in probed),
            "mean_phi_star_random": _mean(r["phi_star"] for r in random),
        }
        data["models"][m.name] = {"summary": summary, "probed": probed, "random": random}
        fig = plots.validate_figure(
            m.name, [_nan(p["phi_not_l"]) for p in probed], [_nan(p["phi_l"]) for p in probed],
            [p["feature"] for p in probed], [_nan(p["phi_star"]) for p in probed],
            [_nan(r["phi_star"]) for r in random])
        figures.append(plots.save_figure(fig, ctx.png("validate", m.name)))
        md.append(f"| {m.name} | {len(probed)} | " + " | ".join(_fmt(summary[key], ".3f") for key in (
            "share_phi_l_gt_phi_not_l", "mean_phi_l", "mean_phi_not_l", "mean_phi_star_probed",
            "mean_phi_star_random")) + " |")
    return Section("validate", data, figures, "\n".join(md))


# ------------------------------------------------------------------------------------------------ ks

def cmd_ks(ctx: Context) -> Section:
    kind = ctx.kind("ks")
    s = ctx.settings
    n_random = s.n_random("ks")
    drawn = "all scored" if n_random == ALL_NEURONS else f"{n_random} random (all where fewer are scored)"
    data = {"neurons": kind, "random_neurons": _count_json(n_random), "pooled": s.pooled, "models": {}}
    header, rule = "| model | parameters | neurons | mean K-S | std |", "|---|---|---|---|---|"
    if s.pooled:
        header, rule = header + " pooled K-S | pooled p |", rule + "---|---|"
    md = [f"K-S statistic between φ of the inputs of each neuron's ℓ* and φ of all inputs, mean over "
          f"{drawn} {kind} neurons"
          + ("; pooled: one test per model on the samples of all those neurons together" if s.pooled else "")
          + ".\n", header, rule]
    for mi, m in enumerate(ctx.models):
        rows, columns = [], []
        for layer, j in stats.sample_neurons(ctx.rng("ks", mi), m.scored(kind), n_random):
            fs = m.feature_stats(kind, layer)
            feature = int(fs.l_star[j])
            column = m.phi(kind, layer)[:, j]
            stat, pvalue, n_feature, n_all = stats.ks_statistic(column, m.feats.labels, feature)
            rows.append(dict(m.describe(kind, layer, j), feature=ctx.classes[feature], statistic=stat,
                             pvalue=pvalue, n_feature=n_feature, n_all=n_all))
            if s.pooled:
                columns.append((column, feature))
        st = [r["statistic"] for r in rows]
        entry = data["models"][m.name] = {
            "n_params": m.capture.n_params,
            "mean": _mean(st), "std": _num(np.std(st)) if st else None,
            "per_layer": {str(layer): _mean(r["statistic"] for r in rows if r["layer"] == layer)
                          for layer in m.layers},
            "neurons": rows,
        }
        line = f"| {m.name} | {m.capture.n_params:,} | {len(rows)} | {_fmt(entry['mean'])} | {_fmt(entry['std'])} |"
        if s.pooled:
            pooled = None
            if columns:
                stat, pvalue, n_feature, n_all = stats.ks_pooled(columns, m.feats.labels)
                pooled = {"statistic": stat, "pvalue": _num(pvalue), "n_feature": n_feature, "n_all": n_all}
            entry["pooled"] = pooled
            line += f" {_fmt((pooled or {}).get('statistic'))} | {_fmt((pooled or {}).get('pvalue'), '.3g')} |"
        md.append(line)
    names = [m.name for m in ctx.models]
    pooled_curve = None
    if s.pooled:
        pooled_curve = [_nan((data["models"][n]["pooled"] or {}).get("statistic")) for n in names]
    fig = plots.ks_figure(names, [m.capture.n_params for m in ctx.models],
                          [_nan(data["models"][n]["mean"]) for n in names],
                          [data["models"][n]["std"] or 0.0 for n in names], pooled_curve)
    return Section("ks", data, [plots.save_figure(fig, ctx.png("ks"))], "\n".join(md))


# -------------------------------------------------------------------------------------------- layers

def cmd_layers(ctx: Context) -> Section:
    kind = ctx.kind("layers")
    n_random = ctx.settings.n_random("layers")
    drawn = "all scored" if n_random == ALL_NEURONS else f"{n_random} random scored (all where fewer)"
    data = {"neurons": kind, "random_neurons": _count_json(n_random), "models": {}}
    md = [f"Mean φ_ℓ* over {drawn} {kind} neurons of each layer.\n",
          "| model | layer | mean φ_ℓ* | std | neurons |", "|---|---|---|---|---|"]
    curves = {}
    for mi, m in enumerate(ctx.models):
        per_layer = {}
        rng = ctx.rng("layers", mi)
        for layer in m.layers:
            star = m.feature_stats(kind, layer).phi_star
            scored = torch.nonzero(~torch.isnan(star))[:, 0].numpy()
            # Fig. 5 draws its neurons in each layer separately (not over all layers, as ks does), so
            # every layer's mean is over the same number of neurons whatever the layers' widths.
            picked = [j for _, j in stats.sample_neurons(rng, {layer: scored}, n_random)]
            star = star[picked]
            per_layer[str(layer)] = {"mean_phi_star": _num(star.mean()), "std": _num(star.std()),
                                     "n_neurons": int(star.numel()), "n_scored": int(len(scored))}
            if n_random != ALL_NEURONS:
                # The drawn neurons, so the mean can be reproduced (not listed for "all": a block
                # layer of a large model has millions).
                per_layer[str(layer)]["drawn"] = picked
        data["models"][m.name] = {"layers": per_layer}
        curves[m.name] = (m.layers, [_nan(per_layer[str(i)]["mean_phi_star"]) for i in m.layers],
                          [per_layer[str(i)]["std"] or 0.0 for i in m.layers])
        md += [f"| {m.name} | {i} | {_fmt(v['mean_phi_star'])} | {_fmt(v['std'])} | {v['n_neurons']} |"
               for i, v in per_layer.items()]
    fig = plots.layers_figure(curves, kind)
    return Section("layers", data, [plots.save_figure(fig, ctx.png("layers"))], "\n".join(md))


# ----------------------------------------------------------------------------------------------- fkr

def _ratio_key(r: float) -> str:
    return format(r, "g")


def cmd_fkr(ctx: Context) -> Section:
    kind = ctx.kind("fkr")
    ratios = list(ctx.settings.ratios)
    data = {"neurons": kind, "ratios": ratios, "models": {}}
    figures = []
    md = [f"False Killing Rate of a global threshold over all (input, {kind} neuron) MS values.\n",
          "| model | layer | argmin ratio | FKR at argmin | FKR at 2 % |", "|---|---|---|---|---|"]
    for m in ctx.models:
        fkr, argmin, selected, curves = {}, {}, {}, {}
        for layer in m.layers:
            fs = m.feature_stats(kind, layer)
            points = stats.fkr_curve(m.phi(kind, layer), m.feats.labels, fs.l_star, ratios)
            m.release(kind, layer)                 # fkr runs last in a report: φ is not needed again
            values = [p.fkr for p in points]
            best = int(np.argmin(values))          # first minimum: the smallest minimising ratio
            fkr[str(layer)] = {_ratio_key(p.ratio): p.fkr for p in points}
            selected[str(layer)] = {_ratio_key(p.ratio): p.selected for p in points}
            argmin[str(layer)] = ratios[best]
            curves[layer] = (ratios, values)
            at2 = fkr[str(layer)].get(_ratio_key(0.02))
            md.append(f"| {m.name} | {layer} | {ratios[best]:g} | {values[best]:.4f} | "
                      f"{'–' if at2 is None else f'{at2:.4f}'} |")
        data["models"][m.name] = {"fkr": fkr, "argmin": argmin, "selected": selected}
        fig = plots.fkr_figure(m.name, curves, {int(k): v for k, v in argmin.items()}, kind)
        figures.append(plots.save_figure(fig, ctx.png("fkr", m.name)))
    # The issue's --json shape, for the first model (all models are under "models").
    first = data["models"][ctx.models[0].name]
    data["fkr"], data["argmin"] = first["fkr"], first["argmin"]
    return Section("fkr", data, figures, "\n".join(md))


# ---------------------------------------------------------------------------------------- trajectory

def cmd_trajectory(ctx: Context) -> Section:
    s = ctx.settings
    runs, data = {}, {"runs": {}}
    for paths, dashed in ((s.runs, False), (s.baseline_runs, True)):
        for p in paths:
            name = Path(p).resolve().name if Path(p).is_dir() else Path(p).resolve().parent.name
            while name in runs:
                name += "'"
            series = read_tau_series(p)
            runs[name] = (dashed, series)
            data["runs"][name] = {"path": str(p), "dashed": dashed,
                                  "tau": {str(layer): {"step": st, "tau": ta} for layer, (st, ta) in series.items()}}
    fig = plots.trajectory_figure(runs)
    md = ["Threshold τ per L2E site over training (dashed: baseline runs).\n",
          "| run | layer | first τ | last τ | steps |", "|---|---|---|---|---|"]
    md += [f"| {run} | {layer} | {ta[0]:.4g} | {ta[-1]:.4g} | {st[0]}–{st[-1]} |"
           for run, (_, series) in runs.items() for layer, (st, ta) in series.items()]
    return Section("trajectory", data, [plots.save_figure(fig, ctx.png("trajectory"))], "\n".join(md))


COMMANDS = {
    "probe": cmd_probe,
    "validate": cmd_validate,
    "ks": cmd_ks,
    "layers": cmd_layers,
    "fkr": cmd_fkr,
    "trajectory": cmd_trajectory,
}
