"""Typed run configuration: one dataclass per component, YAML layering, ``--set`` overrides.

A run file names the files it builds on with ``base: [..]`` (paths relative to that file); later
files and then ``--set a.b=c`` overrides win, key by key. Loading collects *every* error (unknown
key, wrong type, out-of-range value) with the key and the file it came from, and raises one
:class:`ConfigError`; the CLIs print its lines and exit 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_l2e.l2e.config import L2EConfig


class ConfigError(Exception):
    """One or more user errors in a configuration; ``str()`` is one line per error."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """A Pythia-style GPT-NeoX (transformers ``GPTNeoXConfig`` fields, Pythia's names in comments)."""

    name: str = "custom"
    num_layers: int = 6
    hidden_size: int = 512
    num_attention_heads: int = 8
    intermediate_size: int | None = None      # default 4 · hidden
    vocab_size: int = 50304
    seq_length: int = 2048                    # also max-position-embeddings
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    use_parallel_residual: bool = True        # gpt-j-residual
    tie_word_embeddings: bool = False         # Pythia: no-weight-tying
    hidden_act: Literal["gelu", "gelu_new", "gelu_pytorch_tanh"] = "gelu"  # tanh approx = bias-gelu-fusion
    compile: bool = False                     # torch.compile each block's attention + MLP (L2E sites stay eager)
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method: Literal["small_init", "normal"] = "small_init"
    output_layer_init_method: Literal["wang_init", "small_init", "normal"] = "wang_init"
    init_std: float = 0.02                    # only for init_method: normal
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # per block, non-reentrant (the L2E penalty must keep its gradient); auto: only where the memory
    # plan needs it (the micro-batch does not fit without; megatron_l2e/memory.py)
    checkpoint_activations: bool | Literal["auto"] = True
    loss_impl: Literal["auto", "fused", "chunked", "reference"] = "auto"  # LM loss path (megatron_l2e/loss.py)
    loss_chunk_size: int = 1024               # chunked: tokens per chunk (one [chunk, vocab] fp32 buffer)
    bos_token_id: int = 0
    eos_token_id: int = 0

    def validate(self) -> list[tuple[str, str]]:
        e = []
        for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if getattr(self, k) < 1:
                e.append((k, f"must be ≥ 1, got {getattr(self, k)}"))
        if self.hidden_size >= 1 and self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            e.append(("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size "
                                             f"{self.hidden_size}"))
        if not 0.0 <= self.rotary_pct <= 1.0:
            e.append(("rotary_pct", f"must lie in [0, 1], got {self.rotary_pct}"))
        for k in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, k) < 1.0:
                e.append((k, f"must lie in [0, 1), got {getattr(self, k)}"))
        if self.loss_chunk_size < 1:
            e.append(("loss_chunk_size", f"must be ≥ 1 token, got {self.loss_chunk_size}"))
        if self.intermediate_size is not None and self.intermediate_size < 1:
            e.append(("intermediate_size", f"must be ≥ 1, got {self.intermediate_size}"))
        return e

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


@dataclass
class DataConfig:
    """Token data. ``rows``: fixed rows of seq_length + 1 tokens (step s = rows [GB·s, GB·(s+1)))."""

    format: Literal["rows", "pythia_preshuffled", "documents"] = "rows"
    path: str | None = None                   # .bin/.idx prefix (documents: see `paths`)
    paths: list[str] = field(default_factory=list)      # documents: blend of prefixes
    weights: list[float] = field(default_factory=list)  # documents: blend weights
    split: str = "969,30,1"                   # documents: train/valid/test split
    valid_path: str | None = None             # rows: held-out rows (else the tail of `path`)
    tokenizer: str | None = None              # HF tokenizer folder or name (export, decoding)
    smoke: bool = False                       # build the smoke corpus + tokenizer into `path`'s folder
    smoke_max_files: int = 400                # smoke corpus size (stdlib source files)
    smoke_vocab_size: int | None = None       # smoke tokenizer size (null = model.vocab_size)
    index_cache: str | None = None            # documents: megatron-core index cache folder
    check_tokens: int = 1_000_000             # tokens sampled at start to check ids < vocab (0: off)

    def validate(self) -> list[tuple[str, str]]:
        e = []
        if self.format in ("rows", "pythia_preshuffled") and not self.path:
            e.append(("path", f"data.format {self.format} needs data.path (a .bin/.idx prefix)"))
        if self.format == "documents" and not (self.paths or self.path):
            e.append(("paths", "data.format documents needs data.paths (or data.path)"))
        if self.weights and len(self.weights) != len(self.paths):
            e.append(("weights", f"{len(self.weights)} weights for {len(self.paths)} paths"))
        if self.check_tokens < 0:
            e.append(("check_tokens", f"must be ≥ 0, got {self.check_tokens}"))
        if self.smoke_vocab_size is not None and not 257 <= self.smoke_vocab_size <= 65535:
            e.append(("smoke_vocab_size", f"must lie in [257, 65535] (bytes + EOD, uint16), got {self.smoke_vocab_size}"))
        return e


