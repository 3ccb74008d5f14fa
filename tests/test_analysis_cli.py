"""Every analysis command end to end on a tiny random GPT-NeoX and a real 6-class dataset.

The model and a byte-level BPE tokenizer are built here (no hub); the dataset is Python stdlib
source labelled by package (text already on the machine). Independent checks re-capture the
activations with the test's own hooks and recompute the figures with numpy/scipy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from megatron_l2e.analysis import build_stdlib_dataset, write_jsonl  # noqa: E402
from megatron_l2e.analysis.cli import apply_preset, build_parser, main, settings_from_args  # noqa: E402
from megatron_l2e.analysis.commands import ALL_NEURONS  # noqa: E402

CLASSES = ["asyncio", "email", "http", "json", "logging", "unittest"]
SEQ = 48
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("analysis")
    rows = build_stdlib_dataset(CLASSES, per_class=10, chars=300, seed=0)
    features = tmp / "stdlib.jsonl"
    write_jsonl(rows, features)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["text"] for r in rows], vocab_size=320, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)
    models = []
    for name in ("tiny_a", "tiny_b"):
        model = GPTNeoXForCausalLM(cfg)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
        models.append(tmp / name)

    runs = []
    for name, slope in (("l2e", 0.01), ("baseline", 0.0)):
        (tmp / name).mkdir()
        with open(tmp / name / "metrics.jsonl", "w") as f:
            for step in range(0, 100, 10):
                f.write(json.dumps({"step": step, "lm_loss": 4.0, "l2e/layer1/tau": 1 + slope * step,
                                    "l2e/layer2/tau": 2 - slope * step}) + "\n")
                f.write(json.dumps({"step": step, "tokens_per_s": 1e3}) + "\n")   # other metrics lines
        runs.append(tmp / name)
    return {"tmp": tmp, "features": features, "models": models, "runs": runs, "tokenizer": tok, "rows": rows}


def run(argv) -> int:
    return main([str(a) for a in argv] + ["--no-progress"] * (argv[0] != "trajectory"))


def model_args(assets, *extra):
    # The tiny model is checked with the small settings (and the numpy references use c = 0.01);
    # the paper preset's own defaults are checked in test_presets_*.
    return ["--model", assets["models"][0], "--features", assets["features"], "--preset", "quick",
            "--seq-length", SEQ, *extra]


def check_figures(out: Path, figures: list[dict]):
    assert figures
    for fig in figures:
        png = out / fig["path"]
        assert png.stat().st_size > 0
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01, f"{png} is blank"
        assert fig["axes"] and all(ax["xlabel"] and ax["ylabel"] for ax in fig["axes"]), fig


def capture_independently(assets, layer: int):
    """The test's own capture: tokens, valid mask, MLP act per token and block output of ``layer``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["models"][0]).eval()
    ids = [assets["tokenizer"](r["text"], add_special_tokens=False)["input_ids"][:SEQ] for r in assets["rows"]]
    tokens = torch.zeros(len(ids), SEQ, dtype=torch.long)
    valid = torch.zeros(len(ids), SEQ, dtype=torch.bool)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.tensor(t)
        valid[i, : len(t)] = True
    acts = []
    hook = model.gpt_neox.layers[layer].mlp.act.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        out = model.gpt_neox(input_ids=tokens, attention_mask=valid.long(), output_hidden_states=True)
    hook.remove()
    labels = np.array([CLASSES.index(r["label"]) for r in assets["rows"]])
    return valid.numpy(), acts[0].numpy(), out.hidden_states[layer + 1].numpy(), labels


def numpy_phi(v: np.ndarray, c: float = 0.01) -> np.ndarray:
    mu, var = np.nanmean(v, 0), np.nanvar(v, 0, ddof=1)
    return (v - mu) ** 2 / (var + c * np.nanmean(var))


# ------------------------------------------------------------------------------------------ commands

