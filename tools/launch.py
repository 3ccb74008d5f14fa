#!/usr/bin/env python
"""Launch megatron-l2e training on several nodes: validate first, print the command, then run it.

    tools/launch.py check     --nodes N [--gpus-per-node G] --config RUN.yml [--set k=v ...]
    tools/launch.py hostfile  --hostfile FILE [--no-ssh --node-rank R] [--master-addr A] --config ...
    tools/launch.py torchrun  --nnodes N --node-rank R --master-addr A [--nproc-per-node G] --config ...
    tools/launch.py slurm     --config ...          (inside an sbatch allocation: srun one task per node)
    tools/launch.py submit    --nodes N --config ... (sbatch scripts/slurm/train.sbatch, validated first)
    tools/launch.py paper     SIZE/VARIANT|RUN.yml (--nodes n1,n2,... | --hostfile FILE) [--slurm] ...

Every sub-command loads the run config exactly as ``python -m megatron_l2e.train`` does (same files,
same ``--set`` overrides) and checks the global batch against the GPUs it is about to use with
:class:`megatron_l2e.engine.BatchLayout` — a split that does not divide is refused with the nearest
valid GPU counts *before* anything starts. ``--dry-run`` prints the command and exits. The thin
scripts in ``scripts/`` call this file; errors are one line on stderr, exit status 2.

Long runs (DESIGN §7): this file stays the parent of the launcher it starts. The first stop request it
receives (SIGTERM, SIGUSR1, SIGHUP, SIGQUIT or a first Ctrl-C) is passed on once, as a signal every launcher
in the chain survives and the ranks handle (SIGUSR1; SIGTERM for a torchrun without ``--signals-to-handle``);
a second Ctrl-C aborts. When the launcher ends, ``RUN/checkpoints/preempted`` (written by rank 0 after the
stop checkpoint) decides the status: 75 and a resume hint if it exists — launchers rewrite the ranks' 75
into 1 — else the launcher's own status. Under Slurm the batch step then requeues the job
(``scontrol requeue``) and exits 0. Details: docs/distributed.md "Long runs".
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ call the package; run from anywhere

from launch_supervise import supervise  # noqa: E402 - the launcher's parent during a run

from megatron_l2e.config import Config, ConfigError, load_config  # noqa: E402
from megatron_l2e.engine import BatchLayout, LaunchError  # noqa: E402

TRAIN_MODULE = "megatron_l2e.train"
DEFAULT_PORT = 29500
SBATCH_SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
HOST_RE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)(?:\s+slots=(?P<slots>\S+))?$")

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"   # torchrun's default list + SIGUSR1
DEFAULT_SHUTDOWN_TIMEOUT = 600       # s torchrun waits for the ranks after forwarding a signal (≥ a save)
ENV_FILE = "launch.env"              # RUN/launch.env: what the DeepSpeed runner exports on every node
# What DeepSpeed's runner does not forward by itself (it forwards PYTHON*, MLFLOW*, MV2*, UCX*, NCCL* on
# CUDA) but this package, wandb, Hugging Face, Triton or torch read on the ranks.
ENV_PREFIXES = ("MEGATRON_L2E_", "WANDB_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_",
                "TORCH_", "TORCHINDUCTOR_", "NUMBA_", "GLOO_")
ENV_NAMES = ("OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "DS_ACCELERATOR")
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DS_PLAIN = re.compile(r"[\w@%+=:,./-]*")    # values DeepSpeed's add_export passes without quotes


class UsageError(Exception):
    """A bad argument, hostfile or node count (one line)."""


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def parse_hostfile(path: str | Path) -> dict[str, int]:
    """DeepSpeed hostfile → {host: slots}. Lines ``HOST slots=N``; ``#`` comments and blank lines ignored."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"hostfile {path}: no such file")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOST_RE.match(line)
        if not m or m["slots"] is None:
            raise UsageError(f"hostfile {path}:{n}: {raw.strip()!r}: expected 'HOSTNAME slots=N'")
        if not m["slots"].isdigit() or int(m["slots"]) < 1:
            raise UsageError(f"hostfile {path}:{n}: slots={m['slots']}: expected a positive whole number of GPUs")
        if m["host"] in hosts:
            raise UsageError(f"hostfile {path}:{n}: host {m['host']} is listed twice")
        hosts[m["host"]] = int(m["slots"])
    if not hosts:
        raise UsageError(f"hostfile {path}: no 'HOSTNAME slots=N' lines")
    return hosts


