"""Matplotlib figures for the analysis commands (no pyplot state: each figure owns an Agg canvas).

Every function takes plain numbers and returns a :class:`matplotlib.figure.Figure`;
:func:`save_figure` writes the PNG and returns the figure's record for the JSON (path, title and
every axis' labels read back from the figure itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["save_figure", "probe_figure", "validate_figure", "ks_figure", "layers_figure",
           "fkr_figure", "trajectory_figure"]


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Figure, path: Path) -> dict:
    """Write ``path`` (PNG) and return ``{"path", "title", "axes": [{"title", "xlabel", "ylabel"}]}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return {
        "path": path.name,
        "title": fig.get_suptitle(),
        "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel()}
                 for ax in fig.axes],
    }


def probe_figure(model: str, layers: list[int], best_f1: dict[str, list[float]], neurons: str) -> Figure:
    """Best single-neuron F1 per layer, one line per feature."""
    fig, (ax,) = _figure()
    for feature, f1 in best_f1.items():
        ax.plot(layers, f1, marker="o", label=feature)
    ax.set_xlabel("layer")
    ax.set_ylabel("best single-neuron F1")
    ax.set_xticks(layers)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small", ncols=2)
    fig.suptitle(f"Sparse probing ({neurons} neurons): {model}")
    return fig


def validate_figure(model: str, phi_not: list[float], phi_l: list[float], features: list[str],
                    star_probed: list[float], star_random: list[float]) -> Figure:
    """Left: φ_ℓ vs φ_ℓ⁻ of the probed neurons (paper Fig. 3). Right: φ_ℓ* probed vs random."""
    fig, (ax, bx) = _figure(ncols=2, width=5.0)
    for feature in sorted(set(features)):
        sel = [i for i, f in enumerate(features) if f == feature]
        ax.scatter([phi_not[i] for i in sel], [phi_l[i] for i in sel], s=18, label=feature)
    finite = [v for v in phi_not + phi_l if np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="φ_ℓ = φ_ℓ⁻")
    ax.set_xlabel("φ_ℓ⁻ (inputs without feature ℓ)")
    ax.set_ylabel("φ_ℓ (inputs with feature ℓ)")
    ax.set_title("probed neurons")
    ax.legend(fontsize="x-small", ncols=2)
    data = [np.asarray([v for v in star_probed if np.isfinite(v)]),
            np.asarray([v for v in star_random if np.isfinite(v)])]
    bx.boxplot(data, tick_labels=["probed", "random"])
    bx.set_xlabel("neurons")
    bx.set_ylabel("φ_ℓ* (relatively monosemantic feature)")
    bx.set_title("φ_ℓ*: probed vs random neurons")
    fig.suptitle(f"MS validation: {model}")
    return fig


def ks_figure(models: list[str], n_params: list[int], mean: list[float], std: list[float],
              pooled: list[float] | None = None) -> Figure:
    """Mean K-S statistic over random neurons per model (paper Fig. 4); ``pooled``: one test per model."""
    fig, (ax,) = _figure()
    x = np.arange(len(models))
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, label="mean ± std over neurons")
    if pooled is not None:
        ax.plot(x, pooled, marker="s", linestyle="--", label="pooled neurons, one test")
        ax.legend(fontsize="small")
    ax.set_xticks(x, [f"{m}\n{p / 1e6:.2f}M" for m, p in zip(models, n_params)], fontsize="small")
    ax.set_xlabel("model (parameters)")
    ax.set_ylabel("K-S statistic: φ of ℓ* inputs vs all inputs")
    fig.suptitle("K-S test across models")
    return fig


def layers_figure(per_model: dict[str, tuple[list[int], list[float], list[float]]], neurons: str) -> Figure:
    """Mean φ_ℓ* per layer, one line per model (paper Fig. 5/9)."""
    fig, (ax,) = _figure()
    for model, (layers, mean, std) in per_model.items():
        m, s = np.asarray(mean), np.asarray(std)
        ax.plot(layers, m, marker="o", label=model)
        ax.fill_between(layers, m - s, m + s, alpha=0.15)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean φ_ℓ* over neurons")
    ax.legend(fontsize="small")
    fig.suptitle(f"MS per layer ({neurons} neurons)")
    return fig


def fkr_figure(model: str, curves: dict[int, tuple[list[float], list[float]]], argmin: dict[int, float],
               neurons: str) -> Figure:
    """FKR against the inhibition percentage, one line per layer, minima marked (paper Fig. 6/11)."""
    fig, (ax,) = _figure()
    for layer, (ratios, fkr) in curves.items():
        pct = 100 * np.asarray(ratios)
        (line,) = ax.plot(pct, fkr, marker=".", label=f"layer {layer}")
        best = ratios.index(argmin[layer])
        ax.plot(pct[best], fkr[best], marker="*", markersize=14, color=line.get_color(),
                markeredgecolor="black", linestyle="none")
    if any(len(r) > 1 for r, _ in curves.values()):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel("inhibition percentage (%)")
    ax.set_ylabel("False Killing Rate")
    ax.legend(fontsize="small", title="★ = minimum")
    fig.suptitle(f"False Killing Rate ({neurons} neurons): {model}")
    return fig


def trajectory_figure(runs: dict[str, tuple[bool, dict[int, tuple[list[int], list[float]]]]]) -> Figure:
    """τ per site over training; ``runs[name] = (dashed, {layer: (steps, taus)})`` (paper Fig. 12)."""
    fig, (ax,) = _figure(width=7.0)
    layers = sorted({layer for _, series in runs.values() for layer in series})
    colors = {layer: f"C{i % 10}" for i, layer in enumerate(layers)}
    for run, (dashed, series) in runs.items():
        for layer, (steps, taus) in sorted(series.items()):
            ax.plot(steps, taus, color=colors[layer], linestyle="--" if dashed else "-",
                    label=f"{run} · layer {layer}")
    ax.set_xlabel("training step")
    ax.set_ylabel("threshold τ")
    ax.legend(fontsize="x-small")
    fig.suptitle("MS threshold trajectories (dashed: baseline runs)")
    return fig
