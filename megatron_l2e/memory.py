"""Memory plan: bytes per GPU for a run, and the largest micro-batch that fits (docs/memory.md).

Pure arithmetic on the config (no DeepSpeed, no model, no torch): model states by ZeRO stage,
data-parallel size and precision; activations of the GPT-NeoX parallel-residual block with and
without per-block activation checkpointing; the L2E sites; the LM loss path. Decimal units
(GB = 1e9 bytes), as ``--dry-run``'s storage lines.

The peak is reached either in the backward pass or in the optimizer step, whichever is larger::

    peak = weights + optimizer + L2E state
           + max(gradients alive in the backward + max(activations, saved activations + loss),
                 gradients alive at the step + step transients)

``activations`` is the activation peak of the backward (all saved tensors, or with checkpointing
the blocks' inputs plus one recomputed block, and the gradients in flight); ``saved activations +
loss`` is the moment the loss path peaks, after the forward, before any block's backward.

It must fit in ``distributed.gpu_memory_gb`` minus a reserve: on CUDA 2 GB (CUDA context, cuBLAS
workspaces, NCCL buffers) + 10 % of the device (caching-allocator fragmentation); on CPU 1 GB (the
Python / torch / DeepSpeed process itself, which the plan does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
CUDA_RESERVE_BYTES = 2 * GB          # CUDA context + cuBLAS workspaces + NCCL buffers
CUDA_FRAGMENTATION = 0.10            # share of the device the caching allocator loses to fragmentation
CPU_RESERVE_BYTES = 1 * GB           # the process itself (interpreter, torch, DeepSpeed), on CPU
DEFAULT_LOSS_CHUNK_TOKENS = 4096     # chunked / fused loss: tokens per chunk, where the config has no key
ZERO3_PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (we keep it)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOSS_IMPLS = ("reference", "chunked", "fused")


@dataclass(frozen=True)
class Dims:
    """What the plan reads from ``model``: GPT-NeoX dimensions and the attention kernel."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    tied: bool = False
    attn: str = "sdpa"               # sdpa | flash_attention_2 | eager
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    cuda: bool = True

    @classmethod
    def of(cls, m, cuda: bool = True) -> Dims:
        # auto: flash-attn where CUDA and the package are there, else SDPA; plan SDPA's (larger) bytes
        attn = "sdpa" if m.attn_implementation == "auto" else m.attn_implementation
        return cls(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, ffn=m.ffn_size,
                   vocab=m.vocab_size, seq=m.seq_length, tied=m.tie_word_embeddings, attn=attn,
                   hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, cuda=cuda)

    @property
    def eager_scores(self) -> bool:
        """Attention stores S×S probabilities: eager, or — on CPU — SDPA with attention dropout (its
        math path; CUDA's flash / memory-efficient kernels drop inside the kernel)."""
        return self.attn == "eager" or (not self.cuda and self.attn == "sdpa" and self.attention_dropout > 0)

    @property
    def block_params(self) -> int:
        H, F = self.hidden, self.ffn
        return 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (H * F + F) + (F * H + H)

    @property
    def params(self) -> int:
        """Exactly ``count_parameters(build_model(cfg))`` (70M: 70,426,624)."""
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.block_params + 2 * self.hidden


# ----------------------------------------------------------------------------------------------
# Activations: bytes per token
# ----------------------------------------------------------------------------------------------

def block_bytes_per_token(d: Dims, b: int) -> float:
    """Saved for backward by one GPT-NeoX parallel-residual block (transformers' GPTNeoXLayer), per
    token; ``b`` bytes per element of the training precision. Counted with saved-tensor hooks.

    SDPA: block input H (both LayerNorms read it; it is the previous block's output) + the two
    LayerNorm outputs 2H (query_key_value's and dense_h_to_4h's inputs) + the fused QKV output 3H
    (``v`` is a view of it, so the whole buffer stays) + q and k after the rotary embedding 2H + the
    attention output H and its contiguous [S, heads·d] copy that ``dense`` saves H + the MLP's 2F
    (GELU input, GELU output) = 10H + 2F = 18H for F = 4H; the S×S scores are never stored, only a
    log-sum-exp (fp32, one per head). flash-attn returns the [S, heads·d] layout: 17H.
    Eager: block input, LayerNorm outputs, q, kᵀ, v, the attention output, MLP = 7H + 2F = 15H,
    plus the softmax probabilities in fp32 (``heads × S`` per token) and, below fp32, their copy in
    the training precision (the causal mask is counted once per micro-batch: :func:`head_bytes_per_token`).
    Also: fp32 LayerNorm statistics, 2 × (mean, rstd); with dropout, a bool mask per dropped tensor
    (and the dropped probabilities).
    """
    H, F, nh, S = d.hidden, d.ffn, d.heads, d.seq
    if d.eager_scores:
        out = (7 * H + 2 * F) * b + nh * S * (4 + (b if b < 4 else 0))
        if d.attention_dropout > 0:
            out += nh * S * (1 + b)
    else:
        out = (9 * H + 2 * F) * b if d.attn == "flash_attention_2" else (10 * H + 2 * F) * b
        out += 4 * nh
    out += 2 * 2 * 4
    if d.hidden_dropout > 0:
        out += 2 * H
    return out