def parse_nodes(nodes: str) -> list[str]:
    hosts = [h.strip() for h in nodes.split(",") if h.strip()]
    if not hosts:
        raise UsageError(f"--nodes {nodes!r}: expected a comma-separated list of host names")
    if len(set(hosts)) != len(hosts):
        raise UsageError(f"--nodes {nodes}: a host is listed twice")
    return hosts


def _splits(global_batch: int, micro_batch: int, gpus: int) -> bool:
    try:
        BatchLayout(global_batch, micro_batch, gpus).check()   # the rule training applies at start-up
    except LaunchError:
        return False
    return True


def check_gpus(cfg: Config, gpus: int, gpus_per_node: int | None = None) -> BatchLayout:
    """The batch layout on ``gpus`` data-parallel ranks, or a one-line UsageError with the nearest valid counts."""
    gb, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    layout = BatchLayout(gb, mb, gpus)
    if _splits(gb, mb, gpus):
        return layout
    step = gpus_per_node or 1
    counts = [c for c in range(step, 4 * max(gpus, step) + 1, step) if _splits(gb, mb, c)]
    below = [c for c in counts if c < gpus]
    above = [c for c in counts if c > gpus]
    unit = (lambda c: f"{c} ({c // step} node{'s' if c // step > 1 else ''} × {step})") if gpus_per_node \
        else (lambda c: str(c))
    near = " or ".join(unit(c) for c in ([below[-1]] if below else []) + ([above[0]] if above else []))
    smaller = [m for m in range(mb - 1, 0, -1) if _splits(gb, m, gpus)]
    hint = f"; or keep {gpus} GPUs with --set train.micro_batch_size={smaller[0]}" if smaller else ""
    raise UsageError(f"train.global_batch_size {gb} does not split over {gpus} GPUs with micro-batch {mb} "
                     f"(global = micro × accumulation × GPUs); nearest valid GPU counts: {near or 'none'}{hint}")


def load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.set)
    except ConfigError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def train_args(args: argparse.Namespace) -> list[str]:
    """The arguments every rank's ``python -m megatron_l2e.train`` gets (forwarded verbatim)."""
    out = []
    for c in args.config:
        out += ["--config", c]
    for s in args.set:
        out += ["--set", s]
    if args.resume:
        out += ["--resume", args.resume]
    if args.exit_after_steps:
        out += ["--exit-after-steps", str(args.exit_after_steps)]
    return out


# ----------------------------------------------------------------------------------------------
# Commands per launcher
# ----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    cmd: list[str]
    layout: BatchLayout
    nodes: int
    note: str = ""
    kind: str = "exec"               # exec: hand the process over (sbatch); local | pdsh | slurm: supervise
    run_dir: Path | None = None      # the config's output.dir (where the marker appears)
    env: dict[str, str] = field(default_factory=dict)        # added to the launcher's environment
    env_file: tuple[Path, str] | None = None                 # (path, text) written before launching
    hosts: list[str] = field(default_factory=list)           # pdsh: where the stop request goes
    stop_signal: int = signal.SIGUSR1                        # local/slurm: what the first stop request sends
    stop_group: bool = False                                 # local: to the launcher's process group
    warnings: list[str] = field(default_factory=list)

    def show(self) -> str:
        lines = [f"# {self.nodes} node(s), {self.layout.dp_world} GPUs: {self.layout.describe()}"]
        if self.note:
            lines.append(f"# {self.note}")
        lines += [f"# warning: {w}" for w in self.warnings]
        lines += [f"# env: {k}={v}" for k, v in self.env.items()]
        lines.append(shlex.join(self.cmd))
        return "\n".join(lines)


def run_dir(cfg: Config) -> Path:
    return Path(os.path.abspath(cfg.output.dir))


# ---- DeepSpeed runner (ssh/pdsh): the environment every node gets ------------------------------

def ds_env_value(value: str) -> str:
    """``value`` as a line of a DeepSpeed env file. The runner strips it and, when it holds anything
    outside ``[\\w@%+=:,./-]``, wraps it in double quotes for the remote shell; backslash-escaping the
    backslash, the double quote, ``$`` and the backquote makes the remote shell see the value itself."""
    return value if DS_PLAIN.fullmatch(value) else re.sub(r'([\\"$`])', r"\\\1", value)


