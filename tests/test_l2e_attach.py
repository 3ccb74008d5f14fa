"""L2E attached to real (tiny) transformers GPT-NeoX models: lifecycle, scaling, checkpointing, identities."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from megatron_l2e.l2e import L2E, L2EConfig, resolve_layers  # noqa: E402
from megatron_l2e.l2e import functional as F  # noqa: E402

VOCAB, HIDDEN, SEQ = 64, 32, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(layers: int = 4, seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                        attention_dropout=0.0, use_cache=False)
    return GPTNeoXForCausalLM(cfg).train()


def batches(n: int, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, SEQ), generator=g) for _ in range(n)]


def l2e_cfg(**kw) -> L2EConfig:
    base = dict(enabled=True, inhibition="regularizer", lam=1e-2, late_start=0, warmup_steps=1, ratio=0.05)
    base.update(kw)
    return L2EConfig(**base)


def lm_loss(model, x):
    return model(input_ids=x, labels=x, use_cache=False).loss


def grads(model) -> dict[str, torch.Tensor]:
    # ".block." — the CheckpointInside wrapper below; names as in the unwrapped model
    return {n.replace(".block.", "."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def site_state(l2e: L2E) -> dict:
    return {i: s.state_dict() for i, s in l2e.sites.items()}


def assert_states_equal(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for i in a:
        for key, va in a[i].items():
            vb = b[i][key]
            if isinstance(va, torch.Tensor):
                if exact:
                    assert torch.equal(va, vb), (i, key)
                else:
                    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
            elif exact or not isinstance(va, float):
                assert va == vb, (i, key)
            else:
                assert va == pytest.approx(vb, rel=1e-6), (i, key)


def train_step(model, l2e: L2E | None, micro: list[torch.Tensor], opt=None):
    """One optimizer step with gradient accumulation over ``micro`` (DeepSpeed's 1/GAS by hand)."""
    model.zero_grad(set_to_none=True)
    gas = len(micro)
    losses = []
    for x in micro:
        loss = lm_loss(model, x)
        pen = l2e.pop_penalty() if l2e is not None else None
        total = loss if pen is None else loss + pen
        (total / gas).backward()
        if l2e is not None:
            l2e.micro_batch_end()                       # a no-op unless threshold_update: micro_batch
        losses.append(loss.detach())
    g = grads(model)
    if opt is not None:
        opt.step()
    if l2e is not None:
        l2e.step_end()
    return losses, g


@pytest.mark.parametrize("placement,expected", [
    ("mid2", {6: [2, 3], 24: [11, 12], 32: [15, 16]}),
    ("top_bottom", {6: [0, 5], 24: [0, 23], 32: [0, 31]}),
    ("mid_third", {6: [2, 3], 24: list(range(8, 16)), 32: list(range(11, 21))}),
    # the paper's 410M sentence read 1-based: "11th and 12th", "8th to 16th" of 24 layers (issue 15)
    ("mid2_literal", {6: [1, 2], 24: [10, 11], 32: [14, 15]}),
    ("mid_third_literal", {6: [1, 2, 3], 24: list(range(7, 16)), 32: list(range(10, 21))}),
])
def test_placements_match_design(placement, expected):
    for layers, idx in expected.items():
        assert resolve_layers(placement, layers) == idx


def test_attach_hooks_chosen_blocks_and_remove_detaches():
    model = tiny_model(6)
    l2e = L2E.attach(model, l2e_cfg(layers="top_bottom"), global_batch_size=4)
    assert sorted(l2e.sites) == [0, 5]
    hooked = [i for i, blk in enumerate(model.gpt_neox.layers) if blk._forward_hooks]
    assert hooked == [0, 5]
    l2e.remove()
    assert not any(blk._forward_hooks for blk in model.gpt_neox.layers)
    off = L2E.attach(model, l2e_cfg(enabled=False), global_batch_size=4)
    assert off.sites == {} and not any(blk._forward_hooks for blk in model.gpt_neox.layers)
    lm_loss(model, batches(1)[0])
    assert off.pop_penalty() is None and off.metrics() == {}
    with pytest.raises(ValueError, match="l2e.ratio"):
        L2E.attach(model, l2e_cfg(ratio=2.0), global_batch_size=4)


def test_monitor_only_is_bit_identical_to_no_l2e():
    ref = tiny_model()
    mon = copy.deepcopy(ref)
    l2e = L2E.attach(mon, l2e_cfg(inhibition="none", layers="top_bottom"), global_batch_size=4, loss_multiplier=2.0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_mon = torch.optim.AdamW(mon.parameters(), lr=1e-2)
    for step, x in enumerate(batches(4, 4)):
        l2e.set_measure_grad_ratio(step % 2 == 1)
        micro = [x[:2], x[2:]]
        loss_ref, g_ref = train_step(ref, None, micro, opt_ref)
        loss_mon, g_mon = train_step(mon, l2e, micro, opt_mon)
        assert all(torch.equal(a, b) for a, b in zip(loss_ref, loss_mon))
        assert g_ref.keys() == g_mon.keys() and all(torch.equal(g_ref[k], g_mon[k]) for k in g_ref)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), mon.parameters()))
    m = l2e.metrics()     # telemetry still runs: tau set, selection measured
    assert m["l2e/layer0/tau"] > 0 and m["l2e/layer3/tau"] > 0 and "l2e/layer0/phi_selected" in m
    assert "l2e/layer0/penalty" not in m


