"""Estimate L2E's ``penalty_survival`` at the paper's λ from measured LM-gradient magnitudes (docs/l2e.md).

    python tools/estimate_penalty_survival.py --size 70m [--seq 128] [--mb 4] [--stats-samples 16] [--json OUT]

What it measures, on a *randomly initialised* Pythia-shaped model (no checkpoint is needed or loaded; a
trained model's activations and gradients differ — this is an estimate) on CPU, with uniform random
tokens at a short sequence:

1. the site statistics (mean, unbiased var) over ``--stats-samples`` samples at the paper's mid-2 sites;
2. on ``--mb`` further samples, the LM gradient at each site (mean CE over the micro-batch's tokens),
   turned into the per-token gradient ``g_tok`` (× mb·S);
3. the selection of those samples (exact top-k, ratio 2 %) and the penalty gradient λ_eff·2d/(d² + ε).

Then, as they meet inside one rank's backward in the paper's layout (one 8-GPU node: DP = 8, global batch
1024 × 2048 tokens, DeepSpeed's 1/GAS on the loss and the penalty's GAS × DP multiplier): the LM gradient
per element is ``g_tok · DP / (GB · S)``, the penalty's ``λ_eff · DP · 2d/(d² + ε)``, both times the
loss scale ``s`` in fp16. Survival = ‖round_p(g_lm + g_pen) − round_p(g_lm)‖ / ‖g_pen‖ (the metric the
sites log) with ``g_pen`` in fp32, as the fused backward adds it (one rounding), for bf16, fp16 at several
loss scales, and fp32; for λ read as eq. 5 over the global batch
(λ_eff = λ) and as the presets' GPT-NeoX reading (``penalty_per_samples`` N: λ_eff = λ·N/GB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_l2e.config import load_config  # noqa: E402
from megatron_l2e.l2e import functional as F  # noqa: E402
from megatron_l2e.l2e.config import resolve_layers  # noqa: E402
from megatron_l2e.model import build_model  # noqa: E402

PAPER = {  # λ, Pythia's micro-batch (the presets' penalty_per_samples), sites
    "70m": (1e-11, 32), "410m": (1e-10, 32), "2.8b": (1e-9, 16)}
GB, SEQ_REAL, DP = 1024, 2048, 8
LOSS_SCALES = (2 ** 12, 2 ** 16, 2 ** 20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(PAPER), required=True)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mb", type=int, default=4)
    p.add_argument("--stats-samples", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    cfg = load_config([str(ROOT / f"configs/pythia/{a.size}.yml")], [f"model.seq_length={a.seq}"]).model
    model = build_model(cfg).train()
    for q in model.parameters():
        q.requires_grad_(False)                    # only activation gradients are needed
    sites = resolve_layers("mid2", cfg.num_layers)
    lam, per_samples = PAPER[a.size]
    V = cfg.vocab_size

    # 1. statistics at the sites
    zs = {i: [] for i in sites}
    hooks = [model.gpt_neox.layers[i].register_forward_hook(
        lambda m, args, out, i=i: zs[i].append(out.detach().clone())) for i in sites]
    with torch.no_grad():
        for _ in range(0, a.stats_samples, a.mb):
            model(input_ids=torch.randint(0, V, (a.mb, a.seq)))
    for h in hooks:
        h.remove()
    stats = {}
    for i in sites:
        z = torch.cat(zs[i])[: a.stats_samples]
        stats[i] = (z.mean(0), z.var(0, unbiased=True))

    # 2. LM gradient at every site in one backward (the lowest site's output becomes a leaf)
    held = {}

    def grab(m, args, out, i):
        if i == sites[0]:
            out = out.detach().requires_grad_(True)
        else:
            out.retain_grad()
        held[i] = out
        return out
    hooks = [model.gpt_neox.layers[i].register_forward_hook(lambda m, ar, o, i=i: grab(m, ar, o, i)) for i in sites]
    rows = torch.randint(0, V, (a.mb, a.seq + 1))
    logits = model(input_ids=rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    for h in hooks:
        h.remove()

    out = {"size": a.size, "seq": a.seq, "mb": a.mb, "stats_samples": a.stats_samples, "lam": lam,
           "penalty_per_samples": per_samples, "layout": {"dp": DP, "global_batch": GB, "seq": SEQ_REAL},
           "random_init": True, "sites": {}}
    for i in sites:
        z = held[i].detach()
        g_tok = held[i].grad.detach() * (a.mb * a.seq)          # per-token LM gradient at the site
        mean, var = stats[i]
        phi = F.ms_score(z, mean, var, 0.01)
        k = F.selection_k(z[0].numel(), ratio=a.ratio)
        thr = F.kth_largest(phi, k)
        sel = phi >= thr.reshape(-1, 1, 1)
        d = z - mean
        g_lm = g_tok * DP / (GB * SEQ_REAL)                   # one rank's backward, paper layout
        site = {"rms_g_tok": g_tok.square().mean().sqrt().item(),
                "rms_g_lm_backward": g_lm.square().mean().sqrt().item(),
                "median_abs_d_selected": d[sel].abs().median().item(),
                "readings": {}}
        for reading, lam_eff in (("global_sum", lam), ("gpt_neox", lam * per_samples / GB)):
            g_pen = torch.where(sel, lam_eff * DP * 2 * d / (d.square() + 1e-6), torch.zeros_like(d))
            r = (g_pen[sel].abs() / g_lm[sel].abs().clamp_min(1e-45))
            res = {"lam_eff": lam_eff, "grad_ratio": (g_pen.norm() / g_lm.norm()).item(),
                   "elem_ratio_median": r.median().item(),
                   "elem_ratio_p99": torch.quantile(r.double(), 0.99).item(),
                   # the fused backward adds the fp32 penalty gradient and rounds once: g_pen stays fp32
                   "survival_bf16": F.penalty_survival(g_lm.bfloat16(), g_pen),
                   "survival_fp32": F.penalty_survival(g_lm, g_pen)}
            for s in LOSS_SCALES:
                res[f"survival_fp16_scale_2^{s.bit_length() - 1}"] = F.penalty_survival((g_lm * s).half(), g_pen * s)
            site["readings"][reading] = res
        out["sites"][str(i)] = site
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