def ds_env_file(out: Path, environ=None) -> tuple[str, list[str]]:
    """The text of ``out`` (``RUN/launch.env``), for ``DS_ENV_FILE``, and notes on what was left out.

    ``KEY=VALUE`` lines, no blank line (DeepSpeed's reader splits every line at its first ``=`` and
    fails on one without). First this process's values of ``ENV_PREFIXES``/``ENV_NAMES``, then the lines
    of the env files DeepSpeed would otherwise read itself (``~/NAME`` then ``./NAME``, NAME =
    ``$DS_ENV_FILE`` or ``.deepspeed_env``; DS_ENV_FILE replaces both, so they are merged here, read-only):
    later lines win, as in DeepSpeed."""
    environ = os.environ if environ is None else environ
    entries: dict[str, str] = {}
    notes: list[str] = []
    for key in sorted(environ):
        if not (key.startswith(ENV_PREFIXES) or key in ENV_NAMES) or not SHELL_NAME.fullmatch(key):
            continue
        value = environ[key]
        if "\n" in value or "\r" in value or value != value.strip():
            notes.append(f"{key} is not forwarded: DeepSpeed's env file cannot carry a value with a line break "
                         f"or leading/trailing blanks")
            continue
        entries[key] = ds_env_value(value)
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    seen = {os.path.realpath(out)}
    for base in (os.path.expanduser("~"), "."):
        f = os.path.join(base, name)
        if not os.path.isfile(f) or os.path.realpath(f) in seen:
            continue
        seen.add(os.path.realpath(f))
        for n, raw in enumerate(Path(f).read_text().splitlines(), 1):
            if not raw.strip():
                continue                      # DeepSpeed itself would fail on it
            if "=" not in raw:
                raise UsageError(f"{f}:{n}: {raw.strip()!r}: expected KEY=VALUE (DeepSpeed's env-file format)")
            key, value = raw.split("=", 1)
            entries[key.strip()] = value.strip()
        notes.append(f"merged {f}")
    entries.pop("DS_ENV_FILE", None)
    return "".join(f"{k}={v}\n" for k, v in entries.items()), notes


def plan_hostfile(args, cfg: Config, hosts: dict[str, int] | None = None) -> Plan:
    hosts = hosts or parse_hostfile(args.hostfile)
    layout = check_gpus(cfg, sum(hosts.values()), _uniform(hosts))
    master = args.master_addr or next(iter(hosts))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(args.hostfile),
           "--master_addr", master, "--master_port", str(args.master_port)]
    plan = Plan(cmd, layout, len(hosts), run_dir=run_dir(cfg), hosts=list(hosts))
    if args.no_ssh:
        if args.node_rank is None:
            raise UsageError("--no-ssh needs --node-rank R (0 on the first host of the hostfile, 1 on the next, ...)")
        if not 0 <= args.node_rank < len(hosts):
            raise UsageError(f"--node-rank {args.node_rank} is outside the hostfile's {len(hosts)} node(s)")
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
        plan.note = f"run this on every node with its own --node-rank (this is node {args.node_rank})"
        # The local launchers ignore SIGUSR1 (inherited), the ranks handle it: one signal to the group.
        plan.kind, plan.stop_group = "local", True
    else:
        if args.node_rank is not None:
            raise UsageError("--node-rank is for --no-ssh launches; with ssh/pdsh one command starts every node")
        # One host in the hostfile would otherwise be launched *locally*; force pdsh so it runs there.
        # --save_pid: each node's launcher writes its pid where the stop request finds its ranks.
        cmd += ["--force_multi", "--launcher", "pdsh", "--save_pid"]
        env_path = plan.run_dir / ENV_FILE
        text, notes = ds_env_file(env_path)
        plan.env_file = (env_path, text)
        plan.env["DS_ENV_FILE"] = str(env_path)
        names = [line.split("=", 1)[0] for line in text.splitlines()]
        plan.note = (f"{env_path}: {len(names)} variable(s) for every node ({', '.join(names) or 'none'})"
                     + "".join(f"; {n}" for n in notes))
        plan.kind = "pdsh"
    cmd += ["--module", TRAIN_MODULE, *train_args(args)]
    return plan


def _uniform(hosts: dict[str, int]) -> int | None:
    slots = set(hosts.values())
    return slots.pop() if len(slots) == 1 else None


