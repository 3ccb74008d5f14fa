"""The L2E site kernel on CUDA equals the PyTorch reference (``pytest -m gpu``; skipped elsewhere).

``megatron_l2e.l2e.kernels.site_forward`` with ``backend="auto"`` (Triton on CUDA) — and any other
non-reference backend the module lists — against ``backend="reference"`` (the functional math),
for fp32/bf16/fp16 inputs and the three modes, at Pythia-70M's site shape [B, 2048, 512] with
GPT-NeoX-like activations (a few large-magnitude dimensions). Both sides read the same inputs, so
the selection is compared exactly except for elements whose φ lies within fp32 rounding of the
threshold (FMA contraction may move φ by one ulp); sums, loss and gradients to fp32 accumulation-order
tolerance.
"""

from __future__ import annotations

import pytest
from conftest import watch_penalty_grad_buffers

pytestmark = pytest.mark.gpu

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("stats", "penalty", "reverse_deactivation")


def _inputs(dtype_name: str, B: int = 4, S: int = 2048, H: int = 512, seed: int = 0):
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(seed)
    # Per-neuron running statistics; a handful of hidden dims with GPT-NeoX's large magnitudes.
    mean = torch.randn(S, H, device="cuda", generator=g) * 0.5
    mean[:, :4] += 40.0
    var = torch.rand(S, H, device="cuda", generator=g) * 2.0 + 0.05
    z = (mean + var.sqrt() * torch.randn(B, S, H, device="cuda", generator=g)).to(dtype)
    shift = mean.clone()
    return z, mean, var, shift


def _thresholds(kernels, z, mean, var, ratio: float = 0.02, compensation: float = 0.01):
    import torch

    k = max(1, round(ratio * z[0].numel()))
    thr = kernels.kth_score(z, mean, var, k, compensation=compensation, backend="reference")
    # Sample 0 by top-k; the others by a scalar tau (L2E's moving threshold), one sample selecting nothing.
    thr = thr.clone()
    thr[1:] = thr[0] * 1.1
    thr[-1] = float("inf")
    return thr.to(torch.float32)


def _fast_backends(kernels) -> list[str]:
    return [b for b in kernels.BACKENDS if b != "reference"]


