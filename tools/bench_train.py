#!/usr/bin/env python
"""Training throughput with L2E off / MEmeL / exact top-k (No-Thr) / moving threshold, side by side in one run.

    python tools/bench_train.py                                  # 70M, 410M, 2.8B on the visible GPU
    python tools/bench_train.py --models 70m --micro-batch 16 --steps 10 --reps 5 --json out.json
    torchrun --nproc_per_node 8 tools/bench_train.py --models 70m,410m,2.8b   # one 8-GPU node
    python tools/bench_train.py --model-config configs/smoke/cpu.yml --quick  # CPU figure (tiny model)

For each model one DeepSpeed engine is built exactly as ``python -m megatron_l2e.train`` builds it
(``megatron_l2e.engine``/``model``, the config's precision, ZeRO stage, activation checkpointing) and
every step is the training loop's own ``train_step``. The modes share the engine: before a mode's
steps its L2E sites are attached (their state carried over from the mode's previous block), after them
removed. Repetitions are interleaved (off, memel, topk, threshold, then rotated), each block starting with one
untimed step; the figures are medians over all timed steps of a mode. Inputs are uniform random tokens
(the step cost does not depend on the text). L2E modes run with ``late_start 0`` and one warm-up step,
primed by ``--warmup`` untimed steps, so every timed step is in its phase: exact top-k for ``topk``
and ``memel``, ``φ ≥ tau`` for ``threshold``. ``memel`` is Table 2's MEmeL row: the L2E settings of
``configs/runs/70m/memel.yml`` (per-sample exact top-k + Reverse Deactivation; the same at every size).

MFU = (6·N + 12·L·H·S)·tokens/s / (peak · GPUs) — N the parameters doing matmuls (all but the input
embedding, a lookup), 12·L·H·S the attention score/value matmuls per token forward + backward (PaLM's
convention: causal masking not discounted); activation-checkpoint recompute is not counted (that would
be HFU). Peak: dense bf16/fp16 per GPU (``PEAK_TFLOPS``), or ``--peak-tflops``. On a CPU the figures
are labelled as CPU figures and MFU is not given.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_l2e import engine as eng
from megatron_l2e.config import Config, ConfigError, load_config
from megatron_l2e.model import build_model, count_parameters, enable_activation_checkpointing
from megatron_l2e.train import activation_checkpointing, attach_l2e, seed_everything, train_step

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"70m": "configs/pythia/70m.yml", "410m": "configs/pythia/410m.yml", "2.8b": "configs/pythia/2.8b.yml"}
MODES = ("off", "memel", "topk", "threshold")
MEMEL_PRESET = "configs/runs/70m/memel.yml"     # its l2e method keys define the "memel" mode
MEMEL_KEYS = ("inhibition", "selection", "delta", "compensation", "forget_steps", "k")
# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets. Matched
# against torch.cuda.get_device_name() in this order (first hit wins).
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
               ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


class UsageError(Exception):
    """A bad argument: one line on stderr, exit 2."""


# ----------------------------------------------------------------------------------------------
# Inputs and figures
# ----------------------------------------------------------------------------------------------

class RandomTokens:
    """``train_step``'s data interface over uniform random tokens, reproducible per (step, micro, rank)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def micro_batch(self, step: int, micro_index: int, micro_batch_size: int, dp_rank: int,
                    dp_world: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, step, micro_index, dp_rank)) % 2**63)
        return torch.randint(0, self.vocab_size, (micro_batch_size, self.seq_length + 1), generator=g)


def flops_per_token(model: torch.nn.Module, cfg: Config) -> tuple[int, float]:
    """(N matmul parameters, training FLOPs per token = 6·N + 12·L·H·S)."""
    n = count_parameters(model) - model.get_input_embeddings().weight.numel()
    m = cfg.model
    return n, 6.0 * n + 12.0 * m.num_layers * m.hidden_size * m.seq_length


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ModeRun:
    """One mode's attached L2E state between its blocks of steps, and its timings."""

    name: str
    cfg: Config
    state: dict | None = None
    times: list[float] = field(default_factory=list)
    peak_mem: int = 0
    phase: str = "off"


# ----------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------

def mode_config(base: Config, mode: str) -> Config:
    cfg = copy.deepcopy(base)
    if mode == "off":
        cfg.l2e.enabled = False
    elif mode == "memel":
        memel = load_config(ROOT / MEMEL_PRESET).l2e
        cfg.l2e.enabled = True
        for key in MEMEL_KEYS:
            setattr(cfg.l2e, key, getattr(memel, key))
    else:
        cfg.l2e.enabled = True
        cfg.l2e.selection = mode
    if mode != "off":
        cfg.l2e.late_start = 0      # scores from the second step on
        cfg.l2e.warmup_steps = 1    # one exact top-k step, then the mode's own selection
    return cfg


