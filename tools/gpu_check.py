#!/usr/bin/env python
"""The device check: everything that needs a GPU, in one command, ≤ 8 minutes on one H100.

    scripts/gpu_check.sh [--dry-run] [--only STEP,...] [--budget SECONDS]     (= make gpu-check)
    python tools/gpu_check.py --check-wheels [.whl]                           (size, completeness)

Every step is a subprocess with its own time limit, timed and logged; a failed or timed-out step is
recorded and the check goes on. The steps, in the order they run:

  (limits: wheels 30, env 30, kernels 60, data 90, smoke_bf16 60, smoke_fp16 50, bench_train 100,
   memory_plan 25, pytest_gpu 200, bench_loss 90 — and never past the whole budget)
  wheels        install what the host lacks from .whl/ (``make gpu-wheels`` made it beforehand) with
                ``pip install --no-index --find-links .whl --no-deps`` — never torch / transformers / triton
  env           GPU name, driver, torch / CUDA / triton / transformers / deepspeed versions
  kernels       the Triton L2E kernels against the PyTorch reference on CUDA (tests/test_gpu_kernels.py)
  data          the smoke corpus + tokenizer for the 70M smoke runs (built once, shared)
  smoke_bf16    70M smoke, 30 steps, bf16, L2E on (configs/smoke/gpu-70m.yml)
  smoke_fp16    the same in fp16 with Pythia's dynamic loss scale (configs/smoke/gpu-70m-fp16.yml)
  bench_train   tools/bench_train.py at 70M: L2E off / MEmeL / top-k / threshold, the config's micro-batch
  memory_plan   ``--dry-run``'s memory plan for bench_train's run against its torch.cuda.max_memory_allocated
  pytest_gpu    the rest of ``pytest -m gpu`` (every gpu-marked test but the kernels')
  bench_loss    tools/bench_loss.py on CUDA (recorded "missing" when the tool is not there)

The whole check keeps to ``--budget`` (default 450 s): a step gets at most its own budget and what is
left, and a step with under 15 s left is not started (recorded "skipped"). Results go to
``GPU_CHECK_OUT`` (default runs/gpu-check/): gpu_check.json, gpu_check.md, gpu_check.log (each step's
output, tail-truncated), bench_train.json, bench_loss.json — five small files, made to come back
through the device tool's $OUT. Scratch (runs, checkpoints, the corpus) goes to ``GPU_CHECK_WORK``
(default $TMPDIR/megatron-l2e-gpu-check). Without CUDA the check stops at once with one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
WHEELS_DIR = ROOT / ".whl"
WHEELS_LIST = ROOT / "requirements/gpu-check-wheels.txt"
WHEELS_MAX_MB = 60.0
# Never installed from .whl, whatever the folder holds: the host's own builds.
PROTECTED = {"torch", "transformers", "triton", "numpy", "tokenizers", "safetensors", "nvidia-nccl-cu13"}
TOTAL_BUDGET_S = 450.0          # + start-up and the report: the whole check within 8 minutes
MIN_STEP_S = 15.0
LOG_TAIL_CHARS = 60_000         # per step, in gpu_check.log
SMOKE_STEPS = 30
SMOKE_CONFIGS = {"smoke_bf16": "configs/smoke/gpu-70m.yml", "smoke_fp16": "configs/smoke/gpu-70m-fp16.yml"}
BENCH_MODEL = "70m"
PLAN_LINE = re.compile(r"memory plan per GPU \((?P<cap>[\d.]+) GB\): weights (?P<weights>[\d.]+) GB, gradients "
                       r"(?P<gradients>[\d.]+) GB, optimizer (?P<optimizer>[\d.]+) GB, activations "
                       r"(?P<activations>[\d.]+) GB \(checkpointed (?P<checkpointed>[\d.]+) GB\), loss "
                       r"(?P<loss>[\d.]+) GB")
FITS_LINE = re.compile(r"largest micro-batch that fits: (?P<mb>\S+)")
PEAK_LINE = re.compile(r"peak (?P<plain>[\d.]+) GB without checkpointing, (?P<ckpt>[\d.]+) GB with")
CKPT_LINE = re.compile(r"activation checkpointing (?P<on>on|off)\b|checkpoint_activations: (?P<cfg>\S+)")


# ----------------------------------------------------------------------------------------------
# Wheels
# ----------------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(path: Path = WHEELS_LIST) -> list[tuple[str, str]]:
    """(name, version) pairs of requirements/gpu-check-wheels.txt (``name==version`` lines)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out.append((_norm(name), version.strip()))
    return out


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    return _norm(parts[0]), parts[1]


