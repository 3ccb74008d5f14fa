"""Monosemanticity statistics on a frozen model's activations (paper Sections 3 and 4.2, Appendix B).

Every function takes one layer's neuron matrix ``values [X, N]`` (X inputs = sequences, N neurons)
with an optional validity ``mask [X, N]`` (False = padded position: never counted), and integer
``labels [X]`` in ``[0, L)``. The MS itself is :func:`megatron_l2e.l2e.functional.ms_score` — the
code L2E trains with — applied with the dataset's own per-neuron mean and unbiased variance:

    φ(x, j)    = (z_j(x) − μ_j)² / (σ²_j + c·mean_j' σ²_j')    (MS of input x at neuron j; eq. 1, §3, if c = 0)
    φ_ℓ(j)     = mean of φ(x, j) over inputs x of feature ℓ                  (eq. 2, §3.1)
    φ_ℓ⁻(j)    = mean of φ(x, j) over inputs x not of feature ℓ              (eq. 2, complement)
    ℓ*(j)      = argmax_ℓ φ_ℓ(j),   φ_ℓ*(j) = max_ℓ φ_ℓ(j)                    (eq. 3, §3.1)
    FKR(r)     = |{(x, j) : φ(x, j) ≥ τ_k, label(x) ≠ ℓ*(j)}| / |{(x, j) : φ(x, j) ≥ τ_k}|   (eq. 4, §4.2)
                 τ_k = the k-th largest φ over all valid (x, j), k = round(r · #valid pairs)

The compensation c = 0 is the paper's eq. 1; c > 0 is MEmeL's variance compensation (what L2E trains
with, 0.01 by default there). Neurons with fewer than two valid inputs have no variance and therefore
no score (NaN columns); at c = 0 neither does a neuron whose valid values are all equal (0/0).
``c·mean(var)`` averages over the scored neurons of the layer, as a training site averages over its
``[S, H]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from megatron_l2e.l2e.functional import ms_score

__all__ = [
    "masked_moments",
    "ms_matrix",
    "feature_means",
    "relative_feature",
    "ProbeResult",
    "probe_f1",
    "ks_samples",
    "ks_statistic",
    "ks_pooled",
    "FKRPoint",
    "fkr_curve",
    "sample_neurons",
]


def masked_moments(values: Tensor, mask: Tensor | None = None):
    """Per-neuron ``(count [N], mean [N], var [N])`` over valid inputs (fp64, unbiased variance).

    ``var`` is NaN where ``count < 2``.
    """
    v = values.double()
    w = torch.ones_like(v) if mask is None else mask.double()
    count = w.sum(0)
    mean = (v * w).sum(0) / count.clamp_min(1)
    var = ((v - mean).square() * w).sum(0) / (count - 1)
    var = torch.where(count >= 2, var, torch.full_like(var, float("nan")))
    return count.long(), mean, var


def ms_matrix(values: Tensor, mask: Tensor | None = None, compensation: float = 0.0) -> Tensor:
    """φ ``[X, N]`` (fp64) with the dataset's own moments; NaN at invalid entries and unscored neurons.

    ``compensation`` 0 (the default) is the paper's eq. 1.
    """
    count, mean, var = masked_moments(values, mask)
    keep = count >= 2
    if compensation == 0:
        # Without the compensation term a constant neuron's MS is 0/0: its computed deviations and
        # variance are fp rounding noise (the mean of equal values need not be exactly that value),
        # and their ratio would be an arbitrary score of order 1. It has no score, like a 1-input neuron.
        v = values.double()
        valid = torch.ones_like(v, dtype=torch.bool) if mask is None else mask
        spread = (torch.where(valid, v, -torch.inf).amax(0) > torch.where(valid, v, torch.inf).amin(0))
        keep &= spread
    phi = torch.full(values.shape, float("nan"), dtype=torch.float64)
    phi[:, keep] = ms_score(values[:, keep].double(), mean[keep], var[keep], compensation)
    if mask is not None:
        phi = phi.masked_fill(~mask, float("nan"))
    return phi


def feature_means(phi: Tensor, labels: np.ndarray, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(φ_ℓ [L, N], φ_ℓ⁻ [L, N])``: mean MS of the inputs of / not of each feature (eq. 2).

    NaN entries of ``phi`` are skipped; a feature with no valid input at a neuron gives NaN.
    """
    valid = ~torch.isnan(phi)
    p0 = torch.where(valid, phi, 0.0)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels), n_classes).double()  # [X, L]
    s = onehot.T @ p0                       # [L, N] sums over inputs of ℓ
    c = onehot.T @ valid.double()           # [L, N] counts
    tot_s, tot_c = p0.sum(0), valid.double().sum(0)
    return s / c, (tot_s - s) / (tot_c - c)     # 0/0 → NaN where a side has no valid input


