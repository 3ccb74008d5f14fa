"""The ``l2e`` config section: one typed dataclass (plain Python, no file handling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Centred sets (the presets) and the paper's 410M sentence read 1-based (docs/reproduction.md).
PLACEMENTS = ("mid2", "top_bottom", "mid_third", "mid2_literal", "mid_third_literal")


@dataclass
class L2EConfig:
    """L2E (Learning Towards Emergence) and its ablations. Defaults: DESIGN.md §3."""

    enabled: bool = False
    # regularizer: L2E eq. 5 | reverse_deactivation: MEmeL | dropout: random drop at the sites
    # (a control) | none: monitor only (statistics, tau, telemetry; no effect on training) |
    # decorrelation: Yan et al.'s counter-hypothesis, λ·Σ_samples mean_{i≠j} C_ij² of the site's
    # per-sample feature correlation (encourages monosemanticity; ignores the selection).
    inhibition: Literal["regularizer", "reverse_deactivation", "dropout", "none", "decorrelation"] = "regularizer"
    # threshold: L2E's moving threshold (eq. 6) | topk: exact per-sample top-k (No-Thr, MEmeL).
    selection: Literal["threshold", "topk"] = "threshold"
    # Eq. 6 "for each incoming batch": step = once per optimizer step with the global batch's mean
    # selected count; micro_batch = once per micro-batch with that micro-batch's count summed over the
    # data-parallel ranks (the training loop calls L2E.micro_batch_end() after each backward).
    threshold_update: Literal["step", "micro_batch"] = "step"
    ratio: float | None = 0.02          # share of a sample's N = S·H neurons selected
    k: int | None = None                # or an absolute count per sample (MEmeL's t); sets ratio aside
    lam: float = 1e-11                  # λ of eq. 5 (any sign: negative encourages monosemanticity)
    # Which batch eq. 5's sum runs over. null: the whole global batch (objective CE + λ·Σ_global).
    # N: as if summed over each N-sample micro-batch and added to that micro-batch's mean CE, the
    # GPT-NeoX reading — objective CE + λ·(N/GB)·Σ_global, whatever the actual micro-batch, accumulation
    # and data-parallel size (the presets write Pythia's own micro-batch: 32 / 32 / 16).
    penalty_per_samples: int | None = None
    eps: float = 1e-6                   # guards log(0) in eq. 5 only
    delta: float = 1.0                  # Δ of Reverse Deactivation (any real)
    dropout_p: float = 0.2              # probability for inhibition: dropout
    layers: str | list[int] = "mid2"    # mid2 | top_bottom | mid_third | mid2_literal | mid_third_literal | [0-based]
    warmup_steps: int = 10              # scored steps of exact top-k before tau takes over
    late_start: int = 10                # optimizer steps before any score exists
    forget_steps: int | None = 10       # cap of the running count in global batches; null = full history
    compensation: float = 0.01          # c of φ's variance compensation
    # auto: Triton on CUDA, the fused numba loops on CPU; reference forces the PyTorch functional path
    kernel: Literal["auto", "reference", "triton", "cpu"] = "auto"
    grad_ratio_interval: int = 0        # log l2e/layer<i>/grad_ratio every N steps (0: at log steps)

    def validate(self) -> list[tuple[str, str]]:
        errs: list[tuple[str, str]] = []
        if self.k is not None:
            if self.k < 1:
                errs.append(("k", f"must be ≥ 1, got {self.k}"))
        elif self.ratio is None:
            errs.append(("ratio", "give l2e.ratio or l2e.k"))
        elif not 0.0 < self.ratio <= 1.0:
            errs.append(("ratio", f"must lie in (0, 1], got {self.ratio}"))
        if self.eps <= 0:
            errs.append(("eps", f"must be > 0, got {self.eps}"))
        if not 0.0 <= self.dropout_p < 1.0:
            errs.append(("dropout_p", f"must lie in [0, 1), got {self.dropout_p}"))
        if self.warmup_steps < 0:
            errs.append(("warmup_steps", f"must be ≥ 0, got {self.warmup_steps}"))
        elif self.warmup_steps == 0 and self.selection == "threshold":
            errs.append(("warmup_steps", "must be ≥ 1 with selection: threshold (tau starts as the "
                                         "warm-up's mean k-th score)"))
        if self.late_start < 0:
            errs.append(("late_start", f"must be ≥ 0, got {self.late_start}"))
        if self.forget_steps is not None and self.forget_steps < 1:
            errs.append(("forget_steps", f"must be ≥ 1 or null, got {self.forget_steps}"))
        if self.compensation < 0:
            errs.append(("compensation", f"must be ≥ 0, got {self.compensation}"))
        if self.penalty_per_samples is not None and self.penalty_per_samples < 1:
            errs.append(("penalty_per_samples", f"must be ≥ 1 or null, got {self.penalty_per_samples}"))
        if self.grad_ratio_interval < 0:
            errs.append(("grad_ratio_interval", f"must be ≥ 0, got {self.grad_ratio_interval}"))
        if isinstance(self.layers, str) and self.layers not in PLACEMENTS:
            errs.append(("layers", f"must be one of {', '.join(PLACEMENTS)} or a list of block indices, "
                                   f"got {self.layers!r}"))
        if isinstance(self.layers, list):
            if not self.layers:
                errs.append(("layers", "an explicit list needs at least one block index"))
            elif len(set(self.layers)) != len(self.layers):
                errs.append(("layers", f"repeated block index in {self.layers}"))
        return errs


def resolve_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """0-based block indices of the L2E sites for a model of ``num_layers`` blocks (DESIGN §3).

    Centred sets: mid2 = {L/2 − 1, L/2}; top_bottom = {0, L − 1}; mid_third = round(L/3) … round(2L/3) − 1.
    The paper's 410M sentence read 1-based ("11th and 12th", "8th to 16th" of 24 layers):
    mid2_literal = {L/2 − 2, L/2 − 1}; mid_third_literal = round(L/3) − 1 … round(2L/3) − 1 (inclusive).
    Rounding is half up.
    """
    L = num_layers
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"l2e.layers: block indices {bad} out of range for {L} layers (0..{L - 1})")
        return sorted(layers)
    if layers == "mid2":
        return sorted({max(L // 2 - 1, 0), L // 2 if L > 1 else 0})
    if layers == "top_bottom":
        return sorted({0, L - 1})
    if layers == "mid_third":
        lo, hi = _round_half_up(L / 3), _round_half_up(2 * L / 3)
        return list(range(lo, max(hi, lo + 1)))
    if layers == "mid2_literal":
        return sorted({max(L // 2 - 2, 0), max(L // 2 - 1, 0)})
    if layers == "mid_third_literal":
        lo, hi = max(_round_half_up(L / 3) - 1, 0), _round_half_up(2 * L / 3) - 1
        return list(range(lo, max(hi, lo) + 1))
    raise ValueError(f"l2e.layers: unknown placement {layers!r}")


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


__all__ = ["L2EConfig", "resolve_layers", "PLACEMENTS"]
