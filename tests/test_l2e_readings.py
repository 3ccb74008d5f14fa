"""The paper's readings behind switches (issue 15, docs/reproduction.md), each against an independent reference.

* ``l2e.penalty_per_samples`` — a literal GPT-NeoX loop (eq. 5 summed per N-sample micro-batch, added to
  that micro-batch's mean CE, losses averaged over micro-batches) gives the same parameter gradients as
  ours at any micro-batch / accumulation / data-parallel layout;
* ``l2e.threshold_update: micro_batch`` — eq. 6 by hand per micro-batch, 2 ranks == 1 rank, 2 % held on a
  frozen model (both granularities), skipped steps, a loop that forgets ``micro_batch_end``;
* ``configs/overlays/literal-eq1.yml`` — a numpy replay of eq. 1 over the full history (no compensation,
  no forgetting), with the warm-up and eq. 6 by hand;
* the schedule and the presets — the cosine formula by hand, Pythia's micro-batches, rd/memel.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from test_l2e_attach import batches, grads, lm_loss, tiny_model  # noqa: E402
from test_l2e_site import FakeGroup  # noqa: E402

from megatron_l2e.config import load_config  # noqa: E402
from megatron_l2e.l2e import L2E, L2EConfig, L2ESite  # noqa: E402
from megatron_l2e.l2e import functional as F  # noqa: E402
from megatron_l2e.l2e.site import micro_batch_end_sites, step_end_sites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# penalty_per_samples: the GPT-NeoX reading, layout-invariant
# ----------------------------------------------------------------------------------------------

def _gpt_neox_reference_step(model, monitor: L2E, cfg: L2EConfig, x: torch.Tensor, n: int, opt) -> dict:
    """One optimizer step as a GPT-NeoX implementation of eq. 5 would take it: the global batch ``x`` in
    micro-batches of ``n`` samples; each micro-batch's loss = its mean CE + λ·Σ_{selected} log((z − mean)² + ε)
    over ITS samples (selection against the statistics as they stood before the step, exactly as the site
    does); the optimizer sees the mean over micro-batches (DeepSpeed's 1/GAS and rank averaging).
    ``monitor`` (inhibition: none) keeps the statistics and tau; the penalty is computed here by hand."""
    sites = monitor.sites
    captured: dict[int, torch.Tensor] = {}
    hooks = [model.gpt_neox.layers[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
             for i in sites]
    state = {i: (s.mean.clone(), s.var.clone(), s.tau, s.scoring(), s.exact_topk()) if s.mean is not None
             else None for i, s in sites.items()}
    model.zero_grad(set_to_none=True)
    micro = x.split(n)
    for xm in micro:
        loss = lm_loss(model, xm)
        for i, st in state.items():
            if st is None or not st[3]:
                continue
            mean, var, tau, _, exact = st
            z = captured[i]
            phi = F.ms_score(z.detach(), mean, var, cfg.compensation)
            thr = F.kth_largest(phi, sites[i].k) if exact else torch.full((z.shape[0],), tau)
            sel = phi >= thr.reshape(-1, 1, 1)
            d = z.float() - mean
            loss = loss + cfg.lam * torch.where(sel, torch.log(d.square() + cfg.eps), 0).sum()
        (loss / len(micro)).backward()
    for h in hooks:
        h.remove()
    g = grads(model)
    opt.step()
    monitor.step_end()
    return g


def _ours_step(model, l2e: L2E, x: torch.Tensor, layout: list[list[int]], opt) -> dict:
    """One optimizer step through L2E.attach's path at a micro-batch layout per rank; data-parallel ranks
    are simulated on one replica: each rank's gradient is taken in turn and averaged (DeepSpeed's mean)."""
    dp = len(layout)
    model.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    start = 0
    for sizes in layout:
        model.zero_grad(set_to_none=True)
        for b in sizes:
            loss = lm_loss(model, x[start:start + b])
            pen = l2e.pop_penalty()
            ((loss if pen is None else loss + pen) / len(sizes)).backward()
            start += b
        for k, v in grads(model).items():
            total[k] = total.get(k, 0) + v / dp
    for n_, p in model.named_parameters():
        p.grad = total.get(n_)
    opt.step()
    l2e.step_end()
    return total


# Equal micro-batches only: the mean CE of unequal micro-batches is not the global mean (in any loop).
@pytest.mark.parametrize("layout", [[[8]], [[2, 2, 2, 2]], [[4], [4]], [[2, 2], [2, 2]], [[1] * 4, [1] * 4]],
                         ids=lambda lay: "x".join("+".join(map(str, r)) for r in lay))
def test_penalty_per_samples_is_gpt_neox_objective_at_any_layout(layout):
    """Fixed N = 4 of GB = 8: the literal per-micro-batch objective == ours, whatever the actual layout."""
    cfg = L2EConfig(enabled=True, inhibition="regularizer", lam=3e-2, late_start=0, warmup_steps=2, ratio=0.05,
                    penalty_per_samples=4)
    ref_model, our_model = tiny_model(seed=3), tiny_model(seed=3)
    monitor = L2E.attach(ref_model, dataclasses.replace(cfg, inhibition="none"), global_batch_size=8)
    ours = L2E.attach(our_model, cfg, global_batch_size=8, loss_multiplier=float(len(layout[0]) * len(layout)))
    opt_r = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    opt_o = torch.optim.SGD(our_model.parameters(), lr=0.5)
    for step, x in enumerate(batches(5, 8, seed=7)):
        g_ref = _gpt_neox_reference_step(ref_model, monitor, cfg, x, 4, opt_r)
        g_our = _ours_step(our_model, ours, x, layout, opt_o)
        for k in g_ref:
            scale = g_ref[k].abs().max().item()
            torch.testing.assert_close(g_our[k], g_ref[k], rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=f"{step} {k}")
    site = ours.sites[1]
    assert site.scored_steps == 4 and site.tau > 0        # warm-up, then the moving threshold
    # the telemetry is the term as it enters the objective: λ·(N/GB)·Σ over the global batch
    assert site.lam == pytest.approx(3e-2 * 4 / 8)


def test_penalty_per_samples_scales_lambda_exactly():
    """λ·(N/GB) on the global batch's sum: N = GB is the global-batch reading, N = 1 is 1/GB of it."""
    z = torch.randn(6, 4, 8) * 3
    results = {}
    for n in (None, 6, 3, 1):
        site = L2ESite(0, L2EConfig(enabled=True, late_start=0, warmup_steps=1, lam=0.5, ratio=0.1,
                                    penalty_per_samples=n), 6)
        site.forward(z + 1)
        step_end_sites([site])
        site.forward(z)
        (pen,) = site.pop_pending()
        results[n] = pen.item()
    assert results[6] == results[None]
    assert results[3] == pytest.approx(results[None] / 2, rel=1e-6)
    assert results[1] == pytest.approx(results[None] / 6, rel=1e-6)


