"""Entry point: ``python -m megatron_l2e.train --config FILE [--set a.b=c ...] [--resume auto|PATH] [--dry-run]``.

Runs as a plain process on a CPU and unchanged under torchrun / the deepspeed launcher / srun.
``train()`` builds everything, then a loop that reads top to bottom: step → log → validate →
checkpoint. The checkpointer decides when to write.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_l2e.config import Config, ConfigError, load_config

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_l2e.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, action="append",
                   help="run YAML (repeatable; later files win; each may name `base:` files)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.iters=100")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: continue from output.dir's latest checkpoint if any; PATH: a run, its "
                        "checkpoints folder, or a global_step<N> folder")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and derived figures, then exit")
    p.add_argument("--exit-after-steps", type=int, metavar="N",
                   help="stop (with a checkpoint) after N steps of this invocation (GPT-NeoX's exit-interval)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.exit_after_steps is not None and args.exit_after_steps < 1:
        p.error(f"--exit-after-steps must be ≥ 1, got {args.exit_after_steps}")
    return args


# ----------------------------------------------------------------------------------------------
# Derived figures (--dry-run) and start-up checks
# ----------------------------------------------------------------------------------------------

def dry_run_report(cfg: Config) -> str:
    from megatron_l2e.checkpoint import storage_plan
    from megatron_l2e.engine import BatchLayout, launch_env, lr_at
    from megatron_l2e.l2e.config import resolve_layers
    from megatron_l2e.memory import report_lines
    from megatron_l2e.model import build_model, count_parameters

    _, world, _ = launch_env()
    n_params = count_parameters(build_model(cfg.model, meta=True))
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    layout = BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    try:
        layout.check()
        split = layout.describe()
    except Exception as exc:  # a bad split is reported, not raised, in a dry run
        split = f"INVALID: {exc}"
    warm = int(cfg.schedule.warmup * cfg.decay_iters)
    lines = [
        "# resolved config", cfg.to_yaml().rstrip(), "# derived",
        f"parameters: {n_params:,}",
        f"tokens per step: {tokens:,} ({cfg.train.global_batch_size} × {cfg.model.seq_length})",
        f"steps: {cfg.train.iters:,} ({tokens * cfg.train.iters:,} tokens)",
        f"batch split (world size {world}): {split}",
        f"schedule: {cfg.schedule.style}, warm-up {warm:,} steps, decay over {cfg.decay_iters:,} steps, "
        f"lr {cfg.optimizer.lr:g} → {cfg.optimizer.lr * cfg.schedule.min_lr_ratio:g}; "
        f"lr at the last step {lr_at(cfg.train.iters - 1, cfg):.3g}",
        *storage_plan(n_params, precision=cfg.train.precision, zero_stage=cfg.distributed.zero_stage,
                      cfg=cfg.checkpoint, train_iters=cfg.train.iters).lines(),
        *report_lines(cfg, dp=world),   # per GPU of `world` data-parallel GPUs (WORLD_SIZE=8: one node)
    ]
    if cfg.l2e.enabled:
        sites = resolve_layers(cfg.l2e.layers, cfg.model.num_layers)
        n = cfg.model.seq_length * cfg.model.hidden_size
        k = cfg.l2e.k or round(cfg.l2e.ratio * n)
        lines.append(f"L2E: {cfg.l2e.inhibition} / {cfg.l2e.selection} at blocks {sites} (0-based), "
                     f"N = {n:,} neurons per site, k = {k:,} per sample")
        c = cfg.l2e
        if c.inhibition == "regularizer":
            gb = cfg.train.global_batch_size
            scale = "the global batch" if c.penalty_per_samples is None else \
                f"{c.penalty_per_samples}-sample micro-batches (λ·{c.penalty_per_samples}/{gb} = " \
                f"{c.lam * c.penalty_per_samples / gb:.4g} on the global batch's sum)"
            lines.append(f"L2E penalty: λ = {c.lam:g}, eq. 5 summed over {scale}")
        lines.append(f"L2E score: compensation {c.compensation:g}, history "
                     f"{'all samples' if c.forget_steps is None else f'{c.forget_steps} global batches'}; "
                     f"threshold update per {c.threshold_update.replace('_', '-')}")
    else:
        lines.append("L2E: off")
    return "\n".join(lines)


def check_loss_impl(cfg: Config, device: torch.device) -> str:
    """The LM loss path this run takes on ``device`` (a ConfigError where ``model.loss_impl`` cannot run)."""
    from megatron_l2e.loss import LossImplError, resolve_loss_impl

    try:
        impl = resolve_loss_impl(cfg.model.loss_impl, device)
    except LossImplError as exc:
        raise ConfigError([str(exc)]) from None
    return f"{impl} ({cfg.model.loss_chunk_size}-token chunks)" if impl == "chunked" else impl


def check_output_dir(path: str) -> Path:
    from megatron_l2e.engine import LaunchError

    run = Path(path)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise LaunchError(f"output.dir {path}: not writable ({exc.strerror})") from None
    return run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    lm_loss: float
    penalty: float
    grad_norm: float | None
    applied: bool
    seconds: float


def lm_loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of rows ``[mb, S+1]``: inputs row[:-1], labels row[1:], through
    ``model.loss_impl`` (megatron_l2e/loss.py: no [mb, S, V] logits except for ``reference``)."""
    from megatron_l2e.loss import lm_loss

    return lm_loss(model, batch[:, :-1], batch[:, 1:])