def block_work_bytes_per_token(d: Dims, b: int) -> float:
    """Transient memory of the block whose backward runs, on top of what it saved: the gradients in
    flight — the MLP's 2F (the gradient of the GELU output and of its input, momentarily both) and 2H
    for the residual stream's gradient and the LayerNorm gradients; eager attention adds an fp32
    [heads, S] score gradient (counting two overestimated the measured eager peak by 26 % once the
    loss stopped dominating it)."""
    out = (2 * d.ffn + 2 * d.hidden) * b
    if d.eager_scores:
        out += 4 * d.heads * d.seq
    return out


def head_bytes_per_token(d: Dims, b: int) -> float:
    """The final LayerNorm's input and output (embed_out's input) with its statistics; eager attention's
    causal mask ([mb, 1, S, S] in the training precision, shared by every block)."""
    return 2 * d.hidden * b + 8 + (d.seq * b if d.eager_scores else 0)


def l2e_site_bytes_per_token(inhibition: str, kernel: str, hidden: int, b: int) -> float:
    """What one L2E site keeps for backward per token beyond the block's own tensors. The fused
    regularizer returns a view of the block output (already counted: the next block's input) and
    saves only [S, H] statistics; Reverse Deactivation makes a new output (z itself stays saved);
    random dropout saves a mask and a new output; the PyTorch reference path keeps φ and z − mean
    (fp32) and the selection mask."""
    if inhibition == "reverse_deactivation":
        extra = hidden * b
    elif inhibition == "dropout":
        extra = hidden * (1 + b)
    else:
        extra = 0.0
    if kernel == "reference" and inhibition in ("regularizer", "reverse_deactivation"):
        extra += hidden * (4 + 4 + 1)
    return extra


def loss_bytes(loss_impl: str, tokens: int, d: Dims, b: int, chunk_tokens: int) -> float:
    """Peak bytes of the LM loss path for one micro-batch of ``tokens`` tokens.

    reference (``F.cross_entropy(logits.float())``): at the start of its backward the fp32
    log-softmax (saved), the dense fp32 gradient nll_loss hands back and log_softmax's input gradient
    are alive together: 3 × 4·V bytes per token (the forward's logits + fp32 copy + log-softmax,
    b + 4 + 4 ≤ 12, are freed before).
    chunked / fused (gradients computed in the forward, chunk by chunk): one chunk of
    ``chunk_tokens × V`` logits in fp32 (+ the matmul's output in the training precision when that
    is not fp32), the stored gradient of the final hidden states [tokens, H] and an fp32 accumulator
    of embed_out's gradient [V, H].
    """
    V, H = d.vocab, d.hidden
    if loss_impl == "reference":
        return 12.0 * tokens * V
    if loss_impl in ("chunked", "fused"):
        c = min(chunk_tokens, tokens)
        return (4 + (b if b < 4 else 0)) * c * V + b * tokens * H + 4.0 * V * H
    raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")


# ----------------------------------------------------------------------------------------------
# Model states: weights, gradients, optimizer, by ZeRO stage / data-parallel size / precision
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class States:
    weights: float
    optimizer: float
    grads_backward: float            # alive at the start of a backward pass
    grads_step: float                # alive after the last backward, through the optimizer step
    step_transient: float


