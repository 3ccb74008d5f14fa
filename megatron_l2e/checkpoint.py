"""Checkpoints: when to save, atomic ``latest``, keep-last-k, client state, exact resume.

Layout (DESIGN §7)::

    RUN/checkpoints/global_step<N>/   DeepSpeed's files (every rank writes its ZeRO shard)
                                      + config.yaml (the resolved run config, plain YAML)
                                      + rng_state.rank<R>.pt (each rank's own generators)
    RUN/checkpoints/global_step<N>_universal/   DeepSpeed's universal form of global_step<N>, made on
                                      demand to resume on another data-parallel size
    RUN/checkpoints/latest            a text file naming the tag, replaced atomically only after
                                      every rank finished writing — a crash mid-save leaves it alone
    RUN/checkpoints/preempted         the tag a stop request saved (megatron_l2e.stopping)
    RUN/checkpoints/hf_step<N>/       Pythia's log-spaced extra steps: weights only, a Hugging Face
                                      folder of the fp32 master weights (never pruned, never resumed
                                      from; written under a temporary name, then renamed)

The client state holds only tensors and plain Python values (step, consumed samples, the resolved
config, all RNG states, ``extensions.<name>``) so ``torch.load(weights_only=True)`` reads it, and
DeepSpeed's own files are read back through a weights-only checkpoint engine.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_l2e.config import CheckpointConfig

TAG_RE = re.compile(r"^global_step(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
# Model keys that a checkpoint's weights or L2E state depend on: a resume must not change them.
# (Dropout, attention kernel, activation checkpointing and init may change between allocations.)
MODEL_KEYS_FIXED_BY_CHECKPOINT = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                                  "vocab_size", "seq_length", "rotary_pct", "rotary_emb_base",
                                  "use_parallel_residual", "tie_word_embeddings", "hidden_act", "layer_norm_eps")
WEIGHTS_TAG_RE = re.compile(r"^hf_step(\d+)$")     # weights-only extra steps (not matched by TAG_RE)


class CheckpointError(Exception):
    """A resume path that does not exist or is not a checkpoint (one line)."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def weights_tag_for(step: int) -> str:
    """The folder of a weights-only save (a Hugging Face model folder)."""
    return f"hf_step{step}"


# ----------------------------------------------------------------------------------------------
# RNG states as weights_only-safe values
# ----------------------------------------------------------------------------------------------

def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------
# Weights-only loading of DeepSpeed's files
# ----------------------------------------------------------------------------------------------