def test_every_command_end_to_end(assets):
    tmp = assets["tmp"]
    commands = {
        "probe": model_args(assets, "--top-k", 3),
        "validate": model_args(assets, "--top-k", 2, "--random-neurons", 30),
        "ks": model_args(assets, "--model", assets["models"][1], "--random-neurons", 30, "--pooled"),
        "layers": model_args(assets, "--model", assets["models"][1]),
        "fkr": model_args(assets, "--ratios", "0.01,0.02,0.1"),
        "trajectory": ["--runs", assets["runs"][0], "--baseline-runs", assets["runs"][1]],
    }
    for command, args in commands.items():
        out = tmp / f"out_{command}"
        assert run([command, *args, "--out", out]) == 0, command
        data = json.loads((out / f"{command}.json").read_text())
        assert data["command"] == command
        check_figures(out, data["figures"])

    probe = json.loads((tmp / "out_probe/probe.json").read_text())["models"]["tiny_a"]
    assert set(probe["top"]) == set(CLASSES) and all(len(v) == 3 for v in probe["top"].values())
    ks = json.loads((tmp / "out_ks/ks.json").read_text())["models"]
    assert set(ks) == {"tiny_a", "tiny_b"} and all(0 < m["mean"] < 1 for m in ks.values())
    assert all(0 <= m["pooled"]["statistic"] <= 1 and m["pooled"]["n_all"] > m["pooled"]["n_feature"] > 0
               for m in ks.values())
    layers = json.loads((tmp / "out_layers/layers.json").read_text())
    # --preset quick: every scored MLP channel of each layer, as before the paper preset
    assert layers["random_neurons"] == "all"
    assert all(v["n_neurons"] == v["n_scored"] == 64 and "drawn" not in v
               for v in layers["models"]["tiny_a"]["layers"].values())
    fkr = json.loads((tmp / "out_fkr/fkr.json").read_text())
    assert fkr["neurons"] == "block" and set(fkr["fkr"]) == {"0", "1", "2"}
    assert all(set(v) == {"0.01", "0.02", "0.1"} for v in fkr["fkr"].values())
    assert all(fkr["argmin"][k] == min(v, key=v.get) and isinstance(fkr["argmin"][k], float)
               for k, v in ((k, {float(r): x for r, x in d.items()}) for k, d in fkr["fkr"].items()))
    traj = json.loads((tmp / "out_trajectory/trajectory.json").read_text())["runs"]
    assert traj["baseline"]["dashed"] and not traj["l2e"]["dashed"]
    assert traj["l2e"]["tau"]["1"]["tau"][-1] == pytest.approx(1.9)


