"""L2E math (functional.py) and the reference site kernel against independent numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_l2e.l2e import functional as F
from megatron_l2e.l2e import kernels

NEURONS = (3, 5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _np_batch(rng: np.random.Generator, b: int) -> np.ndarray:
    # Large offset + modest spread: the regime where naive Σz² loses digits.
    return rng.normal(50.0, 2.0, size=(b, *NEURONS)) * rng.uniform(0.5, 2.0, size=NEURONS)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _np_phi(z, mean, var, c):
    return (z - mean) ** 2 / (var + c * var.mean())


def _np_lemma(m, mu, v, b, mu_b, v_b_unbiased):
    """MEmeL Lemma 3.2 as written (υ'_b the biased batch variance)."""
    if m == 0:
        return b, mu_b, v_b_unbiased
    v_b_biased = v_b_unbiased * (b - 1) / b
    mu_new = (m * mu + b * mu_b) / (m + b)
    v_new = m * b * (mu - mu_b) ** 2 / ((m + b - 1) * (m + b)) + (b * v_b_biased + (m - 1) * v) / (m + b - 1)
    return m + b, mu_new, v_new


splits = st.lists(st.integers(1, 6), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(sizes=splits, seed=st.integers(0, 2**16))
def test_merge_moments_any_split_equals_numpy_of_concatenation(sizes, seed):
    rng = np.random.default_rng(seed)
    batches = [_np_batch(rng, b) for b in sizes]
    count, mean, var = 0, torch.zeros(NEURONS, dtype=torch.float64), torch.zeros(NEURONS, dtype=torch.float64)
    for x in batches:
        count, mean, var = F.merge_moments(count, mean, var, _t(x))
    allx = np.concatenate(batches)
    assert count == len(allx)
    np.testing.assert_allclose(mean.numpy(), allx.mean(0), rtol=1e-12)
    if len(allx) > 1:
        np.testing.assert_allclose(var.numpy(), allx.var(0, ddof=1), rtol=1e-9)
    else:
        assert torch.all(var == 0)  # a count of 1 has variance 0


@settings(max_examples=25, deadline=None)
@given(sizes=splits, seed=st.integers(0, 2**16))
def test_combine_over_split_equals_merge_of_concatenation(sizes, seed):
    rng = np.random.default_rng(seed)
    prior = _np_batch(rng, 4)
    batches = [_np_batch(rng, b) for b in sizes]
    c0, m0, v0 = F.merge_moments(0, torch.zeros(NEURONS, dtype=torch.float64),
                                 torch.zeros(NEURONS, dtype=torch.float64), _t(prior))
    # Combine the per-part moments one by one …
    c, m, v = c0, m0, v0
    for x in batches:
        xb = _t(x)
        vb = xb.var(0) if len(x) > 1 else torch.zeros(NEURONS, dtype=torch.float64)
        c, m, v = F.combine_moments(c, m, v, len(x), xb.mean(0), vb)
    # … equals merging the concatenation at once.
    cc, mc, vc = F.merge_moments(c0, m0, v0, _t(np.concatenate(batches)))
    assert c == cc
    torch.testing.assert_close(m, mc, rtol=1e-12, atol=0)
    torch.testing.assert_close(v, vc, rtol=1e-9, atol=0)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=6), max_count=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_max_count_equals_lemma_with_capped_old_count(sizes, max_count, seed):
    rng = np.random.default_rng(seed)
    count, mean, var = 0, torch.zeros(NEURONS, dtype=torch.float64), torch.zeros(NEURONS, dtype=torch.float64)
    n_m, n_mu, n_v = 0, np.zeros(NEURONS), np.zeros(NEURONS)
    for b in sizes:
        x = _np_batch(rng, b)
        count, mean, var = F.merge_moments(count, mean, var, _t(x), max_count=max_count)
        vb = x.var(0, ddof=1) if b > 1 else np.zeros(NEURONS)
        n_m, n_mu, n_v = _np_lemma(min(n_m, max_count), n_mu, n_v, b, x.mean(0), vb)
    assert count == n_m
    np.testing.assert_allclose(mean.numpy(), n_mu, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), n_v, rtol=1e-9)


