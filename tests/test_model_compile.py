"""``model.compile: true``: each block's attention and MLP compiled with torch.compile (inductor, CPU).

* in process (default suite): a tiny Pythia-style model, L2E attached and transformers' activation
  checkpointing on, compiled vs eager over a few optimizer steps — the same losses, gradients and L2E
  state to fp32 tolerance, unchanged parameter names, no graph break, one graph per module class;
* a real run (``-m slow``): ``python -m megatron_l2e.train`` through DeepSpeed for 20 steps with and
  without ``model.compile``: per-step losses equal to fp32 tolerance.

Inductor compiles on the first step: 35–40 s on 2 shared cores with a cold cache (the tiny model's two
graphs, forward and backward); its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, default
``/tmp/torchinductor_$USER``) makes later processes take a few seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from megatron_l2e.config import ModelConfig
from megatron_l2e.l2e import L2E, L2EConfig
from megatron_l2e.model import build_model, compile_blocks, enable_activation_checkpointing
from megatron_l2e.train import lm_loss_of

VOCAB, SEQ = 320, 32          # conftest's tiny run shapes: the slow test's graphs hit this test's cache


def _tiny() -> ModelConfig:
    return ModelConfig(name="tiny", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=VOCAB,
                       seq_length=SEQ, attn_implementation="sdpa")


def test_compiled_blocks_train_like_eager_with_l2e_and_checkpointing(monkeypatch):
    from torch import _dynamo
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    # inductor's pool of compile workers only competes for 2 shared cores (cold cache: 60 s with it, 40 without)
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    _dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model(_tiny()).train()
    comp = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    runs = {}
    for name, model in (("eager", eager), ("compiled", comp)):
        model.config.use_cache = False
        enable_activation_checkpointing(model)
        cfg = L2EConfig(enabled=True, inhibition="regularizer", selection="threshold", layers=[0, 1], ratio=0.05,
                        lam=1e-3, late_start=1, warmup_steps=1)
        l2e = L2E.attach(model, cfg, global_batch_size=8, loss_multiplier=2.0)
        if name == "compiled":
            compile_blocks(model)
        runs[name] = (model, l2e, torch.optim.AdamW(model.parameters(), lr=5e-3))
    # compiled in place: no OptimizedModule, no `_orig_mod.` — checkpoints and export see the same names
    assert list(comp.state_dict()) == keys
    assert all(type(b.attention).__name__ == "GPTNeoXAttention" for b in comp.gpt_neox.layers)

    g = torch.Generator().manual_seed(1)
    for step in range(4):
        rows = [torch.randint(0, VOCAB, (4, SEQ + 1), generator=g) for _ in range(2)]
        out = {}
        for name, (model, l2e, opt) in runs.items():
            opt.zero_grad(set_to_none=True)
            l2e.set_measure_grad_ratio(step == 3)
            losses = []
            for x in rows:
                loss = lm_loss_of(model, x)
                pen = l2e.pop_penalty()
                ((loss if pen is None else loss + pen) / 2).backward()
                losses.append(loss.detach())
            out[name] = (losses, {n: p.grad.clone() for n, p in model.named_parameters()}, l2e.state_dict())
            opt.step()
            l2e.step_end()
        (la, ga, sa), (lb, gb, sb) = out["eager"], out["compiled"]
        torch.testing.assert_close(torch.stack(lb), torch.stack(la), rtol=1e-5, atol=1e-6)
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        for i, site in sa["sites"].items():
            other = sb["sites"][i]
            assert site["count"] == other["count"] and site["scored_steps"] == other["scored_steps"]
            torch.testing.assert_close(other["mean"], site["mean"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other["var"], site["var"], rtol=1e-4, atol=1e-6)
    m_e, m_c = runs["eager"][1].metrics(), runs["compiled"][1].metrics()
    assert m_c["l2e/layer1/penalty"] != 0.0                 # the regularizer was live through compiled blocks
    assert m_c["l2e/layer1/grad_ratio"] == pytest.approx(m_e["l2e/layer1/grad_ratio"], rel=1e-3)
    # attention + MLP: one graph each for both blocks (parameters are graph inputs), no graph break
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_refused_with_zero3():
    from megatron_l2e.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.compile"):
        load_config([str(Path(__file__).resolve().parents[1] / "configs/smoke/cpu.yml")],
                    ["model.compile=true", "distributed.zero_stage=3"])


@pytest.mark.slow
def test_compiled_training_run_matches_eager_over_20_steps(tiny_data, tmp_path):
    """A real DeepSpeed run (CPU/gloo, fp32, ZeRO-1, activation checkpointing, L2E regularizer through
    warm-up into the moving threshold): 20 steps' losses equal to fp32 tolerance. ~20 s eager + ~50 s
    compiled with a cold inductor cache on 2 shared cores (~25 s warm)."""
    from conftest import run_train, tiny_run_yaml

    l2e = "{enabled: true, layers: [0, 1], ratio: 0.05, lam: 1.0e-3, warmup_steps: 3, late_start: 1}"
    losses = {}
    for name in ("eager", "compiled"):
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(tiny_run_yaml(
            tiny_data, tmp_path / name, l2e=l2e,
            model=f"{{name: tiny, num_layers: 2, hidden_size: 32, num_attention_heads: 2, vocab_size: {VOCAB}, "
                  f"seq_length: {SEQ}, checkpoint_activations: true, compile: {str(name == 'compiled').lower()}}}",
            train="{iters: 20, global_batch_size: 8, micro_batch_size: 4, precision: fp32}",
            checkpoint="{interval: 0, extra_steps: [], save_final: false}"))
        run_train(["--config", str(cfg)], timeout=900, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r for r in recs if "lm_loss" in r]
    assert len(losses["eager"]) == len(losses["compiled"]) == 20
    for a, b in zip(losses["eager"], losses["compiled"]):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5), a["step"]
        assert b["penalty"] == pytest.approx(a["penalty"], rel=1e-3, abs=1e-6), a["step"]
    assert losses["compiled"][-1]["penalty"] != 0.0