def model_states(d: Dims, *, precision: str, zero_stage: int, dp: int, grad_accum: int,
                 reduce_bucket_size: int, overlap_comm: bool, cuda: bool = True) -> States:
    """DeepSpeed 0.19's model states per GPU, with torch's AdamW (two moments).

    weights    the module's parameters in the training precision: ``b``·P (ZeRO-3: P/dp of them plus
               the gathered working set — embed_out, V·H, and the prefetch bucket).
    optimizer  ZeRO 1–3: an fp32 master copy of the rank's partition (a clone, in fp32 training too)
               and fp32 Adam m, v: 12·P/dp. ZeRO 0: fp32 updates the module's parameters in place (m, v:
               8P); fp16 and bf16 go through DeepSpeed's FP16 optimizer, an fp32 master 4P + m, v 8P.
    gradients  in the backward: ZeRO 0/1 accumulate ``b``·P in ``param.grad`` — alive when a
               backward starts only under gradient accumulation (otherwise they appear as the
               activations go: only embed_out's V·H, the first to arrive, is counted); ZeRO 2/3 keep
               the rank's partition ``b``·P/dp (under accumulation) and reduce as they go through
               buckets of ``reduce_bucket_size`` elements (two with ``overlap_comm``, which ZeRO 1 then
               also uses in the last micro-batch's backward).
               After the backward: ZeRO 0/1 ``b``·P + the rank's partition copied out twice (ZeRO 1:
               2·b·P/dp, + the buckets without overlap); ZeRO 2/3 2·b·P/dp + buckets.
               On CPU only the pages a gradient is copied into are resident: at most P elements of a bucket.
    step       the fp32 gradient of the master partition (4·P/dp; ZeRO 0: 4P) and as much again for
               the optimizer's temporaries.
    """
    P, b = d.params, BYTES[precision]
    accumulating = grad_accum > 1
    head_grad = b * d.vocab * d.hidden
    if zero_stage == 0:
        g_bwd = b * P if accumulating else head_grad
        g_step = b * P * (2 if dp > 1 else 1)             # + a flattened copy to all-reduce
        if precision in ("fp16", "bf16"):   # DeepSpeed's FP16(_Unfused)Optimizer: fp32 master + m, v
            return States(b * P, 12.0 * P, g_bwd, g_step, 8.0 * P)
        return States(b * P, 8.0 * P, g_bwd, g_step, 8.0 * P)
    shard = P / dp
    bucket = reduce_bucket_size if cuda else min(reduce_bucket_size, P)
    n_buckets = 2 if overlap_comm and zero_stage < 3 else 1
    buckets = bucket * b * n_buckets
    if zero_stage == 1:
        g_bwd = (b * P if accumulating else head_grad) + (buckets + b * shard if overlap_comm else 0.0)
        g_step = b * P + 2 * b * shard + (0.0 if overlap_comm else buckets)
    else:
        g_bwd = (b * shard if accumulating else 0.0) + buckets
        g_step = 2 * b * shard + buckets
    weights = b * P
    if zero_stage == 3:
        weights = b * shard + b * (d.vocab * d.hidden + ZERO3_PREFETCH_ELEMENTS)
    return States(weights, 12.0 * shard, g_bwd, g_step, 8.0 * shard)


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    dp: int
    grad_accum: int
    cuda: bool
    loss_impl: str
    loss_chunk_tokens: int
    capacity: float                  # bytes of the device the plan is for
    reserve: float
    weights: float
    optimizer: float
    grads_backward: float
    grads_step: float
    step_transient: float
    l2e_state: float
    activations: float               # activation peak of the backward, no checkpointing
    activations_ckpt: float          # ... with per-block checkpointing
    saved: float                     # saved activations when the loss runs, no checkpointing
    saved_ckpt: float                # ... with checkpointing (the blocks' inputs)
    loss: float

    @property
    def gradients(self) -> float:
        return max(self.grads_backward, self.grads_step)

    @property
    def usable(self) -> float:
        return self.capacity - self.reserve

    def peak(self, checkpointed: bool) -> float:
        acts, saved = (self.activations_ckpt, self.saved_ckpt) if checkpointed else (self.activations, self.saved)
        backward = self.grads_backward + max(acts, saved + self.loss)
        step = self.grads_step + self.step_transient
        return self.weights + self.optimizer + self.l2e_state + max(backward, step)

    def fits(self, checkpointed: bool) -> bool:
        return self.peak(checkpointed) <= self.usable


def resolve_loss_impl(model_cfg, cuda: bool, loss_impl: str | None = None) -> str:
    """``loss_impl`` if given, else ``model.loss_impl`` where the config has that key (auto: fused on
    CUDA, chunked elsewhere); a config without the key: fused when planning for CUDA (what the paper
    configs' micro-batches assume), the reference on CPU (what ``lm_loss_of`` computes there)."""
    choice = loss_impl or getattr(model_cfg, "loss_impl", None)
    if choice in (None, "auto"):
        if cuda:
            return "fused"
        return "chunked" if choice == "auto" else "reference"
    if choice not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be auto or one of {LOSS_IMPLS}, got {choice!r}")
    return choice