def test_eval_mode_is_identity_and_changes_no_state():
    model = tiny_model()
    l2e = L2E.attach(model, l2e_cfg(inhibition="reverse_deactivation"), global_batch_size=4)
    data = batches(4)
    for x in data[:3]:
        train_step(model, l2e, [x])
    x = data[3]
    train_out = model(input_ids=x).logits.detach()  # training mode: RD changes the forward
    l2e.step_end(applied=False)                     # drop that probe's accumulators
    before = copy.deepcopy(site_state(l2e))
    model.eval()
    with torch.no_grad():
        hooked = model(input_ids=x).logits
    assert l2e.pop_penalty() is None
    l2e.step_end()
    after = site_state(l2e)
    for st in after.values():
        st["optimizer_steps"] -= 1                   # the only change: the (empty) step was counted
    assert_states_equal(before, after)
    l2e.remove()
    with torch.no_grad():
        plain = model(input_ids=x).logits
    assert torch.equal(hooked, plain)
    assert not torch.equal(train_out, plain)        # the identity is not vacuous: training mode differs


def test_training_forward_without_autograd_fails_loudly():
    model = tiny_model()
    L2E.attach(model, l2e_cfg(), global_batch_size=4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="use_reentrant"):
        lm_loss(model, batches(1)[0])


class CheckpointInside(nn.Module):
    """Runs a block (hooks included) under torch.utils.checkpoint: the layout where a recompute re-runs hooks."""

    def __init__(self, block: nn.Module, reentrant: bool):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, hidden_states, **kwargs):
        return checkpoint(lambda h: self.block(h, **kwargs), hidden_states, use_reentrant=self.reentrant)


def _enable_checkpointing(model, how: str):
    if how == "hf":           # transformers' own (non-reentrant) activation checkpointing, as the lead enables it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:                     # hooks inside the checkpointed region
        layers = model.gpt_neox.layers
        for i in range(len(layers)):
            layers[i] = CheckpointInside(layers[i], reentrant=how == "inside_reentrant")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("how", ["hf", "inside"])
@pytest.mark.parametrize("inhibition,granularity", [("regularizer", "step"), ("reverse_deactivation", "step"),
                                                    ("regularizer", "micro_batch")])
def test_activation_checkpointing_on_off_identical(how, inhibition, granularity):
    """micro_batch: tau moves between micro-batches, after the backward — a recompute still sees its own."""
    base = tiny_model()
    plain = copy.deepcopy(base)
    ck = copy.deepcopy(base)
    cfg = l2e_cfg(inhibition=inhibition, layers="mid2", threshold_update=granularity)
    l2e_a = L2E.attach(base, cfg, global_batch_size=4, loss_multiplier=2.0)
    l2e_b = L2E.attach(ck, cfg, global_batch_size=4, loss_multiplier=2.0)
    _enable_checkpointing(ck, how)
    calls = []
    hooked = ck.gpt_neox.layers[1] if how == "hf" else ck.gpt_neox.layers[1].block
    hooked.register_forward_hook(lambda *a: calls.append(1), prepend=True)   # runs just before L2E's hook
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (base, ck, plain)]
    for step, x in enumerate(batches(4, 4)):
        micro = [x[:2], x[2:]]
        l2e_a.set_measure_grad_ratio(True)
        l2e_b.set_measure_grad_ratio(True)
        _, g_a = train_step(base, l2e_a, micro, opts[0])
        _, g_b = train_step(ck, l2e_b, micro, opts[1])
        _, g_p = train_step(plain, None, micro, opts[2])
        assert g_a.keys() == g_b.keys()
        for k in g_a:
            assert torch.equal(g_b[k], g_a[k]), k
        assert_states_equal(site_state(l2e_a), site_state(l2e_b), exact=True)
        assert l2e_a.metrics() == pytest.approx(l2e_b.metrics(), rel=1e-6)
        if step >= 1:   # scores exist: the inhibition must reach the parameters (not lost to recompute)
            assert any(not torch.allclose(g_a[k], g_p[k]) for k in g_a)
    # hf: hooks outside the checkpoint, 8 forwards. inside: + a recompute reaching the L2E hook for each
    # scored micro-batch (3 steps × 2); at step 0 the hook saves nothing, so the recompute stops before it.
    assert len(calls) == (14 if how == "inside" else 8)


