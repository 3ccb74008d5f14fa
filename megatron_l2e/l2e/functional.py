"""L2E's math as pure functions: the public, stateless API (DESIGN.md §3).

Notation. A *site* is the output ``z`` of one transformer block, ``[B, *neurons]`` (in training
``[B, S, H]``: one neuron is one (position, channel) element). Statistics run over samples, the
leading dimension. ``mean``/``var`` are ``[*neurons]``; ``var`` is always the *unbiased* sample
variance S². Scalars (``count``, ``tau``, ``k``, ``lam``, ``max_count``) may be Python numbers or
0-d tensors; tensors may be fp32 or fp64 (fp16/bf16 activations are upcast to fp32: a squared
fp16 deviation overflows at 256).

Everything here is the *reference*: ``megatron_l2e.l2e.kernels`` must match it, and the analysis
tools reuse it on frozen checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ms_score",
    "combine_moments",
    "merge_moments",
    "moments_from_shifted_sums",
    "kth_largest",
    "selection_k",
    "update_threshold",
    "ms_penalty",
    "ms_penalty_grad",
    "reverse_deactivation",
    "decorrelation",
    "penalty_survival",
    "penalty_survival_sums",
]


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (the accumulation dtype of every op here)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(thr: Tensor | float, z: Tensor) -> Tensor:
    """Broadcast a per-sample threshold ``[B]`` (or a scalar) against ``z`` ``[B, *neurons]``."""
    thr = torch.as_tensor(thr, device=z.device)
    if thr.dim() == 0:
        return thr
    return thr.reshape(thr.shape[0], *([1] * (z.dim() - 1)))


def ms_score(z: Tensor, mean: Tensor, var: Tensor, compensation: float = 0.01) -> Tensor:
    """Monosemanticity score φ = (z − mean)² / (var + c·mean(var)).

    z ``[B, *neurons]``, mean/var ``[*neurons]`` → φ ``[B, *neurons]`` (fp32, or fp64 for fp64 input).
    The compensation term ``c·mean(var)`` (MEmeL's variance compensation) keeps near-constant neurons
    from scoring huge; the floor only guards the degenerate all-zero-variance case.
    """
    dt = _acc_dtype(z, mean, var)
    var = var.to(dt)
    denom = (var + compensation * var.mean()).clamp_min(torch.finfo(dt).tiny)
    # Capped at the largest finite value: a zero-variance site (denominator at the floor) or a
    # deviation whose square overflows would otherwise score +inf, which a threshold of +inf
    # ("select nothing") would still select and which would make a warm-up tau infinite.
    return ((z.to(dt) - mean.to(dt)).square() / denom).clamp_max(torch.finfo(dt).max)


def combine_moments(count_a, mean_a: Tensor, var_a: Tensor, count_b, mean_b: Tensor, var_b: Tensor,
                    max_count=None):
    """Pooled-variance merge of two sets of moments (MEmeL Lemma 3.2; Chan et al.).

    Returns ``(count, mean, var)``. With ``max_count`` the old count ``count_a`` first becomes
    ``min(count_a, max_count)`` — MEmeL's forgetting: old samples keep their moments but lose weight.

        μ ← (m μ + b μ_b)/(m+b)
        υ ← m b (μ − μ_b)² / ((m+b−1)(m+b)) + (b υ'_b + (m−1) υ)/(m+b−1),   υ'_b = (b−1)/b · var_b

    A count of 0 on either side returns the other side; a count of 1 carries variance 0.
    """
    if float(count_b) == 0:  # nothing merged: the old moments stand, uncapped
        return count_a, mean_a, var_a
    if max_count is not None:
        count_a = torch.minimum(torch.as_tensor(count_a), torch.as_tensor(max_count)) \
            if isinstance(count_a, Tensor) or isinstance(max_count, Tensor) else min(count_a, max_count)
    if float(count_a) == 0:
        return count_b, mean_b, var_b
    dt = _acc_dtype(mean_a, var_a, mean_b, var_b)
    m, b = count_a, count_b
    n = m + b
    mean_a, var_a, mean_b, var_b = (t.to(dt) for t in (mean_a, var_a, mean_b, var_b))
    delta = mean_b - mean_a
    mean = mean_a + delta * (b / n)
    # Sum of squared deviations of each side: M2 = (count − 1)·S² (= b·υ'_b for side b).
    m2 = (m - 1) * var_a + (b - 1) * var_b + delta.square() * (m * b / n)
    var = m2 / (n - 1)
    return n, mean, var


def moments_from_shifted_sums(count_b, shift: Tensor, sum_d: Tensor, sum_d2: Tensor):
    """Batch moments from sums shifted by ``shift`` (the running mean, identical on every rank).

    ``sum_d = Σ(z − shift)``, ``sum_d2 = Σ(z − shift)²`` over ``count_b`` samples → ``(count_b, mean_b,
    var_b)``. Shifting by a value close to the mean avoids the catastrophic cancellation of raw
    Σz² in fp32 on GPT-NeoX's large-magnitude channels; sums add across micro-batches and ranks.
    """
    b = float(count_b)
    if b == 0:
        return count_b, shift, torch.zeros_like(sum_d)
    mean_d = sum_d / b
    mean_b = shift.to(sum_d.dtype) + mean_d
    if b < 2:
        return count_b, mean_b, torch.zeros_like(sum_d)
    m2 = (sum_d2 - sum_d * mean_d).clamp_min(0)
    return count_b, mean_b, m2 / (b - 1)


def merge_moments(count, mean: Tensor, var: Tensor, batch: Tensor, max_count=None):
    """Merge a raw batch ``[b, *neurons]`` into ``(count, mean, var)`` — see :func:`combine_moments`."""
    dt = _acc_dtype(mean, var, batch)
    x = batch.to(dt)
    b = x.shape[0]
    mean_b = x.mean(0)
    var_b = x.var(0, unbiased=True) if b > 1 else torch.zeros_like(mean_b)
    return combine_moments(count, mean, var, b, mean_b, var_b, max_count=max_count)


def selection_k(n_neurons: int, ratio: float | None = None, count: int | None = None) -> int:
    """Elements selected per sample: ``round(ratio·N)`` (L2E) or an absolute count (MEmeL's t)."""
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio or count")
    k = int(count) if count is not None else int(round(ratio * n_neurons))
    if not 1 <= k <= n_neurons:
        raise ValueError(f"k={k} must lie in [1, {n_neurons}]")
    return k


def kth_largest(phi: Tensor, k) -> Tensor:
    """Per-sample k-th largest score over all of a sample's neurons: ``[B, *neurons]`` → ``[B]``.

    Used as the per-sample threshold of exact top-k selection (warm-up, No-Thr, MEmeL): ``φ ≥ thr[b]``
    selects exactly k elements per sample (ties aside).
    """
    flat = phi.reshape(phi.shape[0], -1)
    n = flat.shape[1]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest: k={k} must lie in [1, {n}]")
    # kthvalue counts from the smallest: the k-th largest is the (n − k + 1)-th smallest.
    return torch.kthvalue(flat, n - k + 1, dim=1).values


def update_threshold(tau, mean_selected, k, n_neurons):
    """Paper eq. 6: ``tau ← tau + (k̄* − k)/N`` with k̄* the mean selected count per sample."""
    return tau + (mean_selected - k) / n_neurons


def _selected(z: Tensor, mean: Tensor, var: Tensor, thr, compensation: float) -> Tensor:
    phi = ms_score(z.detach(), mean, var, compensation)
    return phi >= _per_sample(thr, phi).to(phi.dtype)


def ms_penalty(z: Tensor, mean: Tensor, var: Tensor, thr, lam, eps: float = 1e-6,
               compensation: float = 0.01):
    """L2E's inhibition term (paper eq. 5), summed over the selected elements of ``z``.

    ``loss = λ · Σ_{φ ≥ thr[b]} log((z − mean)² + ε)`` — differentiable in ``z`` only (``mean`` is a
    constant; the selection carries no gradient), so ``dloss/dz = λ·2(z − mean)/((z − mean)² + ε)``
    on selected elements and 0 elsewhere. ``thr`` is ``[B]`` (or a scalar τ).
    Returns ``(loss, counts)``: a 0-d loss and ``counts[b]`` = selected elements of sample b.
    """
    mask = _selected(z, mean, var, thr, compensation)
    dt = _acc_dtype(z, mean)
    d = z.to(dt) - mean.detach().to(dt)
    logs = torch.log(d.square() + eps)
    loss = lam * torch.where(mask, logs, torch.zeros_like(logs)).sum()
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    return loss, counts


def ms_penalty_grad(z: Tensor, mean: Tensor, var: Tensor, thr, lam, eps: float = 1e-6,
                    compensation: float = 0.01) -> Tensor:
    """Closed-form gradient of :func:`ms_penalty` w.r.t. ``z`` (fp32/fp64, shape of ``z``)."""
    mask = _selected(z, mean, var, thr, compensation)
    d = z.to(_acc_dtype(z, mean)) - mean.to(_acc_dtype(z, mean))
    g = (2.0 * lam) * d / (d.square() + eps)
    return torch.where(mask, g, torch.zeros_like(g))


def reverse_deactivation(z: Tensor, mean: Tensor, var: Tensor, thr, delta: float = 1.0,
                         compensation: float = 0.01):
    """MEmeL's Reverse Deactivation: selected elements become ``−Δ·z + (mean + Δ·z).detach()``.

    The forward value of a selected element is the running mean; its gradient is ``−Δ`` (Δ = 1 the
    method, Δ = 0 and Δ = −1 MEmeL's naive variants). Unselected elements pass unchanged.
    Returns ``(z_out, counts)`` with ``z_out`` in ``z``'s dtype.
    """
    mask = _selected(z, mean, var, thr, compensation)
    dt = _acc_dtype(z, mean)
    zf = z.to(dt)
    # mean + (−Δ)·(z − z.detach()) has the value and gradient of −Δ·z + (mean + Δ·z).detach(), but its
    # forward value is exactly the mean: the literal form rounds (−Δz + (mean + Δz) ≠ mean for |z| ≫ |mean|).
    rd = mean.to(dt).detach() + (-delta) * (zf - zf.detach())
    z_out = torch.where(mask, rd, zf).to(z.dtype)
    counts = mask.reshape(mask.shape[0], -1).sum(1)
    return z_out, counts


def penalty_survival_sums(g_lm: Tensor, g_pen: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(‖round_p(g_lm + g_pen) − round_p(g_lm)‖², ‖g_pen‖²)`` as 0-d fp64 tensors.

    ``round_p`` rounds to the training precision ``p`` (``dtype``, default ``g_lm``'s dtype) by a cast:
    what autograd does when it adds the penalty's gradient to the LM gradient of a ``p`` activation.
    The sum itself is formed exactly first (fp32 for 16-bit ``p``: the sum of two fp16/bf16 values is
    exact there unless it could not change the rounded result anyway; fp64 for fp32 ``p``).
    """
    p = dtype or g_lm.dtype
    acc = torch.float32 if p in (torch.float16, torch.bfloat16) else torch.float64
    a, b = g_lm.detach().to(acc), g_pen.detach().to(acc)
    moved = (a + b).to(p).to(acc) - a.to(p).to(acc)
    return moved.square().sum(dtype=torch.float64), b.square().sum(dtype=torch.float64)


def penalty_survival(g_lm: Tensor, g_pen: Tensor, dtype: torch.dtype | None = None) -> float:
    """How much of the penalty gradient survives rounding into the LM gradient, in precision ``p``:
    ``‖round_p(g_lm + g_pen) − round_p(g_lm)‖ / ‖g_pen‖`` (≈ 1: it all arrives; ≈ 0: it rounds away;
    NaN when ``g_pen`` is zero). In fp32 it is 1 to fp32 rounding unless the penalty is below fp32's
    half-ulp of the LM gradient."""
    num, den = penalty_survival_sums(g_lm, g_pen, dtype)
    return float((num / den).sqrt()) if den > 0 else float("nan")

def decorrelation(z: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample feature decorrelation (after Yan et al., EMNLP 2024): ``[B, S, H]`` → ``[B]``.

    For sample b, C_b is the correlation matrix of its H features over its S tokens (each feature
    centred and scaled by its standard deviation over the tokens; ``eps`` floors the variance of a
    constant feature), and the term is the mean squared off-diagonal correlation,
    ``d_b = mean_{i≠j} C_b[i, j]²`` ∈ [0, 1]. Summed over samples it adds up over micro-batches and
    data-parallel ranks like eq. 5. Yan et al.'s released code differs (docs/l2e.md): it penalises
    the Gram matrix of absolute MLP activations ACROSS the samples of a batch at the last token.
    """
    if z.dim() != 3:
        raise ValueError(f"decorrelation expects [B, S, H], got {list(z.shape)}")
    B, S, H = z.shape
    if H < 2:
        return torch.zeros(B, dtype=_acc_dtype(z), device=z.device)
    x = z.to(_acc_dtype(z))
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc * torch.rsqrt(xc.square().mean(dim=1, keepdim=True) + eps)      # [B, S, H], unit variance
    corr = torch.bmm(xn.transpose(1, 2), xn) / S                             # [B, H, H]
    off = corr.square().sum(dim=(1, 2)) - corr.diagonal(dim1=1, dim2=2).square().sum(dim=1)
    return off / (H * (H - 1))
