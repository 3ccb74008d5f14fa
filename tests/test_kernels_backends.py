"""The fused site kernels (numba CPU path; Triton under TRITON_INTERPRET=1) against the functional reference.

The expected values come from ``megatron_l2e.l2e.functional`` (the reference math) and from float64
sums computed here; the kernels under test share none of that code.
"""

from __future__ import annotations

import os

# triton.jit decides interpreter-vs-compiled when a kernel module is imported: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from megatron_l2e.l2e import functional as F  # noqa: E402
from megatron_l2e.l2e import kernels  # noqa: E402

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
C = 0.01


def _interpreter_usable() -> bool:
    """Triton's interpreter needs TRITON_INTERPRET=1 before *triton* was first imported (its own
    library functions are decorated then); in a test process where something imported it earlier
    (transformers, DeepSpeed), the Triton cases run in a subprocess instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(std.zeros, InterpretedFunction)


@pytest.fixture(autouse=True)
def _triton_in_this_process(request):
    uses_triton = "triton" in request.node.name and "subprocess" not in request.node.name
    if uses_triton:
        if not _interpreter_usable():
            pytest.skip("run by test_triton_cases_in_subprocess (triton was imported before TRITON_INTERPRET)")
        tk = importlib.import_module("megatron_l2e.l2e.kernels.triton_kernels")
        if not tk.interpreted():  # imported earlier without the interpreter: re-decorate the kernels
            importlib.reload(tk)
        assert tk.interpreted()


def test_triton_cases_in_subprocess():
    if _interpreter_usable():
        pytest.skip("the Triton cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not subprocess"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, proc.stdout[-500:]


def _case(B, neurons, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(neurons)
    mean = torch.randn(n, generator=g) * 0.5
    var = torch.rand(n, generator=g) * 4 + 0.1
    z = (mean + torch.randn(B, *n, generator=g) * scale).to(dtype)
    shift = mean + 0.01 * torch.randn(n, generator=g)
    return z, mean, var, shift


def _thr(z, mean, var, frac=0.05):
    """A per-sample threshold selecting ~frac of each sample, from the reference score."""
    phi = F.ms_score(z, mean, var, C)
    k = max(1, round(frac * phi[0].numel()))
    return F.kth_largest(phi, k).to(torch.float32)


def _sums64(z, shift):
    d = z.double() - shift.double()
    return d.sum(0), d.square().sum(0)


def _check_stats(out, z, mean, var, thr, shift):
    _, ref_counts = F.ms_penalty(z, mean, var, thr, 1.0, 1e-6, C)
    assert torch.equal(out.counts, ref_counts.to(torch.int64))
    assert out.counts.dtype == torch.int64
    sd, sd2 = _sums64(z, shift)
    # fp32 accumulation over B samples: a few ulps of the largest partial sum.
    tol = 4 * z.shape[0] * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out.sum_d.double(), sd, rtol=0, atol=tol * float(sd2.sqrt().max() * z.shape[0] ** .5 + 1))
    torch.testing.assert_close(out.sum_d2.double(), sd2, rtol=tol, atol=tol)
    assert out.sum_d.dtype == out.sum_d2.dtype == torch.float32
    assert out.sum_d.shape == z.shape[1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,neurons", [(4, (16, 40)), (1, (7, 13)), (3, (2085,))])
def test_penalty_forward_backward(backend, dtype, B, neurons):
    z, mean, var, shift = _case(B, neurons, dtype)
    thr = _thr(z, mean, var)
    lam = 0.37
    zr = z.clone().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, shift, mode="penalty", compensation=C, lam=lam,
                               backend=backend)
    _check_stats(out, z, mean, var, thr, shift)
    # z_out: a view of z (no copy) through which z's other gradient reaches the penalty's backward
    assert out.z_out is not zr and out.z_out._base is zr and out.z_out.data_ptr() == zr.data_ptr()

    ref_loss, _ = F.ms_penalty(z, mean, var, thr, lam, 1e-6, C)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)

    # Penalty gradient alone (z_out unused) ...
    g = torch.tensor(1.7)
    (grad,) = torch.autograd.grad(out.loss, zr, g, retain_graph=True)
    ref_grad = (F.ms_penalty_grad(z, mean, var, thr, lam, 1e-6, C) * g).to(dtype)
    assert grad.dtype == dtype
    _assert_grad_close(grad, ref_grad, dtype)

    # ... and the kernel's fused form, adding z's incoming gradient in the same pass.
    be = importlib.import_module(f"megatron_l2e.l2e.kernels.{'cpu' if backend == 'cpu' else 'triton_kernels'}")
    g_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    denom = (var + C * var.mean()).clamp_min(torch.finfo(torch.float32).tiny)
    grad2 = be.penalty_backward(z, mean, denom, thr, g_out, g, lam, 1e-6)
    ref2 = (g_out.float() + F.ms_penalty_grad(z, mean, var, thr, lam, 1e-6, C) * g).to(dtype)
    _assert_grad_close(grad2, ref2, dtype)
    # Into a preallocated buffer, and in place into the incoming gradient: the same bits.
    buf = torch.full_like(z, float("nan"))
    assert be.penalty_backward(z, mean, denom, thr, g_out, g, lam, 1e-6, out=buf) is not None
    assert torch.equal(buf, grad2)
    g_in_place = g_out.clone()
    be.penalty_backward(z, mean, denom, thr, g_in_place, g, lam, 1e-6, out=g_in_place)
    assert torch.equal(g_in_place, grad2)
    # Through autograd: z_out's gradient and the loss's meet in the one fused pass; the caller's
    # gradient tensor (held by Python) is never written.
    g_keep = g_out.clone()
    (grad3,) = torch.autograd.grad([out.z_out, out.loss], zr, [g_out, g])
    assert torch.equal(grad3, grad2) and torch.equal(g_out, g_keep)
    # fuse_grad=False: z_out is z, the penalty gradient is a separate autograd input
    out_nf = kernels.site_forward(zr, mean, var, thr, shift, mode="penalty", compensation=C, lam=lam,
                                  backend=backend, fuse_grad=False)
    assert out_nf.z_out is zr
    (grad4,) = torch.autograd.grad(out_nf.loss, zr, g)
    assert torch.equal(grad4, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_penalty_backward_writes_only_into_gradients_autograd_alone_holds(backend):
    """In place into z_out's incoming gradient exactly when nothing else can see it; every case's
    gradients equal the reference's."""
    B, neurons = 3, (24, 20)
    z0, mean, var, shift = _case(B, neurons, torch.float32, seed=4)
    thr = _thr(z0, mean, var, frac=0.1)
    lam, w = 0.3, torch.randn(B, *neurons, generator=torch.Generator().manual_seed(9))
    pen = F.ms_penalty_grad(z0, mean, var, thr, lam, 1e-6, C)
    assert (pen != 0).sum() > 20

    def run(case):
        x = z0.clone().requires_grad_(True)
        z = x * 1.0                               # a non-leaf block output
        h = torch.zeros_like(z0, requires_grad=True)
        h1 = h * 1.0      # made before the penalty: its backward runs after the penalty's
        out = kernels.site_forward(z, mean, var, thr, shift, mode="penalty", compensation=C, lam=lam,
                                   backend=backend)
        ptr, kept = {}, []
        out.z_out.register_hook(lambda g: ptr.__setitem__("in", g.data_ptr()))
        z.register_hook(lambda g: ptr.__setitem__("out", g.data_ptr()))
        zo = out.z_out
        if case == "shared":   # AddBackward hands one tensor to both inputs; h1's node still holds it
            zo = zo + h1
        elif case == "hook_keeps":
            out.z_out.register_hook(lambda g: kept.append(g))
        elif case == "retain_grad":
            out.z_out.retain_grad()
        ((zo * w).sum() + out.loss).backward()
        torch.testing.assert_close(x.grad, w + pen, rtol=0, atol=1e-6)
        if case == "shared":
            assert torch.equal(h.grad, w)          # the other input's gradient was not written
        if case == "hook_keeps":
            assert torch.equal(kept[0], w)
        if case == "retain_grad":
            assert torch.equal(out.z_out.grad, w)
        return ptr["in"] == ptr["out"]

    assert run("fresh")                           # MulBackward's fresh gradient: written in place
    for case in ("shared", "hook_keeps"):
        assert not run(case), case
    run("retain_grad")                            # retain_grad keeps its own copy: either way is right


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_logsum_many_selected(backend):
    """Every element selected, d² spanning 1e-12…1e30: the CPU path folds the logs into running
    products with the exponents taken out by hand — checked against a float64 log-sum."""
    g = torch.Generator().manual_seed(11)
    B, n = 3, 20000
    mean = torch.zeros(n)
    z = (torch.rand(B, n, generator=g) * 42 - 21).exp2() * torch.randn(B, n, generator=g).sign()  # |z| ~ 2^±21
    z[0, :100] = 1e15                                        # d² = 1e30
    var = torch.ones(n)
    thr = torch.zeros(B)                                     # φ ≥ 0: all selected
    out = kernels.site_forward(z, mean, var, thr, mean, mode="penalty", compensation=C, lam=1.0, eps=1e-6,
                               backend=backend)
    want = torch.log((z.float() ** 2 + 1e-6).double()).sum()
    assert out.counts.tolist() == [n] * B
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-3)


