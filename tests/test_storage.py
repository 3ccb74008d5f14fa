"""The storage plan (issue 16): export from the fp32 masters, weights-only extra steps, dry-run sizes.

Real DeepSpeed runs on CPU: bf16 ZeRO-1 and ZeRO-0 on one rank, bf16 ZeRO-3 on two ranks (torchrun, gloo).
The reference masters never come from the export code: the live engine's gather
(``deepspeed.utils.safe_get_full_fp32_param``, written as ``hf_step<N>`` during training), the ZeRO-1
optimizer file's flat fp32 partition cut by DeepSpeed's own ``param_slice_mappings``, and the 16-bit
module DeepSpeed saved (= the masters rounded to bf16).
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_train, tiny_run_yaml
from safetensors.torch import load_file

from megatron_l2e.checkpoint import _allow_deepspeed_globals

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 6 bf16 steps; full saves every 2 (keep 2), weights-only at the extra steps 1 and 4.
TRAIN = "{iters: 6, global_batch_size: 8, micro_batch_size: 4, precision: bf16}"
CKPT = "{interval: 2, extra_steps: [1, 4], keep_last: 2}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    out = {}
    for name, zero, ranks in (("z1", 1, 1), ("z0", 0, 1), ("z3x2", 3, 2)):
        cfg = root / f"{name}.yml"
        train = TRAIN.replace("micro_batch_size: 4", "micro_batch_size: 2") if ranks == 2 else TRAIN
        cfg.write_text(tiny_run_yaml(tiny_data, root / name, train=train, checkpoint=CKPT,
                                     distributed=f"{{zero_stage: {zero}}}"))
        if ranks == 1:
            run_train(["--config", str(cfg)])
        else:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-port", str(_free_port()), "-m", "megatron_l2e.train", "--config", str(cfg)],
                               cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
            assert p.returncode == 0, p.stderr[-4000:]
        out[name] = root / name / "checkpoints"
    return out


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's tensors under the module's names (the file says embed_out for lm_head)."""
    return {("lm_head.weight" if k == "embed_out.weight" else k): v
            for k, v in load_file(folder / "model.safetensors").items()}


def module_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    _allow_deepspeed_globals()
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def zero1_optimizer_masters(ckpt: Path) -> dict[str, torch.Tensor]:
    """One rank's ZeRO-1 fp32 partition (= all of it), cut with DeepSpeed's own name → slice map."""
    _allow_deepspeed_globals()
    osd = torch.load(next(ckpt.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")), map_location="cpu",
                     weights_only=True)["optimizer_state_dict"]
    shapes = {k: v.shape for k, v in module_weights(ckpt).items()}
    out = {}
    for flat, mapping in zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
        for name, frag in mapping.items():
            out[name] = flat[frag.start:frag.start + frag.numel].view(shapes[name])
    return out


def export(ckpt: Path, out: Path, dtype: str) -> dict[str, torch.Tensor]:
    from megatron_l2e.export import main

    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--dtype", dtype]) == 0
    return hf_weights(out)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["z1", "z0", "z3x2"])
def test_export_is_the_fp32_masters_bit_for_bit(runs, name, tmp_path):
    ck = runs[name]
    live = hf_weights(ck / "hf_step4")                 # gathered from the live engine at step 4
    fp32 = export(ck / "global_step4", tmp_path / "fp32", "fp32")
    assert_same(fp32, live)
    assert all(v.dtype == torch.float32 for v in fp32.values())
    bf16 = export(ck / "global_step4", tmp_path / "bf16", "bf16")
    assert_same(bf16, {k: v.to(torch.bfloat16) for k, v in live.items()})
    if name == "z1":
        assert_same(fp32, zero1_optimizer_masters(ck / "global_step4"))
    if name != "z3x2":                                 # ZeRO-3 saves no 16-bit module
        module = module_weights(ck / "global_step4")
        assert_same(bf16, module)                      # DeepSpeed's bf16 weights = the masters, rounded
        # ... and the masters carry more than the bf16 weights: not an upcast of the module
        assert any(not torch.equal(fp32[k], module[k].float()) for k in fp32)