def relative_feature(phi_l: Tensor) -> tuple[Tensor, Tensor]:
    """``(ℓ* [N] int64, φ_ℓ* [N])``: each neuron's relatively monosemantic feature (eq. 3)."""
    filled = torch.nan_to_num(phi_l, nan=float("-inf"))
    best, l_star = filled.max(0)
    best = torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)
    return l_star, best


@dataclass(frozen=True)
class ProbeResult:
    """Single-neuron probe of every (feature, neuron) pair of one layer."""

    f1: Tensor          # [L, N] F1 of the best threshold (either direction)
    direction: Tensor   # [L, N] int8: +1 "value ≥ threshold ⇒ feature", −1 "value ≤ threshold ⇒ feature"
    threshold: Tensor   # [L, N]


def _best_cut(values: Tensor, mask: Tensor | None, onehot: Tensor, positives: Tensor):
    """Best F1 of "predict ℓ for the i largest values" over every cut i, per (feature, neuron).

    With inputs sorted by value, predicting the top i as positive gives TP = cumsum(y)[i] and
    F1 = 2·TP / (i + P). A cut is only allowed between two different values (ties cannot be split)
    or after the last valid input.
    """
    x, n = values.shape
    v = values.double()
    if mask is not None:
        v = v.masked_fill(~mask, float("-inf"))             # invalid inputs sort to the bottom
    n_valid = torch.full((n,), x) if mask is None else mask.sum(0)
    v_sorted, order = torch.sort(v, dim=0, descending=True, stable=True)
    strict = torch.ones(x, n, dtype=torch.bool)
    strict[:-1] = v_sorted[:-1] > v_sorted[1:]
    i = torch.arange(1, x + 1, dtype=torch.float64)[:, None]          # [X, 1] predicted positives
    cut_ok = strict & (i <= n_valid[None, :])
    f1s, thrs = [], []
    for c in range(onehot.shape[1]):
        y = onehot[:, c][order]                                       # [X, N] 0/1 in sorted order
        if mask is not None:
            y = y * torch.gather(mask, 0, order)
        tp = torch.cumsum(y, 0)
        f1 = torch.where(cut_ok, 2 * tp / (i + positives[c][None, :]), torch.tensor(-1.0, dtype=torch.float64))
        best, idx = f1.max(0)
        f1s.append(best)
        thrs.append(torch.gather(v_sorted, 0, idx[None, :])[0])
    return torch.stack(f1s), torch.stack(thrs)