def _assert_grad_close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:  # same fp32 value, one final rounding: at most one ulp of the 16-bit type apart
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reverse_deactivation(backend, dtype):
    z, mean, var, shift = _case(3, (9, 31), dtype, seed=1)
    thr = _thr(z, mean, var, 0.1)
    delta = 0.75
    zr = z.clone().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, shift, mode="reverse_deactivation", compensation=C,
                               delta=delta, backend=backend)
    assert out.loss is None
    _check_stats(out, z, mean, var, thr, shift)
    zl = z.clone().requires_grad_(True)
    ref_out, _ = F.reverse_deactivation(zl, mean, var, thr, delta, C)
    assert out.z_out.dtype == dtype
    assert torch.equal(out.z_out, ref_out)          # selected elements hold exactly the mean
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad,) = torch.autograd.grad(out.z_out, zr, g)
    (ref_grad,) = torch.autograd.grad(ref_out, zl, g)
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_mode_and_select_nothing(backend, dtype):
    z, mean, var, shift = _case(2, (5, 300), dtype, seed=3)
    out = kernels.site_forward(z, mean, var, torch.full((2,), float("inf")), shift, mode="stats",
                               compensation=C, backend=backend)
    assert out.z_out is z and out.loss is None
    assert out.counts.tolist() == [0, 0]
    _check_stats(out, z, mean, var, torch.full((2,), float("inf")), shift)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_and_huge_values(backend):
    B, n = 3, (4, 50)
    z, mean, var, shift = _case(B, n, torch.float32, seed=4)
    var[:, :10] = 0.0                      # zero-variance neurons
    z[0, 0, :5] = 3e19                     # (z − mean)² overflows fp32: φ is capped at fp32 max
    z[1, 2, 7] = -1e30
    thr = _thr(z, mean, var)
    zr = z.clone().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, shift, mode="penalty", compensation=C, lam=0.5,
                               backend=backend)
    _, ref_counts = F.ms_penalty(z, mean, var, thr, 0.5, 1e-6, C)
    assert torch.equal(out.counts, ref_counts)
    ref_loss, _ = F.ms_penalty(z, mean, var, thr, 0.5, 1e-6, C)
    torch.testing.assert_close(out.loss, ref_loss)                     # +inf both
    (grad,) = torch.autograd.grad(out.loss, zr)
    torch.testing.assert_close(grad, F.ms_penalty_grad(z, mean, var, thr, 0.5, 1e-6, C))
    # An all-zero variance (denominator at the floor) with thr = +inf still selects nothing.
    out = kernels.site_forward(z, mean, torch.zeros_like(var), torch.full((B,), float("inf")), shift,
                               mode="stats", compensation=C, backend=backend)
    assert out.counts.tolist() == [0] * B
    assert torch.equal(kernels.kth_score(z, mean, var, 5, compensation=C, backend=backend),
                       F.kth_largest(F.ms_score(z, mean, var, C), 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,neurons,k", [(4, (32, 64), 41), (1, (3, 7), 1), (2, (3, 7), 21), (3, (2085,), 100)])
def test_kth_score_exact(backend, dtype, B, neurons, k):
    z, mean, var, _ = _case(B, neurons, dtype, seed=6)
    got = kernels.kth_score(z, mean, var, k, compensation=C, backend=backend)
    want = F.kth_largest(F.ms_score(z, mean, var, C), k)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kth_score_ties(backend):
    # Few distinct values: many equal scores around the k-th.
    g = torch.Generator().manual_seed(7)
    z = torch.randint(-3, 4, (3, 4000), generator=g).float()
    mean, var = torch.zeros(4000), torch.ones(4000)
    for k in (1, 17, 1000, 2500, 4000):
        got = kernels.kth_score(z, mean, var, k, compensation=C, backend=backend)
        assert torch.equal(got, F.kth_largest(F.ms_score(z, mean, var, C), k)), k
    with pytest.raises(ValueError):
        kernels.kth_score(z, mean, var, 4001, compensation=C, backend=backend)


def test_triton_multi_block_grid():
    """Several programs per sample and a ragged tail (N not a multiple of BLOCK)."""
    from megatron_l2e.l2e.kernels import triton_kernels as tk
    z, mean, var, shift = _case(3, (7, 37), torch.bfloat16, seed=8)
    thr = _thr(z, mean, var)
    denom = (var + C * var.mean()).clamp_min(torch.finfo(torch.float32).tiny)
    _, counts, logsum, sd, sd2 = tk.forward(z, mean, denom, thr, shift, mode="penalty", eps=1e-6, block=64)
    out = kernels.SiteOutput(z, None, counts, sd, sd2)
    _check_stats(out, z, mean, var, thr, shift)
    ref_loss, _ = F.ms_penalty(z, mean, var, thr, 1.0, 1e-6, C)
    torch.testing.assert_close(logsum, ref_loss, rtol=1e-5, atol=1e-5)
    g_out = torch.randn(z.shape).to(z.dtype)
    grad = tk.penalty_backward(z, mean, denom, thr, g_out, torch.tensor(2.0), 0.3, 1e-6, block=64)
    _assert_grad_close(grad, (g_out.float() + 2.0 * F.ms_penalty_grad(z, mean, var, thr, 0.3, 1e-6, C))
                       .to(z.dtype), z.dtype)
    assert torch.equal(tk.kth_score(z, mean, denom, 30, block=64), F.kth_largest(F.ms_score(z, mean, var, C), 30))


def test_auto_dispatch_on_cpu():
    z = torch.zeros(2, 3)
    assert kernels.resolve_backend("auto", z) == "cpu"
    assert kernels.resolve_backend("auto", z.double()) == "reference"
    assert kernels.resolve_backend("reference", z) == "reference"
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend("cuda", z)


def test_cpu_large_outputs_on_huge_pages():
    """Outputs ≥ 32 MiB come from a huge-page mapping (cpu._empty): same values, a normal tensor."""
    from megatron_l2e.l2e.kernels import cpu
    z, mean, var, shift = _case(2, (1 << 22,), torch.float32, seed=9, scale=1.0)   # z: 32 MiB
    thr = torch.tensor([4.0, 9.0])
    g_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    zr = z.clone().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, shift, mode="reverse_deactivation", compensation=C,
                               backend="cpu")
    (grad,) = torch.autograd.grad(out.z_out, zr, g_out)
    ref_out, _ = F.reverse_deactivation(z, mean, var, thr, 1.0, C)
    assert torch.equal(out.z_out, ref_out)
    mask = ref_out != z
    assert torch.equal(grad, torch.where(mask, -g_out, g_out))
    big = cpu._empty((3, 1 << 22), torch.float32)
    assert big.shape == (3, 1 << 22) and big.is_contiguous()
    big.fill_(2.0)
    assert float(big.sum()) == 2.0 * 3 * (1 << 22)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_parallel_kernels_equal_their_serial_twins(dtype):
    """Small work runs each kernel's serial twin (no thread launch), large work the parallel one:
    the same loops, so the same bits — counts, accumulated sums, log-sum partials, gradients."""
    import numba
    import numpy as np
    from megatron_l2e.l2e.kernels import cpu, fused
    B, N = 3, 3 * 8192 + 77                                   # several chunks and a ragged tail
    z, mean, var, shift = _case(B, (N,), dtype, seed=12)
    thr = _thr(z, mean, var, frac=0.03)
    denom = fused.denominator(var, C)
    zw, vec = cpu._words(z.contiguous()), cpu._vec
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    cpu._start_pool()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    results = []
    for kernel in (cpu._forward_kernel, cpu._serial_twin(cpu._forward_kernel)):
        nc = cpu._n_chunks(N)
        counts, loss = np.zeros((nc, B), np.int64), np.zeros(nc, np.float64)
        s1, s2 = np.full(N, 0.5, np.float32), np.full(N, 2.0, np.float32)     # accumulate onto these
        pos, dv = np.zeros((nc, B, cpu._RECORD_CAP), np.int16), np.zeros((nc, B, cpu._RECORD_CAP), np.float32)
        kernel(zw, vec(mean), vec(denom), vec(thr), vec(shift), 1, 1e-6, zw[:1, :1], counts, loss, s1, s2, True,
               pos, dv)
        results.append((counts, loss, s1, s2, pos, dv))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert results[0][0].sum() > 0
    grads = []
    for kernel in (cpu._penalty_backward_kernel, cpu._serial_twin(cpu._penalty_backward_kernel)):
        gi = g.clone()
        kernel(zw, vec(mean), vec(denom), vec(thr), cpu._words(gi), True, True, 1.3, 0.6, 1e-6, cpu._words(gi))
        grads.append(gi)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], g)
    counts, _, _, _, pos, dv = results[0]
    for kernel in (cpu._penalty_backward_recorded_kernel, cpu._serial_twin(cpu._penalty_backward_recorded_kernel)):
        gi = g.clone()
        kernel(pos, dv, counts, zw, vec(mean), vec(denom), vec(thr), cpu._words(gi), 1.3, 0.6, 1e-6)
        assert torch.equal(gi, grads[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_recorded_backward_equals_the_dense_pass(dtype):
    """The forward's selection record turns the in-place backward into updates of the selected
    elements alone; a (chunk, sample) selecting more than the record holds is redone densely. Both
    give the dense pass's bits — which the other tests hold against the reference."""
    from megatron_l2e.l2e.kernels import cpu, fused
    B, N = 3, 4 * 8192 + 501
    z, mean, var, shift = _case(B, (N,), dtype, seed=13)
    thr = _thr(z, mean, var, frac=0.02)
    thr[1] = _thr(z, mean, var, frac=0.2)[1]         # sample 1 overflows every full chunk's record
    denom = fused.denominator(var, C)
    record = []
    out = cpu.forward(z, mean, denom, thr, mean, mode="penalty", eps=1e-6, record=record)
    (pos, dv, counts_part), = record
    over = counts_part > cpu._RECORD_CAP
    assert over[:-1, 1].all() and not over[-1, 1] and not over[:, [0, 2]].any()   # the tail: 501 neurons
    assert torch.equal(out[1], torch.from_numpy(counts_part.sum(0)))
    g_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    dense, recorded = g_out.clone(), g_out.clone()
    cpu.penalty_backward(z, mean, denom, thr, dense, torch.tensor(1.7), 0.3, 1e-6, out=dense)
    assert cpu.penalty_backward(z, mean, denom, thr, recorded, torch.tensor(1.7), 0.3, 1e-6, out=recorded,
                                selection=record[0]) is recorded
    assert torch.equal(recorded, dense) and not torch.equal(dense, g_out)
    # out of place the record is not used (the result still needs every element written)
    fresh = cpu.penalty_backward(z, mean, denom, thr, g_out, torch.tensor(1.7), 0.3, 1e-6, selection=record[0])
    assert torch.equal(fresh, dense)
