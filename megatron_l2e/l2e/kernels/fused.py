"""Fused backends of the site kernel: autograd around the one-pass kernels (``cpu`` or ``triton_kernels``).

Each backend module provides the same four functions on ``z`` ``[B, *neurons]`` and the
precomputed denominator ``denom = max(var + c·mean(var), tiny)`` ``[*neurons]`` (computed here
once, with the very ops of ``ms_score``, so every backend selects exactly what the reference does):

* ``forward(z, mean, denom, thr, shift, *, mode, eps, sums, accumulate, record) → (z_out | None, counts, logsum | None, sum_d, sum_d2)``
* ``penalty_backward(z, mean, denom, thr, grad_out | None, g, lam, eps, *, out, selection) → grad_in``
* ``rd_backward(z, mean, denom, thr, grad_out, delta) → grad_in``
* ``kth_score(z, mean, denom, k) → [B]``

Penalty: ``z_out`` is a view of ``z`` through which z's other gradient reaches the Function's
backward, which returns ``grad_out + g·λ·2d/(d²+eps)`` in one pass over Z (in place when autograd
alone holds ``grad_out``, on a device type where that rule is proven: :func:`inplace_devices`).
Only ``z`` and ``[*neurons]``/``[B]`` tensors are saved, plus — CPU —
the forward's sparse ``record`` of its selection (positions and z − mean of the ≤ 1/16 selected
elements it holds; the ~2 % L2E selects), with which the in-place backward updates the selected
elements alone instead of re-reading Z and the statistics; the Triton backward recomputes the
selection (a GPU streams Z at full bandwidth). ``sums`` lets the caller keep its step sums in its own buffers: the kernel
writes (or adds, ``accumulate``) the micro-batch's shifted sums there — no fresh ``[*neurons]``
outputs, whose first touch costs page faults on CPU, and no separate accumulation pass.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from .reference import MODES, SiteOutput


_DENOM_CACHE: dict[tuple[int, float], tuple[weakref.ref, int, Tensor]] = {}


def denominator(var: Tensor, compensation: float) -> Tensor:
    """``var + c·mean(var)`` floored at the smallest normal — the same ops as ``functional.ms_score``.

    Cached per ``var`` tensor (by identity and in-place version): a site's variance changes only at
    the step end, and every micro-batch and backward of the step reuses the result.
    """
    key = (id(var), float(compensation))
    hit = _DENOM_CACHE.get(key)
    if hit is not None and hit[0]() is var and hit[1] == var._version:
        return hit[2]
    v = var.detach().to(torch.float32)
    denom = (v + compensation * v.mean()).clamp_min(torch.finfo(torch.float32).tiny)
    _DENOM_CACHE[key] = (weakref.ref(var, lambda _, k=key: _DENOM_CACHE.pop(k, None)), var._version, denom)
    return denom


# ---- where the in-place gradient add may run ------------------------------------------------------
# The in-place add trusts reference counts calibrated by a probe (below). Device types on which a test
# has proved that rule — the backward wrote into the incoming gradient exactly when autograd alone held
# it, with the same bits as the out-of-place add — are listed here; everywhere else the add is out of
# place. CPU: tests/test_kernels_backends.py, test_kernels_site.py, test_l2e_attach.py. CUDA: off until
# the user opts in after `pytest -m gpu` passed tests/test_gpu_kernels.py::test_inplace_grad_cuda on
# that host (its CUDA worker thread, allocator and stream semantics are not the CPU's).
INPLACE_ENV = "MEGATRON_L2E_INPLACE_GRAD"
PROVEN_INPLACE_DEVICES = frozenset({"cpu"})


def inplace_devices() -> frozenset[str]:
    """Device types on which the penalty backward may add in place into z's incoming gradient.

    ``MEGATRON_L2E_INPLACE_GRAD`` (read at each call): unset → the proven set (``cpu``); a comma list
    of device types (``cpu,cuda``) → exactly those (``cuda`` is the opt-in); ``none`` or ``0`` → none
    (out of place everywhere).
    """
    raw = os.environ.get(INPLACE_ENV)
    if raw is None or raw.strip() == "":
        return PROVEN_INPLACE_DEVICES
    names = {t.strip().lower() for t in raw.split(",") if t.strip()}
    return frozenset() if names & {"none", "0", "off", "false"} else frozenset(names)


def inplace_allowed(device: torch.device) -> bool:
    return device.type in inplace_devices()


def _grad_refs(g: Tensor) -> tuple[int, int, int]:
    """(C++ owners of g's TensorImpl, Python references to g, owners of its storage)."""
    return g._use_count(), sys.getrefcount(g), torch._C._storage_Use_Count(g.untyped_storage()._cdata)


class _RefProbe(torch.autograd.Function):
    """Measures :func:`_grad_refs` of a gradient that only autograd holds, reached exactly the way
    ``_Penalty.backward`` reaches its incoming gradient (so the Python reference count of the call
    path is calibrated, not assumed)."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _RefProbe.seen.append(_owned_by_autograd(g, None, calibrate=True))
        return g


@functools.cache
def _exclusive_refs(device_type: str = "cpu") -> tuple[int, int, int] | None:
    """The probe's counts, taken on a tensor of ``device_type`` (a CUDA backward runs on autograd's
    device thread: calibrated there, not assumed equal to the CPU's)."""
    if not hasattr(Tensor, "_use_count") or not hasattr(torch._C, "_storage_Use_Count"):
        return None
    with torch.enable_grad():
        x = torch.zeros(4, requires_grad=True, device=device_type)
        (_RefProbe.apply(x * 1.0) * 2.0).sum().backward()   # MulBackward hands over a fresh gradient
    refs = _RefProbe.seen.pop()
    return refs if refs[0] == 1 else None


def _owned_by_autograd(g: Tensor, z: Tensor | None, calibrate: bool = False):
    """True when nothing but autograd's call into this backward holds ``g`` — no other graph node
    (a gradient that ``a + b`` hands to both inputs), no Python reference (a hook that kept it, the
    caller's ``grad_tensors``), no other tensor on its storage — so the backward may write its result
    into it. PyTorch's own gradient accumulation uses the same rule (``use_count() == 1``); the
    Python side is compared with a probe's count, taken through this very function (``calibrate``:
    return the counts) so the call path adds the same references. Any doubt: False (out of place)."""
    refs = _grad_refs(g)
    if calibrate:
        return refs
    if not inplace_allowed(g.device):   # not proven on this device type: out of place
        return False
    base = _exclusive_refs(g.device.type)
    if base is None or torch.is_grad_enabled() or g.requires_grad or g._is_view():
        return False
    if g.dtype != z.dtype or g.device != z.device or g.shape != z.shape or not g.is_contiguous():
        return False
    return refs[0] == 1 and refs[1] <= base[1] and refs[2] <= base[2]


class _Penalty(torch.autograd.Function):
    """Outputs ``(z_out, loss)``; ``counts``, ``sum_d``, ``sum_d2`` (no gradient) go to ``side`` — not
    autograd outputs, which each cost a wrap per micro-batch.

    ``fuse_grad``: ``z_out`` is a view of ``z`` (no copy), so the gradient the rest of the network
    sends to z arrives here together with the loss's, and one pass over Z returns their sum
    ``g_z + g·λ·2d/(d² + eps)`` — written into ``g_z`` itself when autograd alone holds it
    (``_owned_by_autograd``: reads Z and dZ, writes dZ; no new B·S·H tensor) and z's device type is in
    :func:`inplace_devices`, else into a new tensor.
    Without ``fuse_grad`` (``z_out`` None: the caller reads z directly) the backward
    returns the penalty gradient alone and autograd adds it to z's other gradient — one more pass,
    used where the two gradients are measured apart.
    """

    @staticmethod
    def forward(ctx, z, mean, denom, thr, shift, lam, eps, backend, sums, accumulate, fuse_grad, side):
        record = [] if fuse_grad else None   # the CPU backend records its selection for the backward
        _, counts, logsum, sum_d, sum_d2 = backend.forward(z, mean, denom, thr, shift, mode="penalty", eps=eps,
                                                           sums=sums, accumulate=accumulate, record=record)
        side.extend((counts, sum_d, sum_d2))
        if isinstance(logsum, Tensor):   # on the device (Triton): no host sync
            loss = (logsum * lam).to(torch.float32)
        else:                            # a host fp32 scalar (CPU): the same fp32 product, one torch call
            loss = torch.tensor(logsum * np.float32(lam), dtype=torch.float32)
        ctx.save_for_backward(z, mean, denom, thr)
        ctx.consts = (lam, eps, backend, record[0] if record else None)
        ctx.set_materialize_grads(False)
        return (z.view_as(z) if fuse_grad else None), loss

    @staticmethod
    def backward(ctx, g_z, g_loss):
        none = (None,) * 11
        if g_loss is None:
            return (g_z, *none)
        z, mean, denom, thr = ctx.saved_tensors
        lam, eps, backend, selection = ctx.consts
        out = g_z if g_z is not None and _owned_by_autograd(g_z, z) else None
        return (backend.penalty_backward(z, mean, denom, thr, g_z, g_loss, lam, eps, out=out,
                                         selection=selection), *none)


class _ReverseDeactivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mean, denom, thr, shift, delta, backend, sums, accumulate, side):
        z_out, counts, _, sum_d, sum_d2 = backend.forward(z, mean, denom, thr, shift, mode="reverse_deactivation",
                                                         eps=1.0, sums=sums, accumulate=accumulate)
        side.extend((counts, sum_d, sum_d2))   # no gradient: not autograd outputs
        ctx.save_for_backward(z, mean, denom, thr)
        ctx.consts = (delta, backend)
        return z_out

    @staticmethod
    def backward(ctx, g):
        z, mean, denom, thr = ctx.saved_tensors
        delta, backend = ctx.consts
        return backend.rd_backward(z, mean, denom, thr, g, delta), *(None,) * 9