@pytest.mark.parametrize("inhibition,selection", [("regularizer", "topk"), ("reverse_deactivation", "topk"),
                                                   ("regularizer", "threshold")])
def test_recompute_reuses_its_forwards_topk_thresholds(monkeypatch, inhibition, selection):
    """Hooks inside non-reentrant checkpointing: the recompute takes the thr[B] its forward selected with
    (warm-up, topk, RD) — as many exact top-k selections as without checkpointing — and the gradients
    and L2E state stay bit-identical. ``threshold``: exact top-k only during its 2 warm-up steps."""
    from megatron_l2e.l2e import kernels

    calls = {"plain": 0, "inside": 0}
    current = ["plain"]
    kth = kernels.kth_score

    def counting(*a, **k):
        calls[current[0]] += 1
        return kth(*a, **k)

    monkeypatch.setattr(kernels, "kth_score", counting)
    base = tiny_model()
    ck = copy.deepcopy(base)
    cfg = l2e_cfg(inhibition=inhibition, selection=selection, layers="mid2", warmup_steps=2)
    l2e_a = L2E.attach(base, cfg, global_batch_size=4, loss_multiplier=2.0)
    l2e_b = L2E.attach(ck, cfg, global_batch_size=4, loss_multiplier=2.0)
    _enable_checkpointing(ck, "inside")
    recomputes = []
    ck.gpt_neox.layers[1].block.register_forward_hook(
        lambda *a: recomputes.append(torch._C._current_graph_task_id() != -1), prepend=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (base, ck)]
    for x in batches(4, 4):
        micro = [x[:2], x[2:]]
        current[0] = "plain"
        _, g_a = train_step(base, l2e_a, micro, opts[0])
        current[0] = "inside"
        _, g_b = train_step(ck, l2e_b, micro, opts[1])
        for k in g_a:
            assert torch.equal(g_b[k], g_a[k]), k
        assert_states_equal(site_state(l2e_a), site_state(l2e_b), exact=True)
    # steps 1..3 are scored (late start 0, count ≥ 2 after step 0): 2 sites × 2 micro-batches each
    exact_steps = 3 if selection == "topk" else 2
    assert calls["plain"] == 2 * 2 * exact_steps
    assert sum(recomputes) >= 2 * exact_steps       # the recompute reached the site for those micro-batches
    assert calls["inside"] == calls["plain"]         # ... and selected nothing again
    assert sum(s.kth_calls for s in l2e_b.sites.values()) == calls["inside"]


def test_recompute_threshold_cache_is_per_input_and_step():
    """Unit rules of the cache: a recompute finds only its own forward's input (same object, same
    version); the same input twice in a step is ambiguous (select again); a step end forgets all."""
    from megatron_l2e.l2e import L2ESite

    site = L2ESite(0, l2e_cfg(), global_batch_size=4)
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    ta, tb = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    site._remember_thr(a, ta)
    site._remember_thr(b, tb)
    site._remember_thr(None, tb)                     # no key: nothing kept
    assert site._forward_thr(a) is ta and site._forward_thr(b) is tb
    assert site._forward_thr(torch.zeros(2, 3)) is None and site._forward_thr(None) is None
    b.add_(1.0)                                      # changed in place: no longer the forward's input
    assert site._forward_thr(b) is None
    site._remember_thr(a, tb)                        # a second forward on the same input
    assert site._forward_thr(a) is None
    del b                                            # dead inputs drop out at the next insert
    site._remember_thr(torch.ones(1), ta)
    assert len(site._thr_fwd) == 2
    site.discard()                                   # the step ended
    assert site._forward_thr(a) is None and site._thr_fwd == []


