"""Long runs, one process (issue 16): a real SIGTERM at a random moment, the time limit, per-rank RNG files,
and the two bad inputs that used to end in a traceback. Multi-rank cases: tests/test_multinode_train.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_train, tiny_run_yaml

from megatron_l2e.checkpoint import _allow_deepspeed_globals

L2E = "{enabled: true, layers: [0, 1], ratio: 0.05, lam: 1.0e-3, warmup_steps: 2, late_start: 1, forget_steps: 3}"
ITERS = 24
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "lm_loss" in r}


def module(ckpt: Path) -> dict:
    _allow_deepspeed_globals()
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def config(tiny_data, root: Path, name: str, **sections) -> Path:
    """24 steps with dropout (the resume must restore the generators) and L2E, interval saves every 8."""
    f = root / f"{name}.yml"
    sections = {"l2e": L2E, "checkpoint": "{interval: 8, extra_steps: [], keep_last: null}",
                "train": f"{{iters: {ITERS}, global_batch_size: 8, micro_batch_size: 4, precision: fp32}}",
                "model": "{name: tiny, num_layers: 2, hidden_size: 32, num_attention_heads: 2, vocab_size: 320, "
                         "seq_length: 32, hidden_dropout: 0.1}",
                **sections}
    f.write_text(tiny_run_yaml(tiny_data, root / name, **sections))
    return f


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted reference run."""
    root = tmp_path_factory.mktemp("long")
    cfg = config(tiny_data, root, "straight")
    run_train(["--config", str(cfg)], env=ENV)
    return root, root / "straight"


