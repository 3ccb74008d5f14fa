"""One L2E site: the running MS statistics of one block's output and what a micro-batch does with them.

Lifecycle of an optimizer step (DESIGN §3):

* every micro-batch forward (training mode) calls :meth:`L2ESite.forward` with the block output
  ``z`` ``[B, S, H]``. Scores use the statistics as they stood before the step; the site selects
  (exact top-k in warm-up and ``selection: topk``, ``φ ≥ tau`` after), applies its inhibition and adds
  the micro-batch's shifted sums, counts and telemetry to per-step accumulators (on the device, no sync);
* after the optimizer step :func:`step_end_sites` packs every site's accumulators into ONE flat
  fp32 tensor, sums it over the data-parallel group with one all-reduce, and each site merges the
  global batch into ``(count, mean, var)`` and moves its threshold. Every rank computes the same
  state from the same sums, so the state never needs broadcasting.
* with ``threshold_update: micro_batch``, :func:`micro_batch_end_sites` runs after each micro-batch's
  backward: one small all-reduce of the micro-batch's selected counts, then eq. 6 at every site in
  its threshold phase. It runs after the backward so that a checkpoint recompute sees the tau its
  forward used.

A forward re-run by activation checkpointing during backward (detected by a live autograd graph task)
repeats the same autograd operations — the recomputation must save the same tensors — but adds nothing
to the accumulators and registers no hooks. Exact top-k (warm-up, ``selection: topk``) is not selected
again there: each forward keeps its per-sample thresholds ``thr[B]`` for the step, keyed by the block's
input tensor (the very object non-reentrant checkpointing hands back to the recompute), and the
recompute takes its forward's.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as nnF
from torch import Tensor

from . import functional as F
from . import kernels
from .config import L2EConfig

# Scalars per site at the end of the packed vector (after sum_d[N], sum_d2[N]).
_TAIL = ("samples", "selected", "kth_sum", "kth_n", "penalty", "gpen_sq", "glm_sq", "phi_sum", "surv_sq",
         "decorrelation")
# fp32 suffices: the vectors are fp32 sums anyway; the integer counts are exact below 2^24 and,
# above (a 2.8B global batch selects ~2·10^7 elements per site), rounded to 6e-8 relative, which
# moves eq. 6's tau by < 1e-9 — "to fp32 rounding", like everything else in the merged state.
# Exception: the very first step (count 0) has no running mean to shift by, so its sums are raw
# Σz, Σz² — taken in fp64 by the site and packed in fp64 (once per run), since in fp32 a channel at
# 300 ± 1 would lose the variance to cancellation.
PACK_DTYPE = torch.float32


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass — i.e. when a forward runs, it is a checkpoint recompute."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _StepAcc:
    """This rank's sums over the micro-batches of the current optimizer step (device tensors)."""

    sum_d: Tensor | None = None      # [S, H] Σ (z − mean): the site's buffer (or fp64, first step)
    sum_d2: Tensor | None = None     # [S, H] Σ (z − mean)²
    samples: int = 0
    # selected, kth_sum, kth_n, penalty, ...: 0-d fp64 tensors on the device (no host sync on a GPU),
    # or Python floats for CPU activations (the same fp64 sums with no torch call per micro-batch)
    scalars: dict[str, Tensor | float] = field(default_factory=dict)
    measured: bool = False

    def add(self, name: str, value: Tensor) -> None:
        v = value.item() if value.device.type == "cpu" else value.detach().to(torch.float64)
        self.scalars[name] = self.scalars[name] + v if name in self.scalars else v