def test_report_end_to_end(assets):
    out = assets["tmp"] / "out_report"
    assert run(["report", *model_args(assets, "--random-neurons", 20, "--top-k", 2, "--ratios", "0.02,0.05"),
                "--runs", assets["runs"][0], "--out", out, "--json", out / "copy.json"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert list(data["sections"]) == ["probe", "validate", "ks", "layers", "fkr", "trajectory"]
    assert (out / "copy.json").read_text() == (out / "report.json").read_text()
    md = (out / "report.md").read_text()
    for section in data["sections"].values():
        check_figures(out, section["figures"])
        for fig in section["figures"]:
            assert f"]({fig['path']})" in md


def test_ks_equals_scipy_on_independently_captured_activations(assets):
    out = assets["tmp"] / "out_ks_check"
    assert run(["ks", *model_args(assets, "--layers", "1", "--random-neurons", 20, "--pooled"), "--out", out]) == 0
    model = json.loads((out / "ks.json").read_text())["models"]["tiny_a"]
    rows = model["neurons"]
    valid, act, _, labels = capture_independently(assets, 1)
    # MLP neuron value of a sequence: mean of its channel over the valid tokens
    z = (act * valid[..., None]).sum(1) / valid.sum(1)[:, None]
    phi = numpy_phi(z)
    l_star = np.argmax([phi[labels == c].mean(0) for c in range(len(CLASSES))], axis=0)
    assert len(rows) == 20
    for row in rows:
        j = row["neuron"]
        assert row["feature"] == CLASSES[l_star[j]]
        ref = scipy.stats.ks_2samp(phi[labels == l_star[j], j], phi[:, j])
        assert row["statistic"] == pytest.approx(ref.statistic, abs=1e-6)
    # pooled: one test on the 20 neurons' samples concatenated
    js = [r["neuron"] for r in rows]
    ref = scipy.stats.ks_2samp(np.concatenate([phi[labels == l_star[j], j] for j in js]), phi[:, js].T.ravel())
    assert model["pooled"]["statistic"] == pytest.approx(ref.statistic, abs=1e-6)
    assert model["pooled"]["n_all"] == 20 * len(labels)


def test_fkr_ratio_one_is_share_outside_l_star(assets):
    out = assets["tmp"] / "out_fkr_check"
    assert run(["fkr", *model_args(assets, "--layers", "0", "--ratios", "1,0.02"), "--out", out,
                "--json", out / "fkr_copy.json"]) == 0
    data = json.loads((out / "fkr_copy.json").read_text())
    valid, _, block, labels = capture_independently(assets, 0)
    x, s, h = block.shape
    v = np.where(valid[..., None], block, np.nan).reshape(x, s * h)
    v = v[:, (~np.isnan(v)).sum(0) >= 2]                  # neurons (positions) with ≥ 2 real tokens
    phi = numpy_phi(v)
    l_star = np.argmax([np.nanmean(phi[labels == c], 0) for c in range(len(CLASSES))], axis=0)
    outside = (labels[:, None] != l_star[None, :]) & ~np.isnan(phi)
    assert data["fkr"]["0"]["1"] == pytest.approx(outside.sum() / (~np.isnan(phi)).sum(), rel=1e-9)
    assert 0 <= data["fkr"]["0"]["0.02"] <= 1


def test_deterministic_given_seed(assets):
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        out = assets["tmp"] / f"out_seed{i}"
        assert run(["ks", *model_args(assets, "--random-neurons", 15, "--max-sequences", 40, "--layers", "0"),
                    "--seed", seed, "--out", out]) == 0
        outs.append((out / "ks.json").read_text())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_saved_dataset_folder(assets):
    import datasets

    rows = assets["rows"]
    ids = [assets["tokenizer"](r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    folder = assets["tmp"] / "saved"
    datasets.Dataset.from_dict({"tokens": ids, "category": [r["label"] for r in rows]}).save_to_disk(str(folder))
    out = assets["tmp"] / "out_saved"
    assert run(["probe", "--model", assets["models"][0], "--features", folder, "--label-column", "category",
                "--seq-length", SEQ, "--out", out]) == 0
    data = json.loads((out / "probe.json").read_text())
    assert data["meta"]["classes"] == CLASSES and data["meta"]["n_sequences"] == len(rows)
    # no --preset: the paper's settings end to end (only --seq-length given, the model has 64 positions)
    assert data["meta"]["preset"] == "paper" and data["meta"]["compensation"] == 0.0
    assert data["top_k"] == 10 and all(len(v) == 10 for v in data["models"]["tiny_a"]["top"].values())


# ------------------------------------------------------------------------------------------- presets

def settings_for(argv):
    args = build_parser().parse_args([str(a) for a in argv] + ["--out", "o"])
    apply_preset(args)
    return args, settings_from_args(args)


MODEL = ["--model", "m", "--features", "f"]


def test_presets_paper_by_default_quick_on_request():
    for argv in (["validate", *MODEL], ["validate", *MODEL, "--preset", "paper"]):
        args, s = settings_for(argv)
        assert (args.seq_length, s.top_k, s.compensation, s.preset) == (512, 10, 0.0, "paper")
        assert (s.n_random("validate"), s.n_random("ks"), s.n_random("layers")) == (10, 1000, 1000)
        assert not s.pooled
    args, s = settings_for(["report", *MODEL, "--preset", "quick"])
    assert (args.seq_length, s.top_k, s.compensation, s.preset) == (128, 5, 0.01, "quick")
    assert (s.n_random("validate"), s.n_random("ks"), s.n_random("layers")) == (100, 100, ALL_NEURONS)
    _, s = settings_for(["ks", *MODEL, "--pooled"])
    assert s.pooled and s.n_random("ks") == 1000


def test_presets_explicit_flags_win():
    # compensation 0 and seq length 128 are falsy / equal to a preset value: still explicit
    args, s = settings_for(["validate", *MODEL, "--preset", "quick", "--seq-length", 64, "--top-k", 7,
                            "--compensation", 0, "--random-neurons", 3])
    assert (args.seq_length, s.top_k, s.compensation, s.n_random("validate")) == (64, 7, 0.0, 3)
    args, s = settings_for(["ks", *MODEL, "--compensation", 0.01, "--seq-length", 128])
    assert (args.seq_length, s.compensation, s.preset) == (128, 0.01, "paper")
    # report: one --random-neurons for every section that draws; 'all' and 0 mean no draw
    _, s = settings_for(["report", *MODEL, "--random-neurons", 20])
    assert (s.n_random("validate"), s.n_random("ks"), s.n_random("layers")) == (20, 20, 20)
    for value in ("all", "0"):
        _, s = settings_for(["layers", *MODEL, "--random-neurons", value])
        assert s.n_random("layers") == ALL_NEURONS


def test_help_shows_each_commands_own_defaults(capsys):
    expected = {
        "validate": ["default 10; 100 with --preset quick", "(default 10; 5 with"],
        "ks": ["default 1000; 100 with --preset quick", "--pooled"],
        "layers": ["default 1000; all with --preset quick"],
        "report": ["default 10 / 1000 / 1000; 100 / 100 / all with --preset quick"],
    }
    for command, needles in expected.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())          # undo argparse's line wrapping
        for needle in needles + ["default 512; 128 with --preset quick", "default 0; 0.01 with --preset quick"]:
            assert needle in text, (command, needle)


# ---------------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_and_exit_2(assets, capsys):
    tmp = assets["tmp"]
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": 3}\n')
    cases = {
        "bad.jsonl:2": ["probe", "--model", assets["models"][0], "--features", bad, "--seq-length", SEQ],
        "nope.jsonl": ["probe", "--model", assets["models"][0], "--features", tmp / "nope.jsonl",
                       "--seq-length", SEQ],
        "--layers": ["ks", *model_args(assets, "--layers", "0,3")],
        "--model": ["layers", "--model", tmp, "--features", assets["features"]],
        "--seq-length": ["layers", *model_args(assets), "--seq-length", "65"],
        "1.5": ["fkr", *model_args(assets, "--ratios", "0.02,1.5")],
        "metrics.jsonl": ["trajectory", "--runs", tmp],
        "'x'": ["ks", *model_args(assets, "--random-neurons", "x")],
        "≥ 0": ["ks", *model_args(assets, "--random-neurons", "-1")],
        "'fast'": ["ks", *model_args(assets), "--preset", "fast"],
        # the paper preset's 512 tokens do not fit the tiny model: say where 512 came from
        "paper preset": ["layers", "--model", assets["models"][0], "--features", assets["features"]],
    }
    for culprit, argv in cases.items():
        try:
            rc = main([str(a) for a in argv] + ["--out", str(tmp / "out_bad")])
        except SystemExit as e:     # argparse-level errors exit from inside parse_args
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2, culprit
        assert len(err.splitlines()) == 1 and "error" in err and culprit in err, (culprit, err)


def test_module_entry_point_usage_error():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_l2e.analysis", "fkr", "--model", "m",
                           "--features", "f", "--out", "o", "--ratios", "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "ratio 0 outside (0, 1]" in proc.stderr
