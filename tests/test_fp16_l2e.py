"""L2E under mixed precision: loss scaling and overflow-skipped optimizer steps.

fp16 training multiplies the loss by a scale S before backward and divides the gradients by S before
the update (DeepSpeed's dynamic loss scale); a step whose gradients are not finite is skipped. L2E's
penalty joins the LM loss *before* ``engine.backward`` scales it, so

* the unscaled parameter gradients of ``S·(lm + pen)`` must equal those of ``lm + pen`` — checked by hand
  on a real (tiny) GPT-NeoX in fp32, and at the site kernel in fp16, where the scale is what keeps the
  penalty gradient from flushing to zero;
* a skipped step (``step_end(applied=False)``) must leave the L2E state exactly as it was — statistics,
  tau, phase counters — and the next applied step must merge only its own batch: the run is then
  bit-identical to one that never saw the skipped batch. Checked by hand-simulating the skip, and with
  real DeepSpeed ZeRO-1 in bf16 on CPU (DeepSpeed 0.19 checks bf16 gradients for overflow and skips the
  step) driven by the training loop's own ``train_step``. DeepSpeed refuses fp16 on CPU ("Type fp16 is
  not supported on your device"), so its fp16 variant runs on CUDA only (``pytest -m gpu``).
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from megatron_l2e.l2e import L2E, L2EConfig  # noqa: E402
from megatron_l2e.l2e import kernels  # noqa: E402

VOCAB, HIDDEN, SEQ = 64, 32, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                        attention_dropout=0.0, use_cache=False)
    return GPTNeoXForCausalLM(cfg).train()


def batches(n: int, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, SEQ), generator=g) for _ in range(n)]


def l2e_cfg(**kw) -> L2EConfig:
    base = dict(enabled=True, inhibition="regularizer", selection="threshold", layers=[1, 2], ratio=0.05,
                lam=1e-2, late_start=1, warmup_steps=3, forget_steps=3)
    base.update(kw)
    return L2EConfig(**base)


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x, use_cache=False).loss


def param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def l2e_state(l2e: L2E) -> dict:
    return copy.deepcopy(l2e.state_dict())


def assert_tree_equal(a, b, path: str = "", exact: bool = True) -> None:
    """Equality of nested dicts/lists of tensors and numbers: exact, or (``exact=False``) to fp32
    rounding for floats while integers (counts, phase counters) stay exact."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        if exact:
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]", exact)
    elif isinstance(a, float) and not exact:
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, (path, a, b)


