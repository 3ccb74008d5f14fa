#!/usr/bin/env python
"""Pipeline overhead (P4): our training step ÷ a bare PyTorch loop of the same model, L2E off.

    python tools/bench_overhead.py [--shapes smoke,70m] [--reps 5] [--steps 4] [--threads 1] [--json F]
    python tools/bench_overhead.py --quick --json F        # a smoke test of the tool (seconds)

"Ours" is ``megatron_l2e.train.train_step`` on a DeepSpeed engine built as ``python -m megatron_l2e.train``
builds it (``engine.init_distributed`` / ``build_model`` / activation checkpointing as the config says /
``engine.build_engine``: ZeRO stage and AdamW param groups from the config, the LambdaLR schedule), with
L2E off. "Bare" is the same model (``transformers.GPTNeoXForCausalLM`` built by ``build_model`` from the
same seed, the same activation checkpointing) trained by a plain loop: ``torch.optim.AdamW`` with the
same param groups and hyper-parameters, the same LambdaLR schedule, ``loss / accumulation`` backward per
micro-batch, ``torch.nn.utils.clip_grad_norm_`` with the same max norm, ``step``, ``zero_grad`` — no
DeepSpeed, no L2E — over the same batches in the same order. Both loops start from identical weights
and see identical batches, so their losses must agree (``max_loss_diff``: a check that the bare loop
really is the same training).

Repetitions are interleaved (ours, bare; then bare, ours; …), each block starting with one untimed
step; the figures are medians over every timed step, and ``ratio`` = median ours ÷ median bare. On a
CPU the headline clock is the process's CPU time (``time.process_time``: user + system time of every
thread of this process, page faults included), which other jobs on a shared machine inflate far less
than the wall clock; the wall-clock medians and ratio are reported beside it (on a GPU the wall clock
is the headline). ``paired_ratio``: the median over repetitions of each ours block ÷ the bare block
next to it — robust to the machine's load drifting during the run. Inputs are uniform random tokens
generated before timing (the data path is out of both).

Shapes (CPU, fp32: DeepSpeed refuses fp16 on a CPU):
* ``smoke`` — ``configs/smoke/cpu.yml`` as it is (4 × 128, vocab 1024, seq 128, micro-batch 8 × 2
  accumulation steps);
* ``70m`` — Pythia-70M's blocks (6 × 512, 8 heads, ``configs/pythia/70m.yml``) at sequence 256 with a
  SMALL VOCABULARY (1024 instead of 50304: a 50k vocabulary makes the two output matmuls dominate a CPU
  step and is not what this measures), micro-batch 4 × 2 accumulation steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_l2e import engine as eng  # noqa: E402
from megatron_l2e.config import ConfigError, load_config  # noqa: E402
from megatron_l2e.model import build_model, enable_activation_checkpointing, param_groups  # noqa: E402
from megatron_l2e.train import seed_everything, train_step  # noqa: E402

SHAPES = {
    "smoke": ("configs/smoke/cpu.yml", []),
    "70m": ("configs/pythia/70m.yml", ["model.vocab_size=1024", "model.seq_length=256",
                                      "train.micro_batch_size=4", "train.global_batch_size=8",
                                      "data.format=rows"]),
}
QUICK_SETS = ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
TARGET_RATIO = 1.05


class Tokens:
    """``train_step``'s data interface over uniform random tokens, generated up front."""

    def __init__(self, vocab: int, seq: int, gb: int, steps: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, vocab, (steps * gb, seq + 1), generator=g)
        self.gb = gb

    def micro_batch(self, step: int, micro_index: int, micro_batch_size: int, dp_rank: int,
                    dp_world: int) -> torch.Tensor:
        start = step * self.gb + (dp_rank * (self.gb // dp_world)) + micro_index * micro_batch_size
        return self.rows[start:start + micro_batch_size]


def reference_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The plain next-token cross-entropy (what ``train.lm_loss_of`` computes with the reference path)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


class BareLoop:
    """The same training without DeepSpeed: AdamW + LambdaLR + clip_grad_norm_ + accumulation."""

    def __init__(self, model, cfg, layout, device):
        from megatron_l2e.engine import lr_at

        self.model, self.layout, self.clip = model.to(device), layout, cfg.optimizer.grad_clip
        o = cfg.optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The same constructor call as engine.build_optimizer (torch AdamW, fused on CUDA).
        self.opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps, fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_at(s, cfg) / o.lr if o.lr > 0 else 0.0)
        self.device = device
        model.train()

    def step(self, data, step: int) -> float:
        ga, mb = self.layout.grad_accum, self.layout.micro_batch_size
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for j in range(ga):
            batch = data.micro_batch(step, j, mb, 0, 1).to(self.device, non_blocking=True)
            loss = reference_loss(self.model, batch)
            (loss / ga).backward()
            total += loss.detach().double()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total) / ga


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_config(name: str, quick: bool, extra: list[str]):
    path, sets = SHAPES[name]
    cfg = load_config(ROOT / path, sets + (QUICK_SETS if quick else []) + extra)
    cfg.l2e.enabled = False
    cfg.train.precision = "fp32"           # both loops in fp32 (the bare loop has no mixed precision)
    if hasattr(cfg.model, "loss_impl"):
        # Both sides compute the same loss: the comparison is of the pipeline, not of the loss path.
        cfg.model.loss_impl = "reference"
    return cfg