@lru_cache(maxsize=1)
def torchrun_options() -> frozenset[str]:
    """The options this interpreter's torchrun accepts (``--signals-to-handle``: torch ≥ 2.9;
    ``--shutdown-timeout``: newer still)."""
    try:
        from torch.distributed.run import get_args_parser
        return frozenset(get_args_parser()._option_string_actions)
    except Exception:  # noqa: BLE001 - no torch here: assume an old torchrun
        return frozenset()


def shutdown_timeout(args) -> int:
    t = args.shutdown_timeout if args.shutdown_timeout is not None else DEFAULT_SHUTDOWN_TIMEOUT
    if t < 1:
        raise UsageError(f"--shutdown-timeout {t}: expected ≥ 1 second (at least one checkpoint save)")
    return t


def torchrun_cmd(torchrun: str, nnodes: int, node_rank: str, master: str, port: int, gpn: int,
                 args, warnings: list[str]) -> list[str]:
    cmd = [*shlex.split(torchrun), "--nnodes", str(nnodes), "--nproc-per-node", str(gpn),
           "--node-rank", node_rank, "--master-addr", master, "--master-port", str(port)]
    opts = torchrun_options()
    timeout = shutdown_timeout(args)
    if "--signals-to-handle" in opts:
        cmd += ["--signals-to-handle", TORCHRUN_SIGNALS]
    else:
        warnings.append("this torch's torchrun has no --signals-to-handle (torch < 2.9): SIGUSR1 would kill it, "
                        "so it is started with SIGUSR1 ignored and stop requests reach it as SIGTERM")
    if "--shutdown-timeout" in opts:
        cmd += ["--shutdown-timeout", str(timeout)]
    else:
        warnings.append("this torch's torchrun has no --shutdown-timeout: it SIGKILLs the ranks 30 s after "
                        "forwarding a stop signal; a save that takes longer is lost (use train.walltime)")
    return [*cmd, "-m", TRAIN_MODULE, *train_args(args)]


def plan_torchrun(args, cfg: Config) -> Plan:
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank} is outside --nnodes {args.nnodes}")
    layout = check_gpus(cfg, args.nnodes * args.nproc_per_node, args.nproc_per_node)
    warnings: list[str] = []
    cmd = torchrun_cmd(args.torchrun, args.nnodes, str(args.node_rank), args.master_addr, args.master_port,
                       args.nproc_per_node, args, warnings)
    # torchrun puts each rank in its own session: the stop request goes to torchrun, which forwards it.
    stop = signal.SIGUSR1 if "--signals-to-handle" in cmd else signal.SIGTERM
    return Plan(cmd, layout, args.nnodes, f"run on every node with its own --node-rank (this is node {args.node_rank})",
                kind="local", run_dir=run_dir(cfg), stop_signal=stop, warnings=warnings)


def slurm_hosts() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UsageError("not inside a Slurm allocation (SLURM_JOB_NODELIST is unset): submit with "
                         "scripts/slurm/submit.sh or sbatch scripts/slurm/train.sbatch")
    if shutil.which("scontrol") is None:
        raise UsageError("scontrol not found on PATH (needed to expand SLURM_JOB_NODELIST)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise UsageError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip() or 'no hosts'}")
    return hosts


def slurm_gpus_per_node(args) -> int:
    if args.gpus_per_node:
        return args.gpus_per_node
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        v = os.environ.get(var, "").split(":")[-1]   # "h100:8" → "8"
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 8