def _install_weights_only_loader(engine) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not isinstance(ce, TorchCheckpointEngine) or getattr(ce, "_weights_only", False):
        return

    def load(path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    ce._weights_only = True


def _allow_deepspeed_globals() -> None:
    """DeepSpeed stores a few plain enums/containers in its files; allow exactly those."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    import collections
    allowed += [collections.OrderedDict, set]
    torch.serialization.add_safe_globals(allowed)


@contextlib.contextmanager
def weights_only_torch_load():
    """Make DeepSpeed's offline utilities (``deepspeed.utils.zero_to_fp32``, which hard-code
    ``torch.load(weights_only=False)``) read the checkpoint with ``weights_only=True`` while they run.

    ``torch.load`` is swapped process-wide for the duration: use it in single-purpose processes
    (export), not around concurrent work.
    """
    _allow_deepspeed_globals()
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ----------------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------------

@dataclass
class Resumed:
    step: int
    consumed_samples: int
    client_state: dict
    path: Path


class Checkpointer:
    """Decides when to save, writes atomically, prunes, and resumes."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, *, train_iters: int, is_main: bool):
        self.cfg = cfg
        self.dir = Path(run_dir) / "checkpoints"
        self.train_iters = train_iters
        self.is_main = is_main
        self.extra = set(cfg.extra_steps)

    # -- when -------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """``step`` = optimizer updates completed. Interval saves, Pythia's extra steps, the end."""
        if step in self.extra:
            return True
        if self.cfg.interval and step > 0 and step % self.cfg.interval == 0:
            return True
        return self.cfg.save_final and step == self.train_iters

    def full_save_due(self, step: int) -> bool:
        """A full (resumable) DeepSpeed checkpoint is scheduled at ``step``: an interval save or the end."""
        if self.cfg.interval and step > 0 and step % self.cfg.interval == 0:
            return True
        return self.cfg.save_final and step == self.train_iters

    def weights_save_due(self, step: int) -> bool:
        """``step`` is one of Pythia's extra steps: a weights-only Hugging Face folder (``hf_step<N>``)."""
        return step in self.extra

    # -- save -------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, config_yaml: str,
             rank_extras: dict[str, dict] | None = None) -> Path:
        """Every rank calls this. ``latest`` moves only after all ranks wrote their files.

        ``rank_extras`` (debugging): every rank also writes ``<name>.rank<R>.pt`` into the checkpoint
        folder for each entry — e.g. its own copy of the L2E state, which rank 0's client state
        alone cannot show to be identical on every rank.
        """
        tag = tag_for(step)
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / tag
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            # Every rank's own generators (CUDA ones differ per device; rank 0's client state has only its own).
            torch.save(rng_state(), path / f"rng_state.rank{_rank()}.pt")
            if self.is_main:
                (path / "config.yaml").write_text(config_yaml)
            for name, state in (rank_extras or {}).items():
                torch.save(state, path / f"{name}.rank{_rank()}.pt")
        except (OSError, RuntimeError) as exc:
            # A full disk, a quota, a vanished mount: one line; `latest` has not moved. (torch.save reports
            # file errors as RuntimeErrors of its stream writer — "file write failed", "open file failed
            # with strerror: …"; other RuntimeErrors are not ours to word.)
            text = str(exc)
            if isinstance(exc, RuntimeError) and not re.search(r"file (write|open)? ?failed|open file failed", text):
                raise
            latest = self.dir / "latest"
            last = latest.read_text().strip() if latest.is_file() else "no checkpoint yet"
            if isinstance(exc, OSError) and exc.strerror:
                why = exc.strerror
            else:
                m = re.search(r"strerror: ([^\n]+)|(file write failed)", text)
                why = (m.group(1) or m.group(2)).strip() if m else text.splitlines()[0]
            raise CheckpointError(f"saving {path} failed ({why}); `latest` still names {last}: free space, remove "
                                  f"{path.name}, then --resume auto") from None
        _barrier()
        if self.is_main:
            self._write_latest(tag)
            self._prune(keep=tag)
        _barrier()
        return path

    def _write_latest(self, tag: str) -> None:
        tmp = self.dir / f".latest.tmp.{os.getpid()}"
        tmp.write_text(tag + "\n")
        os.replace(tmp, self.dir / "latest")  # atomic on POSIX

    def _prune(self, keep: str) -> None:
        """Keep the last k interval checkpoints; never Pythia's extra steps or ``latest``'s tag."""
        if self.cfg.keep_last is None:
            return
        steps = sorted(s for p in self.dir.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None)
        # An extra step's full checkpoint is kept unless its weights-only folder exists (older runs
        # saved extra steps as full checkpoints; since hf_step<N> holds them, only interval saves remain).
        prunable = [s for s in steps if tag_for(s) != keep
                    and (s not in self.extra or (self.dir / weights_tag_for(s)).is_dir())]
        # keep_last counts the checkpoint just written too.
        excess = len(prunable) - (self.cfg.keep_last - 1)
        for s in prunable[:max(excess, 0)]:
            shutil.rmtree(self.dir / tag_for(s), ignore_errors=True)
            shutil.rmtree(self.dir / (tag_for(s) + UNIVERSAL_SUFFIX), ignore_errors=True)

    def save_weights(self, engine, step: int, cfg) -> Path:
        """Pythia's extra steps: ``RUN/checkpoints/hf_step<N>/``, a Hugging Face folder of the fp32
        master weights (safetensors + config + tokenizer + the run's config YAML), never pruned.

        Every rank calls this (gathering ZeRO-partitioned masters is a collective); rank 0 writes the
        folder under a temporary name (``.hf_step<N>.tmp``) and renames it when complete, so a crash
        never leaves a partial folder under the final name. A folder of the same step from an earlier
        attempt is replaced.
        """
        state = gather_fp32_masters(engine, is_main=self.is_main)
        final = self.dir / weights_tag_for(step)
        if self.is_main:
            from megatron_l2e.export import write_hf_folder

            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".hf_step*.tmp"):          # a crashed attempt's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.dir / f".{final.name}.tmp"
            write_hf_folder(tmp, state, cfg)
            del state
            _publish_dir(tmp, final)
        _barrier()
        return final

    # -- resume -----------------------------------------------------------------------------
    def resolve(self, resume: str | None) -> Path | None:
        """``auto`` → the checkpoint ``latest`` names (None if there is none yet); a path → that
        checkpoint folder (``RUN``, ``RUN/checkpoints`` or ``RUN/checkpoints/TAG``)."""
        if resume is None:
            return None
        if resume == "auto":
            latest = self.dir / "latest"
            if not latest.exists():
                return None
            return self.dir / latest.read_text().strip()
        p = Path(resume)
        if not p.exists():
            raise CheckpointError(f"--resume {resume}: no such file or directory")
        for cand in (p, p / "checkpoints"):
            if (cand / "latest").is_file():
                return cand / (cand / "latest").read_text().strip()
        if step_of(p.name) is not None and p.is_dir():
            return p
        raise CheckpointError(f"--resume {resume}: not a checkpoint (no 'latest' file and not a global_step<N> folder)")

    def check_layout(self, path: Path, *, dp_world_size: int, zero_stage: int, model: dict | None = None) -> bool:
        """Check a resume against the checkpoint before any work; True when it needs resharding.

        A changed ZeRO stage, or a changed model architecture (``model``: this run's model section), is
        refused in one line. A changed data-parallel size (16 GPUs → 8 after a node loss) is allowed:
        the caller converts the checkpoint to DeepSpeed's universal form (:meth:`make_universal`).
        Runs before any process group exists.
        """
        if model is not None:
            check_same_model(path, model)
        saved = saved_layout(path)
        if saved is None:
            return False
        world, stage = saved
        if stage is not None and stage != zero_stage:
            raise CheckpointError(f"checkpoint {path} was written with distributed.zero_stage {stage}; this run "
                                  f"has {zero_stage} (resume with the same ZeRO stage)")
        return world is not None and world != dp_world_size

    def make_universal(self, path: Path, *, is_main: bool) -> Path:
        """DeepSpeed's universal checkpoint of ``path`` (``<tag>_universal`` beside it), made by rank 0 with
        ``python -m deepspeed.checkpoint.ds_to_universal`` unless it exists; every rank waits for it.

        Written into a temporary folder and renamed, so an interrupted conversion is redone, never used.
        """
        out = path.parent / (path.name + UNIVERSAL_SUFFIX)
        error = ""
        if is_main and not out.is_dir():
            tmp = path.parent / f".{out.name}.tmp.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            if "universal_checkpoint_info" not in _client_keys(path):   # written before we stored it
                cmd.append("--inject_missing_state")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
                error = f"checkpoint {path}: DeepSpeed's universal conversion failed ({last})"
            else:
                for f in ("config.yaml",):
                    shutil.copy2(path / f, tmp / f)
                os.replace(tmp, out)
        error = _broadcast(error)
        if error:
            raise CheckpointError(error)
        return out

    def load(self, engine, path: Path, *, universal: Path | None = None) -> Resumed:
        """Load ``path`` (or its universal form ``universal``, for another data-parallel size).

        Each rank restores its own generators (``rng_state.rank<R>.pt``) when the checkpoint was written
        by as many ranks; otherwise (resharded, or an older checkpoint) rank 0's from the client state.
        """
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        _allow_deepspeed_globals()
        _install_weights_only_loader(engine)
        src = universal or path
        groups = getattr(engine.optimizer, "param_groups", None) or []
        hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
        load_path, client = engine.load_checkpoint(str(src.parent), tag=src.name)
        if load_path is None:
            raise CheckpointError(f"checkpoint {src} could not be loaded by DeepSpeed")
        if universal is not None:
            _repair_universal_load(engine, groups, hyper)
        if universal is not None:       # the universal folder keeps no client state: read the original's
            client = read_client_state(path)
        own = path / f"rng_state.rank{_rank()}.pt"
        set_rng_state(torch.load(own, weights_only=True) if universal is None and own.is_file() else client["rng"])
        return Resumed(step=int(client["step"]), consumed_samples=int(client["consumed_samples"]),
                       client_state=client, path=path)