def test_reentrant_checkpointing_with_hooks_inside_fails_loudly():
    model = tiny_model()
    L2E.attach(model, l2e_cfg(), global_batch_size=4)
    _enable_checkpointing(model, "inside_reentrant")
    with pytest.raises(RuntimeError, match="use_reentrant"):
        lm_loss(model, batches(1)[0])


def test_penalty_scaling_across_accumulation():
    """One micro-batch of 4 vs two of 2 (loss_multiplier = GAS): same parameter gradients and site state."""
    one = tiny_model()
    two = copy.deepcopy(one)
    cfg = l2e_cfg(lam=5e-2)
    l2e_1 = L2E.attach(one, cfg, global_batch_size=4, loss_multiplier=1.0)
    l2e_2 = L2E.attach(two, cfg, global_batch_size=4, loss_multiplier=2.0)
    for x in batches(4, 4):
        _, g1 = train_step(one, l2e_1, [x])
        _, g2 = train_step(two, l2e_2, [x[:2], x[2:]])
        for k in g1:
            # The split changes the fp32 summation order of the per-sample terms, so an element's error
            # scales with the tensor's magnitude, not its own (BLAS kernels differ across CPUs: AVX2 vs
            # AVX-512 gave 1.9e-6 on a tensor of max 25 here): absolute tolerance relative to the tensor.
            scale = g1[k].abs().max().item()
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6 * scale + 1e-7, msg=k)
        assert_states_equal(site_state(l2e_1), site_state(l2e_2), exact=False)
    assert l2e_1.sites[1].scored_steps == 3


def test_grad_ratio_and_phi_selected_against_independent_computation():
    model = tiny_model()
    lm_only = copy.deepcopy(model)
    captured = {}
    model.gpt_neox.layers[2].register_forward_hook(lambda m, a, out: captured.__setitem__("z", out))
    lm_only.gpt_neox.layers[2].register_forward_hook(lambda m, a, out: captured.__setitem__("z_lm", out))
    cfg = l2e_cfg(lam=3e-3)
    l2e = L2E.attach(model, cfg, global_batch_size=4, loss_multiplier=3.0)
    data = batches(3)
    for x in data[:2]:
        train_step(model, l2e, [x])
    site = l2e.sites[2]
    mean, var, tau = site.mean.clone(), site.var.clone(), site.tau
    x = data[2]
    l2e.set_measure_grad_ratio(True)
    train_step(model, l2e, [x])
    m = l2e.metrics()
    # Independent: the LM gradient at the block output from a copy without L2E (same forward values),
    # the penalty gradient from eq. 5's closed form, scaled like the loss (× loss_multiplier).
    loss = lm_loss(lm_only, x)
    (g_lm,) = torch.autograd.grad(loss, captured["z_lm"])
    z = captured["z"].detach()
    g_pen = F.ms_penalty_grad(z, mean, var, tau, cfg.lam, cfg.eps, cfg.compensation) * 3.0
    assert m["l2e/layer2/grad_ratio"] == pytest.approx((g_pen.norm() / g_lm.norm()).item(), rel=1e-4)
    phi = F.ms_score(z, mean, var, cfg.compensation)
    sel = phi >= tau
    assert m["l2e/layer2/phi_selected"] == pytest.approx(phi[sel].mean().item(), rel=1e-5)
    assert m["l2e/layer2/selected_frac"] == pytest.approx(sel.float().mean().item(), abs=1e-9)
    pen = cfg.lam * torch.log((z - mean)[sel].square() + cfg.eps).sum()
    assert m["l2e/layer2/penalty"] == pytest.approx(pen.item(), rel=1e-5)
    # fp32 training: the penalty's gradient survives the add to the LM gradient (to fp32 rounding)
    assert m["l2e/layer2/penalty_survival"] == pytest.approx(F.penalty_survival(g_lm, g_pen), rel=1e-6)
    assert m["l2e/layer2/penalty_survival"] == pytest.approx(1.0, abs=1e-5)
    assert set(m) == {f"l2e/layer{i}/{k}" for i in (1, 2)
                      for k in ("tau", "selected_frac", "penalty", "grad_ratio", "penalty_survival", "phi_selected")}
    l2e.set_measure_grad_ratio(False)
    train_step(model, l2e, [x])
    assert "l2e/layer2/grad_ratio" not in l2e.metrics()


