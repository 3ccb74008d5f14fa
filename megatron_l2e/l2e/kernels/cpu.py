"""Fused CPU path for the L2E site: numba loops over ``[B, N]`` (DESIGN.md §4).

One forward loop reads Z once and produces φ, the selection against ``thr[b]``, per-sample counts,
the penalty's log-sum, the shifted per-neuron moments and (Reverse Deactivation) the output; one
backward loop reads Z and the incoming gradient once and writes the outgoing gradient. Eager
PyTorch needs about a dozen passes for the same work.

Layout: ``z`` is viewed as ``[B, N]`` (N = S·H neurons). The parallel loop runs over neuron
*chunks*; inside a chunk the loop over samples keeps that chunk's statistics (mean, denominator,
shift and the running sums) in L1, so Z is the only stream from memory and no atomics are needed.

Numerics are those of the reference (``functional.py``): every op in fp32, in the same order,
``fastmath=False`` (no reassociation, no reciprocal tricks), so φ — and therefore the selection
and the counts — is bit-identical to ``ms_score``. fp16/bf16 inputs arrive as raw 16-bit words
(numba has no half types on CPU) and are upcast inside the loop; 16-bit outputs are rounded to
nearest-even exactly as ``Tensor.to`` does.
"""

from __future__ import annotations

import math
import mmap
import os
import types as pytypes

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload
from torch import Tensor

# Threading layer: OpenMP where torch's intra-op backend is OpenMP. torch loads its libgomp globally
# (libtorch_global_deps, RTLD_GLOBAL) before numba's omppool is loaded, so omppool's GOMP_parallel
# binds to torch's runtime (LD_DEBUG=bindings shows it; tests/test_kernels_threads.py checks the
# CPU time): the kernels' parallel regions run on the very worker threads torch's ops use, which
# are awake after those ops — a launch costs microseconds, where numba's own workqueue threads
# sleep between kernels and took ~0.1-0.3 ms to wake here. Elsewhere the workqueue layer. A user's
# NUMBA_THREADING_LAYER wins; the setting must precede the first parallel launch in the process.
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "omp" if "parallel backend: OpenMP" in torch.__config__.parallel_info() \
        else "workqueue"

# Neurons per parallel work item: 8192 × (mean, denom, shift, sum_d, sum_d2) × 4 B = 160 KiB — the
# per-chunk working set stays in L2 while the sample loop streams Z through in 32 KiB runs (longer
# runs measured ~15 % faster than 2048 here: the prefetchers restart less often).
_CHUNK = 8192

_MODES = {"stats": 0, "penalty": 1, "reverse_deactivation": 2}


# ---------------------------------------------------------------------------------------------
# 16-bit <-> fp32 conversions (bit-exact with torch's casts)
# ---------------------------------------------------------------------------------------------

@njit(inline="always", error_model="numpy", cache=True)
def _bf16_to_f32(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(inline="always", error_model="numpy", cache=True)
def _f32_to_bf16(x):
    # c10::round_to_nearest_even: NaN stays a quiet NaN, everything else rounds half to even.
    if x != x:
        return np.uint16(0x7FC0)
    u = np.float32(x).view(np.uint32)
    bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16((u + bias) >> np.uint32(16))


@njit(inline="always", error_model="numpy", cache=True)
def _f16_to_f32(h16):
    h = np.uint32(np.uint16(h16))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:  # zero or subnormal: m · 2^-24 is exact in fp32
        v = np.float32(m) * np.float32(5.960464477539063e-08)
        return -v if sign else v
    if e == 31:  # inf / NaN
        return np.uint32(sign | np.uint32(0x7F800000) | (m << np.uint32(13))).view(np.float32)
    return np.uint32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))).view(np.float32)


