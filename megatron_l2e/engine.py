"""DeepSpeed: process-group start-up, config translation, engine construction.

The only module that imports DeepSpeed. It runs unchanged as a plain single process on a CPU (we
fill in the torch.distributed environment DeepSpeed would otherwise look for through mpi4py), under
``torchrun``, under the ``deepspeed`` launcher and under ``srun``.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_l2e.config import Config


class LaunchError(Exception):
    """A launch or batch-layout mistake the user must fix (one line)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class BatchLayout:
    """global batch = micro-batch × gradient-accumulation steps × data-parallel size, exactly."""

    global_batch_size: int
    micro_batch_size: int
    dp_world: int

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_world)

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_world

    def check(self) -> None:
        mb, dp, gb = self.micro_batch_size, self.dp_world, self.global_batch_size
        if gb % (mb * dp):
            raise LaunchError(
                f"train.global_batch_size {gb} is not micro_batch_size {mb} × accumulation × "
                f"{dp} data-parallel ranks for any whole accumulation; choose a micro-batch and rank "
                f"count whose product divides {gb}")

    def describe(self) -> str:
        return (f"{self.micro_batch_size} micro-batch × {self.grad_accum} accumulation × "
                f"{self.dp_world} data-parallel = {self.global_batch_size}")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise LaunchError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / deepspeed / Slurm variables, else a single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        # srun without torchrun: one task per GPU.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def init_distributed(cfg: Config) -> DistInfo:
    """Start the process group (gloo on CPU, nccl on CUDA) through DeepSpeed's comm layer."""
    rank, world, local = launch_env()
    # A plain `python -m megatron_l2e.train` is a world of one: give DeepSpeed the variables a
    # launcher would have set, or it goes looking for mpi4py.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise LaunchError("MASTER_PORT is not set for a multi-process run (use torchrun or the deepspeed launcher)")
        os.environ["MASTER_PORT"] = str(_free_port())

    cuda = torch.cuda.is_available()
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise LaunchError("distributed.backend nccl needs CUDA; use gloo (or auto) on CPU")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    import deepspeed
    import deepspeed.ops

    if not cuda:
        tune_cpu_malloc()
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (50-90 s on
        # 2 cores, every start). gloo does the job; mark the op unavailable so it is never built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def tune_cpu_malloc() -> bool:
    """On a CPU run, keep freed memory in glibc's heap instead of handing it back each step.

    PyTorch's CPU tensors come from malloc. By default glibc returns freed blocks above 128 KB to the
    kernel (trim/mmap thresholds that adapt upwards only slowly), so every step page-faults its
    gradient, optimizer and activation buffers back in: measured 5 % of a 70M-shaped CPU step
    (tools/bench_overhead.py, docs/performance.md). Raising the trim threshold and the top pad, and
    fixing the mmap threshold at glibc's 64-bit maximum (32 MiB), lets the next step reuse the pages.
    Skipped when the user set any ``MALLOC_*`` variable (theirs win) or libc is not glibc. Returns
    whether it changed anything."""
    if any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("MEGATRON_L2E_NO_MALLOC_TUNING"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim, m_top_pad, m_mmap = -1, -2, -3
        ok = libc.mallopt(m_trim, 1 << 30) and libc.mallopt(m_top_pad, 256 << 20) and libc.mallopt(m_mmap, 32 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def lr_at(step: int, cfg: Config) -> float:
    """GPT-NeoX's AnnealingLR: the learning rate of optimizer update ``step`` (0-based).

    Linear warm-up from 0 over ``warmup·decay_iters`` updates, then cosine (or linear) decay to
    ``min_lr = lr·min_lr_ratio`` at ``decay_iters``, held there after. The first update has lr 0,
    exactly as in GPT-NeoX (its scheduler starts at iteration 0).
    """
    lr = cfg.optimizer.lr
    min_lr = lr * cfg.schedule.min_lr_ratio
    decay_iters = cfg.decay_iters
    warmup_iters = cfg.schedule.warmup * decay_iters
    if warmup_iters > 0 and step <= warmup_iters:
        return lr * step / warmup_iters
    if cfg.schedule.style == "constant":
        return lr
    if step >= decay_iters:
        return min_lr
    frac = (step - warmup_iters) / (decay_iters - warmup_iters)
    if cfg.schedule.style == "linear":
        return max(lr * (1.0 - frac), min_lr)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * frac) + 1.0)


def deepspeed_config(cfg: Config, layout: BatchLayout, *, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config of a run (Pythia's ZeRO and fp16 settings).

    ``load_universal``: the resume reads a universal checkpoint (another data-parallel size); DeepSpeed
    must know before ``deepspeed.initialize``."""
    ds = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "steps_per_print": 10**12,            # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, not a DeepSpeed optimizer
        "zero_optimization": {
            "stage": cfg.distributed.zero_stage,
            "allgather_partitions": True,
            "allgather_bucket_size": cfg.distributed.allgather_bucket_size,
            "overlap_comm": cfg.distributed.overlap_comm and torch.cuda.is_available(),
            "reduce_scatter": True,
            "reduce_bucket_size": cfg.distributed.reduce_bucket_size,
            # Pythia's true on CUDA (a contiguous gradient buffer against fragmentation). On a CPU it only
            # adds a per-parameter hook and a copy of every gradient per step (~3 % of a 70M-shaped CPU
            # step, tools/bench_overhead.py); overlap_comm above is CUDA-only for the same reason.
            "contiguous_gradients": torch.cuda.is_available(),
        },
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    p = cfg.train.precision
    if p == "fp16":
        f = cfg.train.fp16
        ds["fp16"] = {"enabled": True, "loss_scale": f.loss_scale, "initial_scale_power": f.initial_scale_power,
                      "loss_scale_window": f.loss_scale_window, "hysteresis": f.hysteresis,
                      "min_loss_scale": f.min_loss_scale}
    elif p == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    from megatron_l2e.model import param_groups  # transformers: imported only when a model is built

    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    if o.type == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise LaunchError("optimizer.type apex_fused_adam needs NVIDIA apex (not installed here); "
                              "use adamw") from None
        return FusedAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adam_w_mode=True)
    # fused AdamW on CUDA (the job apex's FusedAdam did for GPT-NeoX); the foreach path on CPU.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=device.type == "cuda")


def build_engine(model: torch.nn.Module, cfg: Config, dist: DistInfo, layout: BatchLayout, *,
                 load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and Pythia's schedule."""
    import deepspeed

    if p := {"fp16": "fp16", "bf16": "bf16"}.get(cfg.train.precision):
        if dist.device.type == "cpu" and p == "fp16":
            raise LaunchError("train.precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use fp32 or bf16")
    model.to(dist.device)
    optimizer = build_optimizer(model, cfg, dist.device)
    base_lr = cfg.optimizer.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg) / base_lr if base_lr > 0 else 0.0)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, layout, load_universal=load_universal), dist_init_required=False)
    return engine, optimizer, scheduler