def test_penalty_per_samples_larger_than_global_batch_is_a_config_error():
    from megatron_l2e.config import ConfigError

    with pytest.raises(ConfigError, match="l2e.penalty_per_samples: 32-sample micro-batches do not fit"):
        load_config(ROOT / "configs/runs/70m/l2e.yml", ["train.global_batch_size=16", "train.micro_batch_size=16"])
    with pytest.raises(ConfigError, match="penalty_per_samples: must be ≥ 1"):
        load_config(ROOT / "configs/runs/70m/l2e.yml", ["l2e.penalty_per_samples=0"])


# ----------------------------------------------------------------------------------------------
# threshold_update: micro_batch
# ----------------------------------------------------------------------------------------------

S, H = 8, 16


def _mb_cfg(**kw) -> L2EConfig:
    base = dict(enabled=True, inhibition="none", late_start=1, warmup_steps=1, ratio=0.05,
                threshold_update="micro_batch")
    base.update(kw)
    return L2EConfig(**base)


def _stream(steps: int, gb: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    offset, scale = torch.randn(S, H, generator=g) * 10, torch.rand(S, H, generator=g) + 0.2
    return [offset + scale * torch.randn(gb, S, H, generator=g) for _ in range(steps)]


def test_micro_batch_update_is_eq6_per_micro_batch_and_rank_invariant():
    """2 ranks × 2 micro-batches of 2 == 1 rank × 2 micro-batches of 4 (micro-batch j = both ranks' j-th),
    and each update is eq. 6 with that micro-batch's count, checked by hand from numpy scores."""
    cfg = _mb_cfg()
    steps = _stream(6, 8)
    one = L2ESite(0, cfg, 8)
    taus = []
    for z in steps:
        for j in range(2):
            zj = torch.cat([z[2 * j:2 * j + 2], z[4 + 2 * j:4 + 2 * j + 2]])   # rank 0's j-th + rank 1's j-th
            before = (one.mean.clone(), one.var.clone(), one.tau) if one.mean is not None else None
            thresholded = one.scoring() and not one.exact_topk()
            one.forward(zj)
            micro_batch_end_sites([one])
            if thresholded:
                mean, var, tau = before
                phi = ((zj.double() - mean.double()) ** 2 / (var.double() + 0.01 * var.double().mean())).numpy()
                want = tau + ((phi >= tau).sum() / 4 - one.k) / (S * H)
                assert one.tau == pytest.approx(want, rel=1e-9, abs=1e-12)
                taus.append(one.tau)
        step_end_sites([one])
    assert len(taus) == 8 and len(set(taus)) == 8        # 4 threshold steps × 2 updates, each moving tau

    group = FakeGroup(2)
    two = [L2ESite(0, cfg, 8) for _ in range(2)]

    def rank(r: int):
        for z in steps:
            for j in range(2):
                two[r].forward(z[4 * r + 2 * j:4 * r + 2 * j + 2])
                micro_batch_end_sites([two[r]], group.all_reduce(r))
            step_end_sites([two[r]], group.all_reduce(r))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert two[0].tau == two[1].tau and torch.equal(two[0].mean, two[1].mean)     # identical on every rank
    assert two[0].tau == pytest.approx(one.tau, rel=1e-6)
    torch.testing.assert_close(two[0].mean, one.mean, rtol=1e-6, atol=1e-5)


def test_step_granularity_ignores_micro_batch_end():
    """threshold_update: step moves tau once per step with the global mean, whatever micro_batch_end does."""
    steps = _stream(5, 8)
    a, b = L2ESite(0, _mb_cfg(threshold_update="step"), 8), L2ESite(0, _mb_cfg(threshold_update="step"), 8)
    for z in steps:
        a.forward(z)
        step_end_sites([a])
        for half in (z[:4], z[4:]):
            b.forward(half)
            micro_batch_end_sites([b])
        step_end_sites([b])
    assert a.tau == pytest.approx(b.tau, rel=1e-6) and a.scored_steps == 4


def test_micro_batch_update_skipped_step_and_missing_call():
    steps = _stream(5, 8)
    site = L2ESite(0, _mb_cfg(), 8)
    for z in steps[:3]:
        site.forward(z)
        step_end_sites([site])
    assert not site.exact_topk()
    tau = site.tau
    site.forward(steps[3][:4])
    micro_batch_end_sites([site])
    assert site.tau != tau
    step_end_sites([site], applied=False)               # an fp16 overflow: the step changes nothing
    assert site.tau == tau
    site.forward(steps[3][:4])
    with pytest.raises(RuntimeError, match=r"call L2E.micro_batch_end\(\)"):
        site.forward(steps[3][4:])                      # the loop forgot micro_batch_end


@pytest.mark.parametrize("granularity", ["step", "micro_batch"])
def test_controller_holds_ratio_on_a_frozen_model(granularity):
    """Acceptance: a frozen (untrained, lr 0) GPT-NeoX, random tokens, 2 micro-batches per step: after
    warm-up the selected fraction stays at 2 % ± 0.25 pp (means over 50-step windows)."""
    model = tiny_model(layers=4, seed=1)
    cfg = L2EConfig(enabled=True, inhibition="none", ratio=0.02, threshold_update=granularity)  # MEmeL defaults
    l2e = L2E.attach(model, cfg, global_batch_size=16)
    g = torch.Generator().manual_seed(0)
    fracs = []
    with torch.no_grad():                                 # inhibition none needs no graph
        for step in range(260):
            for _ in range(2):
                x = torch.randint(0, 64, (8, 16), generator=g)
                model(input_ids=x)
                l2e.micro_batch_end()
            l2e.step_end()
            fracs.append([v for k, v in l2e.metrics().items() if k.endswith("selected_frac")])
    tail = np.array(fracs[60:])                          # [200 steps, 2 sites]
    windows = tail.reshape(4, 50, -1).mean(1)
    assert np.all(np.abs(windows - 0.02) <= 0.0025), windows


# ----------------------------------------------------------------------------------------------
# configs/overlays/literal-eq1.yml: eq. 1 over the full history
# ----------------------------------------------------------------------------------------------

def test_literal_eq1_overlay_equals_numpy_eq1_over_full_history():
    cfg = load_config([ROOT / "configs/smoke/cpu.yml", ROOT / "configs/overlays/literal-eq1.yml"]).l2e
    assert (cfg.compensation, cfg.forget_steps) == (0.0, None)
    cfg = dataclasses.replace(cfg, lam=1e-3, late_start=2, warmup_steps=3, ratio=0.05)
    b, n_neurons = 6, S * H
    k = round(0.05 * n_neurons)
    site = L2ESite(0, cfg, b)
    history: list[np.ndarray] = []
    tau, scored, warm = 0.0, 0, []
    for step, z in enumerate(_stream(14, b, seed=5)):
        zz = z.double().numpy()
        seen = np.concatenate(history) if history else np.zeros((0, S, H))
        scoring = step >= cfg.late_start and len(seen) >= 2
        site.forward(z)
        if scoring:
            mean, var = seen.mean(0), seen.var(0, ddof=1)            # eq. 1: every earlier sample, unbiased S²
            np.testing.assert_allclose(site.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(site.var.numpy(), var, rtol=1e-4, atol=1e-6)
            phi = (zz - mean) ** 2 / var                              # no compensation
            flat = phi.reshape(b, -1)
            if scored < cfg.warmup_steps:
                kth = -np.sort(-flat, axis=1)[:, k - 1]
                sel, warm = flat >= kth[:, None], warm + list(kth)
            else:
                sel = flat >= tau
            pen = cfg.lam * np.log(((zz - mean) ** 2).reshape(b, -1)[sel] + cfg.eps).sum()
        step_end_sites([site])
        m = site.metrics()
        if scoring:
            assert m["penalty"] == pytest.approx(pen, rel=1e-4)
            assert abs(m["selected_frac"] * b * n_neurons - sel.sum()) <= 1   # a tie at fp32 rounding at most
            if scored < cfg.warmup_steps:
                if scored + 1 == cfg.warmup_steps:
                    tau = float(np.mean(warm))
            else:
                tau += (sel.sum() / b - k) / n_neurons
            scored += 1
            assert site.tau == pytest.approx(tau, rel=1e-5)
        history.append(zz)
    assert scored == 12 and site.count == 14 * b                  # nothing forgotten


# ----------------------------------------------------------------------------------------------
# Schedule and presets
# ----------------------------------------------------------------------------------------------

def _cosine_lr(step: int, lr: float, warmup: int, decay: int) -> float:
    """GPT-NeoX AnnealingLR by hand (min_lr = lr/10), the reference for the dry-run figure."""
    if step <= warmup:
        return lr * step / warmup
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))