def train_step(engine, data, l2e, step: int, layout, dist) -> StepResult:
    """All micro-batches of global step ``step`` (rows [GB·step, GB·(step+1)), this rank's share)."""
    t0 = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # [Σ lm_loss, Σ penalty]
    for j in range(layout.grad_accum):
        batch = data.micro_batch(step, j, layout.micro_batch_size, dist.rank, dist.world_size)
        lm_loss = lm_loss_of(engine, batch.to(dist.device, non_blocking=True))
        loss = lm_loss
        if l2e is not None and (pen := l2e.pop_penalty()) is not None:
            # pen carries grad-accum × dp: DeepSpeed's 1/GAS and rank averaging leave eq. 5 exact.
            loss = loss + pen
            sums[1] += pen.detach().double() / l2e.loss_multiplier
        engine.backward(loss)
        if l2e is not None:
            l2e.micro_batch_end()   # eq. 6 per micro-batch where l2e.threshold_update is micro_batch
        engine.step()  # DeepSpeed updates only at the accumulation boundary
        sums[0] += lm_loss.detach().double()
    applied = bool(engine.was_step_applied()) if hasattr(engine, "was_step_applied") else True
    if l2e is not None:
        l2e.step_end(applied=applied)
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)
    gn = engine.get_global_grad_norm()
    return StepResult(lm_loss=float(sums[0]) / (layout.grad_accum * dist.world_size), penalty=float(sums[1]),
                      grad_norm=None if gn is None else float(gn), applied=applied,
                      seconds=time.perf_counter() - t0)


def step_metrics(r: StepResult, lr: float, tokens_per_step: int, l2e) -> dict[str, float]:
    """What ``metrics.jsonl`` records for a logged step (``loss`` = LM loss + the L2E term)."""
    values = {"loss": r.lm_loss + r.penalty, "lm_loss": r.lm_loss, "penalty": r.penalty, "lr": lr,
              "grad_norm": r.grad_norm if r.grad_norm is not None else float("nan"),
              "tokens_per_s": tokens_per_step / r.seconds, "step_seconds": r.seconds,
              "step_applied": int(r.applied)}
    if l2e is not None:
        values.update(l2e.metrics())
    return values


@torch.no_grad()
def validation_loss(engine, data, cfg: Config, layout, dist) -> float | None:
    """Mean held-out LM loss over ``validation.iters`` micro-batches per rank (L2E is identity in eval)."""
    engine.eval()
    total, n = torch.zeros(2, dtype=torch.float64, device=dist.device), 0
    for i in range(cfg.validation.iters):
        batch = data.valid_micro_batch(i, layout.micro_batch_size, dist.rank, dist.world_size)
        if batch is None:
            break
        total[0] += lm_loss_of(engine, batch.to(dist.device)).double()
        total[1] += 1
        n += 1
    engine.train()
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def prepare_data(cfg: Config, dist):
    """Build (rank 0 first) the smoke corpus if asked, then open and validate the training data."""
    from megatron_l2e import data as data_lib
    from megatron_l2e.engine import barrier

    if cfg.data.smoke:
        def build():
            return data_lib.build_smoke_data(Path(cfg.data.path).parent,
                                             vocab_size=cfg.data.smoke_vocab_size or cfg.model.vocab_size,
                                             seq_length=cfg.model.seq_length, max_files=cfg.data.smoke_max_files)
        if dist.is_main:
            smoke = build()
        barrier()
        if not dist.is_main:
            smoke = build()  # cached: returns at once
        cfg.data.path, cfg.data.valid_path = smoke.prefix, smoke.valid_prefix
        cfg.data.tokenizer = cfg.data.tokenizer or smoke.tokenizer_dir
        cfg.data.smoke = False  # resolved: the config now names the files
    return data_lib.build_train_data(cfg.data, seq_length=cfg.model.seq_length,
                                     global_batch_size=cfg.train.global_batch_size,
                                     vocab_size=cfg.model.vocab_size, iters=cfg.train.iters, seed=cfg.train.seed)