def phase_of(l2e) -> str:
    if l2e is None:
        return "off"
    site = next(iter(l2e.sites.values()))
    if not site.scoring():
        return "not scoring"
    return "exact top-k" if site.exact_topk() else "threshold"


def run_mode_block(mr: ModeRun, engine, data, layout, dist, step0: int, timed: int, settle: int) -> int:
    """Attach the mode's L2E (restoring its state), run ``settle`` untimed + ``timed`` timed steps, detach."""
    model = engine.module
    l2e = attach_l2e(model, mr.cfg, layout)
    if l2e is not None and mr.state is not None:
        l2e.load_state_dict(mr.state)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    step = step0
    for i in range(settle + timed):
        sync(dist.device)
        t0 = time.perf_counter()
        train_step(engine, data, l2e, step, layout, dist)
        sync(dist.device)
        if i >= settle:
            mr.times.append(time.perf_counter() - t0)
        step += 1
    if dist.device.type == "cuda":
        mr.peak_mem = max(mr.peak_mem, torch.cuda.max_memory_allocated(dist.device))
    if l2e is not None:
        mr.phase = phase_of(l2e)
        mr.state = l2e.state_dict()
        l2e.remove()
    return step


def bench_model(name: str, cfg: Config, dist, args) -> dict:
    layout = eng.BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dist.world_size)
    layout.check()
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    checkpointing = activation_checkpointing(cfg, dist)[0]      # auto: as train.py decides
    if checkpointing:
        enable_activation_checkpointing(model)
    n_matmul, fpt = flops_per_token(model, cfg)
    n_params = count_parameters(model)
    engine, _, _ = eng.build_engine(model, cfg, dist, layout)
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, cfg.train.seed)
    runs = [ModeRun(m, mode_config(cfg, m)) for m in args.modes]

    step = 0
    for mr in runs:                     # priming: L2E statistics exist and the phase is reached
        step = run_mode_block(mr, engine, data, layout, dist, step, timed=0, settle=args.warmup)
    for rep in range(args.reps):        # interleaved, rotated so no mode always follows the same one
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]
        for mr in order:
            step = run_mode_block(mr, engine, data, layout, dist, step, timed=args.steps, settle=1)

    tokens_per_step = layout.global_batch_size * cfg.model.seq_length
    peak = peak_tflops(dist.device, cfg.train.precision, args.peak_tflops)
    out = {"model": name, "config_name": cfg.model.name, "parameters": n_params, "matmul_parameters": n_matmul,
           "flops_per_token": fpt, "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
           "seq_length": cfg.model.seq_length, "micro_batch_size": layout.micro_batch_size,
           "grad_accum": layout.grad_accum, "global_batch_size": layout.global_batch_size,
           "tokens_per_step": tokens_per_step, "precision": cfg.train.precision,
           "zero_stage": cfg.distributed.zero_stage, "attn_implementation": getattr(engine.module.config, "_attn_implementation", None),
           "activation_checkpointing": checkpointing,
           "l2e_layers": cfg.l2e.layers, "l2e_ratio": cfg.l2e.ratio, "modes": {}}
    base = None
    for mr in runs:
        med = statistics.median(mr.times)
        tps = tokens_per_step / med
        r = {"step_time_s": med, "step_times_s": mr.times, "tokens_per_s": tps,
             "mfu": (fpt * tps / (peak * 1e12 * dist.world_size)) if peak else None,
             "phase": mr.phase, "peak_memory_gb": mr.peak_mem / 2**30 if mr.peak_mem else None,
             "l2e": ({"inhibition": mr.cfg.l2e.inhibition, "selection": mr.cfg.l2e.selection}
                     if mr.cfg.l2e.enabled else None)}
        if mr.name == "off":
            base = med
        out["modes"][mr.name] = r
    for r in out["modes"].values():
        r["overhead_pct"] = 100.0 * (r["step_time_s"] / base - 1.0) if base else None
    del engine, model, runs
    gc.collect()
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

MODE_LABEL = {"off": "off", "memel": "MEmeL (top-k + RD)", "topk": "top-k (No-Thr)", "threshold": "threshold (L2E)"}


def fmt_table(report: dict) -> str:
    gpus = (f"{report['world_size']}×{report['device_name']}" if report["device"] == "cuda"
            else f"CPU ({report['device_name']})")
    lines = ["| model | GPUs | L2E | step time (s) | tokens/s | MFU | overhead vs off |",
             "|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        if "error" in res:
            lines.append(f"| {res['model']} | {gpus} | – | {res['error']} | | | |")
            continue
        for mode, r in res["modes"].items():
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "–"
            ovh = "–" if mode == "off" or r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f} %"
            lines.append(f"| {res['model']} | {gpus} | {MODE_LABEL[mode]} | {r['step_time_s']:.4f} | "
                         f"{r['tokens_per_s']:,.0f} | {mfu} | {ovh} |")
    return "\n".join(lines)