def client_state(*, step: int, consumed_samples: int, config: dict, extensions: dict,
                 dp_world_size: int | None = None) -> dict:
    """The extra state stored with every checkpoint (weights_only-safe values only).

    ``dp_world_size``: the data-parallel size that wrote the ZeRO shards (compared on resume).
    """
    state = {"step": step, "consumed_samples": consumed_samples, "config": config,
             "rng": rng_state(), "extensions": extensions,
             # what DeepSpeed's ds_to_universal requires to reshard this checkpoint later
             "universal_checkpoint_info": {"universal_checkpoint_version": _universal_version()}}
    if dp_world_size is not None:
        state["dp_world_size"] = dp_world_size
    return state


_SHARD_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def saved_layout(path: Path) -> tuple[int | None, int | None] | None:
    """(data-parallel size, ZeRO stage) a checkpoint folder was written with, read without DeepSpeed.

    The client state lives in rank 0's model-states file (``mp_rank_00_model_states.pt``, or the
    ZeRO-3 ``zero_pp_rank_0_mp_rank_00_model_states.pt``); it is memory-mapped, so the weights in it
    are not read. Older checkpoints without ``dp_world_size`` fall back to counting optimizer shards.
    None when the folder holds no DeepSpeed files.
    """
    path = Path(path)
    if _state_file(path) is None:
        return None
    sd = read_client_state(path)
    world = sd.get("dp_world_size")
    if world is None:
        shards = [f for f in path.iterdir() if _SHARD_RE.match(f.name)]
        world = len(shards) or None
    stage = (sd.get("config") or {}).get("distributed", {}).get("zero_stage")
    return (None if world is None else int(world)), (None if stage is None else int(stage))