def bench_shape(name: str, cfg, dist, reps: int, steps: int) -> dict:
    layout = eng.BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dist.world_size)
    layout.check()
    per_loop = 1 + reps * (steps + 1)       # each loop's own step counter: both see the same batches
    data = Tokens(cfg.model.vocab_size, cfg.model.seq_length, layout.global_batch_size, per_loop,
                  seed=cfg.train.seed)

    def fresh_model():
        seed_everything(cfg.train.seed)
        m = build_model(cfg.model)
        if cfg.model.checkpoint_activations:      # both loops alike
            enable_activation_checkpointing(m)
        return m

    engine, _, _ = eng.build_engine(fresh_model(), cfg, dist, layout)
    bare = BareLoop(fresh_model(), cfg, layout, dist.device)
    wall: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    losses: dict[str, list[float]] = {"ours": [], "bare": []}
    next_step = {"ours": 0, "bare": 0}

    blocks: dict[str, list[tuple[int, int]]] = {"ours": [], "bare": []}   # (first, end) of each timed block

    def run(which: str, n: int, timed: bool) -> None:
        if timed:
            blocks[which].append((len(wall[which]), len(wall[which]) + n))
        for _ in range(n):
            s = next_step[which]
            sync(dist.device)
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "ours":
                loss = train_step(engine, data, None, s, layout, dist).lm_loss
            else:
                loss = bare.step(data, s)
            sync(dist.device)
            if timed:
                wall[which].append(time.perf_counter() - t0)
                cpu[which].append(time.process_time() - c0)
            losses[which].append(loss)
            next_step[which] = s + 1

    run("ours", 1, False)                 # first steps: allocator, DeepSpeed's lazy set-up
    run("bare", 1, False)
    for rep in range(reps):
        for which in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
            run(which, 1, False)          # settle after the switch
            run(which, steps, True)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    # The headline clock: process CPU time on a CPU (other jobs on a shared machine do not inflate it;
    # page faults and every thread of this process count), wall clock on a GPU (asynchronous work).
    clock = "cpu" if dist.device.type == "cpu" else "wall"
    med = med_cpu if clock == "cpu" else med_wall
    # Drift-robust too: each repetition's ours block ÷ the bare block next to it (ABBA order), median.
    per_rep = {c: [statistics.median(t["ours"][a:b]) / statistics.median(t["bare"][x:y])
                   for (a, b), (x, y) in zip(blocks["ours"], blocks["bare"])]
               for c, t in (("wall", wall), ("cpu", cpu))}
    n = min(len(losses["ours"]), len(losses["bare"]))
    diff = max(abs(a - b) for a, b in zip(losses["ours"][:n], losses["bare"][:n]))
    m = cfg.model
    out = {"shape": name, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
           "num_attention_heads": m.num_attention_heads, "vocab_size": m.vocab_size, "seq_length": m.seq_length,
           "micro_batch_size": layout.micro_batch_size, "grad_accum": layout.grad_accum,
           "global_batch_size": layout.global_batch_size, "precision": cfg.train.precision,
           "zero_stage": cfg.distributed.zero_stage, "activation_checkpointing": bool(cfg.model.checkpoint_activations),
           "grad_clip": cfg.optimizer.grad_clip, "clock": clock,
           "ours_median_s": med["ours"], "bare_median_s": med["bare"], "ratio": med["ours"] / med["bare"],
           "paired_ratio": statistics.median(per_rep[clock]),
           "wall": {"ours_median_s": med_wall["ours"], "bare_median_s": med_wall["bare"],
                    "ratio": med_wall["ours"] / med_wall["bare"], "paired_ratio": statistics.median(per_rep["wall"]),
                    "per_rep_ratios": per_rep["wall"], "ours_s": wall["ours"], "bare_s": wall["bare"]},
           "cpu": {"ours_median_s": med_cpu["ours"], "bare_median_s": med_cpu["bare"],
                   "ratio": med_cpu["ours"] / med_cpu["bare"], "paired_ratio": statistics.median(per_rep["cpu"]),
                   "per_rep_ratios": per_rep["cpu"], "ours_s": cpu["ours"], "bare_s": cpu["bare"]},
           "max_loss_diff": diff, "steps_compared": n, "target_ratio": TARGET_RATIO}
    out["meets_target"] = out["ratio"] <= TARGET_RATIO
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench_overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smoke,70m", help=f"comma-separated among {', '.join(SHAPES)}")
    p.add_argument("--reps", type=int, default=8, help="interleaved repetitions (default 8)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per loop per repetition (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: a shared CPU only adds noise with more; 0 = torch's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every shape")
    p.add_argument("--quick", action="store_true", help="tiny sequences, 1 step × 2 repetitions: a test of the tool")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad or not args.shapes:
        p.error(f"--shapes: unknown shape {bad[0] if bad else '(none)'!r}; choose among {', '.join(SHAPES)}")
    if args.quick:
        args.reps, args.steps = 2, 1
    for k in ("reps", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be ≥ 1, got {getattr(args, k)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfgs = [(s, shape_config(s, args.quick, args.set)) for s in args.shapes]
        dist = eng.init_distributed(cfgs[0][1])
    except (ConfigError, eng.LaunchError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    cuda = dist.device.type == "cuda"
    report = {"device": dist.device.type,
              "device_name": torch.cuda.get_device_name(dist.device) if cuda else (platform.processor()
                                                                                   or platform.machine()),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps,
              "steps": args.steps, "quick": args.quick,
              "note": "ours = megatron_l2e.train.train_step on the DeepSpeed engine (L2E off); bare = the same "
                      "model with torch AdamW + clip_grad_norm_ + the same batches; ratio = median ours / median "
                      "bare. The 70m shape has Pythia-70M's blocks with a 1024-token vocabulary.",
              "results": []}
    try:
        import deepspeed
        report["deepspeed"] = deepspeed.__version__
    except ImportError:  # pragma: no cover - init_distributed imported it
        pass
    for name, cfg in cfgs:
        res = bench_shape(name, cfg, dist, args.reps, args.steps)
        report["results"].append(res)
        w = res["wall"]
        print(f"[bench_overhead] {name}: ours {res['ours_median_s'] * 1e3:.1f} ms, bare "
              f"{res['bare_median_s'] * 1e3:.1f} ms ({res['clock']} time), ratio {res['ratio']:.3f} "
              f"(target ≤ {TARGET_RATIO}; per-repetition pairs {res['paired_ratio']:.3f}); wall clock {w['ours_median_s'] * 1e3:.1f} / "
              f"{w['bare_median_s'] * 1e3:.1f} ms = {w['ratio']:.3f}; max |loss ours − bare| "
              f"{res['max_loss_diff']:.2e}", flush=True)
    lines = ["| shape | layers × hidden | vocab | seq | micro × accum | clock | ours (ms) | bare (ms) | ratio | "
             "paired | wall ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['shape']} | {r['num_layers']} × {r['hidden_size']} | {r['vocab_size']} | "
                     f"{r['seq_length']} | {r['micro_batch_size']} × {r['grad_accum']} | {r['clock']} | "
                     f"{r['ours_median_s'] * 1e3:.1f} | {r['bare_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | "
                     f"{r['paired_ratio']:.3f} | {r['wall']['ratio']:.3f} |")
    print(f"[bench_overhead] {report['device']} ({report['device_name']}), {report['threads']} thread(s), "
          f"{args.reps} reps × {args.steps} steps")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