def test_sigterm_at_a_random_moment_then_resume_is_bit_identical(tiny_data, straight):
    root, ref = straight
    cfg = config(tiny_data, root, "preempted")
    run = root / "preempted"
    after = random.Random().randint(2, ITERS - 6)          # a random moment; printed on failure
    p = subprocess.Popen([sys.executable, "-m", "megatron_l2e.train", "--config", str(cfg)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and any(json.loads(x).get("step", 0) >= after for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 75, f"signal after step {after}: rc {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    tag = (run / "checkpoints/preempted").read_text().strip()
    stopped = int(tag.removeprefix("global_step"))
    assert after <= stopped < ITERS, (after, stopped)
    assert (run / "checkpoints/latest").read_text().strip() == tag               # the step in flight, not step 8/16
    assert f"preempted at step {stopped}: saved {run / 'checkpoints' / tag}; continue with --resume auto" in out
    assert max(losses(run)) == stopped
    for r in (0,):
        assert (run / "checkpoints" / tag / f"rng_state.rank{r}.pt").is_file()

    # The per-rank generator file is what a resume restores: a copy whose file holds other states diverges.
    other = root / "other-rng"
    shutil.copytree(run, other)
    donor = 16 if stopped == 8 else 8         # another step's generators (at step 8 they would be the same)
    theirs = torch.load(ref / f"checkpoints/global_step{donor}/rng_state.rank0.pt", weights_only=True)
    torch.save(theirs, other / "checkpoints" / tag / "rng_state.rank0.pt")

    p = run_train(["--config", str(cfg), "--resume", "auto"], env=ENV)
    assert f"resuming from {run / 'checkpoints' / tag} at step {stopped}" in p.stdout
    assert not (run / "checkpoints/preempted").exists()                         # cleared by the resumed run
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    ma, mb = module(ref / f"checkpoints/global_step{ITERS}"), module(run / f"checkpoints/global_step{ITERS}")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    run_train(["--config", str(cfg), "--set", f"output.dir={other}", "--resume", "auto", "--exit-after-steps", "1"],
              env=ENV)
    assert losses(other)[stopped + 1] != a[stopped + 1]                          # dropout drew other masks


def test_walltime_stops_with_a_checkpoint_before_the_limit(tiny_data, tmp_path):
    limit = 16.0
    cfg = config(tiny_data, tmp_path, "wall", train="{iters: 2000, global_batch_size: 8, micro_batch_size: 4, "
                                                    "precision: fp32, walltime: '00:00:16'}",
                 checkpoint="{interval: 50, extra_steps: [], keep_last: 1}", logging="{interval: 1, "
                 "tensorboard: false, wandb: disabled}")
    t0 = time.time()
    p = run_train(["--config", str(cfg)], env=ENV, check=False, timeout=120)
    took = time.time() - t0
    assert p.returncode == 75, p.stderr[-3000:]
    run = tmp_path / "wall"
    tag = (run / "checkpoints/latest").read_text().strip()
    assert (run / "checkpoints/preempted").read_text().strip() == tag
    steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    step_s = max(r.get("step_seconds", 0) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))
    saved_at = (run / "checkpoints/latest").stat().st_mtime
    assert saved_at <= t0 + limit + step_s, (saved_at - t0, step_s)
    assert took <= limit + 5, took                            # the process is gone too (start-up counted)
    assert "stop request (walltime)" in p.stdout and int(tag.removeprefix("global_step")) >= 2, (tag, steps)


def test_resume_with_another_model_is_one_line(straight):
    _, ref = straight
    p = run_train(["--config", str(ref / "config.yaml"), "--resume", "auto", "--set", "model.hidden_size=64",
                   "--set", "model.num_layers=3"], env=ENV, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"error: checkpoint {ref / 'checkpoints' / f'global_step{ITERS}'} holds another model: ")
    assert "model.num_layers 2 in the checkpoint, 3 in this run" in line
    assert "model.hidden_size 32 in the checkpoint, 64 in this run" in line


def test_token_id_beyond_the_vocabulary_mid_run_is_one_line(tiny_data, tmp_path):
    """A bad id in step 3's rows, past the start-up sample: one line naming file, row, step and id; `latest`
    stays on step 2's checkpoint."""
    import numpy as np

    prefix = tmp_path / "bad"
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_data.prefix + ext, str(prefix) + ext)
    row_len = 33                                              # TINY_SEQ + 1 tokens per row, uint16
    tokens = np.memmap(str(prefix) + ".bin", dtype=np.uint16, mode="r+")
    row = 2 * 8 + 5                                           # step 3 (1-based) reads rows 16..23
    tokens[row * row_len + 7] = 999
    tokens.flush()
    cfg = tmp_path / "c.yml"
    cfg.write_text(tiny_run_yaml(tiny_data, tmp_path / "run", checkpoint="{interval: 2, extra_steps: [], keep_last: null}")
                   .replace(f"path: {tiny_data.prefix},", f"path: {prefix},"))
    from megatron_l2e.data.rows import TokenRows
    TokenRows(str(prefix), 32, vocab_size=320, check_tokens=64)      # the start-up sample misses the bad id
    p = run_train(["--config", str(cfg), "--set", "data.check_tokens=64"], env=ENV, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = p.stderr.strip().splitlines()
    assert line == (f"error: {prefix}.bin: row {row} (step 3, data-parallel rank 0) holds token id 999, ≥ "
                    f"model.vocab_size 320: re-tokenize with the model's tokenizer, or raise model.vocab_size")
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "global_step2"


def test_walltime_arithmetic_and_slurm_deadline(monkeypatch):
    from megatron_l2e.stopping import EXIT_ALLOWANCE_S, SLURM_MARGIN_S, StopRequests, parse_walltime, slurm_deadline

    assert parse_walltime("01:02:03") == 3723 and parse_walltime("2-00:00:10") == 2 * 86400 + 10
    assert parse_walltime(86400) == 86400                    # YAML 1.1 reads an unquoted 24:00:00 as 86400
    for bad in ("1:2", "00:60:00", "x-01:00:00", "01:00:00:00"):
        with pytest.raises(ValueError):
            parse_walltime(bad)
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1000000")
    assert slurm_deadline() == 1000000 - SLURM_MARGIN_S
    assert StopRequests.install(None).deadline == 1000000 - SLURM_MARGIN_S   # Slurm's end when no walltime
    s = StopRequests.install("00:01:40", start=0.0)                          # a walltime wins over Slurm's end
    s.uninstall()
    assert s.deadline == 100.0
    s.step_seconds = [1.0, 3.0]
    s.saved(2.0)
    edge = 100.0 - 3.0 - 2.0 - EXIT_ALLOWANCE_S                              # slowest step + slowest save
    assert not s.out_of_time(now=edge) and s.out_of_time(now=edge + 0.01)
    s.save_seconds = None                                                    # before the first save: a guess
    assert s.out_of_time(now=100.0 - 3.0 - 30.0 - EXIT_ALLOWANCE_S + 0.01)   # 10 × the slowest step
    assert not s.out_of_time(now=100.0 - 3.0 - 30.0 - EXIT_ALLOWANCE_S - 0.01)
    assert s.agreed() == "walltime" or not s.out_of_time()


def test_second_sigint_aborts_without_saving(tiny_data, tmp_path):
    """First SIGINT: the run saves the step in flight and exits 75; a second one before that: exit 130,
    `latest` still on the last complete checkpoint, one line, no traceback."""
    cfg = config(tiny_data, tmp_path, "int", checkpoint="{interval: 2, extra_steps: [], keep_last: null}")
    env = {**os.environ, **ENV, "MEGATRON_L2E_SIGNAL": "0:5:SIGINT"}
    p = subprocess.run([sys.executable, "-m", "megatron_l2e.train", "--config", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 75 and (tmp_path / "int/checkpoints/preempted").read_text().strip() == "global_step5"
    assert "press Ctrl-C again to abort" in p.stderr
    # Two SIGINTs to itself at the start of step 7, each handled: no save of step 7 or later.
    p = subprocess.run([sys.executable, "-m", "megatron_l2e.train", "--config", str(cfg), "--resume", "auto"],
                       cwd=ROOT, env={**env, "MEGATRON_L2E_SIGNAL": "0:7:SIGINT,0:7:SIGINT"}, capture_output=True,
                       text=True, timeout=240)
    err = p.stderr
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: aborted by a second SIGINT")
    assert (tmp_path / "int/checkpoints/latest").read_text().strip() == "global_step6"    # the interval save
    assert max(losses(tmp_path / "int")) == 6 and not (tmp_path / "int/checkpoints/global_step7").exists()
