"""The dispatching site (kernel ``auto`` = the fused numba path on CPU) trains exactly like the reference path.

Two identical tiny transformers GPT-NeoX models, L2E attached with ``kernel: auto`` and
``kernel: reference``, run the same steps through late start, exact top-k warm-up and the moving
threshold: every step's parameter gradients and the L2E state (count, mean, var, tau) must agree.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from megatron_l2e.l2e import L2E, L2EConfig  # noqa: E402
from megatron_l2e.l2e import kernels  # noqa: E402
from conftest import watch_penalty_grad_buffers  # noqa: E402


def _model():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, rotary_pct=0.25,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(cfg)


@pytest.mark.parametrize("inhibition,lam", [("regularizer", 1e-2), ("reverse_deactivation", 0.0)])
def test_auto_kernel_matches_reference_over_training_steps(inhibition, lam):
    base = _model()
    runs = {}
    for kernel in ("auto", "reference"):
        model = copy.deepcopy(base).train()
        cfg = L2EConfig(enabled=True, inhibition=inhibition, selection="threshold", ratio=0.05, lam=lam,
                        layers="mid2", late_start=2, warmup_steps=1, forget_steps=None, kernel=kernel)
        runs[kernel] = (model, L2E.attach(model, cfg, global_batch_size=4), torch.optim.SGD(model.parameters(), lr=0.05))
    assert kernels.resolve_backend("auto", torch.zeros(1)) == "cpu"

    # Where the fused penalty's z_out (a view of the block output z) gets its gradient, and where z's
    # gradient lands: the same buffer when the backward wrote into the incoming gradient in place —
    # what GPT-NeoX's next block (two layer norms and the residual add) hands over.
    model_auto, l2e_auto, _ = runs["auto"]
    in_place, watchers = watch_penalty_grad_buffers(model_auto, l2e_auto.sites)

    g = torch.Generator().manual_seed(1)
    threshold_phase = []        # metrics of the auto run's steps selected by the moving threshold
    for step in range(5):
        ids = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]   # 2 micro-batches of 2
        grads = {}
        for kernel, (model, l2e, opt) in runs.items():
            opt.zero_grad()
            for mb in ids:
                loss = model(input_ids=mb, labels=mb).loss
                pen = l2e.pop_penalty()
                (loss if pen is None else loss + pen).backward()
            grads[kernel] = [p.grad.clone() for p in model.parameters()]
            opt.step()
            l2e.step_end()
        for ga, gr in zip(grads["auto"], grads["reference"]):
            torch.testing.assert_close(ga, gr, rtol=1e-5, atol=1e-7)
        for i, site in runs["auto"][1].sites.items():
            ref = runs["reference"][1].sites[i]
            assert site.count == ref.count and site.scored_steps == ref.scored_steps
            torch.testing.assert_close(site.mean, ref.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(site.var, ref.var, rtol=1e-5, atol=1e-6)
            assert site.tau == pytest.approx(ref.tau, rel=1e-6, abs=1e-9), (step, i)
            if site.scored_steps > 1:
                threshold_phase.append(site.metrics())
    # The threshold phase was reached and selected (and, for the regularizer, penalised) something.
    assert any(m["selected_frac"] > 0 for m in threshold_phase)
    if inhibition == "regularizer":
        assert any(m["penalty"] != 0 for m in threshold_phase)
        assert in_place and all(in_place), in_place
    for w in watchers:
        w.remove()


def test_inplace_devices_allow_list(monkeypatch):
    """The in-place gradient add runs only on device types in the allow-list: CPU by default (proven by
    this suite), CUDA only by the explicit opt-in ``MEGATRON_L2E_INPLACE_GRAD``."""
    from megatron_l2e.l2e.kernels import fused

    monkeypatch.delenv(fused.INPLACE_ENV, raising=False)
    assert fused.inplace_devices() == {"cpu"}
    assert fused.inplace_allowed(torch.device("cpu")) and not fused.inplace_allowed(torch.device("cuda", 0))
    monkeypatch.setenv(fused.INPLACE_ENV, "cpu, CUDA")
    assert fused.inplace_devices() == {"cpu", "cuda"} and fused.inplace_allowed(torch.device("cuda", 0))
    monkeypatch.setenv(fused.INPLACE_ENV, "cuda")
    assert not fused.inplace_allowed(torch.device("cpu"))
    for off in ("none", "0"):
        monkeypatch.setenv(fused.INPLACE_ENV, off)
        assert fused.inplace_devices() == frozenset()


def test_out_of_place_add_gives_the_in_place_gradients(monkeypatch):
    """With CPU off the allow-list the fused penalty backward writes a new tensor (never into z_out's
    incoming gradient) and every parameter gradient is bit-identical to the in-place run's."""
    from megatron_l2e.l2e.kernels import fused

    base = _model()
    grads, where = {}, {}
    for name, env in (("in_place", None), ("out_of_place", "none")):
        if env is None:
            monkeypatch.delenv(fused.INPLACE_ENV, raising=False)
        else:
            monkeypatch.setenv(fused.INPLACE_ENV, env)
        model = copy.deepcopy(base).train()
        cfg = L2EConfig(enabled=True, inhibition="regularizer", selection="threshold", ratio=0.05, lam=1e-2,
                        layers="mid2", late_start=1, warmup_steps=1, forget_steps=None, kernel="auto")
        l2e = L2E.attach(model, cfg, global_batch_size=4)
        where[name], _ = watch_penalty_grad_buffers(model, l2e.sites)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        per_step = []
        for _ in range(4):
            opt.zero_grad()
            for _ in range(2):
                mb = torch.randint(0, 64, (2, 16), generator=g)
                loss = model(input_ids=mb, labels=mb).loss
                pen = l2e.pop_penalty()
                (loss if pen is None else loss + pen).backward()
            per_step.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            l2e.step_end()
        grads[name] = per_step
    assert where["in_place"] and all(where["in_place"])
    assert where["out_of_place"] and not any(where["out_of_place"])
    for step_a, step_b in zip(grads["in_place"], grads["out_of_place"]):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)