def probe_f1(values: Tensor, labels: np.ndarray, n_classes: int, mask: Tensor | None = None) -> ProbeResult:
    """Sparse probing with one neuron (Gurnee et al. 2023): F1 of the best threshold, both directions."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels), n_classes).double()   # [X, L]
    w = torch.ones_like(values, dtype=torch.float64) if mask is None else mask.double()
    positives = onehot.T @ w                                          # [L, N] valid inputs of ℓ
    f1_hi, thr_hi = _best_cut(values, mask, onehot, positives)
    f1_lo, thr_lo = _best_cut(-values, mask, onehot, positives)
    hi = f1_hi >= f1_lo
    return ProbeResult(f1=torch.where(hi, f1_hi, f1_lo),
                       direction=torch.where(hi, 1, -1).to(torch.int8),
                       threshold=torch.where(hi, thr_hi, -thr_lo))


def ks_samples(phi_col: Tensor, labels: np.ndarray, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """MS values of one neuron: ``(inputs of ``feature``, all inputs)`` — valid entries only."""
    p = phi_col.numpy()
    valid = ~np.isnan(p)
    return p[valid & (labels == feature)], p[valid]


def ks_statistic(phi_col: Tensor, labels: np.ndarray, feature: int) -> tuple[float, float, int, int]:
    """``scipy.stats.ks_2samp`` between the MS of inputs of ``feature`` (ℓ*) and of all inputs.

    Returns ``(statistic, pvalue, n_feature, n_all)``.
    """
    a, b = ks_samples(phi_col, labels, feature)
    res = sps.ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue), len(a), len(b)


def ks_pooled(columns: list[tuple[Tensor, int]], labels: np.ndarray) -> tuple[float, float, int, int]:
    """One ``scipy.stats.ks_2samp`` over many neurons: ``columns`` holds ``(φ[:, j], ℓ*(j))`` per neuron j.

    The first sample pools {φ(x, j) : label(x) = ℓ*(j)} over the neurons, the second {φ(x, j) : all x};
    one test per model instead of a mean of per-neuron statistics. Returns
    ``(statistic, pvalue, n_feature, n_all)``.
    """
    if not columns:
        raise ValueError("no neuron to pool")
    parts = [ks_samples(col, labels, feature) for col, feature in columns]
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    res = sps.ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue), len(a), len(b)


@dataclass(frozen=True)
class FKRPoint:
    ratio: float
    fkr: float
    k: int              # round(ratio · valid pairs)
    selected: int       # pairs with φ ≥ τ_k (k, or more on ties)
    tau: float


def fkr_curve(phi: Tensor, labels: np.ndarray, l_star: Tensor, ratios) -> list[FKRPoint]:
    """False Killing Rate (eq. 4) at each inhibition ratio, one global τ_k over all (input, neuron).

    One descending sort serves every ratio: the number of false kills among the top n is a
    cumulative sum. Selection is ``φ ≥ τ_k`` (ties at τ_k all selected, as a threshold would).
    """
    valid = ~torch.isnan(phi)
    false = torch.as_tensor(labels)[:, None] != l_star[None, :]      # [X, N] outside ℓ*(j)
    vals, flags = phi[valid], false[valid]
    n = vals.numel()
    if n == 0:
        raise ValueError("no scored (input, neuron) pair")
    v_desc, order = torch.sort(vals, descending=True, stable=True)
    cum_false = torch.cumsum(flags[order].long(), 0)
    neg = -v_desc                                                      # ascending, for searchsorted
    out = []
    for r in ratios:
        k = min(n, max(1, int(round(float(r) * n))))
        tau = v_desc[k - 1]
        n_sel = int(torch.searchsorted(neg, -tau, right=True))       # count of φ ≥ τ
        out.append(FKRPoint(ratio=float(r), fkr=float(cum_false[n_sel - 1]) / n_sel, k=k,
                            selected=n_sel, tau=float(tau)))
    return out


def sample_neurons(rng: np.random.Generator, scored: dict[int, np.ndarray], count: int) -> list[tuple[int, int]]:
    """``count`` (layer, neuron) pairs drawn uniformly without replacement from the scored neurons.

    ``count`` 0 means every scored neuron (no draw, the generator is not used).
    """
    pool = [(layer, int(j)) for layer in sorted(scored) for j in scored[layer]]
    if not pool or count == 0:
        return pool
    pick = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]