def test_combine_with_empty_side_returns_other_and_count_one_has_zero_variance():
    mean, var = torch.randn(NEURONS), torch.rand(NEURONS)
    assert F.combine_moments(7, mean, var, 0, torch.zeros(NEURONS), torch.zeros(NEURONS), max_count=3)[0] == 7
    c, m, v = F.combine_moments(0, torch.zeros(NEURONS), torch.zeros(NEURONS), 5, mean, var)
    assert c == 5 and torch.equal(m, mean) and torch.equal(v, var)
    c, m, v = F.merge_moments(0, torch.zeros(NEURONS), torch.zeros(NEURONS), torch.randn(1, *NEURONS))
    assert c == 1 and torch.all(v == 0)


@settings(max_examples=20, deadline=None)
@given(sizes=splits, seed=st.integers(0, 2**16), shift_off=st.floats(-5, 5))
def test_shifted_sums_give_numpy_moments(sizes, seed, shift_off):
    rng = np.random.default_rng(seed)
    x = np.concatenate([_np_batch(rng, b) for b in sizes])
    shift = x.mean(0) + shift_off  # any shift works; a near-mean one is the accurate choice
    d = x - shift
    b, mean_b, var_b = F.moments_from_shifted_sums(len(x), _t(shift), _t(d.sum(0)), _t((d ** 2).sum(0)))
    np.testing.assert_allclose(mean_b.numpy(), x.mean(0), rtol=1e-12)
    if len(x) > 1:
        np.testing.assert_allclose(var_b.numpy(), x.var(0, ddof=1), rtol=1e-7)


def test_ms_score_equals_numpy_and_is_finite_on_zero_variance():
    rng = np.random.default_rng(0)
    z, mean, var = rng.normal(size=(4, *NEURONS)), rng.normal(size=NEURONS), rng.uniform(0, 2, size=NEURONS)
    np.testing.assert_allclose(F.ms_score(_t(z), _t(mean), _t(var), 0.01).numpy(), _np_phi(z, mean, var, 0.01),
                               rtol=1e-12)
    phi = F.ms_score(torch.randn(4, *NEURONS) * 100, torch.zeros(NEURONS), torch.zeros(NEURONS))
    assert torch.isfinite(phi).all()
    # +inf selects nothing even there.
    assert F.ms_penalty(torch.randn(4, *NEURONS) * 100, torch.zeros(NEURONS), torch.zeros(NEURONS),
                        torch.full((4,), float("inf")), 1.0)[1].sum() == 0


@pytest.mark.parametrize("k", [1, 4, 15])
def test_kth_largest_equals_sort(k):
    phi = torch.rand(6, *NEURONS, dtype=torch.float64)
    ref = np.sort(phi.reshape(6, -1).numpy(), axis=1)[:, -k]
    np.testing.assert_array_equal(F.kth_largest(phi, k).numpy(), ref)
    # φ ≥ thr selects exactly k per sample (no ties in continuous data).
    _, counts = F.ms_penalty(phi, torch.zeros(NEURONS, dtype=torch.float64), torch.ones(NEURONS, dtype=torch.float64),
                             F.kth_largest(F.ms_score(phi, torch.zeros(NEURONS, dtype=torch.float64),
                                                      torch.ones(NEURONS, dtype=torch.float64)), k), 1.0)
    assert counts.tolist() == [k] * 6


def test_update_threshold_is_eq6():
    assert F.update_threshold(5.0, 30.0, 20, 1000) == pytest.approx(5.0 + 10 / 1000)
    assert F.update_threshold(5.0, 0.0, 20, 1000) == pytest.approx(5.0 - 0.02)  # at most ratio downward


