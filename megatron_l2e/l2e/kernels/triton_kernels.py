"""Triton kernels for the L2E site on GPU (DESIGN.md §4); also run under ``TRITON_INTERPRET=1``.

Forward: one program per block of BLOCK neurons loops over the B samples, so the block's
statistics (mean, denominator, shift) are loaded once and the per-neuron moments accumulate in
registers — no atomics for them. Per sample it adds its selected count into ``counts[b]`` (int32
atomic) and the penalty's log-sum goes to a per-program fp32 partial that torch sums afterwards
(deterministic). Z is read once; Reverse Deactivation writes its output in the same pass.
Backward: a 2-D grid (neuron block, sample) reads Z and the incoming gradient once, recomputes the
selection and writes the outgoing gradient — nothing of size B·S·H is saved between the passes.

Numerics follow ``functional.py``: fp32 math on upcast inputs, φ = (z − mean)² / denom with an
IEEE-rounded division (``div_rn``: Triton's default ``/`` is an approximate division on GPU), so
the selection and the counts are bit-identical to the reference.

Whether the kernels are interpreted is decided when this module is imported (``triton.jit`` reads
``TRITON_INTERPRET`` then): set the variable first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_MODES = {"stats": 0, "penalty": 1, "reverse_deactivation": 2}
# No FMA contraction: a fused d·d + eps rounds differently from the reference's two ops. The kernels
# are memory-bound, so the contraction would buy nothing.
_OPTS = {"enable_fp_fusion": False}


def interpreted() -> bool:
    return isinstance(_forward_kernel, triton.runtime.interpreter.InterpretedFunction) \
        if hasattr(triton.runtime, "interpreter") else False


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """fp32 → the output dtype, rounding to nearest-even like ``Tensor.to``.

    bf16 is rounded by hand: the GPU's ``fptrunc`` already rounds to nearest-even, but the
    interpreter truncates, and the tests run there. A few integer ops on a memory-bound kernel.
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        u = tl.where(x != x, 0x7FC0, u)  # NaN stays a quiet NaN
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _score(dd, dn):
    """φ = d²/denom (IEEE division) capped at the largest finite fp32, as ``ms_score``."""
    p = tl.math.div_rn(dd, dn)
    return tl.where(p > 3.4028234663852886e38, 3.4028234663852886e38, p)