def _repair_universal_load(engine, groups: list[dict], hyper: list[dict]) -> None:
    """Undo two things DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong (found by comparing a universal
    load with a plain load of the same checkpoint, step by step):

    * it copies parameter group 0's hyperparameters into every group (biases and LayerNorm weights
      would take weight decay): put each group's own back;
    * it gives every group's optimizer state the SAME ``step`` tensor, which AdamW increments in place,
      so the second group's bias correction runs one step ahead per group: give each state its own.
    """
    for g, h in zip(groups, hyper):
        g.update(h)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in getattr(inner, "state", {}).values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                if id(v) in seen:
                    state[k] = v.clone()
                seen.add(id(state[k]))


def _universal_version() -> float:
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return UNIVERSAL_CHECKPOINT_VERSION_VALUE


def _state_file(path: Path) -> Path | None:
    for f in (path / "mp_rank_00_model_states.pt", path / "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if f.is_file():
            return f
    return None


def read_client_state(path: Path) -> dict:
    """Rank 0's model-states file of a checkpoint (client state included), memory-mapped, weights-only."""
    f = _state_file(path)
    if f is None:
        raise CheckpointError(f"checkpoint {path}: no DeepSpeed model-states file (incomplete checkpoint?)")
    _allow_deepspeed_globals()
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - one line for a damaged file
        raise CheckpointError(f"checkpoint {path}: {f.name} is unreadable ({type(exc).__name__})") from None


def _client_keys(path: Path) -> set[str]:
    return set(read_client_state(path))


def check_same_model(path: Path, model: dict) -> None:
    """One line naming every architecture key whose value differs between the checkpoint and this run."""
    import yaml

    f = path / "config.yaml"
    try:
        saved = (yaml.safe_load(f.read_text()) or {}).get("model", {}) if f.is_file() else \
            (read_client_state(path).get("config") or {}).get("model", {})
    except (OSError, yaml.YAMLError):
        return                                      # unreadable config: DeepSpeed's load reports it
    diffs = [f"model.{k} {saved[k]!r} in the checkpoint, {model.get(k)!r} in this run"
             for k in MODEL_KEYS_FIXED_BY_CHECKPOINT if k in saved and saved[k] != model.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} holds another model: {'; '.join(diffs)} (resume with the "
                              f"checkpoint's model section, or start a new run in another output.dir)")


def _broadcast(obj):
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
# ----------------------------------------------------------------------------------------------
# fp32 master weights of a live engine, and weights-only folders
# ----------------------------------------------------------------------------------------------

def gather_fp32_masters(engine, *, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of a live DeepSpeed engine, whole, on CPU: ``{name: tensor}`` on the
    main rank, None elsewhere.

    A collective under ZeRO: every rank calls it and visits every parameter in the same order.
    ZeRO 1/2/3 (and DeepSpeed's BF16 optimizer): ``deepspeed.utils.safe_get_full_fp32_param``, which
    all-reduces the rank's partition of each master. ZeRO 0 with fp16/bf16 (DeepSpeed's FP16 optimizers,
    no partitioning): the optimizer's fp32 copy of each parameter. fp32 without ZeRO: the parameters are
    the masters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    zero0 = _fp16_optimizer_masters(getattr(engine, "optimizer", None))
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        if master is None:
            master = zero0.get(id(p))
        if master is None:
            if p.dtype != torch.float32 or hasattr(p, "ds_id"):
                raise CheckpointError(f"no fp32 master weight found for {name} ({p.dtype}, "
                                      f"optimizer {type(getattr(engine, 'optimizer', None)).__name__})")
            master = p
        if is_main:
            out[name] = master.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return out if is_main else None


def _fp16_optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(16-bit parameter) → its fp32 master, for DeepSpeed's ZeRO-0 FP16 optimizers (fp16 and bf16)."""
    if optimizer is None:
        return {}
    try:
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    except ImportError:  # pragma: no cover
        return {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):       # per-parameter fp32 copies
        return {id(p): m for lp, hp in zip(optimizer.fp16_groups, optimizer.fp32_groups) for p, m in zip(lp, hp)}
    if isinstance(optimizer, FP16_Optimizer):              # one flat fp32 tensor per group
        from torch._utils import _unflatten_dense_tensors
        return {id(p): m for lp, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat)
                for p, m in zip(lp, _unflatten_dense_tensors(flat, lp))}
    return {}


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a completely written folder to its final name (replacing an older one of that name)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ----------------------------------------------------------------------------------------------
# What a run writes (--dry-run)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoragePlan:
    full_bytes: int           # one full DeepSpeed checkpoint (all ranks together)
    weights_bytes: int        # one weights-only folder (fp32 safetensors)
    n_full: int               # scheduled full checkpoints (interval saves + the final one)
    n_weights: int            # weights-only extra steps
    kept_full: int            # full checkpoints left by keep_last

    @property
    def writes(self) -> int:
        return self.n_full * self.full_bytes + self.n_weights * self.weights_bytes

    @property
    def keeps(self) -> int:
        return self.kept_full * self.full_bytes + self.n_weights * self.weights_bytes

    def lines(self) -> list[str]:
        return [f"checkpoint: {_size(self.full_bytes)} full, {_size(self.weights_bytes)} weights-only",
                f"run writes: {_size(self.writes)}, keeps: {_size(self.keeps)} ({self.n_full} full "
                f"checkpoints, {self.kept_full} kept; {self.n_weights} weights-only extra steps, all kept)"]


def _size(n: float) -> str:
    """Decimal units (GB = 1e9 bytes), one decimal: 38.9 GB, 16.8 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def full_checkpoint_bytes_per_param(precision: str, zero_stage: int) -> int:
    """Bytes per parameter of a full DeepSpeed checkpoint, all ranks together (measured on 0.19.8).

    fp16/bf16: 2-byte module weights + 4-byte fp32 masters + 8-byte Adam moments = 14; ZeRO 3 writes no
    module weights (they are the masters' partitions), 12. fp32: parameters + Adam = 12; ZeRO 1/2 also
    write the optimizer's own fp32 partition copy, 16.
    """
    adam, master = 8, 4
    if zero_stage == 3:
        return master + adam
    if precision in ("fp16", "bf16"):
        return 2 + master + adam
    return 4 + (master if zero_stage in (1, 2) else 0) + adam


def storage_plan(n_params: int, *, precision: str, zero_stage: int, cfg: CheckpointConfig,
                 train_iters: int) -> StoragePlan:
    """What a fresh run of ``train_iters`` steps writes: interval saves and the final save as full
    checkpoints (``keep_last`` of them kept), Pythia's extra steps as weights-only fp32 folders (4 bytes
    per parameter, all kept). File headers, the client state and tokenizer files are not counted."""
    full_steps = {s for s in range(1, train_iters + 1) if cfg.interval and s % cfg.interval == 0}
    if cfg.save_final:
        full_steps.add(train_iters)
    n_full = len(full_steps)
    n_weights = len({s for s in cfg.extra_steps if 0 <= s <= train_iters})
    kept = n_full if cfg.keep_last is None else min(cfg.keep_last, n_full)
    return StoragePlan(full_bytes=n_params * full_checkpoint_bytes_per_param(precision, zero_stage),
                       weights_bytes=n_params * 4, n_full=n_full, n_weights=n_weights, kept_full=kept)


def _rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
