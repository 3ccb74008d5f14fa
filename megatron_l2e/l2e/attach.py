"""Attach L2E sites to a GPT-NeoX model: explicit lifecycle (attach → keep the handle → remove).

    l2e = L2E.attach(model, cfg, global_batch_size=GB, loss_multiplier=GAS * DP, all_reduce=fn)
    for step in ...:
        l2e.set_measure_grad_ratio(log_this_step)
        for micro_batch in ...:
            lm_loss = model(...).loss
            pen = l2e.pop_penalty()                     # None before scores exist / without regularizer
            engine.backward(lm_loss if pen is None else lm_loss + pen)
            l2e.micro_batch_end()                       # eq. 6 per micro-batch (threshold_update: micro_batch)
        applied = engine.step()                         # False when fp16 overflow skipped it
        l2e.step_end(applied)
        log(l2e.metrics())
    l2e.remove()

Scaling. DeepSpeed divides the loss by the accumulation steps and averages gradients over the
data-parallel ranks; with ``loss_multiplier = GAS × DP`` the penalty's contribution to the averaged
parameter gradient is exactly ``λ·2(z − mean)/((z − mean)² + ε)`` per selected element, i.e. the
objective is ``mean LM loss + λ·Σ_{global batch, selected} log((z − mean)² + ε)``. With
``cfg.penalty_per_samples = N`` each site uses λ·N/GB instead of λ (GPT-NeoX's per-micro-batch sum,
made independent of the actual layout).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .config import L2EConfig, resolve_layers
from .site import L2ESite, micro_batch_end_sites, step_end_sites

__all__ = ["L2E"]


def _blocks(model: nn.Module) -> nn.ModuleList:
    try:
        return model.gpt_neox.layers
    except AttributeError:
        raise TypeError(f"L2E attaches to a GPT-NeoX model (model.gpt_neox.layers); got {type(model).__name__}") \
            from None


class L2E:
    """The L2E sites of one model and their hook handles. Build with :meth:`attach`."""

    def __init__(self, sites: dict[int, L2ESite], handles: list, loss_multiplier: float,
                 all_reduce: Callable[[Tensor], None] | None):
        self.sites = sites
        self._handles = handles
        self.loss_multiplier = loss_multiplier
        self.all_reduce = all_reduce

    @classmethod
    def attach(cls, model: nn.Module, cfg: L2EConfig, *, global_batch_size: int, loss_multiplier: float = 1.0,
               all_reduce: Callable[[Tensor], None] | None = None) -> L2E:
        """Hook a site onto the output of each chosen block ``model.gpt_neox.layers[i]``.

        ``cfg.enabled`` False attaches nothing (every call below is then a no-op).
        ``all_reduce(t)``: in-place SUM of ``t`` over the data-parallel group (None on one process).
        """
        errors = cfg.validate()
        if errors:
            key, msg = errors[0]
            raise ValueError(f"l2e.{key}: {msg}")
        if not cfg.enabled:
            return cls({}, [], loss_multiplier, all_reduce)
        blocks = _blocks(model)
        sites, handles = {}, []
        for i in resolve_layers(cfg.layers, len(blocks)):
            site = L2ESite(i, cfg, global_batch_size)
            handles.append(blocks[i].register_forward_hook(_make_hook(site)))
            sites[i] = site
        return cls(sites, handles, loss_multiplier, all_reduce)

    def pop_penalty(self) -> Tensor | None:
        """Sum over sites of the penalties since the last pop, × loss_multiplier; None if there are none."""
        terms = [t for site in self.sites.values() for t in site.pop_pending()]
        if not terms:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total if self.loss_multiplier == 1.0 else total * self.loss_multiplier

    def set_measure_grad_ratio(self, on: bool) -> None:
        """Measure grad_ratio, penalty_survival and phi_selected on the coming step (tensor hooks and an
        extra pass)."""
        for site in self.sites.values():
            site.measure = bool(on)

    def micro_batch_end(self) -> None:
        """After each micro-batch's backward: eq. 6 for ``threshold_update: micro_batch`` sites (one small
        all-reduce when some site is in its threshold phase); a no-op otherwise."""
        sites = [self.sites[i] for i in sorted(self.sites) if self.sites[i].cfg.threshold_update == "micro_batch"]
        if sites:
            micro_batch_end_sites(sites, self.all_reduce)

    def step_end(self, applied: bool = True) -> None:
        """After the optimizer step: one packed all-reduce, then every site updates its state."""
        step_end_sites([self.sites[i] for i in sorted(self.sites)], self.all_reduce, applied)

    def metrics(self) -> dict[str, float]:
        """``l2e/layer<i>/<name>`` of the last applied step: tau, selected_frac, penalty (regularizer),
        grad_ratio and penalty_survival (regularizer, measured steps), phi_selected (measured steps)."""
        return {f"l2e/layer{i}/{k}": v for i in sorted(self.sites) for k, v in self.sites[i].metrics().items()}

    def state_dict(self) -> dict:
        return {"version": 1, "sites": {str(i): s.state_dict() for i, s in self.sites.items()}}

    def load_state_dict(self, sd: dict) -> None:
        saved = {int(i) for i in sd["sites"]}
        if saved != set(self.sites):
            raise ValueError(f"L2E state has sites at blocks {sorted(saved)}, the model has {sorted(self.sites)}")
        for i, s in self.sites.items():
            s.load_state_dict(sd["sites"][str(i)])

    def remove(self) -> None:
        """Detach every hook; the model is as before attach."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _make_hook(site: L2ESite):
    def hook(module: nn.Module, args, output):
        if not module.training:
            return None                                   # identity in eval mode
        tuple_out = isinstance(output, tuple)             # transformers 4.x returns (hidden, ...)
        z = output[0] if tuple_out else output
        # The block input identifies the micro-batch to a checkpoint recompute (see L2ESite.forward).
        key = args[0] if args and isinstance(args[0], Tensor) else None
        z_out = site.forward(z, key=key)
        if z_out is None:
            return None
        return (z_out, *output[1:]) if tuple_out else z_out
    return hook
