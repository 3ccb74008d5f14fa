"""Training end to end with real DeepSpeed processes: loss falls, exact resume, atomic latest,
keep-last-k, weights_only-loadable checkpoints, export round trip."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_train, tiny_run_yaml

from megatron_l2e.checkpoint import _allow_deepspeed_globals


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "lm_loss" in r}


def module_state(ckpt: Path) -> dict:
    _allow_deepspeed_globals()
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


def optim_state(ckpt: Path) -> dict:
    _allow_deepspeed_globals()
    return torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=True)


def assert_tree_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")


L2E = "{enabled: true, layers: [0, 1], ratio: 0.05, lam: 1.0e-3, warmup_steps: 2, late_start: 1, forget_steps: 3}"


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Run A: 8 steps straight. Run B: the same config stopped after 4 steps, then resumed."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("A", "B"):
        cfg = root / f"{name}.yml"
        cfg.write_text(tiny_run_yaml(tiny_data, root / name, **({"l2e": L2E} if L2E else {}),
                                     checkpoint="{interval: 4, extra_steps: [2], keep_last: 1}"))
        out[name] = (cfg, root / name)
    run_train(["--config", str(out["A"][0])])
    run_train(["--config", str(out["B"][0]), "--exit-after-steps", "4"])
    p = run_train(["--config", str(out["B"][0]), "--resume", "auto"])
    assert "resuming from" in p.stdout and "at step 4" in p.stdout
    return {k: v[1] for k, v in out.items()}


def test_resumed_run_is_bit_identical(runs):
    a, b = metrics(runs["A"]), metrics(runs["B"])
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:
        assert a[s]["lm_loss"] == b[s]["lm_loss"], s          # exact, not approximate
        assert a[s]["loss"] == b[s]["loss"], s
    ca, cb = runs["A"] / "checkpoints/global_step8", runs["B"] / "checkpoints/global_step8"
    sa, sb = module_state(ca), module_state(cb)
    assert_tree_equal(sa["module"], sb["module"])
    assert_tree_equal(optim_state(ca)["optimizer_state_dict"], optim_state(cb)["optimizer_state_dict"])
    assert_tree_equal(sa["extensions"], sb["extensions"])      # L2E statistics and threshold too
    assert L2E is None or sa["extensions"]["l2e"], "L2E state missing from the checkpoint"


def test_loss_falls_and_lr_follows_schedule(runs):
    from megatron_l2e.config import load_config
    from megatron_l2e.engine import lr_at

    m = metrics(runs["A"])
    assert m[8]["lm_loss"] < m[1]["lm_loss"] - 0.3, (m[1]["lm_loss"], m[8]["lm_loss"])
    cfg = load_config(runs["A"] / "config.yaml")
    for s, r in m.items():
        assert r["lr"] == pytest.approx(lr_at(s - 1, cfg), rel=1e-9, abs=1e-15)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0


def test_checkpoint_layout_keep_last_and_client_state(runs):
    ck = runs["A"] / "checkpoints"
    assert (ck / "latest").read_text().strip() == "global_step8"
    # keep_last 1 pruned global_step4; Pythia-style extra step 2 is a weights-only folder, never pruned.
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["global_step8", "hf_step2"]
    state = module_state(ck / "global_step8")                   # weights_only=True succeeded
    assert state["step"] == 8 and state["consumed_samples"] == 64
    assert state["config"]["train"]["iters"] == 8
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert (ck / "global_step8" / "config.yaml").is_file()


def test_export_round_trip(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_l2e.config import load_config
    from megatron_l2e.export import main as export_main
    from megatron_l2e.model import build_model

    assert export_main(["--checkpoint", str(runs["A"] / "checkpoints/global_step8"), "--out", str(tmp_path)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    cfg = load_config(runs["A"] / "config.yaml")
    ours = build_model(cfg.model)
    ours.load_state_dict(module_state(runs["A"] / "checkpoints/global_step8")["module"])
    ours.eval()
    ids = torch.tensor([tok("def main(argv):\n    return 0\n")["input_ids"][:32]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25 and hf.config.use_parallel_residual


def test_latest_untouched_when_a_save_fails_midway(tiny_data, tmp_path):
    cfg = tmp_path / "c.yml"
    run = tmp_path / "C"
    cfg.write_text(tiny_run_yaml(tiny_data, run, checkpoint="{interval: 2, extra_steps: [], keep_last: null}",
                                 train="{iters: 4, global_batch_size: 8, micro_batch_size: 4, precision: fp32}"))
    # A directory where DeepSpeed will write the optimizer shard of step 4: the model file is
    # written, then the save fails — a real half-written checkpoint.
    (run / "checkpoints/global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt").mkdir(parents=True)
    p = run_train(["--config", str(cfg)], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]      # one line, as for a full disk
    assert line.startswith(f"error: saving {run / 'checkpoints/global_step4'} failed (") and \
        line.endswith("`latest` still names global_step2: free space, remove global_step4, then --resume auto"), line
    assert (run / "checkpoints/global_step4/mp_rank_00_model_states.pt").exists()   # it did fail midway
    assert (run / "checkpoints/latest").read_text().strip() == "global_step2"
    p = run_train(["--config", str(cfg), "--resume", "auto", "--exit-after-steps", "1"])
    assert "at step 2" in p.stdout