def train(cfg: Config, *, resume: str | None = None, exit_after: int | None = None, stop=None) -> int:
    """The run: 0 when it reached ``train.iters`` (or ``--exit-after-steps``), 75 when a stop request
    (signal, time limit) ended it early with a checkpoint of the step it stopped at. ``stop``: the
    :class:`~megatron_l2e.stopping.StopRequests` installed by ``main`` at start-up (a signal during
    start-up is honoured at the first step boundary); None installs one here."""
    from megatron_l2e import engine as eng
    from megatron_l2e.checkpoint import Checkpointer, client_state, tag_for
    from megatron_l2e.metrics import MetricsLogger
    from megatron_l2e.model import build_model, enable_activation_checkpointing
    from megatron_l2e.stopping import EX_TEMPFAIL, StopRequests, clear_marker, write_marker

    run_dir = check_output_dir(cfg.output.dir)
    ckpt = Checkpointer(cfg.checkpoint, run_dir, train_iters=cfg.train.iters, is_main=True)
    resume_path = ckpt.resolve(resume)                # a bad --resume fails before any work
    reshard = resume_path is not None and ckpt.check_layout(  # same ZeRO stage and model, or refuse
        resume_path, dp_world_size=eng.launch_env()[1], zero_stage=cfg.distributed.zero_stage,
        model=cfg.to_dict()["model"])
    dist = eng.init_distributed(cfg)
    eng.check_same_config(cfg.to_dict())              # every rank resolved the same run, or none trains
    ckpt.is_main = eng.check_shared_output_dir(run_dir, node_local=cfg.checkpoint.node_local)
    eng.agree_on_resume(resume_path)                  # ... and the same checkpoint
    layout = eng.BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, dist.world_size)
    layout.check()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS GEMMs need it
        torch.use_deterministic_algorithms(True)
    data = prepare_data(cfg, dist)
    universal = ckpt.make_universal(resume_path, is_main=ckpt.is_main) if reshard else None

    loss_path = check_loss_impl(cfg, dist.device)     # a fused request without CUDA/liger fails here, one line
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    checkpointing, checkpointing_why = activation_checkpointing(cfg, dist)
    if checkpointing:
        enable_activation_checkpointing(model)
    l2e = attach_l2e(model, cfg, layout)
    model.config.use_cache = False                    # training never reads a key/value cache
    if cfg.model.compile:                             # attention + MLP of every block; L2E hooks stay eager
        from megatron_l2e.model import compile_blocks
        compile_blocks(model)
    engine, _, _ = eng.build_engine(model, cfg, dist, layout, load_universal=universal is not None)

    start = 0
    if resume_path is not None:
        resumed = ckpt.load(engine, resume_path, universal=universal)
        start = resumed.step
        if l2e is not None and "l2e" in resumed.client_state.get("extensions", {}):
            l2e.load_state_dict(resumed.client_state["extensions"]["l2e"])
    if ckpt.is_main:
        clear_marker(ckpt.dir)                        # a marker names the stop of THIS run, or none
    config_yaml = cfg.to_yaml()
    if dist.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        print(config_yaml, flush=True)
        where = f"resuming from {resume_path} at step {start}" if resume_path else "starting at step 0"
        print(f"[megatron-l2e] {where}; world size {dist.world_size} ({dist.backend}); {layout.describe()}",
              flush=True)
        print(f"[megatron-l2e] LM loss: {loss_path}", flush=True)
        print(f"[megatron-l2e] activation checkpointing {'on' if checkpointing else 'off'} ({checkpointing_why})",
              flush=True)
        if universal is not None:
            print(f"[megatron-l2e] resharded {resume_path.name} from {resumed.client_state.get('dp_world_size')} "
                  f"to {dist.world_size} data-parallel ranks through DeepSpeed's universal checkpoint "
                  f"{universal}", flush=True)
    logger = MetricsLogger(cfg.logging, run_dir, total_steps=cfg.train.iters, start_step=start,
                           active=dist.is_main, config=cfg.to_dict())
    dump_l2e = l2e is not None and os.environ.get(DUMP_L2E_ENV, "") not in ("", "0")
    own_stop = stop is None
    stop = stop or StopRequests.install(cfg.train.walltime)

    def save(step: int, full: bool | None = None) -> None:
        """Pythia's extra steps → a weights-only folder (hf_step<N>); interval/final saves → a full
        checkpoint; a step that is both gets both. ``full=True`` (a stop) forces the full one."""
        t0 = time.perf_counter()
        if full is None:
            full = ckpt.full_save_due(step) or not ckpt.weights_save_due(step)
        if full:
            ext = {"l2e": l2e.state_dict()} if l2e is not None else {}
            state = client_state(step=step, consumed_samples=step * layout.global_batch_size,
                                 config=cfg.to_dict(), extensions=ext, dp_world_size=dist.world_size)
            ckpt.save(engine, step, state, config_yaml, rank_extras={"l2e_state": ext["l2e"]} if dump_l2e else None)
            stop.saved(time.perf_counter() - t0)          # what a stop before the deadline must allow for
        t1 = time.perf_counter()
        if ckpt.weights_save_due(step):
            ckpt.save_weights(engine, step, cfg)
        if dist.is_main:
            what = [f"full {t1 - t0:.2f} s"] if full else []
            what += [f"weights-only {time.perf_counter() - t1:.2f} s"] if ckpt.weights_save_due(step) else []
            print(f"[megatron-l2e] saved step {step} ({', '.join(what)})", flush=True)
        logger.log(step, {"checkpoint_seconds": time.perf_counter() - t0})

    if start == 0 and ckpt.should_save(0):
        save(0)
    tokens_per_step = layout.global_batch_size * cfg.model.seq_length
    step, status = start, 0
    try:
        for step in range(start + 1, cfg.train.iters + 1):        # `step` = updates completed after it
            log_now = step % cfg.logging.interval == 0 or step in (1, cfg.train.iters)
            if l2e is not None:
                l2e.set_measure_grad_ratio(log_now)
            lr = engine.get_lr()[0]                                # the lr this update uses
            inject_fault(step, dist.rank)
            inject_signal(step, dist.rank)
            stop.step_started()
            r = train_step(engine, data, l2e, step - 1, layout, dist)
            stop.step_finished()
            logger.advance()
            if log_now:
                logger.log(step, step_metrics(r, lr, tokens_per_step, l2e))
            if cfg.validation.interval and step % cfg.validation.interval == 0:
                vl = validation_loss(engine, data, cfg, layout, dist)
                if vl is not None:
                    logger.log(step, {"val_loss": vl})
            if cfg.eval.interval and step % cfg.eval.interval == 0:
                scores = lm_eval_in_training(engine, cfg, dist)
                if scores:
                    logger.log(step, scores)
            stopped = stop.agreed(dist.device) if step < cfg.train.iters else None   # same on every rank
            leave = stopped or (exit_after is not None and step - start >= exit_after)
            if ckpt.should_save(step) or (leave and step < cfg.train.iters):
                save(step, full=True if leave else None)      # a stop needs a resumable checkpoint
            if stopped:
                status = EX_TEMPFAIL
                if ckpt.is_main:
                    write_marker(ckpt.dir, tag_for(step))
                eng.barrier()                                      # every rank leaves after the marker
                if dist.is_main:
                    print(f"[megatron-l2e] stop request ({stopped}) at step {step}", flush=True)
                    print(f"preempted at step {step}: saved {ckpt.dir / tag_for(step)}; continue with --resume auto",
                          flush=True)
            if leave:
                break
    finally:
        if own_stop:
            stop.uninstall()
    logger.close()
    if dist.is_main and status == 0:
        print(f"[megatron-l2e] done at step {step}; run folder {run_dir}", flush=True)
    eng.shutdown()
    return status