def plan(cfg, *, dp: int, micro_batch: int | None = None, cuda: bool = True, loss_impl: str | None = None,
         loss_chunk_tokens: int | None = None, capacity_bytes: float | None = None) -> MemoryPlan:
    """The memory plan per GPU of ``cfg`` (a :class:`~megatron_l2e.config.Config`) on ``dp``
    data-parallel GPUs at ``micro_batch`` (default: ``train.micro_batch_size``). ``cuda`` False plans a
    CPU process (no overlap buffers, only resident pages, the CPU reserve). ``capacity_bytes``
    overrides ``distributed.gpu_memory_gb``."""
    m, dist = cfg.model, cfg.distributed
    d = Dims.of(m, cuda)
    b = BYTES[cfg.train.precision]
    mb = micro_batch or cfg.train.micro_batch_size
    grad_accum = max(1, cfg.train.global_batch_size // (mb * dp))
    T = mb * d.seq
    impl = resolve_loss_impl(m, cuda, loss_impl)
    chunk = loss_chunk_tokens or getattr(m, "loss_chunk_size", None) or DEFAULT_LOSS_CHUNK_TOKENS
    st = model_states(d, precision=cfg.train.precision, zero_stage=dist.zero_stage, dp=dp, grad_accum=grad_accum,
                      reduce_bucket_size=dist.reduce_bucket_size, overlap_comm=dist.overlap_comm and cuda, cuda=cuda)

    l2e = cfg.l2e
    n_sites, site, l2e_state = 0, 0.0, 0.0
    if l2e.enabled:
        from megatron_l2e.l2e.config import resolve_layers

        n_sites = len(resolve_layers(l2e.layers, d.layers))
        # mean, var, the score's denominator, two step-sum buffers, the warm-up / shift scratch: fp32 [S, H]
        l2e_state = n_sites * 6 * 4.0 * d.seq * d.hidden
        kernel = l2e.kernel if l2e.kernel != "auto" else ("triton" if cuda else "cpu")
        site = l2e_site_bytes_per_token(l2e.inhibition, kernel, d.hidden, b)

    block, work, head = block_bytes_per_token(d, b), block_work_bytes_per_token(d, b), head_bytes_per_token(d, b)
    saved = head + d.layers * block + n_sites * site
    # checkpointed: each block keeps only its input (the L2E sites run inside the blocks, recomputed)
    saved_ckpt = head + d.layers * d.hidden * b
    capacity = capacity_bytes if capacity_bytes is not None else dist.gpu_memory_gb * GB
    reserve = (CUDA_RESERVE_BYTES + CUDA_FRAGMENTATION * capacity) if cuda else CPU_RESERVE_BYTES
    return MemoryPlan(
        micro_batch=mb, dp=dp, grad_accum=grad_accum, cuda=cuda, loss_impl=impl, loss_chunk_tokens=chunk,
        capacity=capacity, reserve=reserve, weights=st.weights, optimizer=st.optimizer,
        grads_backward=st.grads_backward, grads_step=st.grads_step, step_transient=st.step_transient,
        l2e_state=l2e_state,
        activations=T * (saved + work),
        activations_ckpt=T * (saved_ckpt + block + (site if n_sites else 0.0) + work),
        saved=T * saved, saved_ckpt=T * saved_ckpt, loss=loss_bytes(impl, T, d, b, chunk))


def micro_batch_candidates(global_batch: int, dp: int) -> list[int]:
    """Micro-batches with a whole accumulation count: divisors of the per-rank batch, ascending."""
    if dp < 1 or global_batch % dp:
        return []
    per_rank = global_batch // dp
    return [n for n in range(1, per_rank + 1) if per_rank % n == 0]


@dataclass(frozen=True)
class Choice:
    """The largest micro-batch that fits without and with checkpointing (None: not even 1), and the
    pick: the largest without checkpointing where one fits (no recompute: ≈ ⅓ less compute), else
    the largest with it (None when nothing fits)."""

    plain: int | None
    checkpointed: int | None
    micro_batch: int | None
    checkpoint: bool

    @property
    def which(self) -> str:
        if self.micro_batch is None:
            return "none fits"
        return "with checkpointing" if self.checkpoint else "without checkpointing"


def choose_micro_batch(cfg, *, dp: int, **kw) -> Choice:
    plain = ckpt = None
    for n in micro_batch_candidates(cfg.train.global_batch_size, dp):
        p = plan(cfg, dp=dp, micro_batch=n, **kw)
        if p.fits(False):
            plain = n
        if p.fits(True):
            ckpt = n
    if plain is not None:
        return Choice(plain, ckpt, plain, False)
    return Choice(plain, ckpt, ckpt, ckpt is not None)


def needs_checkpointing(cfg, *, dp: int, **kw) -> tuple[bool, str]:
    """``model.checkpoint_activations``: true/false as given; ``auto``: checkpoint only when the
    configured micro-batch does not fit without it. Returns (on, a one-line reason)."""
    setting = cfg.model.checkpoint_activations
    if setting is True or setting is False:
        return setting, f"model.checkpoint_activations: {str(setting).lower()}"
    p = plan(cfg, dp=dp, **kw)
    plain, ckpt = p.peak(False), p.peak(True)
    if plain <= p.usable:
        return False, (f"auto: micro-batch {p.micro_batch} fits without it, {fmt_gb(plain)} of "
                       f"{fmt_gb(p.usable)} usable")
    note = "" if ckpt <= p.usable else " — does not fit either way: lower train.micro_batch_size"
    return True, (f"auto: micro-batch {p.micro_batch} needs it, {fmt_gb(plain)} without, {fmt_gb(ckpt)} with, "
                  f"of {fmt_gb(p.usable)} usable{note}")


def fmt_gb(x: float) -> str:
    """Decimal GB, one decimal from 1 GB on, more below (a smoke model's 0.004 GB is not 0.0)."""
    x /= GB
    return f"{x:.1f} GB" if x >= 0.95 else f"{x:.2f} GB" if x >= 0.095 else f"{x:.3f} GB"


def report_lines(cfg, *, dp: int, cuda: bool = True, **kw) -> list[str]:
    """``--dry-run``'s lines: the plan at the configured micro-batch, the largest micro-batch that
    fits (without / with checkpointing, and which one the plan takes), the peak and the reserve."""
    p = plan(cfg, dp=dp, cuda=cuda, **kw)
    g = fmt_gb
    on = needs_checkpointing(cfg, dp=dp, cuda=cuda, **kw)[0]
    setting = cfg.model.checkpoint_activations
    setting = "auto" if setting == "auto" else f"model.checkpoint_activations: {str(setting).lower()}"
    choice = choose_micro_batch(cfg, dp=dp, cuda=cuda, **kw)
    gb = cfg.train.global_batch_size
    gpus = f"{dp} GPU" if dp == 1 else f"{dp} GPUs"
    if choice.micro_batch is None:
        best = "none (micro-batch 1 does not fit even with checkpointing)"
    else:
        other = (f"{choice.checkpointed if choice.checkpointed is not None else 'none'} with" if not choice.checkpoint
                 else "none without")
        best = (f"{choice.micro_batch} {choice.which} ({other}); the plan's layout: {choice.micro_batch} "
                f"micro-batch × {gb // (choice.micro_batch * dp)} accumulation × {gpus}, checkpointing "
                f"{'on' if choice.checkpoint else 'off'}")
    loss = p.loss_impl + (f", {p.loss_chunk_tokens}-token chunks" if p.loss_impl != "reference" else "")
    reserve = "CUDA context 2 GB + 10 % fragmentation" if cuda else "the CPU process"
    cap = cfg.distributed.gpu_memory_gb
    return [
        f"memory plan per GPU ({cap:g} GB): weights {g(p.weights)}, gradients {g(p.gradients)}, "
        f"optimizer {g(p.optimizer)}, activations {g(p.activations)} (checkpointed {g(p.activations_ckpt)}), "
        f"loss {g(p.loss)}",
        f"largest micro-batch that fits: {best}",
        f"memory plan at micro-batch {p.micro_batch} × {p.grad_accum} accumulation × {gpus} "
        f"(ZeRO {cfg.distributed.zero_stage}, {cfg.train.precision}, loss {loss}"
        f"{f', L2E state {g(p.l2e_state)}' if p.l2e_state else ''}): peak {g(p.peak(False))} without "
        f"checkpointing, {g(p.peak(True))} with, of {g(p.usable)} usable ({g(p.capacity)} − {g(p.reserve)} "
        f"reserve: {reserve}); activation checkpointing {'on' if on else 'off'} ({setting})",
    ]