def data_parallel_all_reduce():
    """In-place SUM over the data-parallel group (here: the world), or None for one process."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return None

    def all_reduce(t: torch.Tensor) -> None:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)

    return all_reduce


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def _first_difference(a, b, prefix: str = "") -> str:
    """The dotted key of the first value that differs between two nested dicts ('' if none)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{prefix}{k}"
            if d := _first_difference(a[k], b[k], f"{prefix}{k}."):
                return d
        return ""
    return "" if a == b else prefix.rstrip(".")


def check_same_config(resolved: dict) -> None:
    """Refuse to train unless every rank resolved the same config (same files, same --set overrides).

    Every rank gathers every rank's resolved dict (a few KB), so all of them reach the same verdict
    and raise together: nobody is left waiting in a collective.
    """
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return
    gathered: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, resolved)
    for r, other in enumerate(gathered):
        if other != gathered[0]:
            key = _first_difference(gathered[0], other)
            raise LaunchError(
                f"the resolved config differs between ranks: rank {r} has {key} = "
                f"{_lookup(other, key)!r}, rank 0 has {_lookup(gathered[0], key)!r}; launch every rank "
                f"with the same --config files and --set overrides")


def _node_key() -> str:
    """Which node this rank runs on: torchrun's GROUP_RANK, Slurm's SLURM_NODEID, else the host name."""
    for var in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").strip():
            return f"{var}={os.environ[var]}"
    return socket.gethostname()


def _ranges(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def check_shared_output_dir(run_dir, node_local: bool = False) -> bool:
    """Every rank must see the files rank 0 writes into ``output.dir`` (or, ``node_local``, those of its
    node's lowest rank). Returns whether this rank writes ``latest`` and the checkpoint's config: rank 0,
    or each node's lowest rank with ``node_local``. Fails in seconds, naming a rank that cannot see it.
    """
    import secrets

    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return True
    rank, world = tdist.get_rank(), tdist.get_world_size()
    mine = (_node_key() if node_local else "all", secrets.token_hex(8))
    infos: list = [None] * world
    tdist.all_gather_object(infos, mine)
    writer = min(r for r in range(world) if infos[r][0] == mine[0])
    probe = os.path.join(os.fspath(run_dir), f".shared-check.{writer}")
    if rank == writer:
        with open(probe, "w") as f:
            f.write(mine[1])
    tdist.barrier()
    try:
        with open(probe) as f:
            seen = f.read() == infos[writer][1]
    except OSError:
        seen = False
    verdicts: list = [None] * world
    tdist.all_gather_object(verdicts, seen)
    if rank == writer:
        try:
            os.remove(probe)
        except OSError:
            pass
    blind = [r for r, ok in enumerate(verdicts) if not ok]
    if blind:
        where = "its node's lowest rank" if node_local else "rank 0"
        raise LaunchError(
            f"output.dir {run_dir} is not shared between ranks ({_ranges(blind)} cannot see the files {where} "
            f"writes there): put output.dir on a shared file system, or set checkpoint.node_local: true")
    return rank == writer


def agree_on_resume(path) -> None:
    """Every rank must resume from the same checkpoint (or none): one all-gather of what each resolved.
    A disagreement (node-local copies, a stale ``latest``, different --resume arguments) fails at once
    on every rank with one line naming the ranks and what each saw."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return
    seen: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(seen, None if path is None else os.path.abspath(os.fspath(path)))
    if len(set(seen)) > 1:
        groups: dict = {}
        for r, p in enumerate(seen):
            groups.setdefault(p, []).append(r)
        told = "; ".join(f"{_ranges(rs)}: {p or 'no checkpoint (start at step 0)'}" for p, rs in groups.items())
        raise LaunchError(f"the ranks resolved different checkpoints to resume from — {told}; make every rank "
                          f"see the same output.dir (or pass the same --resume PATH)")


def _lookup(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<missing>"
        d = d[k]
    return d


def broadcast_object(obj, src: int = 0):
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group, and forget DeepSpeed's cached groups: a later ``init_distributed`` in
    the same process (tests, notebooks) would otherwise hand ZeRO a destroyed group."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
    try:
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith("_GROUP") and not callable(value):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    for name in ("_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