def applied_step(model, l2e: L2E, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One optimizer step the way the training loop orders it: backward, optimizer step, then step_end."""
    opt.zero_grad(set_to_none=True)
    loss = lm_loss(model, x)
    pen = l2e.pop_penalty()
    (loss if pen is None else loss + pen).backward()
    opt.step()
    l2e.step_end(applied=True)


def warmed_up(seed: int = 0, steps: int = 3, **cfg_kw) -> tuple[GPTNeoXForCausalLM, L2E, list[torch.Tensor]]:
    """A tiny model with L2E attached, trained ``steps`` applied steps (scores exist afterwards)."""
    model = tiny_model(seed)
    l2e = L2E.attach(model, l2e_cfg(**cfg_kw), global_batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(steps + 1, seed=seed)
    for x in data[:steps]:
        applied_step(model, l2e, opt, x)
    return model, l2e, data


# ----------------------------------------------------------------------------------------------
# Loss scaling
# ----------------------------------------------------------------------------------------------

def scaled_grads(model, l2e: L2E, x: torch.Tensor, scale: float, *, penalty_inside: bool = True):
    """backward of scale·(lm + pen) (or the wrong scale·lm + pen), then the gradients unscaled by 1/scale.

    The micro-batch's L2E accumulators are dropped afterwards (``step_end(applied=False)``), so every
    call starts from the same state."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, x)
    pen = l2e.pop_penalty()
    assert pen is not None and pen.item() != 0.0, "the penalty must be active for this test to mean anything"
    total = scale * (loss + pen) if penalty_inside else scale * loss + pen
    total.backward()
    l2e.step_end(applied=False)
    return {n: g / scale for n, g in param_grads(model).items()}


@pytest.mark.parametrize("scale", [2.0 ** 12, 2.0 ** 16, 3000.0])
def test_penalty_under_loss_scale_unscales_to_the_unscaled_gradients(scale):
    # Exact top-k (k per sample, never an empty selection) after late start and warm-up.
    model, l2e, data = warmed_up(steps=5, selection="topk")
    assert l2e.sites[1].scored_steps >= l2e.sites[1].cfg.warmup_steps
    x = data[-1]
    ref = scaled_grads(model, l2e, x, 1.0)
    got = scaled_grads(model, l2e, x, scale)
    assert ref.keys() == got.keys()
    for name in ref:
        # fp32 tolerance relative to the tensor's scale: with a scale that is not a power of two the
        # gradient sums round differently, and an element that cancels to ~0 has no relative precision.
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= 1e-5 * ref[name].abs().max().item(), (name, err, ref[name].abs().max().item())
        if math.log2(scale).is_integer():
            assert torch.equal(got[name], ref[name]), name   # a power-of-two scale is exact in fp32

    # The check has power: the penalty moves the gradient well beyond that tolerance, so a loop that
    # added the penalty after scaling (scale·lm + pen) would be caught.
    model.zero_grad(set_to_none=True)
    lm_loss(model, x).backward()
    l2e.pop_penalty()
    l2e.step_end(applied=False)
    lm_only = param_grads(model)
    wrong = scaled_grads(model, l2e, x, scale, penalty_inside=False)
    name = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"     # upstream of the site at block 1
    pen_part = (ref[name] - lm_only[name]).norm()
    assert pen_part > 1e-3 * lm_only[name].norm()
    assert (wrong[name] - ref[name]).norm() > 0.5 * pen_part


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_site_gradient_needs_the_loss_scale(dtype):
    """At the site, fp16 activations get an fp16 gradient: λ·2d/(d² + ε) is ~1e-9 at Pythia's λ, below
    fp16's smallest subnormal (6e-8), so only the loss scale keeps it alive. After unscaling in fp32 it
    equals the formula (numpy, float64) to half-precision rounding on every element."""
    torch.manual_seed(0)
    B, S, H = 3, 8, 16
    mean = torch.randn(S, H)
    var = torch.rand(S, H) + 0.5
    z = (mean + var.sqrt() * torch.randn(B, S, H)).to(dtype)
    lam, eps, c = 1e-10, 1e-6, 0.01
    thr = kernels.kth_score(z, mean, var, 10, compensation=c, backend="reference")

    def site_grad(scale: float) -> torch.Tensor:
        zz = z.clone().requires_grad_(True)
        out = kernels.site_forward(zz, mean, var, thr, mean, mode="penalty", compensation=c, lam=lam, eps=eps,
                                   backend="reference")
        (out.loss * scale).backward()
        assert zz.grad.dtype == dtype
        return zz.grad.float() / scale

    # Independent reference in float64. The k-th element of each sample sits on its threshold (φ = thr
    # in fp32): elements within fp32 rounding of thr may fall either way and are left out.
    zd, md, vd = z.double().numpy(), mean.double().numpy(), var.double().numpy()
    phi = (zd - md) ** 2 / (vd + c * vd.mean())
    t = thr.double().numpy()[:, None, None]
    sure = np.abs(phi - t) > 1e-5 * t
    sel = phi >= t
    d = zd - md
    expected = np.where(sel, lam * 2 * d / (d ** 2 + eps), 0.0)
    assert (sel & sure).sum() >= 9 * B and (~sure).sum() <= B

    scaled = site_grad(2.0 ** 24).double().numpy()           # a scale DeepSpeed reaches on a calm run
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    np.testing.assert_allclose(scaled[sure], expected[sure], rtol=rtol, atol=0.0)
    unscaled = site_grad(1.0).double().numpy()
    if dtype == torch.float16:
        assert np.all(unscaled == 0.0), "without the loss scale the fp16 penalty gradient underflows"
    else:                                                    # bf16 has fp32's exponent range: no underflow
        np.testing.assert_allclose(unscaled[sure], expected[sure], rtol=rtol, atol=0.0)


# ----------------------------------------------------------------------------------------------
# Overflow-skipped steps, simulated by hand
# ----------------------------------------------------------------------------------------------

def skipped_step(model, l2e: L2E, x: torch.Tensor) -> None:
    """What DeepSpeed does on overflow: forward/backward ran, gradients are dropped, no update."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, x)
    pen = l2e.pop_penalty()
    (loss if pen is None else loss + pen).backward()
    model.zero_grad(set_to_none=True)
    l2e.step_end(applied=False)


@pytest.mark.parametrize("skip_at", [0, 1, 3, 4])
def test_skipped_step_changes_nothing_and_next_step_merges_only_its_batch(skip_at):
    """skip_at 0: before late start; 1: the first scored step; 3: the warm-up step that would set tau;
    4: the first threshold step (tau would move by eq. 6)."""
    data = batches(7, seed=3)
    skipped = batches(1, seed=99)[0]

    def run(with_skip: bool):
        model = tiny_model(seed=1)
        l2e = L2E.attach(model, l2e_cfg(), global_batch_size=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for i, x in enumerate(data):
            if with_skip and i == skip_at:
                before = l2e_state(l2e)
                skipped_step(model, l2e, skipped)
                after = l2e_state(l2e)
                if i == 0:   # the very first forward allocates the [S, H] statistics, all zeros, count 0
                    for sd in before["sites"].values():
                        assert sd["shape"] is None and sd["count"] == 0
                        sd.update(shape=[SEQ, HIDDEN], mean=torch.zeros(SEQ, HIDDEN), var=torch.zeros(SEQ, HIDDEN))
                assert_tree_equal(before, after, "l2e")       # count, mean, var, tau, phase counters
                assert l2e.pop_penalty() is None              # nothing of the skipped batch lingers
            applied_step(model, l2e, opt, x)
        return l2e_state(l2e), {n: p.detach().clone() for n, p in model.named_parameters()}

    state_skip, params_skip = run(True)
    state_ref, params_ref = run(False)
    assert_tree_equal(state_skip, state_ref, "l2e")
    assert_tree_equal(params_skip, params_ref, "params")
    site = state_ref["sites"]["1"]
    assert site["optimizer_steps"] == len(data) and site["scored_steps"] == len(data) - 1
    assert site["count"] == 3 * 4 + 4      # old count capped at forget_steps 3 × batch 4, plus this batch
    assert site["tau"] > 0


# ----------------------------------------------------------------------------------------------
# Real DeepSpeed: the training loop's own step, a step made to overflow
# ----------------------------------------------------------------------------------------------

L2E_YAML = "{enabled: true, layers: [0, 1], ratio: 0.05, lam: 1.0e-3, warmup_steps: 3, late_start: 1, forget_steps: 3}"


def _real_run(cfg, dist, data, steps: list[int], poison_step: int | None):
    """Build model + L2E + DeepSpeed engine as train.py does and run ``train_step`` for ``steps``."""
    from megatron_l2e import engine as eng
    from megatron_l2e.model import build_model
    from megatron_l2e.train import attach_l2e, seed_everything, train_step

    layout = eng.BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dist.world_size)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    l2e = attach_l2e(model, cfg, layout)
    engine, _, _ = eng.build_engine(model, cfg, dist, layout)
    first_param = next(p for p in engine.module.parameters() if p.requires_grad)
    results = []
    for s in steps:
        if s == poison_step:
            # A non-finite gradient, as an fp16 overflow produces: DeepSpeed must skip the update.
            before_l2e = l2e_state(l2e)
            before_params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            lr_before = engine.get_lr()[0]
            handle = first_param.register_hook(lambda g: torch.full_like(g, math.nan))
            r = train_step(engine, data, l2e, s, layout, dist)
            handle.remove()
            assert not r.applied and engine.skipped_steps == 1
            assert_tree_equal(before_l2e, l2e_state(l2e), "l2e")
            assert_tree_equal(before_params, {n: p.detach() for n, p in engine.module.named_parameters()},
                              "params")
            assert engine.get_lr()[0] == lr_before            # the schedule did not advance either
        else:
            r = train_step(engine, data, l2e, s, layout, dist)
            assert r.applied
        results.append(r)
    # L2E's phase clock counts exactly the updates the optimizer applied.
    for site in l2e.sites.values():
        assert site.optimizer_steps == engine.global_steps - engine.skipped_steps
    state = l2e_state(l2e)
    params = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
    return state, params, results


@pytest.mark.parametrize("precision,zero_stage", [
    ("bf16", 1),                                   # DeepSpeedZeroOptimizer (Pythia's stage)
    ("bf16", 0),       # the non-ZeRO mixed-precision wrapper (FP16_UnfusedOptimizer here): its own flag
    pytest.param("fp16", 1, marks=pytest.mark.gpu),  # dynamic loss scale: DeepSpeed refuses fp16 on CPU
])
def test_real_deepspeed_overflow_skip_keeps_l2e_in_step(precision, zero_stage, ds_world, tiny_data, tmp_path):
    from conftest import tiny_run_yaml

    from megatron_l2e.config import load_config
    from megatron_l2e.train import prepare_data

    yml = tmp_path / "run.yml"
    yml.write_text(tiny_run_yaml(tiny_data, tmp_path / "out", l2e=L2E_YAML, distributed=f"{{zero_stage: {zero_stage}}}",
                                 train=f"{{iters: 8, global_batch_size: 8, micro_batch_size: 4, "
                                       f"precision: {precision}}}"))
    cfg = load_config(yml)
    data = prepare_data(cfg, ds_world)
    # Step 3 would be the last warm-up step (it would set tau); skipping it must leave it for step 4.
    state_a, params_a, res_a = _real_run(cfg, ds_world, data, [0, 1, 2, 3, 4, 5], poison_step=3)
    state_b, params_b, res_b = _real_run(cfg, ds_world, data, [0, 1, 2, 4, 5], poison_step=None)
    # On CPU the two runs are bit-identical. CUDA kernels (embedding backward's atomics, cuBLAS split-K)
    # may round differently from run to run, so there the floats agree to fp32 rounding only.
    exact = ds_world.device.type == "cpu"
    assert_tree_equal(state_a, state_b, "l2e", exact)
    assert_tree_equal(params_a, params_b, "params", exact)
    assert_tree_equal([r.lm_loss for i, r in enumerate(res_a) if i != 3], [r.lm_loss for r in res_b],
                      "lm_loss", exact)
    site = state_a["sites"]["0"]
    assert site["optimizer_steps"] == 5 and site["scored_steps"] == 4 and site["tau"] > 0
    assert res_a[-1].penalty != 0.0                           # the regularizer was live on the last step


# ----------------------------------------------------------------------------------------------
# Penalty survival: how much of the penalty's gradient the training precision keeps
# ----------------------------------------------------------------------------------------------

def _survival_run(cfg, dist, data, steps: int) -> list[dict[str, float]]:
    """The training loop's own step on a real DeepSpeed engine, every step measured; metrics per step."""
    from megatron_l2e import engine as eng
    from megatron_l2e.model import build_model
    from megatron_l2e.train import attach_l2e, seed_everything, train_step

    layout = eng.BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dist.world_size)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    l2e = attach_l2e(model, cfg, layout)
    engine, _, _ = eng.build_engine(model, cfg, dist, layout)
    out = []
    for s in range(steps):
        l2e.set_measure_grad_ratio(True)
        assert train_step(engine, data, l2e, s, layout, dist).applied
        out.append(l2e.metrics())
    return out