@njit(inline="always", error_model="numpy", cache=True)
def _f32_to_f16(x):
    # numpy's npy_floatbits_to_halfbits: round half to even, overflow to ±inf, NaN kept.
    f = np.float32(x).view(np.uint32)
    f_exp = f & np.uint32(0x7F800000)
    h_sgn = np.uint32((f & np.uint32(0x80000000)) >> np.uint32(16))
    if f_exp >= np.uint32(0x47800000):
        if f_exp == np.uint32(0x7F800000):
            f_sig = f & np.uint32(0x007FFFFF)
            if f_sig != 0:
                ret = np.uint32(0x7C00) + (f_sig >> np.uint32(13))
                if ret == np.uint32(0x7C00):
                    ret += np.uint32(1)
                return np.int16(np.uint16(h_sgn + ret))
        return np.int16(np.uint16(h_sgn + np.uint32(0x7C00)))
    if f_exp <= np.uint32(0x38000000):
        if f_exp < np.uint32(0x33000000):
            return np.int16(np.uint16(h_sgn))
        e = f_exp >> np.uint32(23)
        f_sig = np.uint32(0x00800000) + (f & np.uint32(0x007FFFFF))
        f_sig = f_sig >> (np.uint32(113) - e)
        if ((f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000)) or ((f & np.uint32(0x7FF)) != 0):
            f_sig += np.uint32(0x1000)
        return np.int16(np.uint16(h_sgn + (f_sig >> np.uint32(13))))
    h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
    f_sig = f & np.uint32(0x007FFFFF)
    if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
        f_sig += np.uint32(0x1000)
    return np.int16(np.uint16(h_sgn + h_exp + (f_sig >> np.uint32(13))))


_FMAX = np.float32(np.finfo(np.float32).max)


@njit(inline="always", error_model="numpy", cache=True)
def _score(dd, dn):
    """φ = d²/denom capped at the largest finite fp32, as ``ms_score`` (NaN passes through)."""
    p = dd / dn
    return _FMAX if p > _FMAX else p


_NOT_NORMAL = -(1 << 20)
_LN2 = math.log(2.0)


@njit(inline="always", error_model="numpy", cache=True)
def _split_exponent(p):
    """(mantissa in [1, 2), unbiased binary exponent) of a positive normal fp64 ``p`` — exact, by its
    bits; (p, _NOT_NORMAL) for 0, subnormals, inf and NaN (the caller takes their log directly)."""
    u = np.float64(p).view(np.uint64)
    e = np.int64((u >> np.uint64(52)) & np.uint64(0x7FF))
    if e == 0 or e == 0x7FF or p < 0.0:
        return p, _NOT_NORMAL
    mant = np.uint64((u & np.uint64(0x000FFFFFFFFFFFFF)) | np.uint64(0x3FF0000000000000)).view(np.float64)
    return mant, e - 1023


# Storage convention: fp32 → float32 array, bf16 → uint16 words, fp16 → int16 words.
def _ld(a, i):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


def _st(a, i, x):  # pragma: no cover
    raise NotImplementedError


@overload(_ld)
def _ld_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])


def _enc(a, x):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@overload(_enc)
def _enc_impl(a, x):
    """fp32 ``x`` as a storage word of ``a``'s convention (rounded to nearest-even for 16-bit)."""
    if a.dtype == types.float32:
        return lambda a, x: x
    if a.dtype == types.uint16:
        return lambda a, x: _f32_to_bf16(x)
    if a.dtype == types.int16:
        return lambda a, x: _f32_to_f16(x)


