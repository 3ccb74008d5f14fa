"""Benchmark of the L2E site kernels (a benchmark, not a test): medians and ratios measured side by side.

    python tools/bench_l2e.py [--quick] [--json OUT] [--device cpu|cuda] [--dtype float32|bfloat16|float16]

(a) roofline_ratio — L2E op forward+backward as ``L2ESite`` runs it (penalty mode, threshold
    selection: the fused forward writing the step sums into the site's buffers, then autograd's
    backward through the fused kernel, which adds the penalty into z_out's incoming gradient in
    place — that gradient handed over as the next block's backward hands it) ÷ the time of its
    minimal memory traffic: forward reads Z, backward reads Z and the incoming gradient and writes
    the outgoing one = the bytes of two copies of Z, timed in the same run as ``dst.copy_(Z)`` into
    a preallocated buffer. Also printed: the two kernels called directly with the backward into a
    preallocated buffer, and — timed apart — into a fresh tensor, the unfused autograd branch
    (``fuse_grad=False``) and the eager reference. Site shape [B, 2048, H].
(b) topk_speedup — MEmeL's forward as its code does it (eager score + ``torch.kthvalue`` per sample +
    counts + moments) ÷ L2E's fused forward as the site runs it (score + threshold + counts + moments
    into the site's sum buffers + penalty sum), B = 4. Also: the same against our fastest exact
    selection (fused radix select + fused forward).
(c) step_overhead — L2E work of one micro-batch (``L2ESite.forward`` and the backward through the
    fused kernel, as in (a)) ÷ forward+backward of the 70M GPT-NeoX block it is attached to
    (S = 512, B = 2). Each half runs in the cache state training leaves it in (an untimed 64 MB write
    first; then z hot for the forward, z_out's gradient hot for the backward), and the backward is
    timed minus the same ``torch.autograd.grad`` call through a bare view of z (the scaffolding). The once-per-optimizer-step work (statistics merge, eq. 6, the new variance's
    φ denominator) is timed apart and reported per optimizer step (``step_end_ms``) and as its
    share with 1 and with 8 micro-batches per step; it is not part of a micro-batch's ops.
(d) projection — bytes the fused kernels move per optimizer step ÷ H100 bandwidth (3.35 TB/s), next to
    the paper's step times. A PROJECTION from bytes, not a measurement.

Every ratio comes from timings interleaved in one run (A, B, A, B, …) so machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_l2e.l2e import functional as F
from megatron_l2e.l2e import kernels
from megatron_l2e.l2e.kernels import fused
from megatron_l2e.l2e.site import step_end_sites

# Pythia hidden sizes; a site is [B, S = 2048, H] (N = S·H neurons, DESIGN §3).
HIDDEN = {"70m": 512, "410m": 1024, "2.8b": 2560}
SEQ = 2048
ROOFLINE_CASES = [("70m_b1", "70m", 1), ("70m_b4", "70m", 4), ("410m_b4", "410m", 4), ("2.8b_b4", "2.8b", 4)]
TOPK_CASES = [1_048_576, 2_097_152, 5_242_880]
RATIO, C, LAM = 0.02, 0.01, 1e-9
# Paper Table 2 step times (ms, one 1024×2048-token step; GPU count not stated: one 8-GPU node assumed).
PAPER_STEP_MS = {"70m": 605.8, "410m": 2383.1, "2.8b": 11285.1}
PAPER_L2E_OVERHEAD = {"70m": 0.034, "410m": 0.021, "2.8b": 0.0148}
H100_BYTES_PER_S = 3.35e12
SITES_MID2 = 2
GPUS = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


BEST: dict[str, float] = {}  # fastest repetition of the last interleaved() call (noise indicator)


def interleaved(fns: dict[str, Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]],
                reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each fn, timed round-robin (one warm-up round first, not counted). A
    ``(prepare, fn)`` pair runs ``prepare`` untimed right before each timing of ``fn``.

    The fastest repetitions are kept in BEST: on a shared machine the best-of ratio shows what the
    code does when it gets the cores; the medians (the reported numbers) include the neighbours.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps + 1):
        for name, fn in fns.items():
            if isinstance(fn, tuple):
                fn[0]()
                fn = fn[1]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    BEST.clear()
    BEST.update({k: min(v) for k, v in times.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def _site_inputs(B: int, neurons: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = torch.Size(neurons)
    mean = (torch.randn(n, generator=g) * 0.5).to(device)
    var = (torch.rand(n, generator=g) * 4 + 0.1).to(device)
    z = (mean.cpu() + torch.randn(B, *n, generator=g) * 2).to(device, dtype)
    thr = kernels.kth_score(z, mean, var, max(1, round(RATIO * n.numel())), compensation=C)  # ~2 % selected
    tau = thr.mean().expand(B).contiguous()  # threshold path: one tau for all samples
    return z, mean, var, tau


class _HandOver(torch.autograd.Function):
    """Identity whose backward hands z_out a gradient that nothing else holds — what the next
    block's backward does in training (GPT-NeoX: two layer norms and the residual add, summed by
    autograd into a fresh tensor). The benchmark recycles one preallocated tensor through ``pool``."""

    pool: list[torch.Tensor] = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _HandOver.pool.pop()


def _l2e_as_site_runs_it(z: torch.Tensor, mean, var, thr, sums, backend: str = "auto"):
    """One micro-batch of the regularizer as ``L2ESite`` runs it: the fused forward (sums written into
    the site's buffers), then autograd's backward into z, where z_out's incoming gradient and the
    loss's meet in the fused kernel — in place, as the gradient is autograd's alone (``_HandOver``)."""
    zr = z.detach().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, mean, mode="penalty", compensation=C, lam=LAM,
                               backend=backend, sums=sums)
    y = _HandOver.apply(out.z_out)
    (g,) = torch.autograd.grad([y, out.loss], zr, [_ZERO.expand_as(y), _ONE])
    _HandOver.pool.append(g)
    return out


_ZERO, _ONE = torch.zeros(()), torch.ones(())


def _l2e_kernels(z: torch.Tensor, mean, var, thr, g_out: torch.Tensor, sums, out: torch.Tensor | None = None):
    """The two fused kernels called directly: forward (sums into ``sums``), then the backward
    ``grad_out + penalty gradient`` into ``out`` (a preallocated buffer; ``None``: a fresh tensor)."""
    name = kernels.resolve_backend("auto", z)
    be = importlib.import_module(f"megatron_l2e.l2e.kernels.{'cpu' if name == 'cpu' else 'triton_kernels'}")
    denom = fused.denominator(var, C)
    _, counts, logsum, sum_d, sum_d2 = be.forward(z, mean, denom, thr, mean, mode="penalty", eps=1e-6, sums=sums)
    return logsum, be.penalty_backward(z, mean, denom, thr, g_out, torch.ones((), device=z.device), LAM, 1e-6,
                                       out=out)


def _l2e_unfused(z: torch.Tensor, mean, var, thr, g_out: torch.Tensor, backend: str = "auto"):
    """The penalty as a separate autograd branch (``fuse_grad=False``, and the reference backend):
    z_out is z, autograd adds the penalty's own gradient tensor to dZ (one more pass, fresh tensors)."""
    zr = z.detach().requires_grad_(True)
    out = kernels.site_forward(zr, mean, var, thr, mean, mode="penalty", compensation=C, lam=LAM,
                               backend=backend, fuse_grad=False)
    (g,) = torch.autograd.grad(out.loss, zr)
    return g_out + g


def bench_roofline(args, device, dtype, log) -> tuple[dict, dict]:
    global _ZERO, _ONE
    _ZERO, _ONE = torch.zeros((), device=device, dtype=dtype), torch.ones((), device=device)
    ratios, details = {}, {}
    for case, model, B in ROOFLINE_CASES:
        z, mean, var, tau = _site_inputs(B, (SEQ, HIDDEN[model]), dtype, device)
        g_out = torch.randn_like(z)
        dst = torch.empty_like(z)
        grad_buf = torch.empty_like(z)
        sums = (torch.zeros_like(mean), torch.zeros_like(mean))   # the site's step-sum buffers
        _HandOver.pool[:] = [torch.randn_like(z)]   # accumulates λ-sized penalties (timing unaffected)
        # Group 1, the measurement: the op as the site runs it, right after the copy that evicts
        # its operands (the cold position, as after the block's own work in training), and the
        # kernels called directly. Group 2, for information, apart: tensors allocated fresh each call
        # (a new output, the unfused branch, the eager reference) churn memory and slow whatever
        # runs next.
        reps = args.reps if case != "2.8b_b4" or not args.quick else max(3, args.reps)
        t = interleaved({"copy": lambda: dst.copy_(z),
                         "l2e": lambda: _l2e_as_site_runs_it(z, mean, var, tau, sums),
                         "prealloc_out": lambda: _l2e_kernels(z, mean, var, tau, g_out, sums, grad_buf)},
                        reps, device)
        best = BEST["l2e"] / (2 * BEST["copy"])
        info = {"copy": lambda: dst.copy_(z),
                "fresh_out": lambda: _l2e_kernels(z, mean, var, tau, g_out, None),
                "unfused": lambda: _l2e_unfused(z, mean, var, tau, g_out)}
        if not args.quick or case == "70m_b1":
            info["reference"] = lambda: _l2e_unfused(z, mean, var, tau, g_out, backend="reference")
        t2 = interleaved(info, max(3, reps // 3), device)
        yard, yard2 = 2 * t["copy"], 2 * t2["copy"]
        ratios[case] = t["l2e"] / yard
        extra = {f"{k}_ratio": t2[k] / yard2 for k in ("fresh_out", "unfused", "reference") if k in t2}
        details[case] = ({k: v * 1e3 for k, v in t.items()} | {f"info_{k}": v * 1e3 for k, v in t2.items()}
                         | {"shape": list(z.shape), "best_of_ratio": best,
                            "prealloc_out_ratio": t["prealloc_out"] / yard} | extra)
        ref = f"  reference {extra['reference_ratio']:5.1f}" if "reference_ratio" in extra else ""
        log(f"  {case:8s} {str(list(z.shape)):18s} copy {t['copy'] * 1e3:7.2f} ms  L2E fwd+bwd "
            f"{t['l2e'] * 1e3:7.2f} ms  roofline ratio {ratios[case]:5.2f} (best-of {best:4.2f})  | kernels "
            f"direct, bwd into a preallocated buffer {details[case]['prealloc_out_ratio']:5.2f} | apart: into "
            f"a fresh one {extra['fresh_out_ratio']:5.2f}, unfused branch {extra['unfused_ratio']:5.2f}{ref}")
        del z, g_out, dst, grad_buf
        _HandOver.pool.clear()
    return ratios, details


def _memel_forward(z, mean, var, shift, k):
    """MEmeL's per-micro-batch forward in eager PyTorch: score, exact k-th per sample, counts, moments."""
    phi = F.ms_score(z, mean, var, C)
    thr = F.kth_largest(phi, k)
    mask = phi >= thr.reshape(-1, *([1] * (z.dim() - 1)))
    counts = mask.reshape(z.shape[0], -1).sum(1)
    d = z.float() - shift
    return counts, d.sum(0), d.square().sum(0)


def bench_topk(args, device, dtype, log) -> tuple[dict, dict]:
    ratios, details = {}, {}
    B = 4
    for n in TOPK_CASES:
        z, mean, var, tau = _site_inputs(B, (SEQ, n // SEQ), dtype, device, seed=1)
        k = round(RATIO * n)
        phi = F.ms_score(z, mean, var, C).reshape(B, -1)

        sums = (torch.zeros_like(mean), torch.zeros_like(mean))   # the site's step-sum buffers

        @torch.no_grad()
        def l2e_fwd():   # as L2ESite runs it: the step sums go into the site's buffers
            return kernels.site_forward(z, mean, var, tau, mean, mode="penalty", compensation=C, lam=LAM, sums=sums)

        @torch.no_grad()
        def exact_fused():
            thr = kernels.kth_score(z, mean, var, k, compensation=C)
            return kernels.site_forward(z, mean, var, thr, mean, mode="penalty", compensation=C, lam=LAM, sums=sums)

        fns = {"memel": lambda: _memel_forward(z, mean, var, mean, k), "l2e": l2e_fwd,
               "exact_fused": exact_fused,
               # the selection step alone, on a precomputed φ (for the choice of method)
               "kthvalue": lambda: torch.kthvalue(phi, n - k + 1, dim=1),
               "topk": lambda: torch.topk(phi, k, dim=1, sorted=False).values.amin(1),
               "kth_fused": lambda: kernels.kth_score(z, mean, var, k, compensation=C)}
        t = interleaved(fns, args.reps, device)
        case = f"n{n}"
        ratios[case] = t["memel"] / t["l2e"]
        details[case] = {kk: v * 1e3 for kk, v in t.items()} | {"best_of_speedup": BEST["memel"] / BEST["l2e"],
            "speedup_vs_exact_fused": t["exact_fused"] / t["l2e"], "memel_vs_exact_fused": t["memel"] / t["exact_fused"]}
        log(f"  {case:9s} MEmeL fwd {t['memel'] * 1e3:8.2f} ms  L2E fwd {t['l2e'] * 1e3:7.2f} ms  "
            f"speedup {ratios[case]:6.1f}x | fused exact top-k fwd {t['exact_fused'] * 1e3:7.2f} ms "
            f"(L2E {t['exact_fused'] / t['l2e']:4.1f}x faster) | k-th alone: kthvalue {t['kthvalue'] * 1e3:7.2f}  "
            f"topk {t['topk'] * 1e3:7.2f}  fused radix (incl. φ) {t['kth_fused'] * 1e3:7.2f} ms")
        del z, phi
    return ratios, details


def _block_70m(device):
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

    cfg = GPTNeoXConfig(hidden_size=512, num_attention_heads=8, intermediate_size=2048, num_hidden_layers=6,
                        rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                        hidden_dropout=0.0, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"  # what GPTNeoXForCausalLM picks on CPU; a bare layer gets none
    torch.manual_seed(0)
    return GPTNeoXLayer(cfg, layer_idx=0).to(device).train(), GPTNeoXRotaryEmbedding(cfg).to(device)


def _threshold_site(z, mean, var, tau):
    """An L2ESite past late start and warm-up (the moving-threshold phase), state set by load_state_dict."""
    from megatron_l2e.l2e.config import L2EConfig
    from megatron_l2e.l2e.site import L2ESite

    cfg = L2EConfig(enabled=True, inhibition="regularizer", selection="threshold", ratio=RATIO, lam=LAM,
                    compensation=C, late_start=1, warmup_steps=1, forget_steps=10)
    site = L2ESite(layer=0, cfg=cfg, global_batch_size=z.shape[0])
    site.load_state_dict({"layer": 0, "shape": list(z.shape[1:]), "count": 1000, "mean": mean, "var": var,
                          "tau": tau, "optimizer_steps": 5, "scored_steps": 5, "warm_sum": 0.0, "warm_n": 0})
    assert site.scoring() and not site.exact_topk()
    return site


def bench_step_overhead(args, device, log) -> tuple[dict, dict]:
    B, S, H = 2, 512, 512
    block, rope = _block_70m(device)
    x = torch.randn(B, S, H, device=device, requires_grad=True)
    pos = torch.arange(S, device=device).unsqueeze(0)
    pe = rope(x, pos)

    def block_fwd_bwd():
        out = block(x, position_ids=pos, position_embeddings=pe)
        y = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(y, [x, *block.parameters()], torch.ones_like(y))

    z, mean, var, tau = _site_inputs(B, (S, H), torch.float32, device, seed=2)
    site = _threshold_site(z, mean, var, float(tau[0]))
    _HandOver.pool[:] = [torch.randn_like(z)]
    global _ZERO, _ONE
    _ZERO, _ONE = torch.zeros((), device=device), torch.ones((), device=device)

    # One micro-batch as the training loop runs it, in two timed halves, each after the cache state
    # training leaves it in (the block's own work evicts everything; untimed ``evict``): the forward
    # (L2ESite.forward: the fused forward, sums into the site's buffers, the step's telemetry sums)
    # finds z hot — the block's forward just wrote it; the backward (autograd into z through the fused
    # kernel) finds z_out's gradient hot — the next block's backward just wrote it, handed over as
    # that backward hands it — while z itself, saved since the forward, is cold. The statistics
    # (mean, denominator, step sums) are cold in both.
    scratch = torch.empty(64 << 20, dtype=torch.uint8, device=device)   # 2 × the L3 of the dev machine
    pending: list = []

    def evict():
        scratch.fill_(1)

    def fwd_prepare():
        evict()
        z.sum()

    def l2e_fwd():
        zr = z.detach().requires_grad_(True)
        z_out = site.forward(zr)
        pending.append((zr, z_out, *site.pop_pending()))

    def bwd_prepare():
        evict()
        if _HandOver.pool[-1]._is_view():   # null_bwd hands back a view of z's gradient: the next
            _HandOver.pool[-1] = _HandOver.pool[-1].clone()   # block's backward hands a whole tensor
        _HandOver.pool[-1].sum()

    def l2e_bwd():
        zr, z_out, loss = pending.pop()
        (g,) = torch.autograd.grad([_HandOver.apply(z_out), loss], zr, [_ZERO.expand_as(z), _ONE])
        _HandOver.pool.append(g)

    def null_bwd():
        # the same backward call and hand-over without the site (z_out a plain view of z): what the
        # benchmark's own scaffolding costs, subtracted from l2e_bwd
        zr = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad([_HandOver.apply(zr.view_as(zr))], zr, [_ZERO.expand_as(z)])
        _HandOver.pool.append(g)

    def step_end():
        # once per optimizer step, whatever the number of micro-batches: the packed sums, moments
        # merge and eq. 6 (step_end_sites, no all-reduce on one process), and the new variance's φ
        # denominator, which the step's first forward computes (cached for the rest of the step)
        step_end_sites([site])
        fused.denominator(site.var, C)

    def step_end_prepare():
        evict()
        l2e_fwd()      # a micro-batch of the step (untimed), so the step end has sums to merge
        l2e_bwd()

    l2e_fwd()
    l2e_bwd()
    t = interleaved({"block": block_fwd_bwd, "l2e_fwd": (fwd_prepare, l2e_fwd), "l2e_bwd": (bwd_prepare, l2e_bwd),
                     "null_bwd": (bwd_prepare, null_bwd), "step_end": (step_end_prepare, step_end)},
                    max(args.reps, 5), device)
    t["l2e_bwd_raw"] = t["l2e_bwd"]
    t["l2e_bwd"] = max(t["l2e_bwd"] - t["null_bwd"], 0.0)
    t["l2e"] = t["l2e_fwd"] + t["l2e_bwd"]
    frac = t["l2e"] / t["block"]
    best = (BEST["l2e_fwd"] + max(BEST["l2e_bwd"] - BEST["null_bwd"], 0.0)) / BEST["block"]
    end1 = t["step_end"] / t["block"]        # its share with 1 micro-batch per optimizer step
    end8 = t["step_end"] / (8 * t["block"])  # … with 8 (gradient accumulation)
    log(f"  70m block [2, 512, 512] fwd+bwd {t['block'] * 1e3:8.2f} ms   L2E ops per micro-batch "
        f"{t['l2e'] * 1e3:6.3f} ms (fwd {t['l2e_fwd'] * 1e3:5.3f}, bwd {t['l2e_bwd'] * 1e3:5.3f} = "
        f"{t['l2e_bwd_raw'] * 1e3:5.3f} − the bare backward call {t['null_bwd'] * 1e3:5.3f})   overhead "
        f"{100 * frac:5.2f} % (best-of {100 * best:4.2f} %)")
    log(f"  step-end work (statistics merge, eq. 6, the new φ denominator), once per optimizer step: "
        f"{t['step_end'] * 1e3:6.3f} ms = {100 * end1:5.2f} % of one micro-batch's block fwd+bwd, "
        f"{100 * end8:5.2f} % with 8 micro-batches")
    return {"70m": frac}, {"70m": {k2: v * 1e3 for k2, v in t.items()} | {
        "best_of_fraction": best, "step_end_fraction_1_microbatch": end1,
        "step_end_fraction_8_microbatches": end8, "with_step_end_1_microbatch": frac + end1}}


def projection(log, elem_bytes: int = 2) -> dict:
    """Bytes per optimizer step ÷ H100 bandwidth: a projection, not a measurement."""
    tokens = 1024 * 2048
    out = {}
    log(f"  PROJECTION (not measured): bytes moved by the fused kernels per optimizer step ÷ 3.35 TB/s; "
        f"{SITES_MID2} sites (Mid-2), fp16/bf16 activations, 1024×2048 tokens over {GPUS} GPUs")
    for model, h in HIDDEN.items():
        z_bytes = tokens * h * elem_bytes
        # forward reads Z; backward reads Z and dZ and writes dZ; [S, H] statistics are negligible
        step_bytes = 4 * z_bytes * SITES_MID2 / GPUS
        ms = step_bytes / H100_BYTES_PER_S * 1e3
        frac = ms / PAPER_STEP_MS[model]
        out[model] = {"bytes_per_gpu": step_bytes, "projected_ms": ms, "paper_step_ms": PAPER_STEP_MS[model],
                      "projected_overhead": frac, "paper_l2e_overhead": PAPER_L2E_OVERHEAD[model]}
        log(f"  {model:5s} {step_bytes / 1e9:6.2f} GB/GPU/step → {ms:6.3f} ms vs paper step {PAPER_STEP_MS[model]:8.1f} ms"
            f" = {100 * frac:5.3f} % (paper's L2E: {100 * PAPER_L2E_OVERHEAD[model]:4.2f} %)")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the culprit, exit 2 (no usage dump)
        self.exit(2, f"bench_l2e: {message}\n")


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (same cases); < 60 s on 2 CPU cores")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="activation dtype of the roofline and top-k cases (default float32)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the numba kernels (default: torch's default)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 15
    if args.reps < 1:
        p.error(f"--reps must be ≥ 1, got {args.reps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be ≥ 1, got {args.threads}")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    args.device = dev
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            print(f"bench_l2e: --json {args.json}: {e.strerror}", file=sys.stderr)
            return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # the CPU kernels follow torch's thread count
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    log = lambda s: print(s, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    t0 = time.perf_counter()
    log(f"L2E kernel benchmark on {device} ({name}), dtype {args.dtype}, "
        f"backend auto = {kernels.resolve_backend('auto', torch.empty(0, device=device, dtype=dtype))}, "
        f"{args.reps} reps{' (quick)' if args.quick else ''}")
    log("(a) roofline ratio: L2E fwd+bwd ÷ 2 × copy of Z (1.0 = memory-bound limit)")
    roof, roof_d = bench_roofline(args, device, dtype, log)
    log("(b) top-k speedup: MEmeL forward (eager score + torch.kthvalue + counts + moments) ÷ L2E fused forward, B = 4")
    topk, topk_d = bench_topk(args, device, dtype, log)
    log("(c) step overhead: L2E ops of one micro-batch ÷ 70M block forward+backward (S = 512, B = 2, fp32)")
    step, step_d = bench_step_overhead(args, device, log)
    log("(d) H100 projection")
    proj = projection(log)
    log(f"total {time.perf_counter() - t0:.1f} s")
    result = {"device": f"{device.type}: {name}", "threads": torch.get_num_threads(), "dtype": args.dtype, "quick": args.quick, "reps": args.reps,
              "roofline_ratio": roof, "topk_speedup": topk, "step_overhead": step,
              "projection_h100": proj, "details_ms": {"roofline": roof_d, "topk": topk_d, "step": step_d}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
