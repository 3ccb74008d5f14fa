"""The memory plan (issue 17 item 2): against measured peaks, the paper configs' dry runs, `auto`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_l2e.config import ConfigError, load_config
from megatron_l2e.memory import (CPU_RESERVE_BYTES, GB, Dims, choose_micro_batch, micro_batch_candidates,
                                 model_states, needs_checkpointing, plan)

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "_memory_probe.py"

# Three small fp32 runs (2 optimizer steps each, so Adam's moments exist in the measured step).
# name: (model overrides, train overrides, ZeRO stage, checkpoint_activations, gpu_memory_gb: None = 80,
# "tight" = between the checkpointed and the plain peak, so that `auto` must checkpoint)
MEASURED = {
    "sdpa": ({"attn_implementation": "sdpa"}, {"micro_batch_size": 8, "global_batch_size": 8}, 1, "auto", None),
    "sdpa-ckpt": ({"attn_implementation": "sdpa"}, {"micro_batch_size": 4, "global_batch_size": 8}, 1, "auto",
                  "tight"),
    "eager-zero0": ({"attn_implementation": "eager"}, {"micro_batch_size": 8, "global_batch_size": 8}, 0, False,
                    None),
}
DIMS = dict(num_layers=3, hidden_size=256, num_attention_heads=4, vocab_size=2048, seq_length=512)


def write_rows(prefix: Path, vocab: int, seq: int, n: int) -> None:
    """A rows-format .bin/.idx of random tokens, written by hand (no megatron-core import: seconds)."""
    from megatron_l2e.data.index import HEADER, MAGIC

    rows = np.random.default_rng(0).integers(0, vocab, size=(n, seq + 1)).astype(np.uint16)
    Path(f"{prefix}.bin").write_bytes(rows.tobytes())
    sizes = np.full(n, seq + 1, np.int32)
    pointers = np.arange(n, dtype=np.int64) * (seq + 1) * 2
    Path(f"{prefix}.idx").write_bytes(HEADER.pack(MAGIC, 1, 8, n, n + 1) + sizes.tobytes() + pointers.tobytes()
                                      + np.arange(n + 1, dtype=np.int64).tobytes())


def run_yaml(tmp: Path, name: str, model: dict, train: dict, zero: int, ckpt, gpu_gb) -> Path:
    m = {**DIMS, **model, "name": name, "checkpoint_activations": ckpt}
    t = {"iters": 2, "precision": "fp32", **train}
    def flow(d: dict) -> str:
        return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) + "}"
    dist = {"zero_stage": zero, **({"gpu_memory_gb": gpu_gb} if gpu_gb else {})}
    path = tmp / f"{name}.yml"
    path.write_text(
        f"base: {ROOT}/configs/pythia/common.yml\n"
        f"model: {flow(m)}\n"
        f"data: {{format: rows, path: {tmp}/rows, valid_path: null, tokenizer: null}}\n"
        f"train: {flow(t)}\n"
        f"distributed: {flow(dist)}\n"
        "checkpoint: {interval: 0, extra_steps: [], keep_last: null, save_final: false}\n"
        "validation: {interval: 0}\n"
        "logging: {interval: 1, tensorboard: false, wandb: disabled, progress: false}\n"
        f"output: {{dir: {tmp}/out-{name}}}\n")
    return path


def tight_budget(cfg) -> float:
    """A gpu_memory_gb between the checkpointed and the plain peak (CPU plan): `auto` must turn it on."""
    p = plan(cfg, dp=1, cuda=False)
    assert p.peak(True) < p.peak(False)
    return round((CPU_RESERVE_BYTES + (p.peak(True) + p.peak(False)) / 2) / GB, 4)


def test_plan_against_measured_peak_rss(tmp_path):
    """Three real fp32 training runs (DeepSpeed ZeRO 1 / 0, SDPA / eager, with and without checkpointing,
    with and without accumulation): the plan's peak within 25 % of the measured one.

    Measured: peak RSS (VmHWM, reset before each run) minus the RSS right before the run's model is
    built, the three one after another in one process after a tiny warm-up run, with glibc's mmap
    threshold fixed at 64 KiB so that the RSS follows the live tensors (tests/_memory_probe.py)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measures peak RSS through Linux's /proc/self (statm, status, clear_refs)")
    write_rows(tmp_path / "rows", DIMS["vocab_size"], DIMS["seq_length"], 24)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfgs, args = {}, []
    for name, (model, train, zero, ckpt, gpu_gb) in MEASURED.items():
        path = run_yaml(tmp_path, name, model, train, zero, ckpt, None)
        if gpu_gb == "tight":
            path = run_yaml(tmp_path, name, model, train, zero, ckpt, tight_budget(load_config(path)))
        cfgs[name] = load_config(path)
        if not args:   # the warm-up: the first config with 2 blocks of 32, checkpointed
            args += ["--config", str(path), "--set", "model.num_layers=2", "--set", "model.hidden_size=32",
                     "--set", "model.num_attention_heads=2", "--set", "model.checkpoint_activations=true",
                     "--set", f"output.dir={tmp_path}/out-warm-up"]
        args += ["--", "--config", str(path)]
    p = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "peaks.json"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    warm, *runs = json.loads((tmp_path / "peaks.json").read_text())
    if not warm["reset"]:
        pytest.skip("this kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    assert warm["rc"] == 0, warm
    assert len(runs) == len(MEASURED) and all(r["rc"] == 0 for r in runs), runs
    rows = []
    for (name, cfg), run in zip(cfgs.items(), runs):
        on, why = needs_checkpointing(cfg, dp=1, cuda=False)
        assert run["checkpointing"] == on, (name, why)     # train.py did what the plan said
        measured = run["peak"] - run["baseline"]
        planned = plan(cfg, dp=1, cuda=False).peak(on)
        rows.append((name, on, measured, planned))
    print("\nconfig | checkpointing | measured MB | planned MB | planned / measured")
    for name, on, measured, planned in rows:
        print(f"{name} | {'on' if on else 'off'} | {measured / 1e6:.0f} | {planned / 1e6:.0f} | {planned / measured:.2f}")
    assert [r[1] for r in rows] == [False, True, False], "auto: off with room, on under the tight budget"
    for name, _, measured, planned in rows:
        assert abs(planned / measured - 1) <= 0.25, (name, measured, planned)


@pytest.mark.parametrize("size, micro, accum", [("70m", 128, 1), ("410m", 32, 4), ("2.8b", 8, 16)])
def test_dry_run_paper_configs_print_the_plan(size, micro, accum, monkeypatch):
    """The paper configs carry the plan's micro-batch for one 8×H100-80GB node (global batch 1024)."""
    from megatron_l2e.train import dry_run_report

    monkeypatch.setenv("WORLD_SIZE", "8")          # what `deepspeed --num_gpus 8` sets
    cfg = load_config(ROOT / f"configs/runs/{size}/baseline.yml")
    assert cfg.model.checkpoint_activations == "auto" and cfg.train.global_batch_size == 1024
    assert (cfg.train.micro_batch_size, 1024 // (8 * cfg.train.micro_batch_size)) == (micro, accum)
    choice = choose_micro_batch(cfg, dp=8)
    assert (choice.micro_batch, choice.checkpoint) == (micro, False)
    lines = dry_run_report(cfg).splitlines()
    plan_line = next(l for l in lines if l.startswith("memory plan per GPU (80 GB): weights "))
    for part in ("gradients", "optimizer", "activations", "(checkpointed", "loss"):
        assert part in plan_line
    fit = next(l for l in lines if l.startswith("largest micro-batch that fits: "))
    assert fit.startswith(f"largest micro-batch that fits: {micro} without checkpointing")
    assert f"{micro} micro-batch × {accum} accumulation × 8 GPUs, checkpointing off" in fit
    split = f"batch split (world size 8): {micro} micro-batch × {accum} accumulation × 8 data-parallel = 1024"
    assert split in lines
    # every preset built on the baseline keeps its layout; all fit it without checkpointing but 2.8B's
    # dropout baseline (hidden-dropout masks: +1.6 GB over 70 GB usable), where `auto` turns it on
    for preset in sorted((ROOT / f"configs/runs/{size}").glob("*.yml")):
        c = load_config(preset)
        assert c.train.micro_batch_size == micro, preset
        on, why = needs_checkpointing(c, dp=8)
        assert on is (size == "2.8b" and preset.stem == "dropout"), (preset, why)


def test_auto_checkpoints_exactly_when_needed():
    """auto: on exactly when the micro-batch's plain peak exceeds the usable memory (device − reserve)."""
    cfg = load_config(ROOT / "configs/smoke/cpu.yml", ["model.checkpoint_activations=auto"])
    for cuda in (False, True):
        p = plan(cfg, dp=1, cuda=cuda)
        plain, ckpt = p.peak(False), p.peak(True)
        assert ckpt < plain
        # the device whose usable memory is exactly `peak`
        device = (lambda peak: (peak + 2 * GB) / 0.9) if cuda else (lambda peak: peak + CPU_RESERVE_BYTES)
        for usable, want in ((plain * 1.001, False), (plain * 0.999, True), ((plain + ckpt) / 2, True),
                             (ckpt * 0.5, True), (plain * 100, False)):
            on, why = needs_checkpointing(cfg, dp=1, cuda=cuda, capacity_bytes=device(usable))
            assert on is want, (cuda, usable, why)
    # true / false are kept whatever the plan says
    for setting in (True, False):
        c = load_config(ROOT / "configs/smoke/cpu.yml", [f"model.checkpoint_activations={str(setting).lower()}",
                                                         "distributed.gpu_memory_gb=0.001"])
        assert needs_checkpointing(c, dp=1, cuda=False)[0] is setting
    with pytest.raises(ConfigError, match="checkpoint_activations"):
        load_config(ROOT / "configs/smoke/cpu.yml", ["model.checkpoint_activations=sometimes"])
    with pytest.raises(ConfigError, match="gpu_memory_gb"):
        load_config(ROOT / "configs/smoke/cpu.yml", ["distributed.gpu_memory_gb=0"])


def test_train_resolves_auto_against_the_device(monkeypatch):
    """train.py's auto: the smaller of distributed.gpu_memory_gb and the device (CPU: RAM)."""
    import torch

    from megatron_l2e.engine import DistInfo
    from megatron_l2e.train import activation_checkpointing

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    cfg = load_config(ROOT / "configs/smoke/cpu.yml", ["model.checkpoint_activations=auto"])
    assert activation_checkpointing(cfg, cpu)[0] is False                 # a tiny model in 80 GB / the RAM
    cfg.distributed.gpu_memory_gb = (CPU_RESERVE_BYTES + plan(cfg, dp=1, cuda=False).peak(False) * 0.99) / GB
    assert activation_checkpointing(cfg, cpu)[0] is True


def test_states_by_zero_stage_and_data_parallel_size():
    cfg = load_config(ROOT / "configs/pythia/2.8b.yml")
    d = Dims.of(cfg.model)
    assert d.params == 2_775_208_960
    kw = dict(reduce_bucket_size=0, overlap_comm=False, grad_accum=2)
    P = d.params
    s0 = model_states(d, precision="fp16", zero_stage=0, dp=8, **kw)
    assert (s0.weights, s0.optimizer, s0.grads_backward) == (2 * P, 12 * P, 2 * P)
    s1 = model_states(d, precision="bf16", zero_stage=1, dp=8, **kw)
    assert (s1.weights, s1.optimizer, s1.grads_backward) == (2 * P, 12 * P / 8, 2 * P)
    s2 = model_states(d, precision="bf16", zero_stage=2, dp=8, **kw)
    assert (s2.weights, s2.optimizer, s2.grads_backward) == (2 * P, 12 * P / 8, 2 * P / 8)
    s3 = model_states(d, precision="bf16", zero_stage=3, dp=8, **kw)
    assert s3.weights < s2.weights / 4 and s3.grads_backward == 2 * P / 8
    f32 = model_states(d, precision="fp32", zero_stage=0, dp=1, **kw)
    assert (f32.weights, f32.optimizer, f32.grads_backward) == (4 * P, 8 * P, 4 * P)
    # more GPUs: less per GPU; the candidates keep the accumulation whole
    assert plan(cfg, dp=16).peak(False) < plan(cfg, dp=8).peak(False)
    assert micro_batch_candidates(1024, 8) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert micro_batch_candidates(1024, 3) == []


def test_parameter_count_matches_the_model():
    from megatron_l2e.model import build_model, count_parameters

    for size in ("70m", "410m"):
        m = load_config(ROOT / f"configs/pythia/{size}.yml").model
        assert Dims.of(m).params == count_parameters(build_model(m, meta=True))