@dataclass
class OptimizerConfig:
    """AdamW with GPT-NeoX's parameter groups (no weight decay on biases and LayerNorm weights)."""

    type: Literal["adamw", "apex_fused_adam"] = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self):
        e = []
        if self.lr < 0:
            e.append(("lr", f"must be ≥ 0, got {self.lr}"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            e.append(("betas", f"must be two numbers in [0, 1), got {self.betas}"))
        if self.eps <= 0:
            e.append(("eps", f"must be > 0, got {self.eps}"))
        if self.weight_decay < 0:
            e.append(("weight_decay", f"must be ≥ 0, got {self.weight_decay}"))
        if self.grad_clip < 0:
            e.append(("grad_clip", f"must be ≥ 0 (0 = off), got {self.grad_clip}"))
        return e


@dataclass
class ScheduleConfig:
    """Pythia's schedule: linear warm-up over ``warmup`` of decay_iters, cosine to lr·min_lr_ratio."""

    style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.01                      # fraction of decay_iters (GPT-NeoX's `warmup`)
    decay_iters: int | None = None            # null = train.iters (the run's own length)
    min_lr_ratio: float = 0.1

    def validate(self):
        e = []
        if not 0.0 <= self.warmup < 1.0:
            e.append(("warmup", f"must lie in [0, 1), got {self.warmup}"))
        if self.decay_iters is not None and self.decay_iters < 1:
            e.append(("decay_iters", f"must be ≥ 1 or null, got {self.decay_iters}"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            e.append(("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}"))
        return e


@dataclass
class Fp16Config:
    """DeepSpeed's dynamic loss scaling (Pythia's values)."""

    loss_scale: float = 0.0                   # 0 = dynamic
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class TrainConfig:
    iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 8
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp16: Fp16Config = field(default_factory=Fp16Config)
    deterministic: bool = False               # torch.use_deterministic_algorithms (GPU resume bit-identity)
    # Stop (checkpoint, exit 75) before this much time has passed since start, "HH:MM:SS" (or Slurm's
    # "D-HH:MM:SS"; an integer is seconds — YAML 1.1 reads an unquoted 24:00:00 as 86400 anyway);
    # null: no limit, except under Slurm, where the allocation's end minus a margin counts.
    walltime: str | int | None = None

    def validate(self):
        e = []
        for k in ("iters", "global_batch_size", "micro_batch_size"):
            if getattr(self, k) < 1:
                e.append((k, f"must be ≥ 1, got {getattr(self, k)}"))
        if self.global_batch_size >= 1 and self.micro_batch_size >= 1 and \
                self.global_batch_size % self.micro_batch_size:
            e.append(("global_batch_size", f"{self.global_batch_size} is not a multiple of "
                                           f"micro_batch_size {self.micro_batch_size}"))
        if self.seed < 0:
            e.append(("seed", f"must be ≥ 0, got {self.seed}"))
        if self.walltime is not None:
            from megatron_l2e.stopping import parse_walltime
            try:
                if parse_walltime(self.walltime) <= 0:
                    e.append(("walltime", f"must be > 0, got {self.walltime!r}"))
            except ValueError as exc:
                e.append(("walltime", str(exc)))
        return e


@dataclass
class CheckpointConfig:
    interval: int = 1000                      # GPT-NeoX's checkpoint-factor / save-interval (0 = off)
    extra_steps: list[int] = field(default_factory=list)   # Pythia's log-spaced extra saves; never pruned
    keep_last: int | None = None              # keep the last k interval checkpoints (null = all)
    save_final: bool = True
    # output.dir is on node-local storage: each node's ranks check and resume among themselves (its
    # lowest rank writes `latest` there too); the user copies the shards together before another layout
    node_local: bool = False

    def validate(self):
        e = []
        if self.interval < 0:
            e.append(("interval", f"must be ≥ 0, got {self.interval}"))
        if self.keep_last is not None and self.keep_last < 1:
            e.append(("keep_last", f"must be ≥ 1 or null, got {self.keep_last}"))
        if any(s < 0 for s in self.extra_steps):
            e.append(("extra_steps", "steps must be ≥ 0"))
        return e


@dataclass
class ValidationConfig:
    interval: int = 0                         # held-out loss every N steps (0 = off)
    iters: int = 10                           # batches per evaluation

    def validate(self):
        return [(k, f"must be ≥ 0, got {getattr(self, k)}") for k in ("interval", "iters")
                if getattr(self, k) < 0]


@dataclass
class EvalConfig:
    """In-training lm-eval on rank 0 (optional)."""

    interval: int = 0
    tasks: list[str] = field(default_factory=list)
    num_fewshot: int = 0
    limit: int | None = None
    include_path: str | None = None           # folder of extra lm-eval task YAMLs
    batch_size: int = 8

    def validate(self):
        e = []
        if self.interval < 0:
            e.append(("interval", f"must be ≥ 0, got {self.interval}"))
        if self.interval and not self.tasks:
            e.append(("tasks", "eval.interval is set but eval.tasks is empty"))
        if self.batch_size < 1:
            e.append(("batch_size", f"must be ≥ 1, got {self.batch_size}"))
        return e


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    wandb: Literal["offline", "online", "disabled"] = "offline"   # WANDB_MODE overrides
    wandb_project: str = "megatron-l2e"
    run_name: str | None = None
    progress: bool = True                     # console progress bar

    def validate(self):
        return [("interval", f"must be ≥ 1, got {self.interval}")] if self.interval < 1 else []


@dataclass
class OutputConfig:
    dir: str = "runs/default"


@dataclass
class DistributedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: int = 30
    allgather_bucket_size: int = 500_000_000
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    gpu_memory_gb: float = 80.0               # per-GPU memory the plan fits a run into (--dry-run, auto)

    def validate(self):
        return [("gpu_memory_gb", f"must be > 0, got {self.gpu_memory_gb}")] if self.gpu_memory_gb <= 0 else []


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    l2e: L2EConfig = field(default_factory=L2EConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def decay_iters(self) -> int:
        return self.schedule.decay_iters or self.train.iters


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _read_yaml(path: Path, errors: list[str]) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        errors.append(f"{path}: config file not found")
        return None
    except OSError as exc:
        errors.append(f"{path}: cannot read config file ({exc.strerror})")
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        errors.append(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
        return None
    return data


def _flatten(d: dict, source: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{'a': {'b': 1}} → {'a.b': (1, source)}; dicts are merged key by key, anything else replaces."""
    out: dict[str, tuple[Any, str]] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, source, key + "."))
        else:
            out[key] = (v, source)
    return out


def _layer_file(path: Path, errors: list[str], seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    path = Path(path)
    if path.resolve() in seen:
        errors.append(f"{path}: base files form a cycle ({' -> '.join(str(p) for p in seen)})")
        return {}
    data = _read_yaml(path, errors)
    if data is None:
        return {}
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        errors.append(f"{path}: base must be a file name or a list of file names")
        bases = []
    flat: dict[str, tuple[Any, str]] = {}
    for b in bases:
        flat.update(_layer_file(path.parent / b, errors, seen + (path.resolve(),)))
    flat.update(_flatten(data, str(path)))
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` → ('a.b', yaml-typed c). Raises ConfigError for a malformed override."""
    if "=" not in item:
        raise ConfigError([f"--set {item}: an override must look like section.key=value"])
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError([f"--set {item}: the key must name a section and a field, like train.iters=10"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _unflatten(flat: dict[str, tuple[Any, str]]) -> dict:
    root: dict = {}
    for key, (value, _) in flat.items():
        parts = key.split(".")
        node = root
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
    return root


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list,):
        return f"a list of {_type_name(typing.get_args(tp)[0]).replace('an ', '').replace('a ', '')}s"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp) -> Any:
    """Convert ``value`` to type ``tp`` or return ``_NO``. Ints widen to floats; PyYAML's
    ``1e-3`` (a string in YAML 1.1) is accepted as a float."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return None if type(None) in args else _NO
        for a in args:
            if a is type(None):
                continue
            got = _coerce(value, a)
            if got is not _NO:
                return got
        return _NO
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in typing.get_args(tp))
        return value if ok else _NO
    if origin is list:
        if not isinstance(value, list):
            return _NO
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return _NO


def _build(cls, flat: dict[str, tuple[Any, str]], prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, flat, key + ".", errors)
            if (key in flat) and flat[key][0] not in (None, {}):
                value, src = flat[key]
                errors.append(f"{src}: {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
            continue
        if key not in flat:
            continue
        value, src = flat[key]
        got = _coerce(value, tp)
        if got is _NO:
            errors.append(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}")
        else:
            kwargs[name] = got
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        for fname, msg in obj.validate():
            key = f"{prefix}{fname}"
            src = flat.get(key, (None, "defaults"))[1]
            errors.append(f"{src}: {key}: {msg}")
    return obj


def _known_keys(cls, prefix: str = "") -> tuple[set[str], set[str]]:
    """(leaf keys, section keys) that ``cls`` accepts."""
    leaves, sections = set(), set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            sections.add(key)
            sub_l, sub_s = _known_keys(hints[f.name], key + ".")
            leaves |= sub_l
            sections |= sub_s
        else:
            leaves.add(key)
    return leaves, sections


def load_config(paths: str | Path | list, overrides: list[str] | None = None) -> Config:
    """Layer ``paths`` (each with its own ``base:`` chain) then ``overrides``; validate all at once."""
    errors: list[str] = []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    flat: dict[str, tuple[Any, str]] = {}
    for p in paths:
        flat.update(_layer_file(Path(p), errors))
    if errors:  # unreadable files: checking what is left would only add noise
        raise ConfigError(errors)
    for item in overrides or []:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        # An override replaces a whole sub-tree only where it names a leaf.
        flat = {k: v for k, v in flat.items() if not k.startswith(key + ".")}
        if isinstance(value, dict):
            flat.update(_flatten(value, f"--set {item}", key + "."))
        else:
            flat[key] = (value, f"--set {item}")
    leaves, sections = _known_keys(Config)
    for key, (value, src) in flat.items():
        if key in leaves:
            continue
        if key in sections and value in (None, {}):
            continue
        top = key.split(".")[0]
        if top not in {s.split(".")[0] for s in sections}:
            errors.append(f"{src}: {key}: unknown section '{top}' (known: "
                          f"{', '.join(sorted(f.name for f in dataclasses.fields(Config)))})")
        else:
            errors.append(f"{src}: {key}: unknown key")
    cfg = _build(Config, flat, "", errors)
    if not errors:
        errors += [f"{flat.get(key, (None, 'defaults'))[1]}: {key}: {msg}" for key, msg in cross_checks(cfg)]
    if errors:
        raise ConfigError(errors)
    return cfg


def cross_checks(cfg: Config) -> list[tuple[str, str]]:
    """Constraints between sections: (dotted key to blame, message)."""
    from megatron_l2e.l2e.config import resolve_layers

    e: list[tuple[str, str]] = []
    if isinstance(cfg.l2e.layers, list):
        try:
            resolve_layers(cfg.l2e.layers, cfg.model.num_layers)
        except ValueError as exc:
            e.append(("l2e.layers", str(exc).split(": ", 1)[1]))
    pps = cfg.l2e.penalty_per_samples
    if pps is not None and pps > cfg.train.global_batch_size:
        e.append(("l2e.penalty_per_samples", f"{pps}-sample micro-batches do not fit in train.global_batch_size "
                                             f"{cfg.train.global_batch_size}"))
    if cfg.data.smoke_vocab_size is not None and cfg.data.smoke_vocab_size > cfg.model.vocab_size:
        e.append(("data.smoke_vocab_size", f"{cfg.data.smoke_vocab_size} exceeds model.vocab_size {cfg.model.vocab_size}"))
    n_neurons = cfg.model.seq_length * cfg.model.hidden_size
    if cfg.l2e.k is not None and cfg.l2e.k > n_neurons:
        e.append(("l2e.k", f"{cfg.l2e.k} exceeds the {n_neurons:,} neurons (seq_length × hidden_size) of a site"))
    if cfg.data.format == "pythia_preshuffled":
        if cfg.train.global_batch_size != 1024:
            e.append(("train.global_batch_size", f"data.format pythia_preshuffled replays Pythia's batches of "
                                                 f"1024 rows; got {cfg.train.global_batch_size} (use data.format rows)"))
    if cfg.model.compile and cfg.distributed.zero_stage == 3:
        e.append(("model.compile", "tested with ZeRO stages 0-2 only: ZeRO-3 gathers parameters in hooks on every "
                                   "submodule, which would run inside the compiled attention/MLP"))
    if cfg.eval.interval and cfg.distributed.zero_stage == 3:
        e.append(("eval.interval", "in-training lm-eval needs whole parameters on rank 0; not with ZeRO stage 3"))
    return e


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Rebuild a :class:`Config` from ``to_dict()`` output (e.g. a checkpoint's resolved config)."""
    errors: list[str] = []
    cfg = _build(Config, _flatten(d, source), "", errors)
    if errors:
        raise ConfigError(errors)
    return cfg