class L2ESite:
    """Statistics, selection and inhibition of one block's output (``layer`` = 0-based block index).

    State (checkpointed): ``count`` samples absorbed, ``mean``/``var`` ``[S, H]`` fp32 (unbiased),
    ``tau``, ``optimizer_steps`` seen, ``scored_steps``, warm-up accumulators ``warm_sum``/``warm_n``.
    ``mean``/``var`` are created at the first forward (N = S·H is known only then).
    """

    def __init__(self, layer: int, cfg: L2EConfig, global_batch_size: int):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be ≥ 1, got {global_batch_size}")
        self.layer = layer
        self.cfg = cfg
        self.global_batch_size = global_batch_size
        self.max_count = None if cfg.forget_steps is None else cfg.forget_steps * global_batch_size
        # λ as it multiplies the global batch's sum (see L2EConfig.penalty_per_samples): the
        # GPT-NeoX reading λ·(N/GB) makes the objective independent of the actual micro-batch layout.
        self.lam = cfg.lam if cfg.penalty_per_samples is None else \
            cfg.lam * cfg.penalty_per_samples / global_batch_size
        # state
        self.shape: tuple[int, ...] | None = None
        self.count = 0
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.tau = 0.0                      # python float (fp64): eq. 6 increments are ~1e-3
        self.optimizer_steps = 0
        self.scored_steps = 0
        self.warm_sum = 0.0
        self.warm_n = 0
        # per step
        self.measure = False                # grad_ratio / phi_selected on this step (set by the manager)
        # The kernels write/add each micro-batch's shifted sums into these two [S, H] fp32 buffers,
        # reused step after step (fresh ones cost page faults on CPU, and a separate add pass).
        self._sum_bufs: tuple[Tensor, Tensor] | None = None
        self._thr_cache: tuple[tuple, Tensor | None] = ((), None)
        # Exact top-k thresholds of this step's forwards, for their checkpoint recomputes:
        # [weakref to the block input, its _version, thr [B] (None: two forwards shared the input)].
        self._thr_fwd: list[list] = []
        self.kth_calls = 0                  # exact top-k selections run (forwards; recomputes reuse them)
        self._acc = _StepAcc()
        self._pending: list[Tensor] = []    # micro-batch penalties not yet popped
        # threshold_update: micro_batch — the last micro-batch's selected count and samples, until
        # micro_batch_end_sites applies eq. 6; tau as the step began (restored if the step is skipped)
        self._mb: tuple[Tensor | float, int] | None = None
        self._tau_step_start = 0.0
        self._metrics: dict[str, float] = {}

    # ---- derived -------------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)

    @property
    def k(self) -> int | None:
        if self.shape is None:
            return None
        return F.selection_k(self.n_neurons, ratio=None if self.cfg.k is not None else self.cfg.ratio,
                             count=self.cfg.k)

    def scoring(self) -> bool:
        """Scores exist this step: late start passed and at least two samples absorbed."""
        return self.optimizer_steps >= self.cfg.late_start and self.count >= 2

    def exact_topk(self) -> bool:
        return self.scored_steps < self.cfg.warmup_steps or self.cfg.selection == "topk"

    # ---- forward -------------------------------------------------------------------------------
    def _init_shape(self, z: Tensor) -> None:
        neurons = tuple(z.shape[1:])
        if self.shape is None:
            n, cfg = math.prod(neurons), self.cfg
            try:   # k against N, now that N is known
                F.selection_k(n, ratio=None if cfg.k is not None else cfg.ratio, count=cfg.k)
            except ValueError as e:
                raise ValueError(f"L2E site at block {self.layer} (N = {n} neurons): l2e.k/l2e.ratio: {e}") from None
            self.shape = neurons
            self.mean = torch.zeros(neurons, dtype=torch.float32, device=z.device)
            self.var = torch.zeros(neurons, dtype=torch.float32, device=z.device)
        elif neurons != self.shape:
            raise ValueError(
                f"L2E site at block {self.layer}: activation shape {list(neurons)} differs from "
                f"{list(self.shape)} seen before; the MS statistics need a fixed sequence length")
        if self.mean.device != z.device:
            self.mean, self.var = self.mean.to(z.device), self.var.to(z.device)
        if self._sum_bufs is None or self._sum_bufs[0].device != z.device or self._sum_bufs[0].shape != neurons:
            self._sum_bufs = (torch.zeros(neurons, dtype=torch.float32, device=z.device),
                              torch.zeros(neurons, dtype=torch.float32, device=z.device))

    def forward(self, z: Tensor, key: Tensor | None = None) -> Tensor | None:
        """Process one training micro-batch ``z`` ``[B, *neurons]``; returns the replacement output or None.

        ``key``: the block's input tensor (or None). A checkpoint recompute of a forward calls the block
        with the same input object; exact top-k then reuses the thresholds that forward selected with.
        """
        cfg = self.cfg
        recompute = in_backward_recompute()
        if cfg.inhibition in ("regularizer", "reverse_deactivation", "decorrelation") and not torch.is_grad_enabled() \
                and not recompute:
            raise RuntimeError(
                f"L2E site at block {self.layer}: a training-mode forward ran without autograd, so the "
                f"{cfg.inhibition} gradient would be lost. Reentrant activation checkpointing does this: "
                "use gradient_checkpointing_kwargs={'use_reentrant': False}; for evaluation call model.eval()")
        if self._mb is not None and not recompute:
            raise RuntimeError(
                f"L2E site at block {self.layer}: l2e.threshold_update is micro_batch, but the previous "
                "micro-batch's threshold update is still pending: call L2E.micro_batch_end() after each "
                "micro-batch's backward")
        self._init_shape(z)
        mean, var, B = self.mean, self.var, z.shape[0]
        scoring = self.scoring()
        exact = scoring and self.exact_topk()
        if exact:
            thr = self._forward_thr(key) if recompute else None
            if thr is None:
                thr = kernels.kth_score(z, mean, var, self.k, compensation=cfg.compensation, backend=cfg.kernel)
                self.kth_calls += 1
                if not recompute:
                    self._remember_thr(key, thr)
        else:   # one [B] tensor per (tau, B, device), reused by the step's micro-batches (never written)
            tkey = (self.tau if scoring else math.inf, B, z.device)
            if self._thr_cache[0] != tkey:
                self._thr_cache = (tkey, torch.full((B,), tkey[0], dtype=torch.float32, device=z.device))
            thr = self._thr_cache[1]

        mode = "stats"
        if scoring and cfg.inhibition == "regularizer":
            mode = "penalty"
        elif scoring and cfg.inhibition == "reverse_deactivation":
            mode = "reverse_deactivation"
        # grad_ratio: the penalty and the rest of the network read z through two separate views, so a
        # tensor hook on each sees its own gradient. Views change no value and save no tensor. Other
        # steps pass the penalty's z_out on, so one backward pass adds both gradients (fuse_grad).
        split_views = self.measure and mode == "penalty" and z.requires_grad
        z_pen = z.view_as(z) if split_views else z
        # This step's sums go straight into the site's buffers — except in a checkpoint recompute
        # (already counted) and on the very first step (exact fp64 sums below).
        into_bufs = not recompute and self.count > 0
        out = kernels.site_forward(z_pen, mean, var, thr, mean, mode=mode, compensation=cfg.compensation,
                                   lam=self.lam, eps=cfg.eps, delta=cfg.delta, backend=cfg.kernel,
                                   sums=self._sum_bufs if into_bufs else None,
                                   accumulate=into_bufs and self._acc.sum_d is not None,
                                   fuse_grad=not split_views)
        result: Tensor | None = None
        if split_views:
            result = z.view_as(z)
        elif out.z_out is not z:
            result = out.z_out          # Reverse Deactivation's output, or the fused penalty's view of z
        elif cfg.inhibition == "dropout":
            result = nnF.dropout(z, p=cfg.dropout_p, training=True)
        # Decorrelation needs no statistics and no selection: every training micro-batch, from step 0.
        # A recompute repeats the same autograd operations (same saved tensors) but adds nothing.
        decor = F.decorrelation(z, cfg.eps) if cfg.inhibition == "decorrelation" else None

        if not recompute:
            if self.count == 0:   # no shift yet: exact first-step sums (see PACK_DTYPE)
                with torch.no_grad():
                    d = z.detach().double() - mean.double()
                    out = out._replace(sum_d=d.sum(0), sum_d2=d.square().sum(0))
            self._accumulate(z, out, thr if exact else None, scoring, into_bufs)
            if scoring and not exact and cfg.threshold_update == "micro_batch":
                counts = out.counts.sum()
                self._mb = (counts.item() if counts.device.type == "cpu" else counts.to(torch.float64), B)
            if out.loss is not None:
                self._pending.append(out.loss)
            if decor is not None:
                term = self.lam * decor.sum()
                self._pending.append(term)
                self._acc.add("penalty", term.detach())
                self._acc.add("decorrelation", decor.detach().sum())
            if split_views:
                met: dict[str, Tensor] = {}
                z_pen.register_hook(lambda g: self._measure_grad("pen", g, met))
                result.register_hook(lambda g: self._measure_grad("lm", g, met))
        return result

    def _measure_grad(self, side: str, g: Tensor, met: dict[str, Tensor]) -> None:
        """A measured step's tensor hook on one of z's two views (``pen``: the penalty's gradient,
        ``lm``: the rest of the network's): ‖g‖² for grad_ratio, and once both gradients of the
        micro-batch are in, the part of the penalty's that survives their sum in z's precision
        (``penalty_survival``; the first one to arrive is held until then)."""
        self._acc.add("gpen_sq" if side == "pen" else "glm_sq", g.float().square().sum())
        other = met.pop("lm" if side == "pen" else "pen", None)
        if other is None:
            met[side] = g
            return
        g_lm, g_pen = (g, other) if side == "lm" else (other, g)
        moved_sq, _ = F.penalty_survival_sums(g_lm, g_pen)
        self._acc.add("surv_sq", moved_sq)

    def _remember_thr(self, key: Tensor | None, thr: Tensor) -> None:
        """Keep a forward's exact top-k thresholds for its recompute (this step only: see :meth:`discard`)."""
        if key is None:
            return
        live = [e for e in self._thr_fwd if e[0]() is not None]
        for e in live:
            if e[0]() is key and e[1] == key._version:
                e[2] = None        # the same input twice in one step: ambiguous, recomputes select again
                self._thr_fwd = live
                return
        live.append([weakref.ref(key), key._version, thr])
        self._thr_fwd = live

    def _forward_thr(self, key: Tensor | None) -> Tensor | None:
        """The thresholds the forward with this block input selected with, or None (select again)."""
        if key is None:
            return None
        for ref, version, thr in self._thr_fwd:
            if ref() is key and version == key._version:
                return thr
        return None

    def _accumulate(self, z: Tensor, out: kernels.SiteOutput, kth: Tensor | None, scoring: bool,
                    into_bufs: bool) -> None:
        acc = self._acc
        if into_bufs:   # the kernel already added this micro-batch into the site's buffers
            acc.sum_d, acc.sum_d2 = out.sum_d, out.sum_d2
        else:
            acc.sum_d = out.sum_d if acc.sum_d is None else acc.sum_d + out.sum_d
            acc.sum_d2 = out.sum_d2 if acc.sum_d2 is None else acc.sum_d2 + out.sum_d2
        acc.samples += z.shape[0]
        acc.add("selected", out.counts.sum())
        if kth is not None:
            acc.add("kth_sum", kth.sum())
            acc.add("kth_n", torch.tensor(float(kth.numel())))
        if out.loss is not None:
            acc.add("penalty", out.loss)
        if self.measure and scoring:
            # Mean φ of the selected elements: an extra pass, so only on measured steps.
            acc.measured = True
            phi = F.ms_score(z.detach(), self.mean, self.var, self.cfg.compensation)
            thr = kth if kth is not None else torch.full((z.shape[0],), self.tau, device=z.device)
            sel = phi >= thr.to(phi.dtype).reshape(-1, *([1] * (z.dim() - 1)))
            acc.add("phi_sum", torch.where(sel, phi, torch.zeros_like(phi)).sum())

    def pop_pending(self) -> list[Tensor]:
        pending, self._pending = self._pending, []
        return pending

    # ---- step end ------------------------------------------------------------------------------
    def pack(self, device: torch.device, dtype: torch.dtype = PACK_DTYPE) -> Tensor:
        """This rank's step sums as one flat vector: ``[sum_d (N), sum_d2 (N), *_TAIL]``."""
        acc, n = self._acc, self.n_neurons or 0
        vecs = []
        for v in (acc.sum_d, acc.sum_d2):
            vecs.append(torch.zeros(n, dtype=dtype, device=device) if v is None
                        else v.reshape(-1).to(device, dtype))
        scal = dict(acc.scalars, samples=float(acc.samples))
        tail = torch.stack([torch.as_tensor(scal.get(name, 0.0), dtype=torch.float64).to(device)
                            for name in _TAIL]).to(dtype)
        return torch.cat(vecs + [tail])

    def finish(self, vec: Tensor, tail: dict[str, float], measured: bool) -> None:
        """Apply the globally summed step: merge moments, advance the phase, move tau; reset accumulators."""
        cfg, n = self.cfg, self.n_neurons or 0
        samples = int(round(tail["samples"]))
        was_scoring = self.scoring() and samples > 0
        if samples > 0 and n > 0:
            sum_d, sum_d2 = vec[:n].view(self.shape), vec[n:2 * n].view(self.shape)
            b, mean_b, var_b = F.moments_from_shifted_sums(samples, self.mean.to(vec.dtype), sum_d, sum_d2)
            count, mean, var = F.combine_moments(self.count, self.mean, self.var, b, mean_b, var_b,
                                                 max_count=self.max_count)
            self.count = int(count)
            self.mean, self.var = mean.float(), var.float()
        selected = tail["selected"]
        if was_scoring:
            if self.scored_steps < cfg.warmup_steps:
                self.warm_sum += tail["kth_sum"]
                self.warm_n += int(round(tail["kth_n"]))
                if self.scored_steps + 1 == cfg.warmup_steps:
                    self.tau = self.warm_sum / self.warm_n
            elif cfg.selection == "threshold" and cfg.threshold_update == "step":
                self.tau = float(F.update_threshold(self.tau, selected / samples, self.k, n))
            elif tail["kth_n"] > 0:
                # topk after warm-up: tau is telemetry only — the step's mean k-th score.
                self.tau = tail["kth_sum"] / tail["kth_n"]
            self.scored_steps += 1
        self.optimizer_steps += 1

        m = {"tau": float(self.tau),
             "selected_frac": selected / (samples * n) if samples and n else 0.0}
        if cfg.inhibition in ("regularizer", "decorrelation"):
            m["penalty"] = tail["penalty"]
        if cfg.inhibition == "regularizer" and measured:
            if tail["glm_sq"] > 0:
                m["grad_ratio"] = math.sqrt(tail["gpen_sq"] / tail["glm_sq"])
            if tail["gpen_sq"] > 0:
                # ‖round_p(g_lm + g_pen) − g_lm‖ / ‖g_pen‖ over the global batch (p: z's dtype)
                m["penalty_survival"] = math.sqrt(tail["surv_sq"] / tail["gpen_sq"])
        if cfg.inhibition == "decorrelation" and samples:
            m["decorrelation"] = tail["decorrelation"] / samples     # mean over the global batch, without λ
        if measured and selected > 0:
            m["phi_selected"] = tail["phi_sum"] / selected
        self._metrics = m
        self.discard()
        self._tau_step_start = self.tau

    def micro_batch_update(self, selected: float, samples: float) -> None:
        """Eq. 6 with one micro-batch's selected count summed over the data-parallel ranks."""
        self.tau = float(F.update_threshold(self.tau, selected / samples, self.k, self.n_neurons))
        self._mb = None

    def skip_step(self) -> None:
        """An overflow-skipped step changes no state: drop its sums, undo its micro-batch tau updates."""
        self.tau = self._tau_step_start
        self.discard()

    def discard(self) -> None:
        """Drop the step's accumulators, unpopped penalties and pending micro-batch counts."""
        self._acc = _StepAcc()
        self._pending = []
        self._mb = None
        self._thr_fwd = []

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain numbers and CPU tensors only (``torch.load(weights_only=True)`` accepts it)."""
        return {
            "layer": self.layer,
            "shape": None if self.shape is None else list(self.shape),
            "count": self.count,
            "mean": None if self.mean is None else self.mean.detach().cpu().clone(),
            "var": None if self.var is None else self.var.detach().cpu().clone(),
            "tau": float(self.tau),
            "optimizer_steps": self.optimizer_steps,
            "scored_steps": self.scored_steps,
            "warm_sum": float(self.warm_sum),
            "warm_n": self.warm_n,
        }

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["layer"]) != self.layer:
            raise ValueError(f"L2E state of block {sd['layer']} loaded into the site of block {self.layer}")
        shape = None if sd["shape"] is None else tuple(int(s) for s in sd["shape"])
        if self.shape is not None and shape is not None and shape != self.shape:
            raise ValueError(f"L2E state of block {self.layer}: shape {list(shape)} ≠ {list(self.shape)}")
        device = self.mean.device if self.mean is not None else torch.device("cpu")
        self.shape = shape
        self.mean = None if sd["mean"] is None else sd["mean"].to(device, torch.float32).clone()
        self.var = None if sd["var"] is None else sd["var"].to(device, torch.float32).clone()
        self.count = int(sd["count"])
        self.tau = float(sd["tau"])
        self.optimizer_steps = int(sd["optimizer_steps"])
        self.scored_steps = int(sd["scored_steps"])
        self.warm_sum = float(sd["warm_sum"])
        self.warm_n = int(sd["warm_n"])
        self._tau_step_start = self.tau
        self.discard()


def step_end_sites(sites: Sequence[L2ESite], all_reduce: Callable[[Tensor], None] | None = None,
                   applied: bool = True) -> None:
    """End an optimizer step at every site with ONE packed all-reduce (in-place SUM, or None on one process).

    ``applied=False`` (an fp16 overflow-skipped step): the step's accumulators are dropped, no state
    changes and no collective runs (every rank sees the same overflow decision).
    """
    if not applied:
        for s in sites:
            s.skip_step()
        return
    if not sites:
        return
    micro_batch_end_sites(sites, all_reduce)     # a last micro-batch update not yet applied (if any)
    device = next((s.mean.device for s in sites if s.mean is not None), torch.device("cpu"))
    measured = [s._acc.measured for s in sites]
    # Same decision on every rank (identical state): fp64 only while some site has no shift yet.
    dtype = torch.float64 if any(s.count == 0 for s in sites) else PACK_DTYPE
    parts = [s.pack(device, dtype) for s in sites]
    flat = torch.cat(parts)                               # one flat fp32 vector for the whole model
    if all_reduce is not None:
        all_reduce(flat)
    sizes = [p.numel() for p in parts]
    tails = torch.cat([p[-len(_TAIL):] for p in flat.split(sizes)]).tolist()   # one host sync
    for j, (s, p) in enumerate(zip(sites, flat.split(sizes))):
        tail = dict(zip(_TAIL, tails[j * len(_TAIL):(j + 1) * len(_TAIL)]))
        s.finish(p[:-len(_TAIL)], tail, measured[j])


def micro_batch_end_sites(sites: Sequence[L2ESite], all_reduce: Callable[[Tensor], None] | None = None) -> None:
    """``threshold_update: micro_batch``: apply eq. 6 at every site whose last micro-batch was selected by
    tau, with the selected count and samples of that micro-batch summed over the data-parallel group.

    Which sites take part depends only on state that is identical on every rank, so every rank runs
    the same (single, small) all-reduce or none.
    """
    live = [s for s in sites if s._mb is not None]
    if not live:
        return
    device = live[0].mean.device
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for s in live for v in s._mb])
    if all_reduce is not None:
        all_reduce(vec)
    vals = vec.tolist()                                          # one host sync per micro-batch
    for j, s in enumerate(live):
        s.micro_batch_update(vals[2 * j], vals[2 * j + 1])
