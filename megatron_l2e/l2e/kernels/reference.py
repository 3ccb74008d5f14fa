"""Reference backend of the site kernel: the functional math (``l2e/functional.py``) in plain PyTorch.

One call per site and micro-batch computes what the site needs from ``z`` ``[B, *neurons]``:
the selection ``φ ≥ thr[b]`` and its per-sample counts, the shifted batch sums for the statistics
update, and — by mode — the eq. 5 penalty (an autograd function whose backward recomputes the mask
from ``z``, so nothing of size B·S·H but ``z`` itself is saved) or MEmeL's Reverse Deactivation.
Faster backends (Triton, fused CPU) must match this bit for bit up to accumulation order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import functional as F

MODES = ("stats", "penalty", "reverse_deactivation")


class SiteOutput(NamedTuple):
    z_out: Tensor          # stats: z; penalty: z, or (fused backends) a view of z carrying z's other
                           # gradient into the penalty's backward; reverse_deactivation: a new tensor
    loss: Tensor | None    # 0-d fp32 λ·Σ_sel log((z − mean)² + eps) for mode "penalty", else None
    counts: Tensor         # [B] int64 selected elements per sample (φ ≥ thr[b])
    sum_d: Tensor          # [*neurons] fp32 Σ_b (z − shift)
    sum_d2: Tensor         # [*neurons] fp32 Σ_b (z − shift)²


def _acc(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _mask(z: Tensor, mean: Tensor, var: Tensor, thr: Tensor, compensation: float) -> Tensor:
    """Selection ``φ ≥ thr[b]`` as a bool ``[B, *neurons]`` (φ is finite, so thr = +inf selects nothing)."""
    phi = F.ms_score(z.detach(), mean, var, compensation)
    return phi >= thr.to(phi.dtype).reshape(-1, *([1] * (z.dim() - 1)))


def _counts(mask: Tensor) -> Tensor:
    return mask.reshape(mask.shape[0], -1).sum(1)


class _Penalty(torch.autograd.Function):
    """loss = λ·Σ_sel log((z − mean)² + eps); backward g·λ·2d/(d² + eps) on the selected elements."""

    @staticmethod
    def forward(ctx, z, mean, var, thr, lam, eps, compensation):  # runs without autograd
        mask = _mask(z, mean, var, thr, compensation)
        d = z.to(_acc(z)) - mean.to(_acc(z))
        logs = torch.log(d.square() + eps)
        loss = lam * torch.where(mask, logs, torch.zeros_like(logs)).sum()
        counts = _counts(mask)
        # Only z and [*neurons]/[B] tensors are kept: the mask is recomputed in backward.
        ctx.save_for_backward(z, mean, var, thr)
        ctx.consts = (lam, eps, compensation)
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    def backward(ctx, g, _g_counts):
        z, mean, var, thr = ctx.saved_tensors
        lam, eps, compensation = ctx.consts
        grad = None
        if ctx.needs_input_grad[0]:
            grad = (F.ms_penalty_grad(z, mean, var, thr, lam, eps, compensation) * g).to(z.dtype)
        return grad, None, None, None, None, None, None


class _ReverseDeactivation(torch.autograd.Function):
    """Selected elements take the running mean forward and pass −Δ·g backward; others are identity."""

    @staticmethod
    def forward(ctx, z, mean, var, thr, delta, compensation):
        mask = _mask(z, mean, var, thr, compensation)
        z_out = torch.where(mask, mean.to(_acc(z)), z.to(_acc(z))).to(z.dtype)
        ctx.save_for_backward(z, mean, var, thr)
        ctx.consts = (delta, compensation)
        counts = _counts(mask)
        ctx.mark_non_differentiable(counts)
        return z_out, counts

    @staticmethod
    def backward(ctx, g, _g_counts):
        z, mean, var, thr = ctx.saved_tensors
        delta, compensation = ctx.consts
        mask = _mask(z, mean, var, thr, compensation)
        gf = g.to(_acc(z))
        return torch.where(mask, -delta * gf, gf).to(g.dtype), None, None, None, None, None


@torch.no_grad()
def _shifted_sums(z: Tensor, shift: Tensor, sums: tuple[Tensor, Tensor] | None,
                  accumulate: bool) -> tuple[Tensor, Tensor]:
    d = z.detach().to(_acc(z)) - shift.to(_acc(z))      # [B, *neurons]
    new = d.sum(0), d.square().sum(0)
    if sums is None:
        return new
    for buf, s in zip(sums, new):
        buf.add_(s) if accumulate else buf.copy_(s)     # old + new: the site's acc + sums
    return sums


def site_forward(z: Tensor, mean: Tensor, var: Tensor, thr: Tensor, shift: Tensor, *, mode: str,
                 compensation: float, lam: float = 0.0, eps: float = 1e-6,
                 delta: float = 1.0, sums: tuple[Tensor, Tensor] | None = None,
                 accumulate: bool = False) -> SiteOutput:
    """See :func:`megatron_l2e.l2e.kernels.site_forward` (this is its reference backend; the
    penalty's ``z_out`` is ``z`` itself — autograd adds the two gradients)."""
    if mode not in MODES:
        raise ValueError(f"site_forward: mode must be one of {MODES}, got {mode!r}")
    sum_d, sum_d2 = _shifted_sums(z, shift, sums, accumulate)
    if mode == "penalty":
        loss, counts = _Penalty.apply(z, mean, var, thr, lam, eps, compensation)
        return SiteOutput(z, loss, counts, sum_d, sum_d2)
    if mode == "reverse_deactivation":
        z_out, counts = _ReverseDeactivation.apply(z, mean, var, thr, delta, compensation)
        return SiteOutput(z_out, None, counts, sum_d, sum_d2)
    with torch.no_grad():
        counts = _counts(_mask(z, mean, var, thr, compensation))
    return SiteOutput(z, None, counts, sum_d, sum_d2)


@torch.no_grad()
def kth_score(z: Tensor, mean: Tensor, var: Tensor, k: int, *, compensation: float) -> Tensor:
    """Per-sample k-th largest φ, ``[B]`` fp32: the threshold of exact top-k selection."""
    return F.kth_largest(F.ms_score(z.detach(), mean, var, compensation), k)