@pytest.mark.parametrize("precision,lam,survives", [
    ("bf16", 1.0e-3, True),     # grad_ratio ~0.3: the penalty's gradient arrives
    ("bf16", 1.0e-10, False),   # grad_ratio ~1e-7: below bf16's half-ulp of the LM gradient, rounded away
    ("fp32", 1.0e-10, True),    # the same ratio in fp32 (half-ulp 6e-8 relative): it arrives
])
def test_penalty_survival_real_deepspeed(precision, lam, survives, ds_world, tiny_data, tmp_path):
    """DeepSpeed ZeRO-1 on CPU, the loop's own train_step: ``penalty_survival`` ≈ 1 where the penalty's
    gradient is large enough to change the training-precision sum, ≈ 0 where it rounds away. (Between
    the two it is partial and set by the few selected elements whose LM gradient is small: λ 1e-8,
    grad_ratio ~1e-5 here, survives ~0.15–0.2 in bf16.)"""
    from conftest import tiny_run_yaml

    from megatron_l2e.config import load_config
    from megatron_l2e.train import prepare_data

    yml = tmp_path / "run.yml"
    yml.write_text(tiny_run_yaml(
        tiny_data, tmp_path / "out", distributed="{zero_stage: 1}",
        l2e=f"{{enabled: true, layers: [0, 1], ratio: 0.05, lam: {lam}, warmup_steps: 1, late_start: 1}}",
        train=f"{{iters: 8, global_batch_size: 8, micro_batch_size: 4, precision: {precision}}}"))
    cfg = load_config(yml)
    metrics = _survival_run(cfg, ds_world, prepare_data(cfg, ds_world), steps=4)
    scored = [m for m in metrics if "l2e/layer0/penalty_survival" in m]
    assert len(scored) >= 2                          # late start 1, count ≥ 2: steps 2 and 3 (0-based 1, 2, 3)
    for m in scored:
        for i in (0, 1):
            ratio, surv = m[f"l2e/layer{i}/grad_ratio"], m[f"l2e/layer{i}/penalty_survival"]
            print(precision, lam, i, f"grad_ratio {ratio:.3g} survival {surv:.4f}")
            assert (1e-2 < ratio < 1.0) if lam > 1e-5 else (1e-9 < ratio < 1e-6), ratio
            if survives:
                assert 0.9 < surv < 1.1, surv
            else:
                assert surv < 0.05, surv