def _boundary(kernels_functional, z, mean, var, thr, compensation: float):
    """Elements whose φ is within a few fp32 ulps of their sample's threshold (may flip either way)."""
    import torch

    phi = kernels_functional.ms_score(z.float(), mean, var, compensation)
    t = thr.reshape(-1, *([1] * (z.dim() - 1)))
    return (phi - t).abs() <= 4 * torch.finfo(torch.float32).eps * t.abs().clamp(min=1.0).nan_to_num(0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_site_forward_cuda_matches_reference(dtype_name, mode):
    import torch

    from megatron_l2e.l2e import functional as F
    from megatron_l2e.l2e import kernels

    torch.manual_seed(0)
    z0, mean, var, shift = _inputs(dtype_name)
    thr = _thresholds(kernels, z0, mean, var)
    c, lam, eps, delta = 0.01, 1e-3, 1e-6, 1.0
    near = _boundary(F, z0, mean, var, thr, c)
    n_near = near.reshape(near.shape[0], -1).sum(1)

    def run(backend):
        z = z0.clone().requires_grad_(mode != "stats")
        out = kernels.site_forward(z, mean, var, thr, shift, mode=mode, compensation=c, lam=lam, eps=eps,
                                   delta=delta, backend=backend)
        grad = None
        if mode == "penalty":
            out.loss.backward()
            grad = z.grad
        elif mode == "reverse_deactivation":
            g_in = torch.randn(z.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))
            out.z_out.backward(g_in.to(z.dtype))
            grad = z.grad
        return out, grad

    ref, ref_grad = run("reference")
    assert ref.counts[0] > 0 and ref.counts[-1] == 0, "test inputs must select something and nothing"
    for backend in _fast_backends(kernels):
        got, got_grad = run(backend)
        assert got.counts.dtype == ref.counts.dtype and got.counts.device == ref.counts.device
        assert ((got.counts - ref.counts).abs() <= n_near).all(), (backend, got.counts, ref.counts, n_near)
        torch.testing.assert_close(got.sum_d, ref.sum_d, rtol=1e-5, atol=1e-3 * mean.abs().max().item())
        torch.testing.assert_close(got.sum_d2, ref.sum_d2, rtol=1e-5, atol=1e-3)
        keep = ~near  # compare elementwise outputs away from the threshold boundary
        if mode == "penalty":
            torch.testing.assert_close(got.loss, ref.loss, rtol=1e-4, atol=abs(lam) * 1e-2)
            torch.testing.assert_close(got_grad[keep].float(), ref_grad[keep].float(), rtol=1e-3, atol=1e-6)
        if mode == "reverse_deactivation":
            assert got.z_out.dtype == z0.dtype
            torch.testing.assert_close(got.z_out[keep], ref.z_out[keep], rtol=0, atol=0)
            torch.testing.assert_close(got_grad[keep], ref_grad[keep], rtol=0, atol=0)
        if mode == "stats":
            assert got.loss is None


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_kth_score_cuda_matches_reference(dtype_name):
    import torch

    from megatron_l2e.l2e import kernels

    z, mean, var, _ = _inputs(dtype_name, seed=3)
    k = round(0.02 * z[0].numel())
    ref = kernels.kth_score(z, mean, var, k, compensation=0.01, backend="reference")
    for backend in _fast_backends(kernels):
        got = kernels.kth_score(z, mean, var, k, compensation=0.01, backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def _penalty_backward_cuda(kernels, z0, mean, var, thr, shift, *, keep_incoming: bool = False):
    """The fused penalty on a CUDA z with a downstream consumer (``z_out · w``): returns z's gradient,
    whether the backward wrote it into z_out's incoming gradient (same storage), and — with
    ``keep_incoming`` — a hook's reference to that incoming gradient and a copy taken at the time."""
    import torch

    x = z0.detach().clone().requires_grad_(True)
    z = x * 1.0                                   # non-leaf: its gradient is what z's producer receives
    w = torch.randn(z0.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)).to(z0.dtype)
    out = kernels.site_forward(z, mean, var, thr, shift, mode="penalty", compensation=0.01, lam=1e-2, eps=1e-6,
                               backend="auto")
    ptr, kept = {}, []
    out.z_out.register_hook(lambda g: ptr.__setitem__("in", g.data_ptr()))
    if keep_incoming:
        out.z_out.register_hook(lambda g: kept.extend((g, g.clone())))
    grad = {}
    z.register_hook(lambda g: grad.update(z=g.clone(), ptr=g.data_ptr()))
    ((out.z_out * w).sum() + out.loss).backward()   # MulBackward hands over a gradient autograd alone holds
    torch.cuda.synchronize()
    return grad["z"], ptr["in"] == grad["ptr"], kept


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_inplace_grad_cuda(dtype_name, monkeypatch):
    """Proves the in-place gradient add on CUDA — the evidence for the opt-in ``MEGATRON_L2E_INPLACE_GRAD=cuda``
    (docs/kernels.md): without the opt-in CUDA adds out of place; with it, the backward writes into the
    incoming gradient exactly when autograd alone holds it (not when a hook kept it: that tensor stays
    unchanged), and the bits equal the out-of-place add's."""
    import torch

    from megatron_l2e.l2e import kernels
    from megatron_l2e.l2e.kernels import fused

    z0, mean, var, shift = _inputs(dtype_name, B=2, S=512, H=512)
    thr = _thresholds(kernels, z0, mean, var)
    monkeypatch.delenv(fused.INPLACE_ENV, raising=False)
    g_default, in_place, _ = _penalty_backward_cuda(kernels, z0, mean, var, thr, shift)
    assert not in_place                           # CUDA is not on the default allow-list
    monkeypatch.setenv(fused.INPLACE_ENV, "cuda")
    g_in, in_place, _ = _penalty_backward_cuda(kernels, z0, mean, var, thr, shift)
    assert in_place                               # the opt-in takes the in-place path ...
    assert torch.equal(g_in, g_default)           # ... with the out-of-place bits
    g_kept, in_place, kept = _penalty_backward_cuda(kernels, z0, mean, var, thr, shift, keep_incoming=True)
    assert not in_place and torch.equal(kept[0], kept[1])   # a gradient a hook holds is never written
    assert torch.equal(g_kept, g_default)


def test_inplace_grad_cuda_in_a_model(monkeypatch):
    """A tiny GPT-NeoX on CUDA with L2E (regularizer, threshold phase reached): with the opt-in every
    fused penalty backward ran in place, and every parameter gradient equals the out-of-place run's (to
    fp32 rounding: CUDA's embedding backward and GEMMs may round differently run to run; the kernel-level
    test above compares bits)."""
    import copy

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from megatron_l2e.l2e import L2E, L2EConfig
    from megatron_l2e.l2e.kernels import fused

    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False,
        attn_implementation="eager")).cuda()
    grads, where = {}, {}
    for name, env in (("in_place", "cuda"), ("out_of_place", None)):
        if env is None:
            monkeypatch.delenv(fused.INPLACE_ENV, raising=False)
        else:
            monkeypatch.setenv(fused.INPLACE_ENV, env)
        model = copy.deepcopy(base).train()
        l2e = L2E.attach(model, L2EConfig(enabled=True, inhibition="regularizer", selection="threshold", ratio=0.05,
                                          lam=1e-2, layers="mid2", late_start=1, warmup_steps=1),
                         global_batch_size=4)
        where[name], _ = watch_penalty_grad_buffers(model, l2e.sites)
        g = torch.Generator(device="cuda").manual_seed(1)
        per_step = []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            for _ in range(2):
                mb = torch.randint(0, 64, (2, 32), device="cuda", generator=g)
                loss = model(input_ids=mb, labels=mb).loss
                pen = l2e.pop_penalty()
                (loss if pen is None else loss + pen).backward()
            per_step.append([p.grad.clone() for p in model.parameters()])
            l2e.step_end()
        grads[name] = per_step
    assert where["in_place"] and all(where["in_place"])
    assert where["out_of_place"] and not any(where["out_of_place"])
    for step_a, step_b in zip(grads["in_place"], grads["out_of_place"]):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