@triton.jit
def _forward_kernel(z_ptr, out_ptr, mean_ptr, denom_ptr, shift_ptr, thr_ptr, counts_ptr, loss_ptr,
                    sum_d_ptr, sum_d2_ptr, B, N, eps,
                    MODE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    m = tl.load(mean_ptr + offs, mask=valid, other=0.0)
    dn = tl.load(denom_ptr + offs, mask=valid, other=1.0)
    sh = tl.load(shift_ptr + offs, mask=valid, other=0.0)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_d2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    z_row = z_ptr  # advanced by N per sample: 64-bit pointer arithmetic, B·N may exceed 2^31
    out_row = out_ptr
    for b in range(B):
        x = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(thr_ptr + b)
        d = x - m
        dd = d * d
        sel = (_score(dd, dn) >= t) & valid
        tl.atomic_add(counts_ptr + b, tl.sum(sel.to(tl.int32), axis=0))
        e = x - sh  # 0 on the masked tail (x = sh = 0 there)
        acc_d += e
        acc_d2 += e * e
        if MODE == 1:
            acc_l += tl.where(sel, tl.log(dd + eps), 0.0)
        if MODE == 2:
            # forward value exactly the running mean (the gradient −Δ is the backward's)
            tl.store(out_row + offs, _cast_out(tl.where(sel, m, x), out_ptr.dtype.element_ty), mask=valid)
        z_row += N
        out_row += N
    if ACCUMULATE:  # the caller's step sums: old + new, as the reference's acc + sums
        acc_d = tl.load(sum_d_ptr + offs, mask=valid, other=0.0) + acc_d
        acc_d2 = tl.load(sum_d2_ptr + offs, mask=valid, other=0.0) + acc_d2
    tl.store(sum_d_ptr + offs, acc_d, mask=valid)
    tl.store(sum_d2_ptr + offs, acc_d2, mask=valid)
    if MODE == 1:
        tl.store(loss_ptr + pid, tl.sum(acc_l, axis=0))


@triton.jit
def _penalty_backward_kernel(z_ptr, gout_ptr, gin_ptr, mean_ptr, denom_ptr, thr_ptr, g_ptr, two_lam, N, eps,
                             HAS_GOUT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    row = b.to(tl.int64) * N
    m = tl.load(mean_ptr + offs, mask=valid, other=0.0)
    dn = tl.load(denom_ptr + offs, mask=valid, other=1.0)
    t = tl.load(thr_ptr + b)
    gl = tl.load(g_ptr).to(tl.float32)  # the penalty's incoming gradient: read on device, no host sync
    x = tl.load(z_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    d = x - m
    dd = d * d
    sel = _score(dd, dn) >= t
    g = tl.where(sel, tl.math.div_rn(two_lam * d, dd + eps) * gl, 0.0)  # the reference's op order
    if HAS_GOUT:
        g += tl.load(gout_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(gin_ptr + row + offs, _cast_out(g, gin_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rd_backward_kernel(z_ptr, gout_ptr, gin_ptr, mean_ptr, denom_ptr, thr_ptr, N, delta,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    row = b.to(tl.int64) * N
    m = tl.load(mean_ptr + offs, mask=valid, other=0.0)
    dn = tl.load(denom_ptr + offs, mask=valid, other=1.0)
    t = tl.load(thr_ptr + b)
    x = tl.load(z_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    d = x - m
    sel = _score(d * d, dn) >= t
    g = tl.load(gout_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(gin_ptr + row + offs, _cast_out(tl.where(sel, -delta * g, g), gin_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _score_kernel(z_ptr, phi_ptr, mean_ptr, denom_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    row = b.to(tl.int64) * N
    m = tl.load(mean_ptr + offs, mask=valid, other=0.0)
    dn = tl.load(denom_ptr + offs, mask=valid, other=1.0)
    x = tl.load(z_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)
    d = x - m
    tl.store(phi_ptr + row + offs, _score(d * d, dn), mask=valid)


# ---------------------------------------------------------------------------------------------
# torch-facing wrappers (same contract as kernels/cpu.py)
# ---------------------------------------------------------------------------------------------

def _block(n: int, block: int | None) -> int:
    if block is not None:
        return block
    if interpreted():
        # The interpreter runs each program in numpy: few, large programs keep tests fast.
        return min(triton.next_power_of_2(n), 1 << 16)
    return 1024


def _flat(z: Tensor) -> Tensor:
    return z.detach().reshape(z.shape[0], -1).contiguous()


def _vec(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float32).contiguous()


def forward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, shift: Tensor, *, mode: str,
            eps: float, sums: tuple[Tensor, Tensor] | None = None, accumulate: bool = False,
            record: list | None = None, block: int | None = None):
    """See ``cpu.forward``: ``(z_out | None, counts [B] int64, logsum | None, sum_d, sum_d2)``. No
    selection ``record`` (left empty): the GPU backward recomputes the mask at full bandwidth."""
    z2 = _flat(z)
    B, N = z2.shape
    BLOCK = _block(N, block)
    grid = (triton.cdiv(N, BLOCK),)
    dev = z2.device
    out = torch.empty_like(z2) if mode == "reverse_deactivation" else z2
    counts = torch.zeros(B, dtype=torch.int32, device=dev)
    loss_part = torch.zeros(grid[0], dtype=torch.float32, device=dev)
    if sums is None:
        sum_d, sum_d2, accumulate = (torch.empty(N, dtype=torch.float32, device=dev),
                                     torch.empty(N, dtype=torch.float32, device=dev), False)
    else:
        sum_d, sum_d2 = (s.detach().view(-1) for s in sums)
    _forward_kernel[grid](z2, out, _vec(mean), _vec(denom), _vec(shift), _vec(thr), counts, loss_part,
                          sum_d, sum_d2, B, N, float(eps), MODE=_MODES[mode], ACCUMULATE=bool(accumulate),
                          BLOCK=BLOCK, **_OPTS)
    neurons = z.shape[1:]
    z_out = out.reshape(z.shape) if mode == "reverse_deactivation" else None
    logsum = loss_part.sum() if mode == "penalty" else None
    return z_out, counts.to(torch.int64), logsum, sum_d.view(neurons), sum_d2.view(neurons)


def penalty_backward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, grad_out: Tensor | None,
                     g: Tensor, lam: float, eps: float, block: int | None = None, *,
                     out: Tensor | None = None, selection: None = None) -> Tensor:
    """As ``cpu.penalty_backward``; ``out`` a preallocated result buffer (``out=grad_out``: in place —
    safe, each element is read and written by the same program)."""
    z2 = _flat(z)
    B, N = z2.shape
    BLOCK = _block(N, block)
    if out is None:
        grad_in = torch.empty_like(z2)
    else:
        if out.shape != z.shape or out.dtype != z.dtype or not out.is_contiguous():
            raise ValueError("penalty_backward: out must be a contiguous tensor of z's shape and dtype")
        grad_in = out.view(z2.shape)
    gout = _flat(grad_out) if grad_out is not None else z2
    g_t = torch.as_tensor(g, dtype=torch.float32, device=z2.device).reshape(1)
    _penalty_backward_kernel[(triton.cdiv(N, BLOCK), B)](
        z2, gout, grad_in, _vec(mean), _vec(denom), _vec(thr), g_t, 2.0 * float(lam), N, float(eps),
        HAS_GOUT=grad_out is not None, BLOCK=BLOCK, **_OPTS)
    return out if out is not None else grad_in.reshape(z.shape)


def rd_backward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, grad_out: Tensor, delta: float,
                block: int | None = None) -> Tensor:
    z2 = _flat(z)
    B, N = z2.shape
    BLOCK = _block(N, block)
    grad_in = torch.empty_like(z2)
    _rd_backward_kernel[(triton.cdiv(N, BLOCK), B)](
        z2, _flat(grad_out).to(z2.dtype), grad_in, _vec(mean), _vec(denom), _vec(thr), N, float(delta),
        BLOCK=BLOCK, **_OPTS)
    return grad_in.reshape(z.shape)


def kth_score(z: Tensor, mean: Tensor, denom: Tensor, k: int, block: int | None = None) -> Tensor:
    """Exact per-sample k-th largest φ: φ by one kernel pass, then ``torch.topk``'s radix select.

    Not measured on a GPU yet (this project's development machine has none); the CPU path uses
    its own fused radix select (cpu.kth_score).
    """
    z2 = _flat(z)
    B, N = z2.shape
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must lie in [1, {N}]")
    BLOCK = _block(N, block)
    phi = torch.empty(B, N, dtype=torch.float32, device=z2.device)
    _score_kernel[(triton.cdiv(N, BLOCK), B)](z2, phi, _vec(mean), _vec(denom), N, BLOCK=BLOCK, **_OPTS)
    return torch.topk(phi, k, dim=1, sorted=False).values.amin(dim=1)
