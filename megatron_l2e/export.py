"""Export a training checkpoint to a Hugging Face folder (safetensors + config + tokenizer).

``python -m megatron_l2e.export --checkpoint RUN/checkpoints/TAG --out DIR [--dtype fp32|fp16|bf16]``
(``RUN`` or ``RUN/checkpoints`` pick the checkpoint ``latest`` names; a weights-only
``RUN/checkpoints/hf_step<N>`` folder is accepted too). The weights are the run's fp32 master weights
(for fp16/bf16 training they live in DeepSpeed's optimizer state, not in the 16-bit module), cast to
``--dtype`` (default fp32). The folder loads with ``AutoModelForCausalLM.from_pretrained`` and lm-eval's
``hf`` model as is. Nothing is unpickled: DeepSpeed's files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from megatron_l2e.checkpoint import (WEIGHTS_TAG_RE, CheckpointError, _allow_deepspeed_globals, step_of,
                                     weights_only_torch_load)
from megatron_l2e.config import Config, ConfigError, config_from_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN_YAML = "megatron_l2e_run.yaml"          # the run's resolved config, next to the weights


def is_hf_folder(p: Path) -> bool:
    """A complete Hugging Face model folder: config and weights (one file or the sharded index)."""
    return (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def resolve_checkpoint(path: str | Path) -> Path:
    """``RUN``, ``RUN/checkpoints``, ``RUN/checkpoints/global_step<N>`` or ``…/hf_step<N>`` → the folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file or directory")
    for cand in (p / "checkpoints", p):
        if (cand / "latest").is_file():
            return cand / (cand / "latest").read_text().strip()
    if p.is_dir() and step_of(p.name) is not None:
        return p
    if p.is_dir() and WEIGHTS_TAG_RE.match(p.name) and is_hf_folder(p):
        return p
    raise CheckpointError(f"--checkpoint {path}: not a checkpoint (expected RUN/checkpoints/global_step<N> "
                          f"or RUN/checkpoints/hf_step<N>)")


def checkpoint_config(ckpt: Path) -> Config:
    f = next((c for c in (ckpt / "config.yaml", ckpt / RUN_YAML) if c.is_file()), None)
    if f is None:
        raise CheckpointError(f"{ckpt}: config.yaml is missing (incomplete checkpoint?)")
    return config_from_dict(yaml.safe_load(f.read_text()), source=str(f))


def load_module_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The module's weights as DeepSpeed saved them (the training dtype; ZeRO 0/1/2 only)."""
    _allow_deepspeed_globals()
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt}: no mp_rank_*_model_states.pt (incomplete checkpoint?)")
    return torch.load(files[0], map_location="cpu", weights_only=True)["module"]


def load_fp32_masters(ckpt: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a DeepSpeed checkpoint folder.

    * ZeRO 1/2/3: DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32``), which joins every
      rank's fp32 partition from the optimizer-state files (read with ``weights_only=True``);
    * ZeRO 0, fp32: the module's weights are the masters;
    * ZeRO 0, fp16/bf16: DeepSpeed's FP16 optimizer keeps an fp32 copy of each parameter in
      ``mp_rank_00_model_states.pt``'s optimizer state (no DeepSpeed utility reads it: zero_to_fp32
      needs ZeRO optimizer files), matched to names through the run's own parameter groups.
    """
    stage, precision = cfg.distributed.zero_stage, cfg.train.precision
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k: v.float() for k, v in state.items()}
    if precision == "fp32":
        return {k: v.float() for k, v in load_module_state(ckpt).items()}
    return _zero0_optimizer_masters(ckpt, cfg)


def _zero0_optimizer_masters(ckpt: Path, cfg: Config) -> dict[str, torch.Tensor]:
    from megatron_l2e.model import build_model, param_groups

    _allow_deepspeed_globals()
    f = ckpt / "mp_rank_00_model_states.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: no mp_rank_00_model_states.pt (incomplete checkpoint?)")
    opt = torch.load(f, map_location="cpu", weights_only=True, mmap=True).get("optimizer") or {}
    model = build_model(cfg.model, meta=True)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [[(name_of[id(p)], p.shape) for p in g["params"]] for g in param_groups(model, 0.0)]
    if "fp32_groups" in opt:                               # FP16_UnfusedOptimizer: one tensor per parameter
        tensors = [list(g) for g in opt["fp32_groups"]]
    elif "fp32_groups_flat" in opt:                        # FP16_Optimizer: one flat tensor per group
        tensors = [list(flat.split([s.numel() for _, s in g])) for g, flat in zip(groups, opt["fp32_groups_flat"])]
    else:
        raise CheckpointError(f"{f}: no fp32 master weights in the optimizer state")
    state = {}
    if [len(g) for g in groups] != [len(g) for g in tensors]:
        raise CheckpointError(f"{f}: optimizer groups do not match the config's model")
    for g, ts in zip(groups, tensors):
        for (name, shape), t in zip(g, ts):
            if t.numel() != shape.numel():
                raise CheckpointError(f"{f}: master of {name} has {t.numel()} elements, expected {shape.numel()}")
            state[name] = t.float().reshape(shape)
    return state


def write_hf_folder(out_dir: str | Path, state: dict[str, torch.Tensor], cfg: Config) -> Path:
    """Write ``state`` (names as in ``GPTNeoXForCausalLM``) as a Hugging Face folder: ``save_pretrained``
    safetensors + config (dtype = the tensors'), the run's tokenizer and its resolved config YAML."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    from megatron_l2e.model import hf_config

    config = hf_config(cfg.model, attn_implementation="sdpa")
    with torch.device("meta"):                             # no allocation, no random init
        model = GPTNeoXForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    if cfg.data.tokenizer:
        try:
            AutoTokenizer.from_pretrained(cfg.data.tokenizer).save_pretrained(out)
        except (OSError, ValueError) as exc:
            print(f"warning: tokenizer {cfg.data.tokenizer} not saved ({str(exc).splitlines()[0]})", file=sys.stderr)
    (out / RUN_YAML).write_text(cfg.to_yaml())
    return out


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write ``out_dir`` as a Hugging Face model folder of the fp32 masters cast to ``dtype``; returns it."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint_dir)
    cfg = checkpoint_config(ckpt)
    if WEIGHTS_TAG_RE.match(ckpt.name):                    # a weights-only save: already the fp32 masters
        from transformers import GPTNeoXForCausalLM

        state = GPTNeoXForCausalLM.from_pretrained(ckpt, dtype=torch.float32, local_files_only=True).state_dict()
    else:
        state = load_fp32_masters(ckpt, cfg)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    return write_hf_folder(out_dir, state, cfg)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):            # one line, exit 2 (argparse prints usage + message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m megatron_l2e.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="RUN/checkpoints/global_step<N> (or RUN: its latest), or RUN/checkpoints/hf_step<N>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="weight dtype of the folder (the fp32 masters, cast) [fp32]")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(ckpt, args.out, args.dtype)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} → {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
