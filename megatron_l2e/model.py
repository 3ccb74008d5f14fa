"""Pythia GPT-NeoX from the config: transformers' reference implementation + GPT-NeoX's init.

We train ``transformers.GPTNeoXForCausalLM`` itself (not a fork): it loads every released Pythia
checkpoint, and lm-eval evaluates what we export without conversion.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_l2e.config import ModelConfig


def hf_config(cfg: ModelConfig, attn_implementation: str | None = None) -> GPTNeoXConfig:
    """The transformers config of a Pythia-style model (field names as in Pythia's config.json)."""
    return GPTNeoXConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=cfg.hidden_act,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_emb_base,
        max_position_embeddings=cfg.seq_length,
        layer_norm_eps=cfg.layer_norm_eps,
        use_parallel_residual=cfg.use_parallel_residual,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        use_cache=True,
        attn_implementation=attn_implementation or resolve_attn_implementation(cfg.attn_implementation),
    )


def resolve_attn_implementation(choice: str) -> str:
    """``auto``: flash-attn 2 when on CUDA and installed (and deterministic algorithms are not
    requested: its backward is not deterministic), else PyTorch SDPA."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and not torch.are_deterministic_algorithms_enabled():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """(std of GPT-NeoX's init_method, std of its output_layer_init_method).

    small_init (Nguyen & Salazar 2019): sqrt(2 / (5·d)); wang_init (Wang, GPT-J): 2 / (L·sqrt(d)).
    """
    d, L = cfg.hidden_size, cfg.num_layers
    table = {"small_init": math.sqrt(2.0 / (5.0 * d)), "wang_init": 2.0 / (L * math.sqrt(d)),
             "normal": cfg.init_std}
    return table[cfg.init_method], table[cfg.output_layer_init_method]


@torch.no_grad()
def pythia_init_(model: GPTNeoXForCausalLM, cfg: ModelConfig) -> None:
    """GPT-NeoX's initialisation, in place.

    Every Linear/Embedding weight ~ N(0, std_init) except the two projections that write into the
    residual stream (attention ``dense`` and MLP ``dense_4h_to_h``), which get the depth-scaled
    ``output_layer_init_method`` std; all biases 0; LayerNorm weight 1, bias 0.
    """
    std_in, std_out = init_stds(cfg)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            is_output = name.endswith("attention.dense") or name.endswith("mlp.dense_4h_to_h")
            module.weight.normal_(0.0, std_out if is_output else std_in)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def build_model(cfg: ModelConfig, *, meta: bool = False) -> GPTNeoXForCausalLM:
    """A freshly initialised Pythia GPT-NeoX (fp32; the engine casts for bf16/fp16).

    ``meta=True`` builds on the meta device (shapes only: parameter counts of 12B in milliseconds).
    """
    config = hf_config(cfg, attn_implementation="sdpa" if meta else None)
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        model = GPTNeoXForCausalLM(config)
    if not meta:
        pythia_init_(model, cfg)
    from megatron_l2e.loss import install_loss_head
    install_loss_head(model, cfg.loss_impl, cfg.loss_chunk_size)   # lm_head computes the loss itself
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_weight_decay(module_name: str, module: nn.Module, param_name: str) -> bool:
    """GPT-NeoX's parameter groups: biases and LayerNorm parameters are not decayed."""
    return isinstance(module, nn.LayerNorm) or param_name == "bias"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and (weight_decay 0) biases + LayerNorm parameters."""
    decay, no_decay = [], []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if no_weight_decay(mname, module, pname) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def enable_activation_checkpointing(model: GPTNeoXForCausalLM) -> None:
    """Per-block activation checkpointing (Pythia: checkpoint-num-layers 1), *non-reentrant*.

    Reentrant checkpointing runs the first forward under no_grad, which would silently drop an L2E
    penalty computed in a block hook; the non-reentrant variant keeps the autograd graph.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):       # transformers ≥ 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def compile_blocks(model: GPTNeoXForCausalLM, **compile_kwargs) -> None:
    """``torch.compile`` the attention and the MLP of every block, in place (``model.compile: true``).

    ``nn.Module.compile`` compiles a module's call without wrapping it (no ``OptimizedModule``, no
    ``_orig_mod.`` in parameter names), so state_dict keys, checkpoints and the Hugging Face export are
    those of the eager model. The block itself stays eager: the L2E site is a forward hook on
    ``gpt_neox.layers[i]`` and sees the same block output a compiled attention/MLP feed into the
    (eager) residual adds. Blocks share one compiled graph per module class (parameters are graph
    inputs), so a deep model compiles two graphs, not two per block. Activation checkpointing wraps
    the block's forward, outside the compiled regions.
    """
    for block in model.gpt_neox.layers:
        block.attention.compile(**compile_kwargs)
        block.mlp.compile(**compile_kwargs)