@dataclass
class WheelCheck:
    folder: Path
    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # "name==version" not in the folder
    duplicates: list[str] = field(default_factory=list)    # names with several versions
    protected: list[str] = field(default_factory=list)     # torch & co: never installed from here
    size_mb: float = 0.0
    max_mb: float = WHEELS_MAX_MB

    @property
    def ok(self) -> bool:
        return self.folder.is_dir() and not (self.missing or self.duplicates) and self.size_mb <= self.max_mb

    def message(self) -> str:
        if not self.folder.is_dir():
            return (f"no wheel folder {self.folder}: run `make gpu-wheels` (needs the network) before the "
                    f"device check")
        probs = []
        if self.missing:
            probs.append(f"missing wheel(s) {', '.join(self.missing)}: run `make gpu-wheels` (needs the network)")
        if self.duplicates:
            probs.append(f"several versions of {', '.join(self.duplicates)} (pip refuses them): delete "
                         f"{self.folder} and run `make gpu-wheels`")
        if self.size_mb > self.max_mb:
            probs.append(f"{self.size_mb:.1f} MB is over the {self.max_mb:g} MB limit")
        if self.protected:
            probs.append(f"ignored (the host's own): {', '.join(self.protected)}")
        head = f"{self.folder}: {len(self.files)} wheels, {self.size_mb:.1f} MB"
        return head + ("; " + "; ".join(probs) if probs else " (complete)")


def check_wheels(folder: Path = WHEELS_DIR, required: list[tuple[str, str]] | None = None,
                 max_mb: float = WHEELS_MAX_MB) -> WheelCheck:
    required = wheel_requirements() if required is None else required
    res = WheelCheck(Path(folder), max_mb=max_mb)
    if not res.folder.is_dir():
        res.missing = [f"{n}=={v}" for n, v in required]
        return res
    res.files = sorted(p for p in res.folder.glob("*.whl") if p.is_file())
    res.size_mb = sum(p.stat().st_size for p in res.files) / 1e6
    seen: dict[str, set[str]] = {}
    for p in res.files:
        n, v = wheel_name_version(p.name)
        seen.setdefault(n, set()).add(v)
    res.missing = [f"{n}=={v}" for n, v in required if v not in seen.get(n, set())]
    res.duplicates = sorted(n for n, vs in seen.items() if len(vs) > 1)
    res.protected = sorted(n for n in seen if n in PROTECTED)
    return res