@overload(_st)
def _st_impl(a, i, x):
    if a.dtype == types.float32:
        def st(a, i, x):
            a[i] = x
        return st
    if a.dtype == types.uint16:
        def st(a, i, x):
            a[i] = _f32_to_bf16(x)
        return st
    if a.dtype == types.int16:
        def st(a, i, x):
            a[i] = _f32_to_f16(x)
        return st


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _forward_kernel(z, mean, denom, thr, shift, mode, eps, out, counts_part, loss_part,
                    sum_d, sum_d2, accumulate, sel_pos, sel_d):
    """z/out [B, N] (fp32 or 16-bit words); mean/denom/shift [N] fp32; thr [B] fp32.

    counts_part [n_chunks, B] int64 and loss_part [n_chunks] fp64 are per-chunk partials (summed by
    the caller: deterministic, no atomics); the micro-batch's sums are written into sum_d/sum_d2
    [N] fp32, or added to them (``accumulate``: ``old + new``, the reference's ``acc + sums``).
    Penalty mode also records the selection for the backward: ``sel_pos``/``sel_d``
    [n_chunks, B, cap] get each (chunk, sample)'s first ``cap`` selected positions (chunk-local)
    and their d = z − mean (cap = 0: no record).
    """
    B, N = z.shape
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    eps32 = np.float32(eps)
    cap = sel_pos.shape[2]
    for c in prange(n_chunks):
        n0 = c * _CHUNK
        n1 = min(n0 + _CHUNK, N)
        L = n1 - n0
        # Chunk-local views and accumulators: LLVM sees no aliasing between the streams and
        # vectorises the sample loop (error_model="numpy" drops Python's zero-division checks,
        # which would otherwise keep the division scalar).
        m = mean[n0:n1]
        dn = denom[n0:n1]
        sh = shift[n0:n1]
        acc_d = np.zeros(L, np.float32)
        acc_d2 = np.zeros(L, np.float32)
        msk = np.zeros(_CHUNK, np.uint8)   # the chunk's selection, scanned 8 bytes at a time
        words = msk.view(np.uint64)
        wl = np.empty(_CHUNK // 8, np.int64)  # indices of non-zero mask words
        ix = np.empty(_CHUNK, np.int64)       # selected positions
        loss = 0.0
        loss_exp = 0  # binary exponents taken out of the running products (see below)
        for b in range(B):
            zb = z[b, n0:n1]
            t = thr[b]
            cnt = 0
            if mode == 2:
                ob = out[b, n0:n1]
                for i in range(L):
                    x = _ld(zb, i)
                    d = x - m[i]
                    sel = _score(d * d, dn[i]) >= t
                    cnt += np.int64(sel)
                    e = x - sh[i]
                    acc_d[i] += e
                    acc_d2[i] += e * e
                    # forward value exactly the running mean (the gradient −Δ is the backward's)
                    _st(ob, i, m[i] if sel else x)
            elif mode == 1:
                for i in range(L):
                    x = _ld(zb, i)
                    d = x - m[i]
                    sel = _score(d * d, dn[i]) >= t
                    cnt += np.int64(sel)
                    msk[i] = np.uint8(sel)
                    e = x - sh[i]
                    acc_d[i] += e
                    acc_d2[i] += e * e
                if cnt > 0:
                    # log is scalar-only and only ~2 % of elements are selected, so the log-sum runs
                    # after the vectorised loop, on the chunk's (cache-resident) mask: compact the
                    # non-zero 8-byte words, then the selected positions in them, then take the logs —
                    # all branch-free except the last loop, whose branches are all taken.
                    j = 0
                    for w in range((L + 7) // 8):
                        wl[j] = w
                        j += words[w] != 0
                    q = 0
                    for jj in range(j):
                        base = 8 * wl[jj]
                        for r in range(8):
                            ix[q] = base + r
                            q += msk[base + r]
                    # Σ log x = log Π x, with the product kept in range by hand: every 4 factors
                    # (4 positive fp32 values cannot leave the fp64 range) the product's binary
                    # exponent moves into an exact integer sum and its mantissa ([1, 2)) carries on,
                    # so the whole (chunk, sample) costs one libm log (~20 ns each was the sweep's
                    # main cost). A product that is 0, inf or NaN (eps = 0 with d = 0, overflowing
                    # d²) takes its own log, as before: the loss then is ±inf/NaN like the reference's.
                    prod = 1.0
                    for qq in range(q):
                        i = ix[qq]
                        d = _ld(zb, i) - m[i]
                        if qq < cap:
                            sel_pos[c, b, qq] = i
                            sel_d[c, b, qq] = d
                        prod *= np.float64(d * d + eps32)
                        if (qq & 3) == 3:
                            prod, ex = _split_exponent(prod)
                            if ex == _NOT_NORMAL:
                                loss += math.log(prod)
                                prod = 1.0
                            else:
                                loss_exp += ex
                    loss += math.log(prod)
            else:
                for i in range(L):
                    x = _ld(zb, i)
                    d = x - m[i]
                    cnt += np.int64(_score(d * d, dn[i]) >= t)
                    e = x - sh[i]
                    acc_d[i] += e
                    acc_d2[i] += e * e
            counts_part[c, b] = cnt
        if accumulate:
            for i in range(L):
                sum_d[n0 + i] = sum_d[n0 + i] + acc_d[i]
                sum_d2[n0 + i] = sum_d2[n0 + i] + acc_d2[i]
        else:
            sum_d[n0:n1] = acc_d
            sum_d2[n0:n1] = acc_d2
        loss_part[c] = loss + np.float64(loss_exp) * _LN2


@njit(inline="always", error_model="numpy", cache=True)
def _penalty_term(x, m, dn, t, tl2, eps32, g32):
    """(selected, 2λ·d/(d² + eps)·g) of one element, in the reference's op order."""
    d = x - m
    dd = d * d
    return _score(dd, dn) >= t, tl2 * d / (dd + eps32) * g32


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _penalty_backward_kernel(z, mean, denom, thr, grad_out, has_grad_out, in_place, g, two_lam, eps, grad_in):
    """grad_in = grad_out + (2λ·d/(d² + eps))·g on selected elements, grad_out elsewhere; all [B, N].

    One dense, branch-free, vectorised pass: the penalty term is computed for every element and
    blended in where selected; unselected elements are copied as raw words (bit-exact, NaN payloads
    included). Measured here, this beats writing only the ~2 % selected elements after a vectorised
    mask loop: those scattered read-modify-writes each missed the cache (the gradient was not
    otherwise read), 4 of the pass's 14 ms at [4, 2048, 2560]. ``in_place``: ``grad_in`` *is*
    ``grad_out`` and the loop reads and writes through the one array — given two array objects over
    the same memory, LLVM's runtime alias check fails and the loop runs scalar (2.5× slower, measured).

    The op order is the reference's (``ms_penalty_grad(...) * g``), so fp32 results match it bit for bit.
    """
    B, N = z.shape
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    eps32 = np.float32(eps)
    tl2 = np.float32(two_lam)
    g32 = np.float32(g)
    zero = np.float32(0.0)
    for c in prange(n_chunks):
        n0 = c * _CHUNK
        n1 = min(n0 + _CHUNK, N)
        L = n1 - n0
        m = mean[n0:n1]
        dn = denom[n0:n1]
        for b in range(B):
            zb = z[b, n0:n1]
            ib = grad_in[b, n0:n1]
            gb = grad_out[b, n0:n1]
            t = thr[b]
            # three loops, not one with a branch inside: each compiles to one tight vectorised loop
            if in_place:
                for i in range(L):
                    sel, p = _penalty_term(_ld(zb, i), m[i], dn[i], t, tl2, eps32, g32)
                    ib[i] = _enc(ib, _ld(ib, i) + p) if sel else ib[i]
            elif has_grad_out:
                for i in range(L):
                    sel, p = _penalty_term(_ld(zb, i), m[i], dn[i], t, tl2, eps32, g32)
                    ib[i] = _enc(ib, _ld(gb, i) + p) if sel else gb[i]
            else:
                for i in range(L):
                    sel, p = _penalty_term(_ld(zb, i), m[i], dn[i], t, tl2, eps32, g32)
                    ib[i] = _enc(ib, p if sel else zero)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _penalty_backward_recorded_kernel(sel_pos, sel_d, counts_part, z, mean, denom, thr, grad, g, two_lam, eps):
    """grad += (2λ·d/(d² + eps))·g in place on the selected elements, from the forward's record.

    Where the forward recorded a (chunk, sample)'s whole selection (its count ≤ cap), only those
    elements are touched: Z and the statistics are not read at all, and the incoming gradient — hot,
    the next block's backward just wrote it — only at ~2 % of its elements. A (chunk, sample) with
    more selected elements than the record holds takes the dense in-place loop of
    ``_penalty_backward_kernel``. Same per-element ops as that kernel (``d`` is the forward's own
    z − mean), so the result is bit-identical to it.
    """
    B, N = z.shape
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    cap = sel_pos.shape[2]
    eps32 = np.float32(eps)
    tl2 = np.float32(two_lam)
    g32 = np.float32(g)
    for c in prange(n_chunks):
        n0 = c * _CHUNK
        n1 = min(n0 + _CHUNK, N)
        L = n1 - n0
        for b in range(B):
            ib = grad[b, n0:n1]
            cnt = counts_part[c, b]
            if cnt <= cap:
                pos = sel_pos[c, b]
                dv = sel_d[c, b]
                for q in range(cnt):
                    i = np.int64(pos[q])
                    d = dv[q]
                    ib[i] = _enc(ib, _ld(ib, i) + tl2 * d / (d * d + eps32) * g32)
            else:
                zb = z[b, n0:n1]
                m = mean[n0:n1]
                dn = denom[n0:n1]
                t = thr[b]
                for i in range(L):
                    sel, p = _penalty_term(_ld(zb, i), m[i], dn[i], t, tl2, eps32, g32)
                    ib[i] = _enc(ib, _ld(ib, i) + p) if sel else ib[i]


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _rd_backward_kernel(z, mean, denom, thr, grad_out, delta, grad_in):
    """grad_in = −Δ·grad_out on selected elements, grad_out elsewhere; all [B, N]."""
    B, N = z.shape
    n_chunks = (N + _CHUNK - 1) // _CHUNK
    neg_delta = np.float32(-delta)
    for c in prange(n_chunks):
        n0 = c * _CHUNK
        n1 = min(n0 + _CHUNK, N)
        L = n1 - n0
        m = mean[n0:n1]
        dn = denom[n0:n1]
        for b in range(B):
            zb = z[b, n0:n1]
            gb = grad_out[b, n0:n1]
            ib = grad_in[b, n0:n1]
            t = thr[b]
            for i in range(L):
                d = _ld(zb, i) - m[i]
                g = _ld(gb, i)
                _st(ib, i, neg_delta * g if _score(d * d, dn[i]) >= t else g)


# ---------------------------------------------------------------------------------------------
# Exact per-sample k-th largest φ: a two-pass radix select over φ's fp32 bit pattern
# ---------------------------------------------------------------------------------------------
# φ ≥ 0, so its IEEE bits order like the values (as uint32). Pass 1 recomputes φ from Z and counts
# the top 16 bits into a 65,536-bin histogram; the bin holding the k-th largest is found by a
# scan from the top. Pass 2 recomputes φ again and gathers that bin's members (a few hundred
# typically), whose exact k-th value a small sort gives. Two streaming reads of Z, no φ buffer —
# against sorting/quickselecting N floats per sample.

_HBITS = 16
_NBINS = 1 << _HBITS


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _hist_kernel(z, mean, denom, hist):
    """hist [B, n_chunks, 65536] int32: per-chunk histograms of φ's top 16 bits (no atomics)."""
    B, N = z.shape
    n_chunks = hist.shape[1]
    per = (N + n_chunks - 1) // n_chunks
    for job in prange(B * n_chunks):
        b = job // n_chunks
        c = job % n_chunks
        zb = z[b]
        h = hist[b, c]
        for n in range(c * per, min((c + 1) * per, N)):
            d = _ld(zb, n) - mean[n]
            phi = _score(d * d, denom[n])
            h[np.float32(phi).view(np.uint32) >> np.uint32(32 - _HBITS)] += 1


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _gather_kernel(z, mean, denom, bins, out, fill):
    """Collect φ of the elements whose top 16 bits equal bins[b] into out[b, c, :] (fill[b, c])."""
    B, N = z.shape
    n_chunks = out.shape[1]
    per = (N + n_chunks - 1) // n_chunks
    for job in prange(B * n_chunks):
        b = job // n_chunks
        c = job % n_chunks
        zb = z[b]
        target = np.uint32(bins[b])
        o = out[b, c]
        j = 0
        for n in range(c * per, min((c + 1) * per, N)):
            d = _ld(zb, n) - mean[n]
            phi = _score(d * d, denom[n])
            if (np.float32(phi).view(np.uint32) >> np.uint32(32 - _HBITS)) == target:
                o[j] = phi
                j += 1
        fill[b, c] = j


# ---------------------------------------------------------------------------------------------
# torch-facing wrappers
# ---------------------------------------------------------------------------------------------

_THP_MIN_BYTES = 32 << 20  # glibc serves smaller blocks from its heap (mmap threshold ≤ 32 MiB)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor; large ones on transparent huge pages.

    A fresh 84 MB tensor costs ~20,000 page faults on first write, which took 4-5× the time of
    the copy itself here (torch's CPU allocator returns big blocks to the OS). On 2 MB pages the
    kernel handles 512× fewer faults. The tensor holds the mapping; freeing it unmaps.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _THP_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


# Each thread gets at least this many elements (1 MB of fp32, ~0.1-0.25 ms of work): on torch's
# OpenMP workers a launch costs microseconds, so the 70M step case's forward ([2, 512, 512]) splits
# over two threads; on the workqueue layer a launch wakes sleeping threads (~0.1-0.3 ms measured
# here), so the bar is 4× higher there. Below it the kernel's serial twin runs on the calling thread,
# with no launch at all.
_ELEMENTS_PER_THREAD = 1 << 18 if numba.config.THREADING_LAYER == "omp" else 1 << 20

# The forward's selection record (penalty mode): per 8192 neurons and sample, up to this many
# selected positions (int16, chunk-local) and their z − mean (fp32). At the ~2 % L2E selects that is
# ~164 a chunk; a chunk with more (an early or drifting threshold) is redone densely in the backward.
_RECORD_CAP = _CHUNK // 16
_NO_RECORD = (np.empty((1, 1, 0), np.int16), np.empty((1, 1, 0), np.float32))


_POOL_STARTED = False


def _start_pool() -> None:
    """Start numba's threading layer, keeping torch's thread count: the OpenMP layer's start-up calls
    ``omp_set_num_threads(NUMBA_NUM_THREADS)`` — every core — on the runtime it shares with torch,
    which would silently undo a ``torch.set_num_threads`` (or torchrun's OMP_NUM_THREADS=1)."""
    global _POOL_STARTED, _ELEMENTS_PER_THREAD
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))   # launches the layer
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if numba.threading_layer() != "omp":   # chosen elsewhere before us (a user's setting, earlier code)
        _ELEMENTS_PER_THREAD = max(_ELEMENTS_PER_THREAD, 1 << 20)
    _POOL_STARTED = True


def _threads(n_elements: int) -> int:
    """Threads for this much work: torch's intra-op pool (the process's CPU budget), fewer for small work."""
    if not _POOL_STARTED:
        _start_pool()
    n = min(torch.get_num_threads(), max(1, n_elements // _ELEMENTS_PER_THREAD))
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if n > 1:
        numba.set_num_threads(n)
    return n


def _serial_twin(kernel):
    """The same loops compiled without ``parallel`` (``prange`` runs as ``range`` on the calling thread),
    cached under their own name (numba's cache files are named after the function's qualname)."""
    f = kernel.py_func
    twin = pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__doc__ = f.__doc__
    return njit(fastmath=False, error_model="numpy", cache=True)(twin)


_SERIAL = {}


def _launch(kernel, n_elements: int, *args) -> None:
    """``kernel(*args)`` on ``_threads(n_elements)`` threads; one thread: its serial twin, no launch."""
    if _threads(n_elements) > 1:
        kernel(*args)
        return
    twin = _SERIAL.get(kernel)
    if twin is None:
        twin = _SERIAL[kernel] = _serial_twin(kernel)
    twin(*args)


def _words(t: Tensor) -> np.ndarray:
    """A ``[B, N]`` contiguous CPU tensor as the numpy array the kernels expect (zero-copy)."""
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    raise TypeError(f"L2E CPU kernels take fp32/fp16/bf16 activations, got {t.dtype}")


def _flat(z: Tensor) -> Tensor:
    z = z.detach()
    return z.view(z.shape[0], -1) if z.is_contiguous() else z.reshape(z.shape[0], -1).contiguous()


def _n_chunks(n: int) -> int:
    return (n + _CHUNK - 1) // _CHUNK


def forward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, shift: Tensor, *, mode: str,
            eps: float, sums: tuple[Tensor, Tensor] | None = None, accumulate: bool = False,
            record: list | None = None):
    """Fused site forward. Returns ``(z_out | None, counts [B] int64, logsum np.float32 | None,
    sum_d [*neurons] fp32, sum_d2 [*neurons] fp32)``; ``z_out`` only for reverse_deactivation,
    ``logsum`` = Σ_selected log((z−mean)²+eps) (unscaled by λ) only for penalty.

    ``sums``: the caller's ``(sum_d, sum_d2)`` buffers (contiguous fp32 ``[*neurons]``, checked by
    ``fused.site_forward``), written — or, with ``accumulate``, added to — in place and returned;
    otherwise fresh tensors. ``record`` (penalty mode): a list the forward appends its selection
    record to — the selected positions and their z − mean, up to ``_RECORD_CAP`` per 8192 neurons
    and sample (``_RECORD_CAP``/8192 of Z's elements at most, 6 bytes each) — for ``penalty_backward``'s
    ``selection``.
    """
    # (Few torch calls here: this runs once per site and micro-batch, and at the 70M step case the
    # Python around the two kernels was a fifth of L2E's time.)
    z2 = _flat(z)
    B, N = z2.shape
    zw = _words(z2)
    out = _empty(z2.shape, z2.dtype) if mode == "reverse_deactivation" else None
    counts_part = np.zeros((_n_chunks(N), B), np.int64)
    loss_part = np.zeros(_n_chunks(N), np.float64)
    neurons = z.shape[1:]
    if sums is None:
        sum_d, sum_d2, accumulate = _empty(neurons, torch.float32), _empty(neurons, torch.float32), False
    else:
        sum_d, sum_d2 = sums
    mv = _vec(mean)
    sv = mv if shift is mean else _vec(shift)
    if record is not None and mode == "penalty":
        sel_pos = np.empty((counts_part.shape[0], B, _RECORD_CAP), np.int16)
        sel_d = np.empty((counts_part.shape[0], B, _RECORD_CAP), np.float32)
        record.append((sel_pos, sel_d, counts_part))
    else:
        sel_pos, sel_d = _NO_RECORD
    _launch(_forward_kernel, B * N, zw, mv, _vec(denom), _vec(thr), sv, _MODES[mode], float(eps),
            zw[:1, :1] if out is None else _words(out), counts_part, loss_part,
            sum_d.numpy().reshape(-1), sum_d2.numpy().reshape(-1), bool(accumulate), sel_pos, sel_d)
    counts = torch.from_numpy(counts_part.sum(0))
    z_out = None if out is None else out.view(z.shape)
    # the log-sum as an fp32 value (a numpy scalar: λ-scaling it costs no torch call, see fused._Penalty)
    logsum = np.float32(loss_part.sum()) if mode == "penalty" else None
    return z_out, counts, logsum, sum_d.view(neurons), sum_d2.view(neurons)



def penalty_backward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, grad_out: Tensor | None,
                     g: Tensor, lam: float, eps: float, *, out: Tensor | None = None,
                     selection: tuple | None = None) -> Tensor:
    """``grad_out + g·λ·2(z−mean)/((z−mean)²+eps)`` on selected elements, in z's dtype.

    ``g`` is the incoming gradient of the penalty (0-d); ``grad_out`` that of ``z_out`` (or None).
    ``out``: a preallocated contiguous result buffer of z's shape and dtype (a fresh one costs page
    faults on first touch); ``out=grad_out`` adds the penalty in place (reads Z and dZ, writes dZ).
    ``selection``: the record ``forward`` made of this very selection (its ``record``); in place it
    turns the pass into updates of the selected elements alone (Z and the statistics unread).
    """
    z2 = _flat(z)
    in_place = out is not None and grad_out is not None and out.data_ptr() == grad_out.data_ptr()
    if out is None:
        grad_in = _empty(z2.shape, z2.dtype)
    else:
        if out.shape != z.shape or out.dtype != z.dtype or not out.is_contiguous():
            raise ValueError("penalty_backward: out must be a contiguous tensor of z's shape and dtype")
        grad_in = out.view(z2.shape)
    gw = _words(grad_in)
    if in_place and selection is not None:
        sel_pos, sel_d, counts_part = selection
        # work ~ the recorded updates (≤ 1/16 of the elements), not Z: serial at the 70M step case
        _launch(_penalty_backward_recorded_kernel, z2.numel() // 16, sel_pos, sel_d, counts_part, _words(z2),
                _vec(mean), _vec(denom), _vec(thr), gw, float(g), 2.0 * float(lam), float(eps))
        return out
    if in_place:
        g2w = gw        # the kernel reads and writes through this one array (see the kernel)
    elif grad_out is not None:
        g2w = _words(_flat(grad_out if grad_out.dtype == z2.dtype else grad_out.to(z2.dtype)))
    else:
        g2w = gw[:1]
    _launch(_penalty_backward_kernel, z2.numel(), _words(z2), _vec(mean), _vec(denom), _vec(thr), g2w,
            grad_out is not None, in_place, float(g), 2.0 * float(lam), float(eps), gw)
    return out if out is not None else grad_in.view(z.shape)


def rd_backward(z: Tensor, mean: Tensor, denom: Tensor, thr: Tensor, grad_out: Tensor,
                delta: float) -> Tensor:
    z2 = _flat(z)
    grad_in = _empty(z2.shape, z2.dtype)
    _launch(_rd_backward_kernel, z2.numel(), _words(z2), _vec(mean), _vec(denom), _vec(thr),
            _words(_flat(grad_out).to(z2.dtype)), float(delta), _words(grad_in))
    return grad_in.reshape(z.shape)


def kth_score(z: Tensor, mean: Tensor, denom: Tensor, k: int) -> Tensor:
    """Per-sample exact k-th largest φ, ``[B]`` fp32, bit-identical to ``kth_largest(ms_score(...))``."""
    z2 = _flat(z)
    B, N = z2.shape
    if not 1 <= k <= N:
        raise ValueError(f"k={k} must lie in [1, {N}]")
    zw, m, dn = _words(z2), _vec(mean), _vec(denom)
    numba.set_num_threads(_threads(B * N))   # two passes over Z: parallel launches whatever the size
    # (sample, chunk) jobs: at least two per thread, so both passes split evenly.
    n_chunks = max(1, -(-2 * numba.get_num_threads() // B))
    hist = np.zeros((B, n_chunks, _NBINS), np.int32)
    _hist_kernel(zw, m, dn, hist)
    # Scan from the largest bin: the bin where the running count reaches k holds the answer, and
    # `rank` is the answer's rank (1 = largest) inside that bin.
    cum = np.cumsum(hist.sum(1)[:, ::-1], axis=1)
    idx = (cum >= k).argmax(1)
    bins = (_NBINS - 1 - idx).astype(np.int64)
    before = np.where(idx > 0, cum[np.arange(B), np.maximum(idx - 1, 0)], 0)
    rank = k - before
    size = int((cum[np.arange(B), idx] - before).max())
    cand = np.empty((B, n_chunks, size), np.float32)
    fill = np.zeros((B, n_chunks), np.int64)
    _gather_kernel(zw, m, dn, bins, cand, fill)
    out = np.empty(B, np.float32)
    for b in range(B):
        vals = np.concatenate([cand[b, c, :fill[b, c]] for c in range(n_chunks)])
        out[b] = np.partition(vals, len(vals) - rank[b])[len(vals) - rank[b]]
    return torch.from_numpy(out)


def _vec(t: Tensor) -> np.ndarray:
    if t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad:   # the usual case: zero-copy
        return t.numpy().reshape(-1)
    return t.detach().reshape(-1).contiguous().to(torch.float32).numpy()