@pytest.mark.parametrize("overlay, decay, warmup", [(None, 143_000, 1_430),
                                                    ("configs/overlays/short-schedule.yml", 14_300, 143)])
def test_dry_run_shows_the_schedule(overlay, decay, warmup):
    from megatron_l2e.train import dry_run_report

    paths = [ROOT / "configs/runs/70m/l2e.yml"] + ([ROOT / overlay] if overlay else [])
    report = dry_run_report(load_config(paths))
    last = _cosine_lr(14_299, 1e-3, warmup, decay)
    assert f"warm-up {warmup:,} steps, decay over {decay:,} steps" in report
    assert f"lr at the last step {last:.3g}" in report
    assert f"{last:.3g}" == ("0.000982" if overlay is None else "0.0001")


PYTHIA_MICRO = {"70m": 32, "410m": 32, "2.8b": 16}      # EleutherAI/pythia's train_micro_batch_size_per_gpu


@pytest.mark.parametrize("size", sorted(PYTHIA_MICRO))
def test_paper_presets(size):
    runs = ROOT / "configs/runs" / size
    rd, memel = load_config(runs / "rd.yml").l2e, load_config(runs / "memel.yml").l2e
    assert (rd.selection, rd.inhibition) == ("threshold", "reverse_deactivation")       # Table 9: inhibition only
    assert (memel.selection, memel.inhibition, memel.compensation, memel.forget_steps) == \
        ("topk", "reverse_deactivation", 0.01, 10)                                      # MEmeL as in Table 2
    assert load_config(ROOT / f"configs/pythia/{size}.yml").train.micro_batch_size == PYTHIA_MICRO[size]
    for f in sorted(runs.glob("l2e*.yml")):
        cfg = load_config(f, ["train.micro_batch_size=1"])      # a literal: not read from the micro-batch
        assert cfg.l2e.penalty_per_samples == PYTHIA_MICRO[size], f.name
        assert (cfg.l2e.threshold_update, cfg.l2e.layers in ("mid2", "mid_third", "top_bottom")) == ("step", True)
        assert cfg.decay_iters == 143_000 and cfg.train.iters == 14_300