def plan_slurm(args, cfg: Config) -> Plan:
    hosts = slurm_hosts()
    gpn = slurm_gpus_per_node(args)
    layout = check_gpus(cfg, len(hosts) * gpn, gpn)
    note = f"master {hosts[0]}:{args.master_port}; nodes {','.join(hosts)}"
    if not args.resume:
        args.resume = "auto"          # a requeued job continues; a fresh run has nothing to resume: step 0
        note += "; --resume auto added"
    warnings: list[str] = []
    # Expanded on each node by the bash that srun starts there: every node gets its own rank. The bash
    # ignores SIGUSR1 (inherited through exec): srun's forwarded signal reaches every process of the
    # step, and an old torchrun would die of it; a torchrun with --signals-to-handle installs its own.
    inner = torchrun_cmd(args.torchrun, len(hosts), "$SLURM_NODEID", hosts[0], args.master_port, gpn, args,
                         warnings)
    inner_s = 'trap "" USR1; exec ' + " ".join(
        '"$SLURM_NODEID"' if a == "$SLURM_NODEID" else shlex.quote(a) for a in inner)
    cmd = ["srun", "--nodes", str(len(hosts)), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        cmd.append(f"--cpus-per-task={cpus}")     # srun no longer inherits it from sbatch (Slurm ≥ 22.05)
    cmd += ["bash", "-c", inner_s]
    return Plan(cmd, layout, len(hosts), note, kind="slurm", run_dir=run_dir(cfg), warnings=warnings)


def plan_submit(args, cfg: Config) -> Plan:
    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: expected ≥ 1")
    gpn = args.gpus_per_node or 8
    layout = check_gpus(cfg, args.nodes * gpn, gpn)
    cmd = ["sbatch", "--nodes", str(args.nodes), "--ntasks-per-node", "1", f"--gpus-per-node={gpn}"]
    if args.nodelist:
        cmd.append(f"--nodelist={args.nodelist}")
    for extra in args.sbatch_arg:
        cmd.append(extra)
    cmd += [str(SBATCH_SCRIPT), "--gpus-per-node", str(gpn), "--master-port", str(args.master_port)]
    if args.shutdown_timeout is not None:
        cmd += ["--shutdown-timeout", str(shutdown_timeout(args))]
    cmd += train_args(args)
    return Plan(cmd, layout, args.nodes)


# ----------------------------------------------------------------------------------------------
# The paper's runs: SIZE/VARIANT → configs/runs/SIZE/VARIANT.yml on a node list
# ----------------------------------------------------------------------------------------------

def paper_config(spec: str) -> str:
    p = Path(spec)
    if p.suffix in (".yml", ".yaml"):
        if not p.is_file():
            raise UsageError(f"config {spec}: no such file")
        return spec
    run = ROOT / "configs" / "runs" / f"{spec}.yml"
    if not run.is_file():
        known = sorted(str(f.relative_to(ROOT / "configs" / "runs"))[:-4] for f in (ROOT / "configs/runs").glob("*/*.yml"))
        raise UsageError(f"run {spec}: no configs/runs/{spec}.yml (known: {', '.join(known) or 'none'})")
    return str(run)


def plan_paper(args, cfg: Config) -> Plan:
    if args.slurm:
        if args.hostfile or args.no_ssh:
            raise UsageError("--slurm submits with sbatch; drop --hostfile/--no-ssh")
        args.nodelist = args.nodes
        hosts = parse_nodes(args.nodes) if args.nodes else None
        if hosts is None and not args.num_nodes:
            raise UsageError("--slurm needs --nodes n1,n2,... or --num-nodes N")
        args.nodes = len(hosts) if hosts else args.num_nodes
        args.sbatch_arg = [f"--job-name=l2e-{Path(args.config[0]).parent.name}-{Path(args.config[0]).stem}"]
        return plan_submit(args, cfg)
    if bool(args.nodes) == bool(args.hostfile):
        raise UsageError("give the nodes as --nodes n1,n2,... or --hostfile FILE (one of them)")
    if args.nodes:
        hosts = parse_nodes(args.nodes)
        gpn = args.gpus_per_node or 8
        check_gpus(cfg, len(hosts) * gpn, gpn)          # refuse before writing anything
        # The hostfile the DeepSpeed launcher reads lives with the run (shared storage, kept for the record).
        hostfile = Path(cfg.output.dir) / "hostfile"
        text = "".join(f"{h} slots={gpn}\n" for h in hosts)
        args.hostfile = str(hostfile)
        if args.dry_run:
            print(f"# would write {hostfile}:\n" + "".join(f"#   {line}\n" for line in text.splitlines()), end="")
        else:
            hostfile.parent.mkdir(parents=True, exist_ok=True)
            hostfile.write_text(text)
        return plan_hostfile(args, cfg, {h: gpn for h in hosts})
    return plan_hostfile(args, cfg)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _train_options(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", action="append", required=config_required, default=[] if not config_required else None,
                   help="run YAML (repeatable, as for megatron_l2e.train)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--resume", metavar="auto|PATH", help="forwarded to megatron_l2e.train")
    p.add_argument("--exit-after-steps", type=int, metavar="N", help="forwarded to megatron_l2e.train")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--shutdown-timeout", type=int, metavar="S",
                   help=f"torchrun launches: seconds torchrun waits for the ranks after forwarding a stop signal "
                        f"before SIGKILL (default {DEFAULT_SHUTDOWN_TIMEOUT}; ≥ the measured save time)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the command, launch nothing")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/launch.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)

    c = sub.add_parser("check", help="validate a node count against a run config")
    c.add_argument("--nodes", type=int, required=True)
    c.add_argument("--gpus-per-node", type=int, default=8)
    _train_options(c)

    h = sub.add_parser("hostfile", help="DeepSpeed launcher over an ssh/pdsh hostfile (or --no-ssh per node)")
    h.add_argument("--hostfile", required=True)
    h.add_argument("--master-addr", help="default: the hostfile's first host")
    h.add_argument("--no-ssh", action="store_true", help="no ssh: run this on every node with its --node-rank")
    h.add_argument("--node-rank", type=int)
    _train_options(h)

    t = sub.add_parser("torchrun", help="one torchrun per node (no ssh needed)")
    t.add_argument("--nnodes", type=int, required=True)
    t.add_argument("--node-rank", type=int, required=True)
    t.add_argument("--master-addr", required=True)
    t.add_argument("--nproc-per-node", type=int, default=8)
    t.add_argument("--torchrun", default="torchrun", help="torchrun command (default: torchrun on PATH)")
    _train_options(t)

    s = sub.add_parser("slurm", help="inside an sbatch allocation: srun one torchrun per node")
    s.add_argument("--gpus-per-node", type=int, help="default: SLURM_GPUS_ON_NODE, else 8")
    s.add_argument("--torchrun", default="torchrun")
    _train_options(s)

    b = sub.add_parser("submit", help="validate, then sbatch scripts/slurm/train.sbatch")
    b.add_argument("--nodes", type=int, required=True)
    b.add_argument("--gpus-per-node", type=int, default=8)
    b.add_argument("--nodelist")
    b.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    _train_options(b)

    r = sub.add_parser("paper", help="a paper run (configs/runs/SIZE/VARIANT.yml) on a node list")
    r.add_argument("run", help="SIZE/VARIANT (e.g. 70m/l2e) or a run YAML")
    r.add_argument("--nodes", help="comma-separated hosts (a hostfile with --gpus-per-node slots each is written "
                                   "to output.dir/hostfile)")
    r.add_argument("--num-nodes", type=int, help="with --slurm: any N nodes")
    r.add_argument("--hostfile")
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--slurm", action="store_true", help="submit with sbatch instead of ssh/pdsh")
    r.add_argument("--no-ssh", action="store_true")
    r.add_argument("--node-rank", type=int)
    r.add_argument("--master-addr")
    _train_options(r, config_required=False)
    return p.parse_args(argv)