def test_dropout_control_drops_at_the_site():
    model = tiny_model()
    seen = {}
    model.gpt_neox.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("z", out.detach()))
    model.gpt_neox.layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("next", a[0].detach()))
    L2E.attach(model, l2e_cfg(inhibition="dropout", dropout_p=0.5), global_batch_size=4)
    lm_loss(model, batches(1)[0])
    z, nxt = seen["z"], seen["next"]
    kept = nxt != 0
    assert 0.45 < 1 - kept.float().mean().item() < 0.55
    torch.testing.assert_close(nxt[kept], z[kept] / 0.5, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        model(input_ids=batches(1)[0])
    assert torch.equal(seen["z"], seen["next"])


def test_state_dict_round_trip_weights_only(tmp_path):
    model = tiny_model()
    twin = copy.deepcopy(model)
    cfg = l2e_cfg(forget_steps=2)
    l2e = L2E.attach(model, cfg, global_batch_size=4)
    data = batches(5)
    for x in data[:3]:
        train_step(model, l2e, [x])
    torch.save(l2e.state_dict(), tmp_path / "l2e.pt")
    twin.load_state_dict(model.state_dict())
    l2e_twin = L2E.attach(twin, cfg, global_batch_size=4)
    l2e_twin.load_state_dict(torch.load(tmp_path / "l2e.pt", weights_only=True))
    assert_states_equal(site_state(l2e), site_state(l2e_twin))
    for x in data[3:]:
        _, g = train_step(model, l2e, [x])
        _, g_twin = train_step(twin, l2e_twin, [x])
        assert all(torch.equal(g[k], g_twin[k]) for k in g)
        assert_states_equal(site_state(l2e), site_state(l2e_twin))
        assert l2e.metrics() == l2e_twin.metrics()
    other = L2E.attach(tiny_model(), l2e_cfg(layers="top_bottom"), global_batch_size=4)
    with pytest.raises(ValueError, match="blocks"):
        other.load_state_dict(l2e.state_dict())


def test_changed_sequence_length_is_rejected():
    model = tiny_model()
    L2E.attach(model, l2e_cfg(inhibition="none"), global_batch_size=4)
    lm_loss(model, batches(1)[0])
    with pytest.raises(ValueError, match="fixed sequence length"):
        lm_loss(model, torch.randint(0, VOCAB, (4, SEQ + 4)))


def test_tuple_block_outputs_are_handled():
    """transformers 4.x blocks return (hidden, ...): the site rewrites element 0 and keeps the rest."""
    class TupleBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x), "extra"

    model = nn.Module()
    model.gpt_neox = nn.Module()
    model.gpt_neox.layers = nn.ModuleList([TupleBlock() for _ in range(2)])
    l2e = L2E.attach(model, l2e_cfg(inhibition="reverse_deactivation", layers=[1], ratio=0.25, selection="topk"),
                     global_batch_size=3)
    blk = model.gpt_neox.layers[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = blk(torch.randn(3, 4, 8, generator=g))
        assert isinstance(out, tuple) and out[1] == "extra"
        l2e.step_end()
    site = l2e.sites[1]
    x = torch.randn(3, 4, 8, generator=g)
    with torch.no_grad():
        raw = blk.lin(x)
    out = blk(x)
    thr = F.kth_largest(F.ms_score(raw, site.mean, site.var), site.k)
    sel = F.ms_score(raw, site.mean, site.var) >= thr[:, None, None]
    assert out[1] == "extra" and sel.sum() == 3 * site.k
    torch.testing.assert_close(out[0].detach(), torch.where(sel, site.mean.expand_as(raw), raw), rtol=0, atol=0)


def test_one_packed_all_reduce_per_step_over_all_sites():
    model = tiny_model()
    seen = []

    def all_reduce(t: torch.Tensor) -> None:     # a 1-rank group: SUM is the identity; record the call
        seen.append((t.dtype, t.numel()))

    l2e = L2E.attach(model, l2e_cfg(layers="mid_third"), global_batch_size=4, all_reduce=all_reduce)
    n = SEQ * HIDDEN
    for x in batches(3):
        train_step(model, l2e, [x[:2], x[2:]])
    l2e.step_end(applied=False)                  # a skipped step runs no collective
    per_site = 2 * n + 10                        # sum_d, sum_d2, 10 scalars
    assert seen == [(torch.float64, len(l2e.sites) * per_site)] + [(torch.float32, len(l2e.sites) * per_site)] * 2
