"""The L2E site kernel: one interface, several backends (DESIGN §4).

``site_forward`` does a site's whole per-micro-batch work in one call; ``kth_score`` gives the
per-sample thresholds of exact top-k selection. Backends:

* ``"reference"`` — the PyTorch functional path (``reference.py``) every backend must match;
* ``"triton"`` — one-pass Triton kernels (``triton_kernels.py``), for CUDA tensors (or CPU tensors
  under ``TRITON_INTERPRET=1``, which is how the tests run them);
* ``"cpu"`` — one-pass numba loops (``cpu.py``), for CPU tensors;
* ``"auto"`` — ``triton`` for CUDA tensors, ``cpu`` for CPU tensors, the reference for anything
  else (fp64 activations, other devices).

The fused backends share their autograd wrapping (``fused.py``); modules load lazily, so a CPU
run never imports Triton and a GPU run never compiles numba code.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
from torch import Tensor

from . import fused, reference
from .reference import MODES, SiteOutput

BACKENDS = ("auto", "reference", "triton", "cpu")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MODULES = {"triton": "triton_kernels", "cpu": "cpu"}

__all__ = ["SiteOutput", "site_forward", "kth_score", "resolve_backend", "BACKENDS", "MODES"]


@functools.cache
def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def resolve_backend(backend: str, z: Tensor) -> str:
    """The concrete backend (``reference``, ``triton`` or ``cpu``) that ``backend`` means for ``z``."""
    if backend not in BACKENDS:
        raise ValueError(f"L2E kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if z.dtype not in _FUSED_DTYPES:
        return "reference"
    if z.is_cuda:
        return "triton"
    return "cpu" if z.device.type == "cpu" else "reference"


def site_forward(z: Tensor, mean: Tensor, var: Tensor, thr: Tensor, shift: Tensor, *, mode: str,
                 compensation: float, lam: float = 0.0, eps: float = 1e-6, delta: float = 1.0,
                 backend: str = "auto", sums: tuple[Tensor, Tensor] | None = None, accumulate: bool = False,
                 fuse_grad: bool = True) -> SiteOutput:
    """One site, one micro-batch: selection, counts, shifted sums and the mode's inhibition.

    z ``[B, *neurons]`` fp32/fp16/bf16; mean, var, shift ``[*neurons]`` fp32; thr ``[B]`` fp32
    (``+inf`` selects nothing). Selected: ``φ = (z − mean)²/(var + c·mean(var)) ≥ thr[b]``.

    mode ``"stats"``: ``z_out`` is ``z``, no loss. ``"penalty"``: ``loss`` = λ·Σ_sel log((z − mean)² + eps)
    (0-d fp32, differentiable in z; backward ``g·λ·2(z − mean)/((z − mean)² + eps)`` on selected elements,
    recomputing the mask from z, mean, var, thr). The caller passes ``z_out`` on in place of z: on the fused
    backends (with ``fuse_grad``, when z requires grad) it is a view of z whose gradient meets the loss's in
    one backward pass over Z; on the reference it is z itself. ``"reverse_deactivation"``: ``z_out`` takes
    ``mean`` on selected elements (forward) and passes ``−Δ·g`` there (backward). Always: ``counts`` ``[B]``
    int64, ``sum_d``/``sum_d2`` ``[*neurons]`` fp32 = Σ_b (z − shift), Σ_b (z − shift)² — written into the
    caller's ``sums`` buffers (two contiguous fp32 ``[*neurons]`` tensors; ``accumulate``: added to them)
    when given, fresh tensors otherwise.
    """
    name = resolve_backend(backend, z)
    if name == "reference":
        if sums is not None:
            sums = fused.check_sums(sums, z.shape[1:], z.device)
        return reference.site_forward(z, mean, var, thr, shift, mode=mode, compensation=compensation,
                                      lam=lam, eps=eps, delta=delta, sums=sums, accumulate=accumulate)
    return fused.site_forward(_module(name), z, mean, var, thr, shift, mode=mode, compensation=compensation,
                              lam=lam, eps=eps, delta=delta, sums=sums, accumulate=accumulate,
                              fuse_grad=fuse_grad)


def kth_score(z: Tensor, mean: Tensor, var: Tensor, k: int, *, compensation: float,
              backend: str = "auto") -> Tensor:
    """Per-sample k-th largest φ over a sample's neurons: ``[B]`` fp32."""
    name = resolve_backend(backend, z)
    if name == "reference":
        return reference.kth_score(z, mean, var, k, compensation=compensation)
    return fused.kth_score(_module(name), z, mean, var, k, compensation=compensation)
