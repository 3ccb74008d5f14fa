"""When a run stops before ``train.iters``: stop requests (signals, a time limit) agreed by every rank.

A run is a sequence of allocations (DESIGN §7 "Long runs"). A stop request — SIGTERM or SIGUSR1 reaching
any rank, a first SIGINT, or ``train.walltime`` about to run out — ends every rank at the same step
boundary: the ranks OR their local requests with one tiny all-reduce after each step, the loop saves that
step's checkpoint and the run exits with :data:`EX_TEMPFAIL` (75, "resume me"). A second SIGINT aborts at
once (``latest`` still names a complete checkpoint: it only moves after a save completed).

Lifecycle::

    stop = StopRequests.install(walltime_s=..., deadline=...)   # handlers on, clock started
    for step in ...:
        stop.step_started(); ...; stop.step_finished()
        if stop.agreed(): save, write the marker, exit 75
    stop.uninstall()
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

EX_TEMPFAIL = 75                 # sysexits.h: "temporary failure, retry" — the run wants --resume auto
MARKER = "preempted"             # RUN/checkpoints/preempted: the tag of the stop checkpoint, for wrappers
SLURM_MARGIN_S = 60.0            # stop this long before the Slurm allocation ends (on top of the estimates)
FIRST_SAVE_GUESS_S = 2.0         # before any save was timed: max(this, 10 × the slowest step)
EXIT_ALLOWANCE_S = 2.0           # after the save: marker, barrier, closing the logs, leaving the process group
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def parse_walltime(text: str | int) -> float:
    """``"HH:MM:SS"`` (hours may exceed 24, ``"D-HH:MM:SS"`` as Slurm writes it), or seconds → seconds."""
    if isinstance(text, int):
        return float(text)
    days, _, hms = text.rpartition("-")
    parts = hms.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or (days and not days.isdigit()):
        raise ValueError(f"expected HH:MM:SS, got {text!r}")
    h, m, s = (int(p) for p in parts)
    if m >= 60 or s >= 60:
        raise ValueError(f"minutes and seconds must be < 60, got {text!r}")
    return ((int(days or 0) * 24 + h) * 60 + m) * 60.0 + s


def slurm_deadline() -> float | None:
    """The Slurm allocation's end (Unix seconds) minus a margin, from ``SLURM_JOB_END_TIME``; None if unset."""
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    try:
        return float(end) - SLURM_MARGIN_S if end.strip() else None
    except ValueError:
        return None


@dataclass
class StopRequests:
    """This rank's stop requests and the estimates the time limit is checked against."""

    deadline: float | None = None            # Unix seconds by which the run must have exited
    reason: str | None = None                # the first local request ("SIGTERM", "walltime", ...)
    step_seconds: list[float] = field(default_factory=list)
    save_seconds: float | None = None
    _t_step: float = 0.0
    _previous: dict = field(default_factory=dict)
    _interrupts: int = 0

    @classmethod
    def install(cls, walltime: str | int | None = None, *, start: float | None = None) -> StopRequests:
        """Handlers for SIGTERM, SIGUSR1 and SIGINT (main thread only), and the deadline:
        ``train.walltime`` from ``start`` (this process's start), else Slurm's allocation end."""
        deadline = None
        if walltime is not None:
            deadline = (start if start is not None else time.time()) + parse_walltime(walltime)
        else:
            deadline = slurm_deadline()
        stop = cls(deadline=deadline)
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                stop._previous[sig] = signal.signal(sig, stop._handle)
        return stop

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:              # the second Ctrl-C: abort now
                raise KeyboardInterrupt
            print("[megatron-l2e] SIGINT: finishing the step in flight, then saving; press Ctrl-C again "
                  "to abort without saving", file=sys.stderr, flush=True)
        self.reason = self.reason or name

    # ---- time limit ----------------------------------------------------------------------------
    def step_started(self) -> None:
        self._t_step = time.perf_counter()

    def step_finished(self) -> None:
        self.step_seconds = (self.step_seconds + [time.perf_counter() - self._t_step])[-20:]

    def saved(self, seconds: float) -> None:
        self.save_seconds = seconds if self.save_seconds is None else max(self.save_seconds, seconds)

    def out_of_time(self, now: float | None = None) -> bool:
        """True when one more step plus a save would end after the deadline (the slowest recent step,
        the slowest save so far — or a guess before the first one)."""
        if self.deadline is None or not self.step_seconds:
            return False
        step = max(self.step_seconds)
        save = self.save_seconds if self.save_seconds is not None else max(FIRST_SAVE_GUESS_S, 10 * step)
        return (time.time() if now is None else now) + step + save + EXIT_ALLOWANCE_S > self.deadline

    # ---- agreement -----------------------------------------------------------------------------
    def agreed(self, device: torch.device | None = None) -> str | None:
        """Every rank's verdict at this step boundary: the reason to stop (this rank's, else "another
        rank's request") or None. One all-reduce (MAX) of one number when there are several ranks."""
        if self.reason is None and self.out_of_time():
            self.reason = "walltime"
        local = 1.0 if self.reason else 0.0
        import torch.distributed as tdist

        if tdist.is_initialized() and tdist.get_world_size() > 1:
            flag = torch.tensor([local], device=device or torch.device("cpu"))
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            if flag.item() == 0:
                return None
            self.reason = self.reason or "another rank's stop request"
        return self.reason


def write_marker(checkpoints_dir: os.PathLike, tag: str) -> None:
    """``RUN/checkpoints/preempted`` naming the stop checkpoint (atomically), for wrappers and requeue logic."""
    d = os.fspath(checkpoints_dir)
    tmp = os.path.join(d, f".{MARKER}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag + "\n")
    os.replace(tmp, os.path.join(d, MARKER))


def clear_marker(checkpoints_dir: os.PathLike) -> None:
    try:
        os.remove(os.path.join(os.fspath(checkpoints_dir), MARKER))
    except FileNotFoundError:
        pass


__all__ = ["EX_TEMPFAIL", "MARKER", "StopRequests", "parse_walltime", "slurm_deadline", "write_marker",
           "clear_marker"]
