"""The launcher's parent during a run (tools/launch.py): stop requests in, the ``preempted`` marker out.

``supervise(plan)`` starts ``plan.cmd`` in its own process group, passes the first stop request on once
as a signal every launcher in the chain survives and the ranks handle, and when the launcher ends reads
``RUN/checkpoints/preempted``: 75 ("resume me") if the run saved on a stop request — launchers rewrite
the ranks' 75 into 1 — under Slurm a requeue and 0, else the launcher's own status. ``plan`` is
tools/launch.py's ``Plan`` (kind, cmd, env, env_file, hosts, run_dir, stop_signal, stop_group).
Details: docs/distributed.md "Long runs".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_l2e.stopping import EX_TEMPFAIL, MARKER

STOP_REQUESTS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)
PDSH_FANOUT = "1024"                 # as DeepSpeed's PDSH runner


def pdsh_stop_cmd(hosts: list[str], runner_pid: int) -> list[str]:
    """SIGUSR1 to the ranks on every node: the children of DeepSpeed's per-node launcher, whose pid it wrote
    to /tmp/<runner pid>.deepspeed (runner --save_pid). The launcher itself is left alone: it turns SIGTERM
    into a 30 s countdown to SIGKILL for the ranks, and dies of SIGUSR1."""
    return ["pdsh", "-S", "-f", PDSH_FANOUT, "-w", ",".join(hosts),
            f'pkill -USR1 -P "$(cat /tmp/{runner_pid}.deepspeed)"']


def pdsh_cleanup_cmd(hosts: list[str], runner_pid: int) -> list[str]:
    """DeepSpeed's launcher leaves /tmp/<runner pid>.deepspeed behind, and asserts it is absent at start."""
    return ["pdsh", "-S", "-f", PDSH_FANOUT, "-t", "10", "-u", "30", "-w", ",".join(hosts),
            f"rm -f /tmp/{runner_pid}.deepspeed"]


def read_tag(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_private(path: Path, text: str) -> None:
    """Atomically, mode 0600 (the env file may hold WANDB_API_KEY / HF_TOKEN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def slurm_end_time() -> tuple[str, str] | None:
    """(epoch seconds, source) of this allocation's end from squeue, else scontrol; None if unknown."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    queries = ((["squeue", "-h", "-j", job, "-o", "%e"], lambda out: out.strip()),
               (["scontrol", "show", "job", job], lambda out: (re.findall(r"\bEndTime=(\S+)", out) or [""])[0]))
    for cmd, pick in queries:
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if out.returncode == 0:     # Slurm prints local time, as this process's time.mktime reads it
                return str(int(time.mktime(time.strptime(pick(out.stdout), "%Y-%m-%dT%H:%M:%S")))), cmd[0]
        except (OSError, subprocess.SubprocessError, ValueError, OverflowError):
            pass
    return None


