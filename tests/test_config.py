"""Config: layering, overrides, collected one-line errors, every shipped YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_l2e.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layering_and_overrides(tmp_path):
    write(tmp_path / "base.yml", "optimizer:\n  lr: 1.0e-3\n  betas: [0.9, 0.99]\ntrain:\n  iters: 5\n"
                                 "data:\n  path: x\n")
    run = write(tmp_path / "run.yml", "base: base.yml\ntrain:\n  iters: 7\n  seed: 3\n")
    cfg = load_config(run, ["optimizer.lr=2e-4", "train.micro_batch_size=4", "l2e.layers=[0, 2]",
                            "model.hidden_act=gelu_pytorch_tanh"])
    assert cfg.train.iters == 7 and cfg.train.seed == 3          # run file wins over base
    assert cfg.optimizer.betas == [0.9, 0.99]                     # base value kept
    assert cfg.optimizer.lr == 2e-4 and isinstance(cfg.optimizer.lr, float)  # '2e-4' (a YAML 1.1 string) converted
    assert cfg.train.micro_batch_size == 4
    assert cfg.l2e.layers == [0, 2]
    assert cfg.model.hidden_act == "gelu_pytorch_tanh"


def test_all_errors_of_a_file_reported_at_once(tmp_path):
    bad = write(tmp_path / "bad.yml", "train:\n  iters: many\n  bogus: 1\noptimzer:\n  lr: 1\n"
                                      "model:\n  rotary_pct: 2.0\ndata:\n  path: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.seed=-1"])
    errs = e.value.errors
    joined = "\n".join(errs)
    assert len(errs) == 5, joined
    assert f"{bad}: train.iters: expected an integer, got 'many'" in errs
    assert f"{bad}: train.bogus: unknown key" in errs
    assert any(x.startswith(f"{bad}: optimzer.lr: unknown section 'optimzer'") for x in errs)
    assert any(x.startswith(f"{bad}: model.rotary_pct: must lie in [0, 1]") for x in errs)
    assert any(x.startswith("--set train.seed=-1: train.seed: must be ≥ 0") for x in errs)


@pytest.mark.parametrize("override, message", [
    ("train.iters", "an override must look like section.key=value"),
    ("iters=5", "the key must name a section and a field"),
    ("l2e.inhibition=sometimes", "expected one of 'regularizer'"),
    ("train.precision=fp8", "expected one of 'fp32', 'bf16', 'fp16'"),
    ("l2e.layers=middle", "must be one of mid2, top_bottom, mid_third"),
    ("l2e.layers=[0, 9]", "block indices [9] out of range for 6 layers"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/runs/70m/l2e.yml", [override])
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_config(write(tmp_path / "m.yml", "train:\n  iters: [1\n"))
    with pytest.raises(ConfigError, match="base files form a cycle"):
        write(tmp_path / "a.yml", "base: b.yml\n")
        load_config(write(tmp_path / "b.yml", "base: a.yml\n"))


SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yml") if p.parent.name != "overlays")
OVERLAYS = sorted((ROOT / "configs/overlays").glob("*.yml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize("path", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_every_overlay_layers_onto_every_paper_preset(path):
    """An overlay is a second --config: it loads on top of any run file and changes only its own keys."""
    for run in sorted((ROOT / "configs/runs").glob("*/*.yml")):
        base, over = load_config(run).to_dict(), load_config([run, path]).to_dict()
        changed = {f"{sec}.{k}" for sec in base for k in base[sec] if base[sec][k] != over[sec][k]}
        keys = {f"{sec}.{k}" for sec, d in yaml.safe_load(path.read_text()).items() for k in d}
        assert changed <= keys, (run, changed - keys)


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    cases = [
        (["--config", str(tmp_path / "none.yml")], "config file not found"),
        (["--config", "configs/smoke/cpu.yml", "--set", "train.iters"], "override must look like"),
        (["--config", "configs/smoke/cpu.yml", "--set", "train.itres=3"], "train.itres: unknown key"),
        (["--config", "configs/smoke/cpu.yml", "--set", f"output.dir={tmp_path}/f.txt/run"], "not writable"),
        (["--config", "configs/smoke/cpu.yml", "--set", f"output.dir={tmp_path}/r", "--resume",
          str(tmp_path / "missing")], "no such file or directory"),
    ]
    (tmp_path / "f.txt").write_text("a file, not a folder")
    for args, message in cases:
        p = subprocess.run([sys.executable, "-m", "megatron_l2e.train", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (args, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr


def test_dry_run_70m_paper_run():
    p = subprocess.run([sys.executable, "-m", "megatron_l2e.train", "--config", "configs/runs/70m/l2e.yml",
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "parameters: 70,426,624" in p.stdout
    assert "tokens per step: 2,097,152" in p.stdout
    assert "steps: 14,300" in p.stdout
    assert "  decay_iters: 143000\n" in p.stdout      # the resolved config is printed
    # Pythia's cosine cut off at 14,300 (the lr formula by hand: tests/test_l2e_readings.py)
    assert "warm-up 1,430 steps, decay over 143,000 steps" in p.stdout
    assert "lr at the last step 0.000982" in p.stdout