def _problem(seed=0, dtype=torch.float64):
    """z, mean, var and a per-sample threshold placed mid-gap between φ values (safe for finite differences)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, *NEURONS, generator=g, dtype=dtype)
    mean = torch.randn(NEURONS, generator=g, dtype=dtype) * 0.3
    var = torch.rand(NEURONS, generator=g, dtype=dtype) + 0.5
    phi = np.sort(F.ms_score(z, mean, var).reshape(3, -1).numpy(), axis=1)
    thr = torch.tensor((phi[:, -4] + phi[:, -5]) / 2, dtype=dtype)  # selects the top 4
    return z, mean, var, thr


def test_ms_penalty_value_and_gradient_equal_analytic_numpy():
    z, mean, var, thr = _problem()
    lam, eps = 0.3, 1e-6
    zn, mn, vn = z.numpy(), mean.numpy(), var.numpy()
    sel = _np_phi(zn, mn, vn, 0.01) >= thr.numpy()[:, None, None]
    d = zn - mn
    z.requires_grad_(True)
    loss, counts = F.ms_penalty(z, mean, var, thr, lam, eps=eps)
    loss.backward()
    np.testing.assert_allclose(loss.item(), lam * np.log(d[sel] ** 2 + eps).sum(), rtol=1e-12)
    assert counts.tolist() == sel.reshape(3, -1).sum(1).tolist() == [4, 4, 4]
    analytic = np.where(sel, lam * 2 * d / (d ** 2 + eps), 0.0)
    np.testing.assert_allclose(z.grad.numpy(), analytic, rtol=1e-12, atol=0)
    np.testing.assert_allclose(F.ms_penalty_grad(z.detach(), mean, var, thr, lam, eps).numpy(), analytic,
                               rtol=1e-12)


def test_ms_penalty_gradcheck_fp64():
    z, mean, var, thr = _problem(1)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: F.ms_penalty(x, mean, var, thr, -0.7, eps=1e-3)[0], (z,))
    assert torch.autograd.gradcheck(
        lambda x: kernels.site_forward(x, mean, var, thr, mean, mode="penalty", compensation=0.01, lam=-0.7,
                                       eps=1e-3).loss, (z,))


@pytest.mark.parametrize("delta", [1.0, 0.0, -1.0, 2.5])
def test_reverse_deactivation_forward_mean_gradient_minus_delta(delta):
    z, mean, var, thr = _problem(2, torch.float32)
    z = (z * 1e4).requires_grad_(True)     # |z| ≫ |mean|: the forward value must still be the exact mean
    thr = F.kth_largest(F.ms_score(z.detach(), mean, var), 4)
    sel = (F.ms_score(z.detach(), mean, var) >= thr[:, None, None]).numpy()
    z_out, counts = F.reverse_deactivation(z, mean, var, thr, delta=delta)
    zo = z_out.detach().numpy()
    np.testing.assert_array_equal(zo[sel], np.broadcast_to(mean.numpy(), zo.shape)[sel])
    np.testing.assert_array_equal(zo[~sel], z.detach().numpy()[~sel])
    g = torch.randn_like(z)
    z_out.backward(g)
    np.testing.assert_array_equal(z.grad.numpy(), np.where(sel, -delta * g.numpy(), g.numpy()))
    assert counts.tolist() == [4, 4, 4]


# ---- the reference site kernel ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_site_forward_matches_functional(dtype):
    z, mean, var, thr = _problem(3, torch.float32)
    z = z.to(dtype)
    shift = mean + 0.1
    zf = z.float().numpy()
    d = zf - shift.numpy()
    for mode in ("stats", "penalty", "reverse_deactivation"):
        x = z.clone().requires_grad_(True)
        out = kernels.site_forward(x, mean, var, thr, shift, mode=mode, compensation=0.01, lam=0.5, delta=1.0)
        np.testing.assert_allclose(out.sum_d.numpy(), d.sum(0), rtol=1e-5)
        np.testing.assert_allclose(out.sum_d2.numpy(), (d ** 2).sum(0), rtol=1e-5)
        assert out.sum_d.dtype == out.sum_d2.dtype == torch.float32 and out.counts.dtype == torch.int64
        ref_loss, ref_counts = F.ms_penalty(z.float(), mean, var, thr, 0.5)
        assert torch.equal(out.counts, ref_counts)
        if mode == "penalty":
            # z itself (reference) or a view of it (fused backends): the same values, no copy
            assert out.z_out.data_ptr() == x.data_ptr() and torch.equal(out.z_out, x)
            assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
            torch.testing.assert_close(out.loss, ref_loss)
            out.loss.backward()
            torch.testing.assert_close(x.grad.float(), F.ms_penalty_grad(z.float(), mean, var, thr, 0.5).to(dtype).float())
        elif mode == "reverse_deactivation":
            ref_out, _ = F.reverse_deactivation(z, mean, var, thr)
            assert out.z_out.dtype == dtype and torch.equal(out.z_out, ref_out)
        else:
            assert out.z_out is x and out.loss is None


def test_site_forward_saves_nothing_of_batch_size_but_z():
    z, mean, var, thr = _problem(4, torch.float32)
    z = z.repeat(8, 1, 1).requires_grad_(True)
    thr = thr.repeat(8)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for mode in ("penalty", "reverse_deactivation"):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernels.site_forward(z, mean, var, thr, mean, mode=mode, compensation=0.01, lam=1.0)
        big = [t for t in saved if t.numel() >= z.numel()]
        assert len(big) == 1 and big[0] is z, mode


def test_kth_score_and_inf_threshold():
    z, mean, var, _ = _problem(5, torch.float32)
    thr = kernels.kth_score(z, mean, var, 3, compensation=0.01)
    np.testing.assert_array_equal(thr.numpy(), np.sort(F.ms_score(z, mean, var).reshape(3, -1).numpy(), 1)[:, -3])
    out = kernels.site_forward(z, mean, var, torch.full((3,), float("inf")), mean, mode="penalty",
                               compensation=0.01, lam=1.0)
    assert out.counts.sum() == 0 and out.loss.item() == 0.0
    with pytest.raises(ValueError, match="backend"):
        kernels.kth_score(z, mean, var, 3, compensation=0.01, backend="cuda-magic")


def _np_round_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 → bf16 → fp32 by bits: round to nearest, ties to even (finite inputs)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


_NP_ROUND = {torch.float16: lambda x: np.asarray(x, np.float64).astype(np.float16).astype(np.float64),
             torch.bfloat16: lambda x: _np_round_bf16(np.asarray(x, np.float32)).astype(np.float64),
             torch.float32: lambda x: np.asarray(x, np.float64).astype(np.float32).astype(np.float64)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [3e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9])
def test_penalty_survival_against_numpy(dtype, scale):
    """‖round_p(g_lm + g_pen) − round_p(g_lm)‖ / ‖g_pen‖ with both gradients given in p (as the site's
    hooks see them), against numpy rounding of the exact (fp64) sum."""
    rng = np.random.default_rng(0)
    shape = (4, 16, 32)
    # magnitudes ~1, as after fp16's loss scale (which keeps a 1e-9 penalty out of fp16's subnormals)
    g_lm = torch.from_numpy(rng.normal(0, 1.0, shape) * rng.lognormal(0, 1, shape)).to(dtype)
    pen = np.where(rng.random(shape) < 0.05, rng.normal(0, 1.0, shape) * scale, 0.0)   # ~5 % selected
    g_pen = torch.from_numpy(pen).to(dtype)
    a, b = g_lm.double().numpy(), g_pen.double().numpy()
    rnd = _NP_ROUND[dtype]
    if not b.any():                                  # rounded to zero in p itself (fp16 below 6e-8)
        assert np.isnan(F.penalty_survival(g_lm, g_pen))
        return
    expect = np.linalg.norm(rnd(a + b) - rnd(a)) / np.linalg.norm(b)
    got = F.penalty_survival(g_lm, g_pen)
    assert got == pytest.approx(expect, rel=1e-6, abs=1e-12)     # fp32 squares of exact differences
    num, den = F.penalty_survival_sums(g_lm, g_pen)
    assert float(den) == pytest.approx(float((b ** 2).sum()), rel=1e-12)
    # The regimes: far above p's half-ulp (2^-9 bf16, 2^-12 fp16, 2^-25 fp32, relative) it all survives,
    # far below it none does.
    half_ulp = {torch.float16: 2.0 ** -12, torch.bfloat16: 2.0 ** -9, torch.float32: 2.0 ** -25}[dtype]
    if scale > 100 * half_ulp:
        assert 0.9 < got < 1.1
    elif scale < half_ulp / 100:
        assert got < 0.05
    # p = fp32 gradients rounded to bf16 by the caller's choice of precision
    if dtype == torch.float32:
        got16 = F.penalty_survival(g_lm, g_pen, dtype=torch.bfloat16)
        expect16 = np.linalg.norm(_NP_ROUND[torch.bfloat16](a + b) - _NP_ROUND[torch.bfloat16](a)) / np.linalg.norm(b)
        assert got16 == pytest.approx(expect16, rel=1e-6, abs=1e-9)


def test_penalty_survival_of_a_zero_penalty_is_nan():
    assert np.isnan(F.penalty_survival(torch.ones(3), torch.zeros(3)))