# Debugging / testing hooks, read from the environment (documented in docs/distributed.md):
# MEGATRON_L2E_DUMP_L2E_STATE=1   every rank writes its own L2E state next to each checkpoint
#                                 (global_step<N>/l2e_state.rank<R>.pt), to compare ranks.
# MEGATRON_L2E_FAULT=RANK:STEP    rank RANK raises at the start of step STEP (1-based), to test that a
#                                 crash on one rank ends the whole job and leaves `latest` complete.
# MEGATRON_L2E_SIGNAL=RANK:STEP:SIG[,...]  rank RANK sends itself the real signal SIG (e.g. SIGTERM) at
#                                 the start of step STEP: a preemption that lands on one rank, on cue.
DUMP_L2E_ENV = "MEGATRON_L2E_DUMP_L2E_STATE"
FAULT_ENV = "MEGATRON_L2E_FAULT"
SIGNAL_ENV = "MEGATRON_L2E_SIGNAL"


class InjectedFault(RuntimeError):
    pass


def inject_fault(step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, _, s = spec.partition(":")
    if int(r) == rank and int(s) == step:
        raise InjectedFault(f"fault injected on rank {rank} at step {step} ({FAULT_ENV}={spec})")


def inject_signal(step: int, rank: int) -> None:
    """Entries may repeat, comma-separated ("0:5:SIGINT,0:5:SIGINT": a double Ctrl-C, each handled)."""
    import signal

    for entry in filter(None, os.environ.get(SIGNAL_ENV, "").split(",")):
        r, s, name = entry.split(":")
        if int(r) == rank and int(s) == step:
            os.kill(os.getpid(), getattr(signal, name))


def lm_eval_in_training(engine, cfg: Config, dist) -> dict[str, float]:
    """lm-eval on the in-memory model, rank 0 only (the other ranks wait at the barrier)."""
    from megatron_l2e.engine import barrier

    scores: dict[str, float] = {}
    if dist.is_main:
        from transformers import AutoTokenizer

        from megatron_l2e.eval import in_training_eval

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        scores = in_training_eval(engine.module, tokenizer, cfg.eval)
    barrier()
    return scores


def activation_checkpointing(cfg: Config, dist) -> tuple[bool, str]:
    """``model.checkpoint_activations`` resolved: true/false as given; ``auto`` asks the memory plan
    whether the micro-batch fits without checkpointing in ``distributed.gpu_memory_gb`` — or in the
    device's own memory where that is less (on CPU: RAM shared by this node's ranks)."""
    from megatron_l2e.memory import GB, needs_checkpointing

    if cfg.model.checkpoint_activations != "auto":
        return needs_checkpointing(cfg, dp=dist.world_size)
    capacity = cfg.distributed.gpu_memory_gb * GB
    if dist.device.type == "cuda":
        capacity = min(capacity, torch.cuda.get_device_properties(dist.device).total_memory)
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        capacity = min(capacity, psutil.virtual_memory().total / max(local, 1))
    return needs_checkpointing(cfg, dp=dist.world_size, cuda=dist.device.type == "cuda", capacity_bytes=capacity)


def attach_l2e(model, cfg: Config, layout):
    """Attach L2E sites (or nothing when ``l2e.enabled`` is false)."""
    if not cfg.l2e.enabled:
        return None
    from megatron_l2e.engine import data_parallel_all_reduce
    from megatron_l2e.l2e import L2E

    return L2E.attach(model, cfg.l2e, global_batch_size=layout.global_batch_size,
                      loss_multiplier=float(layout.grad_accum * layout.dp_world),
                      all_reduce=data_parallel_all_reduce())


def _user_errors() -> tuple[type[Exception], ...]:
    from megatron_l2e.checkpoint import CheckpointError
    from megatron_l2e.data import DataError
    from megatron_l2e.engine import LaunchError

    return (ConfigError, CheckpointError, DataError, LaunchError)


def _rank_prefix() -> str:
    """'[rank R/W] ' under a multi-process launcher (so a job log says which rank failed), else ''."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    return f"[rank {rank}/{world}] " if world and world != "1" and rank is not None else ""


def _process_start() -> float:
    """When this process started (Unix seconds): train.walltime counts from there, imports included."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil comes with DeepSpeed; without it, now is close enough
        return time.time()


def _record(fn):
    """torchrun's error recorder: the failing rank's traceback lands in torchrun's failure summary."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            print(dry_run_report(cfg))
            return 0
        from megatron_l2e.stopping import StopRequests

        stop = StopRequests.install(cfg.train.walltime, start=_process_start())   # before any slow start-up
        try:
            return train(cfg, resume=args.resume, exit_after=args.exit_after_steps, stop=stop)
        finally:
            stop.uninstall()
    except _user_errors() as exc:
        for line in str(exc).splitlines():
            print(f"error: {_rank_prefix()}{line}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:           # a second SIGINT: no save; `latest` names the last complete one
        print(f"error: {_rank_prefix()}aborted by a second SIGINT without saving; --resume auto continues from "
              f"the checkpoint `latest` names", file=sys.stderr, flush=True)
        return 130
    except BaseException as exc:
        if _rank_prefix() and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # One line naming the rank (Python's traceback follows), for launchers that interleave every
            # rank's output (deepspeed, srun) and for grep.
            print(f"error: {_rank_prefix()}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
