"""Pythia parity: HF config fields, parameter counts, init, parameter groups, lr schedule."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig

from megatron_l2e.config import load_config
from megatron_l2e.engine import lr_at
from megatron_l2e.model import build_model, count_parameters, hf_config, param_groups

ROOT = Path(__file__).resolve().parents[1]

# The released config.json files of EleutherAI/pythia-{70m,410m,2.8b}-deduped (Hugging Face hub).
RELEASED = {
    "70m": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
            "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
            "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
            "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304},
    "410m": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
             "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 16,
             "num_hidden_layers": 24, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
             "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304},
    "2.8b": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
             "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 32,
             "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
             "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304},
}
PARAMS = {"70m": 70_426_624, "410m": 405_334_016, "2.8b": 2_775_208_960}
FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
          "max_position_embeddings", "hidden_act", "layer_norm_eps", "use_parallel_residual",
          "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters"]


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_pythia_config_parity(size):
    cfg = load_config(ROOT / f"configs/runs/{size}/baseline.yml")
    ours = hf_config(cfg.model, attn_implementation="sdpa").to_dict()
    released = GPTNeoXConfig(**RELEASED[size]).to_dict()
    for f in FIELDS:
        assert ours[f] == released[f], f
    assert count_parameters(build_model(cfg.model, meta=True)) == PARAMS[size]


def test_pythia_recipe_values():
    cfg = load_config(ROOT / "configs/runs/2.8b/baseline.yml")
    assert (cfg.optimizer.lr, cfg.schedule.min_lr_ratio, cfg.optimizer.betas, cfg.optimizer.eps) == \
        (1.6e-4, 0.1, [0.9, 0.95], 1e-8)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.grad_clip, cfg.schedule.warmup) == (0.1, 1.0, 0.01)
    assert (cfg.train.global_batch_size, cfg.model.seq_length, cfg.train.iters) == (1024, 2048, 14300)
    assert cfg.distributed.zero_stage == 1 and cfg.train.precision == "fp16"
    assert cfg.train.fp16.initial_scale_power == 12 and cfg.train.fp16.loss_scale_window == 1000
    assert cfg.checkpoint.extra_steps == [0] + [2**i for i in range(10)]
    assert cfg.model.checkpoint_activations


def test_init_std_per_parameter_group():
    cfg = load_config(ROOT / "configs/pythia/70m.yml").model
    torch.manual_seed(0)
    model = build_model(cfg)
    d, L = 512, 6
    small, wang = math.sqrt(2 / (5 * d)), 2 / (L * math.sqrt(d))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name or "final_layer_norm" in name:
            assert torch.all(p == 1), name
        else:
            want = wang if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")) else small
            assert abs(p.std().item() / want - 1) < 0.02, (name, p.std().item(), want)
            assert abs(p.mean().item()) < 0.05 * want, name


def test_weight_decay_exactly_off_for_biases_and_layernorm():
    model = build_model(load_config(ROOT / "configs/smoke/cpu.yml").model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    want_nd = {n for n, _ in model.named_parameters()
               if n.endswith("bias") or any(isinstance(m, nn.LayerNorm) and n.startswith(mn + ".")
                                            for mn, m in model.named_modules())}
    assert nd == want_nd and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in decay["params"])


def _gpt_neox_annealing_lr(step, lr, min_lr, warmup_iter, end_iter):
    """GPT-NeoX megatron/learning_rates.py AnnealingLR.get_lr (cosine), written out independently."""
    if warmup_iter > 0 and step <= warmup_iter:
        return lr * step / warmup_iter
    if step > end_iter:
        return min_lr
    n, end = step - warmup_iter, end_iter - warmup_iter
    return max(min_lr + (lr - min_lr) / 2.0 * (math.cos(math.pi * n / end) + 1), min_lr)


@pytest.mark.parametrize("overlay, end", [(None, 143000), ("configs/overlays/short-schedule.yml", 14300)])
def test_lr_schedule_matches_gpt_neox(overlay, end):
    """The paper presets cut Pythia's cosine (decay 143,000) off at 14,300; the overlay shortens it."""
    cfg = load_config([ROOT / "configs/runs/70m/baseline.yml"] + ([ROOT / overlay] if overlay else []))
    assert cfg.train.iters == 14300 and cfg.decay_iters == end
    for step in [0, 1, 50, 142, 143, 144, 1000, 7150, 14299, 14300, 20000]:
        want = _gpt_neox_annealing_lr(step, 1e-3, 1e-4, 0.01 * end, end)
        assert lr_at(step, cfg) == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert lr_at(0, cfg) == 0.0
    zero = load_config(ROOT / "configs/runs/70m/baseline.yml", ["optimizer.lr=0"])
    assert all(lr_at(s, zero) == 0.0 for s in (0, 10, 5000, 14300))