def test_weights_only_extra_steps(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = runs["z1"]
    # interval saves 2, 4, 6 with keep_last 2 → 4 and 6; the weights-only extra steps 1 and 4 are kept
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["global_step4", "global_step6", "hf_step1",
                                                                  "hf_step4"]
    assert (ck / "latest").read_text().strip() == "global_step6"
    for step in (1, 4):
        d = ck / f"hf_step{step}"
        assert {"config.json", "model.safetensors", "tokenizer.json", "megatron_l2e_run.yaml"} <= \
            {f.name for f in d.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(ck / "hf_step4").eval()
    assert hf.dtype == torch.float32
    export(ck / "global_step4", tmp_path / "x", "fp32")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    tok = AutoTokenizer.from_pretrained(ck / "hf_step4")
    ids = torch.tensor([tok("def main(argv):\n    return 0\n")["input_ids"][:32]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)

    # eval and the analysis toolkit take the folder as a model as is
    from megatron_l2e.analysis.activations import read_model_spec
    from megatron_l2e.eval import _export

    assert _export(ck / "hf_step4", tmp_path / "unused") == ck / "hf_step4"
    assert read_model_spec(ck / "hf_step4").n_layers == 2
    # export accepts it too (a cast of the same masters)
    assert_same(export(ck / "hf_step4", tmp_path / "b", "bf16"),
                {k: v.to(torch.bfloat16) for k, v in hf_weights(ck / "hf_step4").items()})


def test_crash_between_write_and_rename_leaves_no_folder(tiny_data, tmp_path, monkeypatch):
    from megatron_l2e import checkpoint as ck_mod
    from megatron_l2e.config import load_config
    from megatron_l2e.model import build_model

    f = tmp_path / "c.yml"
    f.write_text(tiny_run_yaml(tiny_data, tmp_path / "run", checkpoint="{interval: 4, extra_steps: [3]}"))
    cfg = load_config(f)
    engine = SimpleNamespace(module=build_model(cfg.model), optimizer=None)   # fp32, no ZeRO: params = masters
    ckpt = ck_mod.Checkpointer(cfg.checkpoint, tmp_path / "run", train_iters=8, is_main=True)

    class Crash(RuntimeError):
        pass

    def crash(tmp, final):
        assert (tmp / "model.safetensors").is_file()   # written completely, not yet renamed
        raise Crash

    monkeypatch.setattr(ck_mod, "_publish_dir", crash)
    with pytest.raises(Crash):
        ckpt.save_weights(engine, 3, cfg)
    names = [p.name for p in ckpt.dir.iterdir()]
    assert not any(re.match(r"^hf_step\d+$", n) for n in names), names
    monkeypatch.undo()
    path = ckpt.save_weights(engine, 3, cfg)          # the next attempt clears the leftover
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["hf_step3"] and path == ckpt.dir / "hf_step3"
    assert_same(hf_weights(path), dict(engine.module.state_dict()))


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _parse_size(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_dry_run_sizes_match_a_real_smoke_save(tmp_path):
    """configs/smoke/cpu.yml (fp32, ZeRO 1, L2E on): the dry run's sizes within 10 % of the bytes on disk."""
    sets = ["train.iters=2", "checkpoint.interval=2", "checkpoint.extra_steps=[2]", "checkpoint.keep_last=null",
            f"output.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data/corpus'}", "data.smoke_max_files=60",
            "validation.interval=0", "logging.wandb=disabled", "logging.tensorboard=false"]
    from megatron_l2e.config import load_config
    from megatron_l2e.train import dry_run_report

    args = ["--config", "configs/smoke/cpu.yml", *[a for s in sets for a in ("--set", s)]]
    dry = dry_run_report(load_config([ROOT / "configs/smoke/cpu.yml"], sets))    # what --dry-run prints
    full, weights = re.search(r"^checkpoint: (.+) full, (.+) weights-only$", dry, re.M).groups()
    assert re.search(r"^run writes: 21\.1 MB, keeps: 21\.1 MB \(1 full checkpoints, 1 kept; 1 weights-only",
                     dry, re.M), dry
    run_train(args)
    ck = tmp_path / "run/checkpoints"
    assert _du(ck / "global_step2") == pytest.approx(_parse_size(full), rel=0.10)
    assert _du(ck / "hf_step2") == pytest.approx(_parse_size(weights), rel=0.10)


def test_storage_plan_of_the_paper_runs():
    from megatron_l2e.checkpoint import full_checkpoint_bytes_per_param, storage_plan
    from megatron_l2e.config import load_config
    from megatron_l2e.train import dry_run_report

    cfg = load_config(ROOT / "configs/runs/2.8b/l2e.yml")
    assert cfg.checkpoint.keep_last == 2 and cfg.train.precision == "fp16" and cfg.distributed.zero_stage == 1
    plan = storage_plan(2_775_208_960, precision="fp16", zero_stage=1, cfg=cfg.checkpoint, train_iters=14300)
    assert plan.full_bytes == 2_775_208_960 * 14 and plan.weights_bytes == 2_775_208_960 * 4
    assert (plan.n_full, plan.kept_full, plan.n_weights) == (15, 2, 11)    # 1000, ..., 14000, 14300; 0 ... 512
    report = dry_run_report(cfg)
    assert "checkpoint: 38.9 GB full, 11.1 GB weights-only" in report
    assert "run writes: 704.9 GB, keeps: 199.8 GB" in report
    # measured on DeepSpeed 0.19.8 (tests above and the fixture runs): what each layout writes per parameter
    assert [full_checkpoint_bytes_per_param(p, z) for p in ("bf16", "fp32") for z in (0, 1, 2, 3)] == \
        [14, 14, 14, 12, 12, 16, 16, 12]
    for size in ("70m", "410m"):
        assert load_config(ROOT / f"configs/runs/{size}/l2e.yml").checkpoint.keep_last == 2


def test_export_bad_input_is_one_line(runs, tmp_path, capsys):
    from megatron_l2e.export import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(runs["z1"]), "--out", str(tmp_path), "--dtype", "fp8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--dtype" in err[0] and "fp8" in err[0]
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