def wheels_to_install(check: WheelCheck) -> list[Path]:
    """The folder's wheels the host lacks, or has at a lower version (torch & co never)."""
    from importlib import metadata

    try:
        from packaging.version import Version
    except ImportError:  # pragma: no cover - pip vendors it; every host here has packaging
        Version = None
    out = []
    for p in check.files:
        n, v = wheel_name_version(p.name)
        if n in PROTECTED:
            continue
        try:
            have = metadata.version(n)
        except metadata.PackageNotFoundError:
            out.append(p)
            continue
        if Version is not None and Version(have) < Version(v):
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    budget_s: float
    what: str
    cmd: list[str] | None                 # None: not runnable (reason in `skip`)
    needs_deepspeed: bool = False
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def plan(py: str, out: Path, work: Path, wheel_files: list[Path] | None, no_wheels: str | None = None) -> list[Step]:
    """Every step with its command. ``wheel_files``: what the wheel step installs (None: not known — a
    dry run shows the folder); ``no_wheels``: why there is nothing to install from."""
    me = [py, str(Path("tools/gpu_check.py"))]
    data = work / "data"
    steps: list[Step] = []
    if wheel_files is None or wheel_files:
        files = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in (wheel_files or [])]
        steps.append(Step("wheels", 30, "install the wheels the host lacks from .whl/",
                          [py, "-m", "pip", "install", "--no-index", "--find-links", ".whl", "--no-deps",
                           "--no-cache-dir", *(files or [".whl/*.whl (those the host lacks)"])]))
    else:
        steps.append(Step("wheels", 30, "install the wheels the host lacks from .whl/", None,
                          skip=no_wheels or "nothing to install (the host has every wheel's package)"))
    steps.append(Step("env", 30, "environment probe", [*me, "--probe"]))
    steps.append(Step("kernels", 60, "Triton L2E kernels vs the PyTorch reference on CUDA",
                      [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu_kernels.py"]))
    steps.append(Step("data", 90, "smoke corpus + tokenizer (shared by the smoke runs and pytest)",
                      [*me, "--build-data", str(data)], needs_deepspeed=False))
    for name, cfg in SMOKE_CONFIGS.items():
        run = work / name
        sets = [f"train.iters={SMOKE_STEPS}", f"output.dir={run}", f"data.path={data}/train",
                "logging.interval=1", "logging.tensorboard=false", "logging.wandb=disabled",
                "logging.progress=false", "validation.interval=0", "eval.interval=0",
                f"checkpoint.interval={SMOKE_STEPS}", "checkpoint.keep_last=1"]
        steps.append(Step(name, 60 if name == "smoke_bf16" else 50,
                          f"70M smoke, {SMOKE_STEPS} steps, {'bf16' if 'bf16' in name else 'fp16'}, L2E on",
                          [py, "-m", "megatron_l2e.train", "--config", cfg, *[a for s in sets for a in ("--set", s)]],
                          needs_deepspeed=True))
    steps.append(Step("bench_train", 100, f"tools/bench_train.py at {BENCH_MODEL} (off / memel / topk / threshold)",
                      [py, "tools/bench_train.py", "--models", BENCH_MODEL, "--steps", "5", "--reps", "2", "--warmup", "2",
                       "--json", str(out / "bench_train.json")],
                      needs_deepspeed=True))
    steps.append(Step("memory_plan", 25, "--dry-run memory plan for bench_train's run vs its measured peak",
                      [py, "-m", "megatron_l2e.train", "--dry-run", *bench_train_run_sets()]))
    steps.append(Step("pytest_gpu", 200, "pytest -m gpu: every gpu-marked test but the kernels'",
                      [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "--continue-on-collection-errors", "tests",
                       "--ignore", "tests/test_gpu_kernels.py"],
                      needs_deepspeed=True, env={"MEGATRON_L2E_GPU_SMOKE_DATA": str(data)}))
    loss_tool = ROOT / "tools/bench_loss.py"
    if loss_tool.is_file():
        text = loss_tool.read_text()
        extra = (["--device", "cuda"] if "--device" in text else []) + (["--dtype", "bf16"] if "--dtype" in text else [])
        steps.append(Step("bench_loss", 90, "loss path benchmark on CUDA",
                          [py, "tools/bench_loss.py", *extra, "--json", str(out / "bench_loss.json")]))
    else:
        steps.append(Step("bench_loss", 90, "loss path benchmark on CUDA", None, skip="missing (no tools/bench_loss.py)"))
    return steps


def bench_train_run_sets() -> list[str]:
    """The config bench_train runs at 70M on one GPU (its ``bench_config``): the size file with the
    config's micro-batch, one accumulation step, bf16, for the dry run's memory plan."""
    from megatron_l2e.config import load_config

    cfg = load_config(ROOT / f"configs/pythia/{BENCH_MODEL}.yml")
    mb = cfg.train.micro_batch_size
    sets = [f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}", "train.precision=bf16",
            "data.format=rows"]
    return ["--config", f"configs/pythia/{BENCH_MODEL}.yml", *[a for s in sets for a in ("--set", s)]]


def quote(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) if not c.startswith(".whl/*") else c for c in cmd)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    status: str                 # ok | failed | timeout | skipped
    seconds: float
    budget_s: float
    command: str | None
    returncode: int | None = None
    reason: str | None = None
    tail: str = ""
    result: dict = field(default_factory=dict)
    output: str = field(default="", repr=False)    # the whole output, for interpret(); not in the JSON


def run_step(step: Step, timeout: float, env: dict[str, str], log) -> Outcome:
    log.write(f"\n===== {step.name}: {quote(step.cmd)} (limit {timeout:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        status = "timeout"
    secs = time.monotonic() - t0
    output = output or ""
    log.write(output[-LOG_TAIL_CHARS:] if len(output) > LOG_TAIL_CHARS else output)
    log.write(f"\n===== {step.name}: {status} in {secs:.1f} s (rc {proc.returncode})\n")
    log.flush()
    return Outcome(step.name, status, secs, step.budget_s, quote(step.cmd), proc.returncode,
                   reason=f"over its {timeout:.0f} s limit" if status == "timeout" else None,
                   tail=output[-3000:], output=output)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's own process group (it was started in a new session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------
# What each step's output means
# ----------------------------------------------------------------------------------------------

def parse_pytest(text: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 2 skipped in 4.1s')."""
    counts = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found and (" in " in line or "no tests ran" in line):
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
            break
    skipped = sorted(set(re.findall(r"SKIPPED \[\d+\] (.+)", text)))[:10]
    failed = sorted(set(re.findall(r"^FAILED (\S+)", text, re.M)))[:20]
    return {"counts": counts, "skipped_reasons": skipped, "failed_tests": failed}


def summarize_smoke(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {"error": f"no {path}"}
    recs = [r for r in map(json.loads, path.read_text().splitlines()) if "lm_loss" in r]
    if not recs:
        return {"error": "no training records"}
    tps = [r["tokens_per_s"] for r in recs[1:] if "tokens_per_s" in r] or [recs[0].get("tokens_per_s", 0.0)]
    last = recs[-1]
    return {"steps": len(recs), "first_lm_loss": recs[0]["lm_loss"], "last_lm_loss": last["lm_loss"],
            "steps_applied": sum(int(r.get("step_applied", 1)) for r in recs),
            "median_tokens_per_s": statistics.median(tps),
            "median_step_seconds": statistics.median(r["step_seconds"] for r in recs[1:] or recs),
            "last_grad_norm": last.get("grad_norm"),
            "l2e_last": {k: v for k, v in last.items() if k.startswith("l2e/")}}


def summarize_memory(plan_text: str, bench: dict | None) -> dict:
    m = PLAN_LINE.search(plan_text)
    if not m:
        return {"status": "missing", "reason": "--dry-run printed no 'memory plan per GPU' line"}
    gb = {k: float(v) for k, v in m.groupdict().items()}
    # Checkpointing as the run resolves it: the plan's own verdict line, else the resolved config's value.
    ckpt_on = True
    for c in CKPT_LINE.finditer(plan_text):
        ckpt_on = c.group("on") == "on" if c.group("on") else c.group("cfg").lower() not in ("false", "off")
        if c.group("on"):
            break
    peak = PEAK_LINE.search(plan_text)
    if peak:       # the plan's own peak (it may count more than the five components)
        planned = float(peak.group("ckpt") if ckpt_on else peak.group("plain"))
    else:
        acts = gb["checkpointed"] if ckpt_on else gb["activations"]
        planned = gb["weights"] + gb["gradients"] + gb["optimizer"] + acts + gb["loss"]
    fits = FITS_LINE.search(plan_text)
    line = next((ln for ln in plan_text.splitlines() if ln.startswith("largest micro-batch that fits")), None)
    out = {"status": "ok", "plan_gb": gb, "checkpointing": ckpt_on, "planned_total_gb": planned,
           "planned_from": "plan peak line" if peak else "sum of the components",
           "largest_micro_batch": fits.group("mb") if fits else None, "largest_micro_batch_line": line}
    measured = None
    if bench:
        res = next((r for r in bench.get("results", []) if "modes" in r), None)
        if res:
            peaks = {m: r.get("peak_memory_gb") for m, r in res["modes"].items()}
            out["measured_peak_gib_by_mode"] = peaks
            if peaks.get("off"):
                measured = peaks["off"] * 2**30 / 1e9      # bench_train reports GiB; the plan GB (1e9)
    if measured is None:
        out.update(measured_peak_gb=None, note="no measured peak (bench_train did not run or failed)")
    else:
        out.update(measured_peak_gb=measured, planned_over_measured=planned / measured,
                   within_25_percent=abs(planned / measured - 1.0) <= 0.25)
    return out


# ----------------------------------------------------------------------------------------------
# Helpers run as steps (so a dry run can print them as commands)
# ----------------------------------------------------------------------------------------------

def probe() -> dict:
    """Versions and the GPU, as JSON on stdout."""
    import platform

    info: dict = {"python": platform.python_version(), "executable": sys.executable}
    for mod in ("torch", "triton", "transformers", "deepspeed", "megatron.core", "liger_kernel", "flash_attn",
                "pydantic", "numba", "tokenizers"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - a probe records, never raises
            info[mod] = f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        info["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({exc})"
    return info


def build_data(folder: Path) -> dict:
    """The smoke corpus exactly as ``prepare_data`` builds it for configs/smoke/gpu-70m.yml."""
    from megatron_l2e.config import load_config
    from megatron_l2e.data import build_smoke_data

    cfg = load_config(ROOT / SMOKE_CONFIGS["smoke_bf16"], [f"data.path={folder}/train"])
    t0 = time.perf_counter()
    d = build_smoke_data(Path(cfg.data.path).parent, vocab_size=cfg.data.smoke_vocab_size or cfg.model.vocab_size,
                         seq_length=cfg.model.seq_length, max_files=cfg.data.smoke_max_files)
    return {"prefix": d.prefix, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = ["# GPU check", "",
             f"{env.get('gpu', 'GPU ?')} · driver {env.get('driver', '?')} · torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda', '?')}) · triton {env.get('triton', '?')} · transformers "
             f"{env.get('transformers', '?')} · deepspeed {env.get('deepspeed', '?')} · Python {env.get('python', '?')}",
             "", f"Total {report['total_seconds']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| step | status | seconds | budget | what |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        why = f" ({s['reason']})" if s.get("reason") else ""
        lines.append(f"| {s['name']} | {s['status']}{why} | {s['seconds']:.1f} | {s['budget_s']:.0f} | {s['what']} |")
    by = {s["name"]: s for s in report["steps"]}
    for name in ("kernels", "pytest_gpu"):
        r = by.get(name, {}).get("result", {})
        if r.get("counts"):
            lines += ["", f"**{name}**: " + ", ".join(f"{n} {k}" for k, n in r["counts"].items())]
            lines += [f"- failed: {t}" for t in r.get("failed_tests", [])]
            lines += [f"- skipped: {t}" for t in r.get("skipped_reasons", [])]
    smoke = [(n, by[n]["result"]) for n in SMOKE_CONFIGS if by.get(n, {}).get("result")]
    if smoke:
        lines += ["", "| smoke | steps (applied) | lm loss first → last | tokens/s (median) | step s | L2E (last step) |",
                  "|---|---|---|---|---|---|"]
        for n, r in smoke:
            if "error" in r:
                lines.append(f"| {n} | {r['error']} | | | | |")
                continue
            l2e = ", ".join(f"{k}={v:.3g}" for k, v in sorted(r["l2e_last"].items())[:8])
            lines.append(f"| {n} | {r['steps']} ({r['steps_applied']}) | {r['first_lm_loss']:.3f} → "
                         f"{r['last_lm_loss']:.3f} | {r['median_tokens_per_s']:,.0f} | {r['median_step_seconds']:.3f} | {l2e} |")
    if by.get("bench_train", {}).get("result", {}).get("table"):
        lines += ["", "**bench_train** (Table 2 layout)", "", by["bench_train"]["result"]["table"]]
    mem = by.get("memory_plan", {}).get("result", {})
    if mem:
        if mem.get("status") == "ok":
            meas = mem.get("measured_peak_gb")
            lines += ["", f"**memory plan** (bench_train's run): planned {mem['planned_total_gb']:.2f} GB "
                          f"(checkpointing {'on' if mem['checkpointing'] else 'off'}), measured "
                          f"max_memory_allocated {'–' if meas is None else f'{meas:.2f} GB'}"
                          + ("" if meas is None else f", planned/measured {mem['planned_over_measured']:.2f}")
                          + f"; largest micro-batch that fits: {mem.get('largest_micro_batch')}"]
        else:
            lines += ["", f"**memory plan**: {mem.get('status')} ({mem.get('reason', '')})"]
    loss = by.get("bench_loss", {})
    if loss.get("result"):
        lines += ["", "**bench_loss** (CUDA): " + json.dumps(loss["result"])[:600]]
    elif loss.get("status") == "skipped":
        lines += ["", f"**bench_loss**: {loss.get('reason')}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print every command it would run, then exit")
    p.add_argument("--only", help="comma-separated step names (a rerun of some steps)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", TOTAL_BUDGET_S)),
                   help=f"seconds for all steps (default {TOTAL_BUDGET_S:g}, or GPU_CHECK_BUDGET_S)")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "runs/gpu-check",
                   help="report folder (default GPU_CHECK_OUT or runs/gpu-check)")
    p.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK")
                   or str(Path(tempfile.gettempdir()) / "megatron-l2e-gpu-check"),
                   help="scratch folder for runs and the corpus (default GPU_CHECK_WORK or $TMPDIR/...)")
    p.add_argument("--check-wheels", nargs="?", const=str(WHEELS_DIR), metavar="DIR",
                   help="check a wheel folder (completeness, size ≤ 60 MB), print one line; exit 1 if not ok")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-data", metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cuda_problem() -> str | None:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"torch does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_wheels:
        c = check_wheels(Path(args.check_wheels))
        print(c.message())
        return 0 if c.ok else 1
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.build_data:
        print(json.dumps(build_data(Path(args.build_data))))
        return 0

    out, work = Path(args.out), Path(args.work)
    out = out if out.is_absolute() else ROOT / out
    py = sys.executable
    if not args.dry_run and (why := cuda_problem()):
        print(f"gpu-check needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    wc = check_wheels()
    if args.dry_run:
        steps = plan(py, out, work, None)
    else:
        steps = plan(py, out, work, wheels_to_install(wc) if wc.folder.is_dir() else [],
                     no_wheels=None if wc.folder.is_dir() else wc.message())
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in steps}]
        if unknown:
            print(f"error: --only: unknown step {unknown[0]!r}; steps: {', '.join(s.name for s in steps)}",
                  file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in names]
    if args.dry_run:
        print(f"[gpu-check] dry run: {len(steps)} steps, budget {args.budget:.0f} s, report in {out}, scratch in "
              f"{work}; wheels: {wc.message()}")
        for i, s in enumerate(steps, 1):
            cmd = quote(s.cmd) if s.cmd else f"(not run: {s.skip})"
            envs = "".join(f"{k}={shlex.quote(v)} " for k, v in s.env.items())
            print(f"{i:2d}. {s.name} [{s.budget_s:.0f} s] {s.what}\n    $ {envs}{cmd}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    t_start = time.monotonic()
    deadline = t_start + args.budget
    report: dict = {"budget_s": args.budget, "out": str(out), "work": str(work), "wheels": wc.message(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    print(f"[gpu-check] {len(steps)} steps, budget {args.budget:.0f} s; {wc.message()}", flush=True)
    deepspeed_ok = True
    with open(out / "gpu_check.log", "w") as log:
        for s in steps:
            left = deadline - time.monotonic()
            if s.cmd is None:
                o = Outcome(s.name, "skipped", 0.0, s.budget_s, None, reason=s.skip)
            elif s.needs_deepspeed and not deepspeed_ok:
                o = Outcome(s.name, "skipped", 0.0, s.budget_s, quote(s.cmd), reason="deepspeed does not import")
            elif left < MIN_STEP_S:
                o = Outcome(s.name, "skipped", 0.0, s.budget_s, quote(s.cmd),
                            reason=f"budget spent ({left:.0f} s left)")
            else:
                o = run_step(s, min(s.budget_s, left), env, log)
            interpret(o, s, out, work, report)
            if s.name == "env":
                deepspeed_ok = not str(report.get("env", {}).get("deepspeed", "")).startswith("not importable")
            d = o.__dict__.copy()
            d.pop("output")
            d["what"] = s.what
            report["steps"].append(d)
            print(f"[gpu-check] {s.name}: {o.status}{f' ({o.reason})' if o.reason else ''} in {o.seconds:.1f} s",
                  flush=True)
    report["total_seconds"] = time.monotonic() - t_start
    report["failed"] = [s["name"] for s in report["steps"] if s["status"] in ("failed", "timeout")]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"[gpu-check] report: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}")
    return 1 if report["failed"] else 0


def interpret(o: Outcome, s: Step, out: Path, work: Path, report: dict) -> None:
    """Fill ``o.result`` from the step's output (and its files)."""
    try:
        if s.name == "env" and o.status == "ok":
            line = next((ln for ln in reversed(o.output.splitlines()) if ln.startswith("{")), "{}")
            report["env"] = o.result = json.loads(line)
        elif s.name in ("kernels", "pytest_gpu") and o.status != "skipped":
            o.result = parse_pytest(o.output)
        elif s.name == "data" and o.status == "ok":
            line = next((ln for ln in reversed(o.output.splitlines()) if ln.startswith("{")), "{}")
            o.result = json.loads(line)
        elif s.name in SMOKE_CONFIGS and o.status != "skipped":
            o.result = summarize_smoke(work / s.name)
        elif s.name == "bench_train" and (out / "bench_train.json").is_file():
            bench = json.loads((out / "bench_train.json").read_text())
            table = "\n".join(ln for ln in o.output.splitlines() if ln.startswith("|"))
            o.result = {"table": table, "results": [
                {k: r.get(k) for k in ("model", "micro_batch_size", "precision", "activation_checkpointing", "error")}
                | {"modes": {m: {k: v.get(k) for k in ("step_time_s", "tokens_per_s", "mfu", "overhead_pct",
                                                        "peak_memory_gb", "phase")}
                             for m, v in r.get("modes", {}).items()}}
                for r in bench.get("results", [])]}
        elif s.name == "memory_plan" and o.status == "ok":
            bt = out / "bench_train.json"
            o.result = summarize_memory(o.output, json.loads(bt.read_text()) if bt.is_file() else None)
        elif s.name == "bench_loss" and (out / "bench_loss.json").is_file():
            o.result = json.loads((out / "bench_loss.json").read_text())
    except Exception as exc:  # noqa: BLE001 - a report never dies on one step's odd output
        o.result = {"error": f"could not read the step's output: {type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    sys.exit(main())
