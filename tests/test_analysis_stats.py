"""MS statistics of the analysis toolkit against known answers and independent numpy/scipy code."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from megatron_l2e.analysis import stats
from megatron_l2e.analysis.activations import Capture
from megatron_l2e.analysis.commands import COMMANDS, Context, ModelData, Settings
from megatron_l2e.analysis.features import FeatureSet


def numpy_phi(values: np.ndarray, mask: np.ndarray, c: float) -> np.ndarray:
    """φ = (z − μ)² / (σ² + c·mean σ²) per column over valid rows (independent of the package)."""
    v = np.where(mask, values, np.nan).astype(np.float64)
    mu = np.nanmean(v, 0)
    var = np.nanvar(v, 0, ddof=1)
    return (v - mu) ** 2 / (var + c * var.mean())


def make_context(labels, classes, kind, layer_values, valid=None, tmp_path=None, compensation=0.01,
                 **settings) -> Context:
    """A Context around synthetic activations (no model): ``layer_values[layer]`` is [X, N] or [X, S, H]."""
    x = len(labels)
    s = 1 if valid is None else valid.shape[1]
    feats = FeatureSet(tokens=torch.zeros(x, s, dtype=torch.long),
                       valid=torch.ones(x, s, dtype=torch.bool) if valid is None else valid,
                       labels=np.asarray(labels), classes=classes, source="synthetic")
    cap = Capture(name="synthetic", n_params=0, n_layers=len(layer_values), layers=sorted(layer_values),
                  **{kind: {k: torch.as_tensor(v, dtype=torch.float32) for k, v in layer_values.items()}})
    return Context(models=[ModelData(cap, feats, compensation)], classes=classes,
                   settings=Settings(out=tmp_path, neurons=kind, compensation=compensation, **settings))


# ------------------------------------------------------------------------------------------------ MS

def test_ms_matrix_matches_numpy_with_padding():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 30)) * rng.uniform(0.1, 5, size=30) + rng.normal(size=30) * 10
    mask = rng.random((40, 30)) > 0.3
    mask[:, 5] = False          # a neuron never valid: no score
    mask[0, 6], mask[1:, 6] = True, False   # one valid input: no variance, no score
    values[~mask] = 1e9         # padded garbage must not leak into any statistic
    phi = stats.ms_matrix(torch.tensor(values), torch.tensor(mask), compensation=0.05).numpy()
    scored = mask.sum(0) >= 2
    ref = numpy_phi(values[:, scored], mask[:, scored], 0.05)
    np.testing.assert_allclose(phi[:, scored], ref, rtol=1e-10, equal_nan=True)
    assert np.isnan(phi[:, ~scored]).all()
    assert np.isnan(phi[~mask]).all()


def test_ms_matrix_compensation_zero_is_eq1_without_constant_neurons():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(30, 6)) * np.array([0.1, 1, 10, 1, 1, 1])
    mask = rng.random((30, 6)) > 0.2
    values[~mask] = 1e9
    values[:, 3] = 0.7                  # constant: 0/0 without the compensation term
    values[mask[:, 4], 4] = 0.3         # constant over its valid inputs only (padding differs)
    phi = stats.ms_matrix(torch.tensor(values), torch.tensor(mask), compensation=0.0).numpy()
    scored = np.array([0, 1, 2, 5])
    np.testing.assert_allclose(phi[:, scored], numpy_phi(values[:, scored], mask[:, scored], 0.0),
                               rtol=1e-10, equal_nan=True)
    assert np.isnan(phi[:, [3, 4]]).all()
    # 0 is the default (the paper's eq. 1) …
    np.testing.assert_array_equal(stats.ms_matrix(torch.tensor(values), torch.tensor(mask)).numpy(), phi)
    # … and with MEmeL's compensation a constant neuron scores (≈ 0), as in training
    comp = stats.ms_matrix(torch.tensor(values), torch.tensor(mask), compensation=0.01).numpy()
    assert np.all(comp[mask[:, 3], 3] < 1e-20)


# ---------------------------------------------------------------------------------------------- FKR

def fkr_fixture():
    """Known-answer activations: every input of neuron j's class c_j = j % 3 deviates hugely
    (±100·(1+ε)), every other input slightly (±0.01·(1+i)), all symmetric so each neuron's mean is 0.

    Classes have 6, 4 and 2 inputs (X = 12 valid) and 6 neurons: 24 of the 72 (input, neuron) pairs are
    inputs of their neuron's ℓ* = c_j and outrank all 48 others. Two extra inputs are padding
    (masked, huge values) and must not count.
    """
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2 + [0, 1])
    values = np.zeros((14, 6))
    counter = 0
    for j in range(6):
        c = j % 3
        for group, scale in ((np.flatnonzero(labels[:12] == c), 100.0), (np.flatnonzero(labels[:12] != c), 0.01)):
            for a, b in group.reshape(-1, 2):
                counter += 1
                mag = scale * (1 + 0.001 * counter) if scale > 1 else scale * counter
                values[a, j], values[b, j] = mag, -mag
    values[12:] = 1e6
    mask = np.ones((14, 6), dtype=bool)
    mask[12:] = False
    return labels, values, mask


def test_fkr_known_answer():
    labels, values, mask = fkr_fixture()
    phi = stats.ms_matrix(torch.tensor(values), torch.tensor(mask))
    phi_l, _ = stats.feature_means(phi, labels, 3)
    l_star, _ = stats.relative_feature(phi_l)
    assert l_star.tolist() == [0, 1, 2, 0, 1, 2]
    points = stats.fkr_curve(phi, labels, l_star, [1 / 72, 1 / 3, 2 / 3, 1.0])
    assert [p.k for p in points] == [1, 24, 48, 72]
    # ±pairs score the same φ: the top-1 value is tied with its mirror, and φ ≥ τ_k takes both
    assert [p.selected for p in points] == [2, 24, 48, 72]
    assert points[0].fkr == 0.0 and points[1].fkr == 0.0   # only ℓ* inputs are killed
    assert points[2].fkr == 0.5                             # 24 right + 24 wrong kills
    # ratio 1: every valid activation is selected → share of inputs outside each neuron's ℓ*
    share_outside = np.mean([np.mean(labels[:12] != j % 3) for j in range(6)])
    assert points[3].fkr == pytest.approx(share_outside) == pytest.approx(48 / 72)


def test_fkr_command_json_shape_and_padding(tmp_path):
    """The same known answer through the ``fkr`` command on block neurons [X, S=2, H=3]."""
    labels, values, mask = fkr_fixture()
    valid = torch.tensor(mask.reshape(14, 2, 3)[:, :, 0])      # padding is per (input, position)
    ctx = make_context(labels, ["a", "b", "c"], "block", {0: values.reshape(14, 2, 3)}, valid, tmp_path,
                       ratios=(1 / 3, 2 / 3, 1.0))
    data = COMMANDS["fkr"](ctx).data
    assert data["fkr"] == {"0": {format(1 / 3, "g"): 0.0, format(2 / 3, "g"): 0.5, "1": pytest.approx(2 / 3)}}
    assert data["argmin"] == {"0": 1 / 3}
    assert (tmp_path / "fkr_synthetic.png").stat().st_size > 0


def test_fkr_matches_bruteforce_with_ties():
    rng = np.random.default_rng(1)
    phi = np.round(rng.exponential(size=(50, 20)), 1)          # many ties
    phi[rng.random(phi.shape) < 0.2] = np.nan                  # padding
    labels = rng.integers(0, 4, size=50)
    l_star = rng.integers(0, 4, size=20)
    ratios = [0.001, 0.02, 0.1, 0.37, 1.0]
    got = stats.fkr_curve(torch.tensor(phi), labels, torch.tensor(l_star), ratios)
    valid = ~np.isnan(phi)
    flat = np.sort(phi[valid])[::-1]
    false = labels[:, None] != l_star[None, :]
    for r, p in zip(ratios, got):
        k = max(1, int(round(r * valid.sum())))
        sel = valid & (np.nan_to_num(phi, nan=-np.inf) >= flat[k - 1])
        assert p.selected == sel.sum()
        assert p.fkr == pytest.approx(false[sel].mean())


# -------------------------------------------------------------------------------------------- probe

def test_probe_f1_matches_bruteforce():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 6, size=(30, 8)).astype(float)   # ties
    mask = rng.random((30, 8)) > 0.15
    labels = rng.integers(0, 3, size=30)
    res = stats.probe_f1(torch.tensor(values), labels, 3, torch.tensor(mask))
    for c in range(3):
        for j in range(8):
            v, y = values[mask[:, j], j], labels[mask[:, j]] == c
            best = 0.0
            for t in np.unique(v):
                for pred in (v >= t, v <= t):
                    best = max(best, 2 * (pred & y).sum() / (pred.sum() + y.sum()))
            assert res.f1[c, j].item() == pytest.approx(best)


def planted(rng, x=120):
    """4 classes; layer 1 neuron 7 fires for class 2, layer 0 neuron 3 is silenced by class 1."""
    labels = np.repeat(np.arange(4), x // 4)
    rng.shuffle(labels)
    layers = {i: rng.normal(size=(x, 50)) for i in range(2)}
    layers[1][:, 7] += 4.0 * (labels == 2)
    layers[0][:, 3] -= 4.0 * (labels == 1)
    return labels, layers


def test_planted_neurons_found_by_probe_and_validated(tmp_path):
    labels, layers = planted(np.random.default_rng(3))
    ctx = make_context(labels, ["w", "x", "y", "z"], "mlp", layers, tmp_path=tmp_path, top_k=3,
                       random_neurons=40)
    probe = COMMANDS["probe"](ctx).data["models"]["synthetic"]["top"]
    assert (probe["y"][0]["layer"], probe["y"][0]["neuron"], probe["y"][0]["direction"]) == (1, 7, "high")
    assert (probe["x"][0]["layer"], probe["x"][0]["neuron"], probe["x"][0]["direction"]) == (0, 3, "low")
    assert probe["y"][0]["f1"] > 0.9 and probe["x"][0]["f1"] > 0.9

    val = COMMANDS["validate"](ctx).data["models"]["synthetic"]
    for feature, layer, neuron in (("y", 1, 7), ("x", 0, 3)):
        row = next(p for p in val["probed"] if (p["feature"], p["layer"], p["neuron"]) == (feature, layer, neuron))
        assert row["phi_l"] > 3 * row["phi_not_l"]
        assert row["l_star"] == feature
        # against numpy: mean φ over inputs with / without the feature
        phi = numpy_phi(layers[layer], np.ones_like(layers[layer], bool), 0.01)[:, neuron]
        c = ["w", "x", "y", "z"].index(feature)
        assert row["phi_l"] == pytest.approx(phi[labels == c].mean())
        assert row["phi_not_l"] == pytest.approx(phi[labels != c].mean())
    assert val["summary"]["mean_phi_star_probed"] > val["summary"]["mean_phi_star_random"]


# ----------------------------------------------------------------------------------------------- K-S

def test_ks_command_equals_scipy_on_same_samples(tmp_path):
    labels, layers = planted(np.random.default_rng(4))
    ctx = make_context(labels, ["w", "x", "y", "z"], "mlp", layers, tmp_path=tmp_path, random_neurons=25)
    data = COMMANDS["ks"](ctx).data["models"]["synthetic"]
    assert len(data["neurons"]) == 25
    for row in data["neurons"]:
        phi = numpy_phi(layers[row["layer"]], np.ones((120, 50), bool), 0.01)
        l_star = np.argmax([phi[labels == c].mean(0) for c in range(4)], axis=0)
        j = row["neuron"]
        assert row["feature"] == ["w", "x", "y", "z"][l_star[j]]
        ref = scipy.stats.ks_2samp(phi[labels == l_star[j], j], phi[:, j])
        assert row["statistic"] == pytest.approx(ref.statistic, abs=1e-12)
        assert row["pvalue"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert data["mean"] == pytest.approx(np.mean([r["statistic"] for r in data["neurons"]]))
    assert "pooled" not in data


def test_ks_pooled_equals_scipy_on_pooled_samples():
    rng = np.random.default_rng(6)
    phi = rng.exponential(size=(40, 5))
    phi[rng.random(phi.shape) < 0.1] = np.nan           # padding
    labels = rng.integers(0, 3, size=40)
    features = np.array([0, 2, 1, 2, 0])                # ℓ* of each neuron
    got = stats.ks_pooled([(torch.tensor(phi[:, j]), int(f)) for j, f in enumerate(features)], labels)
    # independent: one mask over the whole matrix (row-major order; K-S does not depend on order)
    valid = ~np.isnan(phi)
    a = phi[valid & (labels[:, None] == features[None, :])]
    b = phi[valid]
    ref = scipy.stats.ks_2samp(a, b)
    assert got[2:] == (len(a), len(b))
    assert got[0] == pytest.approx(ref.statistic, abs=1e-12)
    assert got[1] == pytest.approx(ref.pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        stats.ks_pooled([], labels)


def test_ks_command_pooled_with_paper_defaults(tmp_path):
    labels, layers = planted(np.random.default_rng(4))
    # paper defaults: c = 0 and 1,000 random neurons, i.e. all 2 × 50 here
    ctx = make_context(labels, ["w", "x", "y", "z"], "mlp", layers, tmp_path=tmp_path, compensation=0.0,
                       pooled=True)
    section = COMMANDS["ks"](ctx)
    data = section.data["models"]["synthetic"]
    assert section.data["random_neurons"] == 1000 and len(data["neurons"]) == 100
    a, b = [], []
    for row in data["neurons"]:
        phi = numpy_phi(layers[row["layer"]], np.ones((120, 50), bool), 0.0)
        l_star = np.argmax([phi[labels == c].mean(0) for c in range(4)], axis=0)
        j = row["neuron"]
        a.append(phi[labels == l_star[j], j])
        b.append(phi[:, j])
    ref = scipy.stats.ks_2samp(np.concatenate(a), np.concatenate(b))
    assert data["pooled"]["statistic"] == pytest.approx(ref.statistic, abs=1e-12)
    assert data["pooled"]["pvalue"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (data["pooled"]["n_feature"], data["pooled"]["n_all"]) == (100 * 30, 100 * 120)
    assert "pooled K-S" in section.markdown and (tmp_path / "ks.png").stat().st_size > 0


# -------------------------------------------------------------------------------------------- layers

def test_layers_draws_random_neurons_in_each_layer(tmp_path):
    labels, layers = planted(np.random.default_rng(7))
    classes = ["w", "x", "y", "z"]

    def star_numpy(layer):
        # the Context holds fp32 activations (as captured): round the same way, then fp64 like stats
        phi = numpy_phi(layers[layer].astype(np.float32), np.ones((120, 50), bool), 0.0)
        return np.max([phi[labels == c].mean(0) for c in range(4)], axis=0)

    ctx = make_context(labels, classes, "mlp", layers, tmp_path=tmp_path, compensation=0.0, random_neurons=10)
    data = COMMANDS["layers"](ctx).data
    assert data["random_neurons"] == 10
    per_layer = data["models"]["synthetic"]["layers"]
    for layer, v in per_layer.items():
        drawn = v["drawn"]
        assert len(set(drawn)) == v["n_neurons"] == 10 and v["n_scored"] == 50
        assert all(0 <= j < 50 for j in drawn)
        star = star_numpy(int(layer))[drawn]
        assert v["mean_phi_star"] == pytest.approx(star.mean(), rel=1e-10)
        assert v["std"] == pytest.approx(star.std(ddof=1), rel=1e-10)
    assert per_layer["0"]["drawn"] != per_layer["1"]["drawn"]          # one draw per layer

    ctx = make_context(labels, classes, "mlp", layers, tmp_path=tmp_path, compensation=0.0, random_neurons=0)
    data = COMMANDS["layers"](ctx).data
    assert data["random_neurons"] == "all"
    for layer, v in data["models"]["synthetic"]["layers"].items():
        assert "drawn" not in v and v["n_neurons"] == 50
        assert v["mean_phi_star"] == pytest.approx(star_numpy(int(layer)).mean(), rel=1e-10)