def run(plan: Plan, args) -> int:
    print(plan.show(), flush=True)
    if args.dry_run:
        return 0
    exe = plan.cmd[0]
    if exe == "srun" or exe == "sbatch":
        if shutil.which(exe) is None:
            raise UsageError(f"{exe} not found on PATH (not a Slurm login/compute node?)")
    elif plan.kind == "pdsh" and shutil.which("pdsh") is None:
        raise UsageError("pdsh not found on PATH (the DeepSpeed launcher starts remote nodes with it): install pdsh, "
                         "or run `scripts/launch.sh --no-ssh --node-rank R ...` on every node")
    if plan.kind == "exec":
        os.execvp(exe, plan.cmd)
        return 1  # pragma: no cover
    return supervise(plan)


PLANS = {"hostfile": plan_hostfile, "torchrun": plan_torchrun, "slurm": plan_slurm, "submit": plan_submit,
         "paper": plan_paper}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.mode == "paper":
            args.config = [paper_config(args.run), *args.config]
        for c in args.config:
            if not Path(c).is_file():
                raise UsageError(f"--config {c}: no such file")
        cfg = load(args)
        if args.mode == "check":
            layout = check_gpus(cfg, args.nodes * args.gpus_per_node, args.gpus_per_node)
            print(f"ok: {args.nodes} node(s) × {args.gpus_per_node} GPUs: {layout.describe()}")
            return 0
        return run(PLANS[args.mode](args, cfg), args)
    except (UsageError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
