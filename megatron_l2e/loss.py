"""The language-model loss: next-token cross-entropy of ``lm_head(hidden)``, without [mb, S, V] logits.

``model.loss_impl`` picks how the mean cross-entropy of the final hidden states ``h [N, H]`` against
``lm_head.weight W [V, H]`` is computed (V = the model's padded vocabulary, 50304 for Pythia: the
logits span every padded id, and labels never hit one — exactly as a plain ``F.cross_entropy``):

* ``reference`` — ``F.cross_entropy((h @ Wᵀ).float(), y)``: fp32 logits ``[N, V]`` kept, with their
  log-softmax and gradient, for the backward (13 GB each at 32 × 2048 × 50304).
* ``chunked`` — :class:`ChunkedLinearCrossEntropy`, PyTorch, any device: the forward walks over
  token chunks and computes each chunk's loss *and* its gradients w.r.t. ``h`` and ``W`` right away
  (logits → log-softmax → softmax − one-hot → ``dh`` chunk, ``dW += …``); the backward only scales
  the stored gradients by the incoming gradient. At most one ``[chunk, V]`` fp32 buffer is alive and
  nothing is recomputed.
* ``fused`` — liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton, CUDA only), the same
  gradients-in-forward scheme fused into kernels.
* ``auto`` — ``fused`` where the hidden states live on CUDA and liger-kernel imports, else ``chunked``.

ZeRO-3: ``W`` is partitioned and only whole inside the lm-head module's own forward (DeepSpeed's
pre-forward hook gathers it, the post-forward hook releases it). So the loss is computed *inside* that
forward: :func:`install_loss_head` swaps the class of the model's existing ``lm_head`` to
:class:`LossHead` (same module object, same Parameter, same name ``lm_head.weight`` — exported as
``embed_out.weight``; DeepSpeed's hooks stay attached), and :func:`lm_loss` runs the whole model with
the labels attached to the head, which then returns the loss in place of logits. Without labels
attached the head is a plain ``nn.Linear`` (generation, evaluation, export see no difference).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

LOSS_IMPLS = ("auto", "fused", "chunked", "reference")
DEFAULT_CHUNK_TOKENS = 1024


class LossImplError(RuntimeError):
    """A loss path that cannot run here (one line)."""


@functools.lru_cache(maxsize=1)
def liger_available() -> bool:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # ImportError, or a Triton/CUDA mismatch failing at import
        return False
    return True


def resolve_loss_impl(choice: str, device: torch.device | str) -> str:
    """The loss path that runs for ``choice`` on ``device`` (raises :class:`LossImplError` for a
    ``fused`` request that cannot run)."""
    if choice not in LOSS_IMPLS:
        raise LossImplError(f"model.loss_impl must be one of {', '.join(LOSS_IMPLS)}, got {choice!r}")
    cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return "fused" if cuda and liger_available() else "chunked"
    if choice == "fused":
        if not cuda:
            raise LossImplError("model.loss_impl fused needs CUDA (liger-kernel's Triton kernels); "
                                "use chunked or auto on this device")
        if not liger_available():
            raise LossImplError("model.loss_impl fused needs liger-kernel (pip install '.[gpu]'); "
                                "use chunked or auto")
    return choice


# ----------------------------------------------------------------------------------------------
# The three paths: (hidden [N, H], weight [V, H], targets [N]) → mean cross-entropy (fp32 scalar)
# ----------------------------------------------------------------------------------------------

def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What ``lm_loss_of`` always did: full fp32 logits, ``F.cross_entropy``."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` with the gradients computed in the forward pass.

    Per chunk of ``chunk`` tokens, in one ``[chunk, V]`` fp32 buffer reused for every chunk:
    ``logits = h_c Wᵀ`` (matmul in the input dtype, as the reference; upcast to fp32), log-softmax in
    place, loss_c = −Σ logp[target], then ``exp`` in place (softmax) and −1 at the targets: that is
    ∂(Σ loss)/∂logits, from which ``dh_c = d W`` and ``dW += dᵀ h_c`` (fp32 accumulators).
    The stored gradients are those of the *summed* loss, so fp16 does not flush them to zero (the
    mean's 1/N ≈ 1e-5 is applied in the backward, in fp32, together with the incoming gradient —
    DeepSpeed's loss scale). The backward scales them in place and returns them: nothing is recomputed.
    A second backward through the same graph (retain_graph) is refused.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, need_dh: bool, need_dw: bool):
        n, h_dim = hidden.shape
        v = weight.shape[0]
        lowp = hidden.dtype != torch.float32
        loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        dh = torch.empty((n, h_dim), dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.zeros((v, h_dim), dtype=torch.float32, device=hidden.device) if need_dw else None
        grads = need_dh or need_dw
        c_max = min(chunk, n)
        buf = torch.empty((c_max, v), dtype=torch.float32, device=hidden.device)
        lp_buf = torch.empty((c_max, v), dtype=hidden.dtype, device=hidden.device) if lowp else None
        w_t = weight.t()
        for s in range(0, n, c_max):
            e = min(s + c_max, n)
            c = e - s
            h_c, t_c = hidden[s:e], targets[s:e].unsqueeze(1)
            z = buf[:c]
            if lowp:
                torch.mm(h_c, w_t, out=lp_buf[:c])
                z.copy_(lp_buf[:c])
            else:
                torch.mm(h_c, w_t, out=z)
            torch.log_softmax(z, 1, out=z)                       # in place (row-wise, cache-resident)
            loss_sum -= z.gather(1, t_c).sum(dtype=torch.float64)
            if not grads:
                continue
            z.exp_()                                             # softmax
            z.scatter_add_(1, t_c, torch.full_like(t_c, -1.0, dtype=z.dtype))  # − one-hot: ∂Σloss/∂logits
            if lowp:
                d = lp_buf[:c]
                d.copy_(z)
                if need_dh:
                    dh[s:e].copy_(d @ weight)
                if need_dw:
                    dw.add_(d.t() @ h_c)
            else:
                if need_dh:
                    torch.mm(z, weight, out=dh[s:e])
                if need_dw:
                    dw.addmm_(z.t(), h_c)
        del buf, lp_buf
        ctx.n, ctx.dtypes = n, (hidden.dtype, weight.dtype)
        ctx.save_for_backward(dh, dw)
        ctx.used = False
        return (loss_sum / n).float()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("chunked loss: its gradients were computed in the forward pass and are "
                               "consumed by the first backward (no retain_graph double backward)")
        ctx.used = True
        dh, dw = ctx.saved_tensors
        scale = grad_out.float() / ctx.n
        out = []
        for g, dtype in ((dh, ctx.dtypes[0]), (dw, ctx.dtypes[1])):
            if g is None:
                out.append(None)
                continue
            g.mul_(scale)
            out.append(g if g.dtype == dtype else g.to(dtype))
        return out[0], out[1], None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1 token, got {chunk}")
    grad = torch.is_grad_enabled()
    return ChunkedLinearCrossEntropy.apply(hidden.contiguous(), weight, targets.contiguous(), int(chunk),
                                           grad and hidden.requires_grad, grad and weight.requires_grad)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """liger-kernel on CUDA. ``reduction="sum"`` and the division by N outside: liger stores the
    gradients in the input dtype during the forward, and the mean's 1/N would push fp16 ones into
    underflow before DeepSpeed's loss scale ever reaches them. fp32 accumulation of ``dW``."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)
    return fn(weight, hidden, targets).float() / targets.numel()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         impl: str = "auto", chunk: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden [..., H] @ weight.T`` against ``targets [...]``."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    impl = resolve_loss_impl(impl, hidden.device)
    if impl == "reference":
        return reference_linear_cross_entropy(hidden, weight, targets)
    if impl == "fused":
        return fused_linear_cross_entropy(hidden, weight, targets)
    return chunked_linear_cross_entropy(hidden, weight, targets, chunk)