# ----------------------------------------------------------------------------------------------
# inhibition: decorrelation (Yan et al.'s counter-hypothesis, per sample)
# ----------------------------------------------------------------------------------------------

def test_decorrelation_value_against_numpy_and_gradient_against_naive_autograd():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(6, 6, generator=g)                        # correlated features
    z = (torch.randn(3, 20, 6, generator=g, dtype=torch.float64) @ mix.double()).requires_grad_(True)
    got = F.decorrelation(z, eps=0.0)
    for b in range(3):
        c = np.corrcoef(z[b].detach().numpy().T)
        want = (c[~np.eye(6, dtype=bool)] ** 2).mean()
        assert got[b].item() == pytest.approx(want, rel=1e-10)
    w = torch.randn(3, dtype=torch.float64, generator=g)
    (gz,) = torch.autograd.grad((got * w).sum(), z)
    naive = sum(wb * ((torch.corrcoef(z[b].T) * (1 - torch.eye(6, dtype=torch.float64))) ** 2).sum() / 30
                for b, wb in enumerate(w))
    (gn,) = torch.autograd.grad(naive, z)
    torch.testing.assert_close(gz, gn, rtol=1e-8, atol=1e-12)
    assert F.decorrelation(torch.randn(2, 50, 4, generator=g) @ torch.eye(4)).max() < 0.1    # ~independent