def torchrun_hint(argv: list[str], n_gpus: int) -> str:
    return f"torchrun --nproc_per_node {n_gpus} tools/bench_train.py " + " ".join(argv)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench_train.py", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="70m,410m,2.8b",
                   help=f"comma-separated Pythia sizes among {', '.join(MODELS)} (default: all three)")
    p.add_argument("--model-config", action="append", metavar="FILE",
                   help="benchmark this run/model YAML instead of --models (repeatable: one model each)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every model, e.g. --set model.seq_length=1024")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated among off, memel, topk, threshold")
    p.add_argument("--micro-batch", type=int, help="micro-batch per GPU (default: the model config's)")
    p.add_argument("--grad-accum", type=int, default=1, help="accumulation steps per optimizer step (default 1)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode per repetition (default 10)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed priming steps per mode (≥ 2; default 3)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: the GPU table)")
    p.add_argument("--quick", action="store_true", help="2 timed steps × 1 repetition (a smoke test of the tool)")
    p.add_argument("--json", metavar="FILE", help="also write the full report (every step time) as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.warmup = 2, 1, 2
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown mode {bad[0] if bad else '(none)'!r}; choose among {', '.join(MODES)}")
    if "off" in args.modes:   # the baseline goes first: overheads are relative to it
        args.modes = ["off"] + [m for m in args.modes if m != "off"]
    for name in ("steps", "reps", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 2:
        p.error(f"--warmup must be ≥ 2 (L2E scores need one merged step first), got {args.warmup}")
    if args.micro_batch is not None and args.micro_batch < 1:
        p.error(f"--micro-batch must be ≥ 1, got {args.micro_batch}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.model_config:
        args.targets = [(Path(f).stem, f) for f in args.model_config]
    else:
        names = [n.strip().lower() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODELS]
        if unknown or not names:
            p.error(f"--models: unknown size {unknown[0] if unknown else '(none)'!r}; choose among {', '.join(MODELS)}")
        args.targets = [(n, str(ROOT / MODELS[n])) for n in names]
    return args


def bench_config(path: str, args, world: int) -> Config:
    """The model's config with the benchmark's batch layout, precision and quiet logging."""
    cfg = load_config(path, args.set)
    mb = args.micro_batch or cfg.train.micro_batch_size
    cfg.train.micro_batch_size = mb
    cfg.train.global_batch_size = mb * args.grad_accum * world
    if args.precision != "auto":
        cfg.train.precision = args.precision
    else:
        cfg.train.precision = "bf16" if torch.cuda.is_available() else "fp32"
    cfg.train.iters = 10**9                  # no schedule end within the benchmark
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        cfgs = [(name, bench_config(path, args, eng.launch_env()[1])) for name, path in args.targets]
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except eng.LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        dist = eng.init_distributed(cfgs[0][1])
    except eng.LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cuda = dist.device.type == "cuda"
    if dist.is_main and cuda and dist.world_size == 1 and torch.cuda.device_count() > 1:
        print(f"[bench_train] {torch.cuda.device_count()} GPUs visible, this process uses one. For all of them:\n"
              f"  {torchrun_hint(argv, torch.cuda.device_count())}", flush=True)
    report = {"device": dist.device.type,
              "device_name": torch.cuda.get_device_name(dist.device) if cuda else _cpu_name(),
              "world_size": dist.world_size, "cpu_figure": not cuda,
              "torch": torch.__version__, "modes": args.modes, "steps": args.steps, "reps": args.reps,
              "warmup": args.warmup, "results": []}
    if not cuda:
        report["note"] = "CPU figure: measured on a CPU, not a GPU; MFU not given"
        if dist.is_main:
            print("[bench_train] CPU FIGURE — measured on a CPU, not a GPU (MFU not given)", flush=True)
    for name, cfg in cfgs:
        try:
            res = bench_model(name, cfg, dist, args)
        except eng.LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            eng.shutdown()
            return 2
        except torch.cuda.OutOfMemoryError:
            res = {"model": name, "error": f"out of memory at micro-batch {cfg.train.micro_batch_size}"}
        if "error" in res:   # outside the except block: the traceback no longer holds the engine's frames
            gc.collect()
            torch.cuda.empty_cache()
        report["results"].append(res)
        report["peak_tflops_per_device"] = peak_tflops(dist.device, cfg.train.precision, args.peak_tflops)
        if dist.is_main:
            print(f"[bench_train] {name} done", flush=True)
    if dist.is_main:
        print(fmt_table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    eng.shutdown()
    return 0


def _cpu_name() -> str:
    import platform
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