def _kill_tree(pid: int) -> None:
    try:
        import psutil                  # a DeepSpeed dependency
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
        for p in procs:
            p.kill()
    except ImportError:
        os.killpg(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - already gone
        pass


class Supervisor:
    """Runs ``plan.cmd`` in its own process group (a terminal's Ctrl-C reaches this process only, never
    the ranks twice) with SIGUSR1 ignored (inherited: launchers that do not handle it survive it), and
    turns the first stop request into one signal the chain survives and the ranks handle."""

    def __init__(self, plan):
        self.plan = plan
        self.proc: subprocess.Popen | None = None
        self.requested: str | None = None
        self.aborted = False
        self.pending: list[int] = []      # stop requests that came before the launcher existed
        self.previous = {s: signal.signal(s, self._on_signal) for s in STOP_REQUESTS}

    def _child_setup(self) -> None:     # in the child, before exec
        os.setpgid(0, 0)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def run(self, env: dict[str, str]) -> int:
        try:
            self.proc = subprocess.Popen(self.plan.cmd, env=env, stdin=subprocess.DEVNULL,
                                         preexec_fn=self._child_setup)
            if self.plan.kind == "slurm":
                job = os.environ.get("SLURM_JOB_ID", "JOBID")
                how = f"scancel --batch --signal=USR1 {job} (then requeued; plain scancel {job} kills at once)"
            else:
                how = f"Ctrl-C once, or kill -USR1 {os.getpid()}; a second Ctrl-C aborts"
            print(f"# launcher pid {self.proc.pid}; to stop with a checkpoint: {how}", flush=True)
            for signum in self.pending:
                self._on_signal(signum, None)
            rc = self.proc.wait()
        finally:
            for s, h in self.previous.items():
                signal.signal(s, h)
        return rc if rc >= 0 else 128 - rc

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        proc = self.proc
        if proc is None:
            self.pending.append(signum)
            return
        if proc.poll() is not None:
            return
        try:
            if self.requested is None:
                self.requested = name
                self._stop(proc, name)
            elif signum == signal.SIGINT and not self.aborted:
                self.aborted = True
                print("# second SIGINT: aborting without waiting for the checkpoint", flush=True)
                if self.plan.kind == "local":
                    _kill_tree(proc.pid)
                else:                       # DeepSpeed's runner / srun: SIGTERM means "kill everything now"
                    proc.send_signal(signal.SIGTERM)
            else:
                print(f"# {name}: a stop was already requested ({self.requested}); waiting for the checkpoint",
                      flush=True)
        except ProcessLookupError:
            pass

    def _stop(self, proc: subprocess.Popen, name: str) -> None:
        plan = self.plan
        if plan.kind == "pdsh":
            cmd = pdsh_stop_cmd(plan.hosts, proc.pid)
            print(f"# {name}: SIGUSR1 to the ranks on every node: {shlex.join(cmd)}", flush=True)
            try:
                subprocess.run(cmd, env={**os.environ, "PDSH_RCMD_TYPE": "ssh"}, stdin=subprocess.DEVNULL,
                               timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"# the stop request failed ({exc}); Ctrl-C twice aborts", flush=True)
            return
        sig = signal.SIGUSR1 if plan.kind == "slurm" else plan.stop_signal
        target = "the launcher's process group" if plan.stop_group else (
            "srun (it forwards SIGUSR1 to every task)" if plan.kind == "slurm" else "torchrun")
        print(f"# {name}: {signal.Signals(sig).name} to {target}: the ranks finish the step, save and exit "
              f"{EX_TEMPFAIL}", flush=True)
        if plan.stop_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def supervise(plan) -> int:
    """Launch, pass stop requests on, then read ``RUN/checkpoints/preempted``: 75 if the run saved on a stop
    request (under Slurm: requeue the job and exit 0), else the launcher's status."""
    sup = Supervisor(plan)              # stop requests are caught from here on
    ckpts = plan.run_dir / "checkpoints"
    marker = ckpts / MARKER
    latest_before = read_tag(ckpts / "latest")
    try:
        marker.unlink()                 # a marker names a stop of THIS launch (rank 0 clears it too)
    except FileNotFoundError:
        pass
    if plan.env_file:
        write_private(*plan.env_file)
    env = {**os.environ, **plan.env}
    if plan.kind == "slurm":
        restarts = os.environ.get("SLURM_RESTART_COUNT", "")
        if restarts.isdigit() and int(restarts) > 0:
            print(f"# allocation {int(restarts) + 1} of Slurm job {os.environ.get('SLURM_JOB_ID')} (requeued)")
        if not os.environ.get("SLURM_JOB_END_TIME"):
            end = slurm_end_time()
            if end:
                env["SLURM_JOB_END_TIME"] = end[0]
                print(f"# SLURM_JOB_END_TIME={end[0]} (from {end[1]}): the run stops in time to save", flush=True)
    status = sup.run(env)
    if plan.kind == "pdsh":
        try:
            subprocess.run(pdsh_cleanup_cmd(plan.hosts, sup.proc.pid), env={**os.environ, "PDSH_RCMD_TYPE": "ssh"},
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass
    tag = read_tag(marker)
    if tag is None:
        if sup.requested:
            print(f"# {sup.requested} was passed on but the run left no {marker}: it did not save on the stop "
                  f"request; exit {status}", flush=True)
        return status
    print(f"preempted: saved {ckpts / tag}; continue with --resume auto (launcher status {status} → "
          f"{EX_TEMPFAIL})", flush=True)
    if plan.kind != "slurm":
        return EX_TEMPFAIL
    return slurm_requeue(tag, latest_before)


def slurm_requeue(tag: str, latest_before: str | None) -> int:
    """``scontrol requeue`` this job (it needs ``--requeue``: train.sbatch asks for it) and exit 0; 75 when
    that is impossible or would make no progress."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("# SLURM_JOB_ID is unset: not requeued", flush=True)
        return EX_TEMPFAIL
    if tag == latest_before:
        print(f"error: the run stopped at {tag}, the checkpoint this allocation started from: not requeued "
              f"(another allocation would make no progress); resubmit with --resume auto", file=sys.stderr, flush=True)
        return EX_TEMPFAIL
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the requeue ends this allocation; leave with our status
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"error: scontrol requeue {job} failed ({out.stderr.strip() or out.returncode}); resubmit with "
              f"--resume auto", file=sys.stderr, flush=True)
        return EX_TEMPFAIL
    print(f"requeued Slurm job {job} (scontrol requeue): its next allocation continues from {tag} "
          f"(--resume auto); exit 0", flush=True)
    return 0
