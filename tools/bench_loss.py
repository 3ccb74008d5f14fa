"""Benchmark the LM loss paths: forward + backward of mean cross-entropy(hidden @ Wᵀ, labels).

    python tools/bench_loss.py [--json F] [--batch 8 --seq 2048 --hidden 512 --vocab 50304]
                               [--chunk N] [--repeats 3] [--paths reference,chunked] [--dtype fp32]

Every measurement runs in its own subprocess (``--worker PATH``), so each path's peak resident set is
its own: the worker imports torch, warms both paths up on a tiny problem, builds the inputs (hidden
``[batch·seq, hidden]`` and ``W [vocab, hidden]``, both requiring gradients, labels below the GPT-NeoX
tokenizer's 50277 ids), then runs forward + backward once, timed. ``--worker inputs`` does everything
except the loss call: **peak extra memory = a path's peak RSS − the peak RSS of the inputs-only
worker** (what the loss path adds on top of its inputs, its outputs' gradients included). Paths are
run alternately (reference, chunked, chunked, reference, …) and the medians compared:

    {"peak_ratio": chunked extra / reference extra, "time_ratio": chunked median / reference median, ...}

Targets (issue 17): peak_ratio ≤ 0.15, time_ratio ≤ 1.15 at the default shape (2 CPU cores: ≈ 5 min).
On CUDA (``--device cuda``) peaks are ``torch.cuda.max_memory_allocated`` above the inputs, and the
``fused`` path (liger-kernel) can be added to ``--paths``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
TOKENIZER_IDS = 50277            # GPT-NeoX-20B tokenizer: ids below this; the model's 50304 is padding


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # Linux: KiB


def _loss_fn(path: str, chunk: int):
    from megatron_l2e.loss import linear_cross_entropy

    return lambda h, w, t: linear_cross_entropy(h, w, t, impl=path, chunk=chunk)


def worker(args) -> dict:
    import torch

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    paths = [p for p in args.paths.split(",") if p != "inputs"]
    # Warm-up on a tiny problem (kernels, thread pools), identical in every worker.
    g = torch.Generator(device="cpu").manual_seed(1)
    for p in paths:
        h = torch.randn(64, args.hidden, generator=g).to(dev, dtype).requires_grad_()
        w = torch.randn(512, args.hidden, generator=g).to(dev, dtype).requires_grad_()
        _loss_fn(p, args.chunk)(h, w, torch.randint(0, 500, (64,), generator=g).to(dev)).backward()
    del h, w
    base = _rss_peak_bytes()
    n = args.batch * args.seq
    # Built in place (no temporaries): the inputs-only worker's peak is the inputs themselves.
    hidden = torch.randn(n, args.hidden, generator=g).to(dev, dtype).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=g).mul_((2.0 / (5 * args.hidden)) ** 0.5) \
        .to(dev, dtype).requires_grad_()
    labels = torch.randint(0, min(TOKENIZER_IDS, args.vocab), (n,), generator=g).to(dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        inputs_alloc = torch.cuda.memory_allocated()
    out = {"worker": args.worker, "baseline_rss_bytes": base, "inputs_rss_bytes": _rss_peak_bytes()}
    times, losses = [], []
    if args.worker != "inputs":
        fn = _loss_fn(args.worker, args.chunk)
        for _ in range(args.iters):
            hidden.grad = weight.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = fn(hidden, weight, labels)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            del loss
        out["grad_norms"] = [float(hidden.grad.float().norm()), float(weight.grad.float().norm())]
    out.update(peak_rss_bytes=_rss_peak_bytes(), times_s=times, losses=losses)
    if cuda:
        out["cuda_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - inputs_alloc
    return out


def _spawn(args, what: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", what, "--batch", str(args.batch),
           "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--chunk", str(args.chunk), "--dtype", args.dtype, "--device", args.device,
           "--iters", str(args.iters), "--paths", args.paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"bench_loss: worker {what} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    from megatron_l2e.config import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunk", type=int, default=ModelConfig().loss_chunk_size, help="chunked: tokens per chunk")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="subprocesses per path (alternating)")
    p.add_argument("--iters", type=int, default=1, help="timed forward+backward per subprocess")
    p.add_argument("--paths", default="reference,chunked", help="comma list; the first is the baseline")
    p.add_argument("--json", metavar="F", help="write the result here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    t_start = time.perf_counter()
    paths = args.paths.split(",")
    base, other = paths[0], paths[1:]
    inputs = _spawn(args, "inputs")
    runs = {p: [] for p in paths}
    for r in range(args.repeats):
        for p in (paths if r % 2 == 0 else paths[::-1]):      # alternate the order: no path always goes first
            res = _spawn(args, p)
            runs[p].append(res)
            print(f"[bench_loss] repeat {r}: {p:9s} {statistics.median(res['times_s']):7.2f} s  peak RSS "
                  f"{res['peak_rss_bytes'] / 2**30:6.2f} GiB  loss {res['losses'][0]:.5f}", flush=True)
    cuda = args.device.startswith("cuda")
    summary = {}
    for p, rs in runs.items():
        times = [t for r in rs for t in r["times_s"]]
        extra = [(r["cuda_peak_extra_bytes"] if cuda else r["peak_rss_bytes"] - inputs["peak_rss_bytes"]) for r in rs]
        summary[p] = {"time_s_median": statistics.median(times), "times_s": times,
                      "peak_extra_bytes_median": statistics.median(extra), "peak_extra_bytes": extra,
                      "peak_rss_bytes": [r["peak_rss_bytes"] for r in rs], "loss": rs[0]["losses"][0],
                      "grad_norms": rs[0]["grad_norms"]}
    out = {"shape": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocab": args.vocab,
                     "tokens": args.batch * args.seq, "dtype": args.dtype, "device": args.device},
           "chunk_tokens": args.chunk, "repeats": args.repeats, "iters_per_process": args.iters,
           "torch_threads": _threads(), "memory_measure": (
               "torch.cuda.max_memory_allocated above the inputs" if cuda else
               "peak RSS (ru_maxrss) of the path's own subprocess minus the peak RSS of a subprocess that "
               "builds the same inputs (and runs the same tiny warm-up) without the loss call"),
           "inputs_peak_rss_bytes": inputs["peak_rss_bytes"], "paths": summary, "baseline": base}
    for p in other:
        key = "" if p == "chunked" and len(other) == 1 else f"_{p}"
        out[f"peak_ratio{key}"] = summary[p]["peak_extra_bytes_median"] / summary[base]["peak_extra_bytes_median"]
        out[f"time_ratio{key}"] = summary[p]["time_s_median"] / summary[base]["time_s_median"]
        out[f"loss_diff{key}"] = abs(summary[p]["loss"] - summary[base]["loss"])
    if "chunked" in other:
        out["peak_ratio"] = out.get("peak_ratio", out.get("peak_ratio_chunked"))
        out["time_ratio"] = out.get("time_ratio", out.get("time_ratio_chunked"))
    out["wall_s"] = time.perf_counter() - t_start
    for p in paths:
        s = summary[p]
        print(f"[bench_loss] {p:9s} median {s['time_s_median']:7.2f} s, peak extra "
              f"{s['peak_extra_bytes_median'] / 2**30:6.3f} GiB")
    print(f"[bench_loss] peak_ratio {out.get('peak_ratio', float('nan')):.3f}  time_ratio "
          f"{out.get('time_ratio', float('nan')):.3f}  (chunk {args.chunk}, wall {out['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