def _f32(t: Tensor) -> Tensor:
    """``t`` as an fp32 tensor outside autograd (itself when it already is one: no torch call)."""
    return t if t.dtype == torch.float32 and not t.requires_grad else t.detach().to(torch.float32)


def check_sums(sums, neurons: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """The caller's step-sum buffers: two contiguous fp32 tensors of the site's neuron shape on z's device."""
    if not isinstance(sums, (tuple, list)) or len(sums) != 2 or any(
            not isinstance(s, Tensor) or s.shape != neurons or s.dtype != torch.float32
            or not s.is_contiguous() or s.device != device or s.requires_grad for s in sums):
        raise ValueError(f"site_forward: sums must be two contiguous fp32 tensors of shape {list(neurons)} "
                         f"on {device} that do not require grad")
    return sums[0], sums[1]


def site_forward(backend: ModuleType, z: Tensor, mean: Tensor, var: Tensor, thr: Tensor, shift: Tensor, *,
                 mode: str, compensation: float, lam: float = 0.0, eps: float = 1e-6,
                 delta: float = 1.0, sums: tuple[Tensor, Tensor] | None = None, accumulate: bool = False,
                 fuse_grad: bool = True) -> SiteOutput:
    """:func:`megatron_l2e.l2e.kernels.site_forward` on a fused backend module."""
    if mode not in MODES:
        raise ValueError(f"site_forward: mode must be one of {MODES}, got {mode!r}")
    if sums is not None:
        sums = check_sums(sums, z.shape[1:], z.device)
    denom = denominator(var, compensation)
    shift_is_mean = shift is mean
    mean, thr = _f32(mean), _f32(thr)
    shift = mean if shift_is_mean else _f32(shift)
    if mode == "penalty":
        fuse = fuse_grad and z.requires_grad and torch.is_grad_enabled()
        if fuse and inplace_allowed(z.device):
            _exclusive_refs(z.device.type)   # calibrate now (once per process and device), not in a backward
        side: list[Tensor] = []
        z_out, loss = _Penalty.apply(z, mean, denom, thr, shift, lam, eps, backend, sums, accumulate, fuse, side)
        return SiteOutput(z if z_out is None else z_out, loss, *side)
    if mode == "reverse_deactivation":
        side = []
        z_out = _ReverseDeactivation.apply(z, mean, denom, thr, shift, delta, backend, sums, accumulate, side)
        return SiteOutput(z_out, None, *side)
    with torch.no_grad():
        _, counts, _, sum_d, sum_d2 = backend.forward(z, mean, denom, thr, shift, mode="stats", eps=eps,
                                                      sums=sums, accumulate=accumulate)
    return SiteOutput(z, None, counts, sum_d, sum_d2)


@torch.no_grad()
def kth_score(backend: ModuleType, z: Tensor, mean: Tensor, var: Tensor, k: int, *,
              compensation: float) -> Tensor:
    return backend.kth_score(z, mean.detach().to(torch.float32), denominator(var, compensation), int(k))