def loss_peak_bytes(impl: str, tokens: int, vocab: int, hidden: int, act_bytes: int = 4,
                    chunk: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Estimated peak bytes the loss path adds on top of its inputs (hidden states and ``W``) for one
    micro-batch of ``tokens`` tokens, its gradients w.r.t. both included (``impl`` resolved: reference,
    chunked or fused; ``act_bytes`` 4 for fp32, 2 for bf16/fp16).

    * reference: fp32 logits, their log-softmax (kept for backward) and, in the backward, the gradient of
      the log-softmax and of the logits — three fp32 [N, V] tensors at once (fp32, measured on CPU:
      9.1 GiB at 16384 × 50304, tools/bench_loss.py), plus the low-precision logits and gradient when
      ``act_bytes`` < 4;
    * chunked: one fp32 [chunk, V] buffer (+ its low-precision copy), fp32 dh [N, H] and dW [V, H]
      (cast once to the activation dtype on return when that is not fp32);
    * fused (liger-kernel): its [c, V] logits chunk in the activation dtype with c = next power of 2
      of N / ceil(V / H), dh [N, H] in the activation dtype, fp32 dW.
    """
    n, v, h = tokens, vocab, hidden
    lowp = act_bytes < 4
    if impl == "reference":
        return n * v * (12 + (2 * act_bytes if lowp else 0)) + (n * h + v * h) * act_bytes
    if impl == "chunked":
        c = min(chunk, n)
        return c * v * (4 + (act_bytes if lowp else 0)) + (n * h + v * h) * (4 + (act_bytes if lowp else 0))
    if impl == "fused":
        inc = -(-v // h)
        c = min(n, 1 << max(0, (-(-n // inc) - 1).bit_length()))
        return c * v * act_bytes + n * h * act_bytes + v * h * (4 + (act_bytes if lowp else 0))
    raise ValueError(f"loss_peak_bytes: impl must be reference, chunked or fused, got {impl!r}")


# ----------------------------------------------------------------------------------------------
# The model side: the loss runs inside lm_head's own forward (ZeRO-3 gathers its weight there)
# ----------------------------------------------------------------------------------------------

class LossHead(nn.Linear):
    """The model's ``lm_head`` (class swapped in place by :func:`install_loss_head`).

    A plain ``nn.Linear`` unless :meth:`targets` is active; then its forward returns the mean
    cross-entropy of its logits against those targets, through ``loss_impl``.
    """

    loss_impl: str = "auto"
    loss_chunk: int = DEFAULT_CHUNK_TOKENS

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = self.__dict__.get("_loss_targets")
        if targets is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise LossImplError("lm_head has a bias: the loss paths assume GPT-NeoX's bias-free head")
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"lm_head loss: hidden states {tuple(hidden.shape)} do not match targets "
                             f"{tuple(targets.shape)}")
        return linear_cross_entropy(hidden, self.weight, targets, impl=self.loss_impl, chunk=self.loss_chunk)

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor):
        self.__dict__["_loss_targets"] = labels
        try:
            yield
        finally:
            self.__dict__.pop("_loss_targets", None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine (``.module``) or a compiled module (``._orig_mod``)."""
    for _ in range(4):
        if hasattr(type(model), "get_output_embeddings"):
            return model
        inner = model._modules.get("module") or model._modules.get("_orig_mod")
        if inner is None:
            break
        model = inner
    raise LossImplError(f"{type(model).__name__} is not a causal LM with an output embedding")


def loss_head_of(model: nn.Module) -> LossHead | None:
    head = _unwrap(model).get_output_embeddings()
    return head if isinstance(head, LossHead) else None


def install_loss_head(model: nn.Module, impl: str = "auto", chunk: int = DEFAULT_CHUNK_TOKENS) -> nn.Module:
    """Make ``model``'s lm-head compute the loss through ``impl`` (see the module doc). Idempotent;
    works before or after the DeepSpeed engine wraps the model (the module object is kept)."""
    if impl not in LOSS_IMPLS:
        raise LossImplError(f"model.loss_impl must be one of {', '.join(LOSS_IMPLS)}, got {impl!r}")
    head = _unwrap(model).get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = LossHead
    elif not isinstance(head, LossHead):
        raise LossImplError(f"lm_head is a {type(head).__name__}, not an nn.Linear: cannot install the loss path")
    head.loss_impl, head.loss_chunk = impl, int(chunk)
    return model


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` (a GPTNeoXForCausalLM or the engine wrapping it).

    The whole model forward runs (every hook: DeepSpeed's, L2E's, checkpointing); with a
    :class:`LossHead` the head returns the loss itself (in the output's ``logits`` field).
    """
    head = loss_head_of(model)
    if head is None or head.loss_impl == "reference":
        logits = model(input_ids=input_ids).logits                    # [mb, S, V]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    with head.targets(labels):
        return model(input_ids=input_ids).logits