@pytest.mark.parametrize("layout", [[[4, 4]], [[4], [4]], [[2, 2], [2, 2]]], ids=["2x4", "4|4", "2+2|2+2"])
def test_decorrelation_is_layout_invariant_and_logged(layout):
    """1 rank × 1 micro-batch of 8 == the same step at any (accumulation, data-parallel) layout."""
    cfg = L2EConfig(enabled=True, inhibition="decorrelation", lam=0.3, layers=[1, 2])
    ref_model, our_model = tiny_model(seed=5), tiny_model(seed=5)
    ref = L2E.attach(ref_model, cfg, global_batch_size=8, loss_multiplier=1.0)
    ours = L2E.attach(our_model, cfg, global_batch_size=8, loss_multiplier=float(len(layout[0]) * len(layout)))
    opt_r = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    opt_o = torch.optim.SGD(our_model.parameters(), lr=0.5)
    for x in batches(3, 8, seed=11):
        g_ref = _ours_step(ref_model, ref, x, [[8]], opt_r)
        g_our = _ours_step(our_model, ours, x, layout, opt_o)
        for k in g_ref:
            scale = g_ref[k].abs().max().item()
            torch.testing.assert_close(g_our[k], g_ref[k], rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=k)
    m = ours.metrics()
    assert 0 < m["l2e/layer1/decorrelation"] < 1
    assert m["l2e/layer1/penalty"] == pytest.approx(0.3 * 8 * m["l2e/layer1/decorrelation"], rel=1e-5)
    assert m == pytest.approx(ref.metrics(), rel=1e-5)
    # the term reaches the parameters below the sites: λ = 0 gives other gradients there
    x = batches(1, 8, seed=12)[0]
    grads_at = {}
    for lam in (0.0, 0.3):
        model = tiny_model(seed=5)
        l2e = L2E.attach(model, dataclasses.replace(cfg, lam=lam), global_batch_size=8)
        grads_at[lam] = _ours_step(model, l2e, x, [[8]], torch.optim.SGD(model.parameters(), lr=0.0))
    key = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    assert not torch.allclose(grads_at[0.0][key], grads_at[0.3][key])
