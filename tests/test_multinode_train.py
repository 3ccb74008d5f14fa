"""Data-parallel training with real processes (torchrun, gloo on CPU, one torch thread per rank).

* 2 ranks vs 1 rank with 2 accumulation steps vs 1 rank with a micro-batch twice as large, same global
  batch: the same loss curve (fp32 tolerance) and the same L2E state, bit-identical on every rank
  (each rank dumps its own copy, MEGATRON_L2E_DUMP_L2E_STATE) — ZeRO-1 and ZeRO-3 (ZeRO-2: slow);
* two simulated nodes on loopback (two torchrun invocations, --nnodes 2 --node-rank 0/1, through
  scripts/launch_torchrun.sh): train, checkpoint, a rank killed mid-run (MEGATRON_L2E_FAULT) ends the job
  non-zero with its error shown and `latest` on a complete checkpoint, resume — bit-identical to the
  uninterrupted run;
* ranks with different configs, ranks that resolve different checkpoints, and ranks that do not share
  output.dir are refused within seconds, each with one line;
* a stop signal that reaches one rank saves the step in flight on both (same tag, the `preempted` marker);
* a resume on another data-parallel size reshards through DeepSpeed's universal checkpoints (2 → 1, 1 → 2
  at ZeRO 1; 2 → 1 at ZeRO 3; ZeRO 2: slow);
* ``l2e.inhibition: decorrelation``: 2 ranks == 1 rank × 2 accumulation steps (loss curve, the logged term).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_run_yaml

from megatron_l2e.checkpoint import _allow_deepspeed_globals

L2E = "{enabled: true, layers: [0, 1], ratio: 0.05, lam: 1.0e-3, warmup_steps: 2, late_start: 1, forget_steps: 3}"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
       "MEGATRON_L2E_DUMP_L2E_STATE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cfg(data, root: Path, name: str, *, zero: int, micro: int) -> Path:
    f = root / f"{name}.yml"
    f.write_text(tiny_run_yaml(data, root / name, l2e=L2E, distributed=f"{{zero_stage: {zero}}}")
                 .replace("micro_batch_size: 4", f"micro_batch_size: {micro}"))
    return f


def run(cmd, *, env=None, timeout=240, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV,
                                                                                            **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def train_1rank(cfg: Path, *args, **kw):
    return run([sys.executable, "-m", "megatron_l2e.train", "--config", str(cfg), *args], **kw)


def train_2rank(cfg: Path, *args, **kw):
    return run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "megatron_l2e.train",
                "--config", str(cfg), *args], **kw)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "lm_loss" in r}


def client(ckpt: Path) -> dict:
    """Rank 0's client state (ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_0_...)."""
    _allow_deepspeed_globals()
    f = ckpt / "mp_rank_00_model_states.pt"
    f = f if f.exists() else ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=True)


def rank_l2e(ckpt: Path, rank: int) -> dict:
    return torch.load(ckpt / f"l2e_state.rank{rank}.pt", weights_only=True)


def assert_l2e_close(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys() and a["sites"].keys() == b["sites"].keys()
    for i, sa in a["sites"].items():
        sb = b["sites"][i]
        for k in ("count", "optimizer_steps", "scored_steps", "warm_n", "shape", "layer"):
            assert sa[k] == sb[k], (i, k)
        for k in ("mean", "var"):
            if exact:
                assert torch.equal(sa[k], sb[k]), (i, k)
            else:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=f"site {i} {k}")
        for k in ("tau", "warm_sum"):
            assert (sa[k] == sb[k]) if exact else sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), (i, k)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The same 8 steps of global batch 8: 1 rank × micro 8, 1 rank × micro 4 × 2 accumulation (ZeRO-3),
    2 ranks × micro 4 (ZeRO-1 and ZeRO-3)."""
    root = tmp_path_factory.mktemp("mn")
    cfgs = {"1r_mb8_z1": write_cfg(tiny_data, root, "1r_mb8_z1", zero=1, micro=8),
            "1r_ga2_z3": write_cfg(tiny_data, root, "1r_ga2_z3", zero=3, micro=4),
            "2r_z1": write_cfg(tiny_data, root, "2r_z1", zero=1, micro=4),
            "2r_z3": write_cfg(tiny_data, root, "2r_z3", zero=3, micro=4)}
    for name, cfg in cfgs.items():
        (train_2rank if name.startswith("2r") else train_1rank)(cfg)
    return {name: root / name for name in cfgs} | {"root": root, "cfgs": cfgs}


def test_loss_curves_match_across_layouts(runs):
    ref = losses(runs["1r_mb8_z1"])
    assert sorted(ref) == list(range(1, 9))
    for name in ("1r_ga2_z3", "2r_z1", "2r_z3"):
        got = losses(runs[name])
        assert sorted(got) == sorted(ref), name           # rank 0 alone logs: one line per step
        for s in ref:
            assert got[s] == pytest.approx(ref[s], rel=2e-5), (name, s)
    assert ref[8] < ref[1] - 0.3                          # it trains


def test_l2e_state_identical_on_every_rank_and_across_layouts(runs):
    ref = client(runs["1r_mb8_z1"] / "checkpoints/global_step8")["extensions"]["l2e"]
    assert ref["sites"]["1"]["scored_steps"] == 7 and ref["sites"]["1"]["count"] < 8 * 8    # threshold phase; forgetting on
    assert_l2e_close(client(runs["1r_ga2_z3"] / "checkpoints/global_step8")["extensions"]["l2e"], ref, exact=False)
    for name in ("2r_z1", "2r_z3"):
        ckpt = runs[name] / "checkpoints/global_step8"
        r0, r1 = rank_l2e(ckpt, 0), rank_l2e(ckpt, 1)
        assert_l2e_close(r0, r1, exact=True)                     # the packed all-reduce: same sums, same state
        assert_l2e_close(client(ckpt)["extensions"]["l2e"], r0, exact=True)
        assert_l2e_close(r0, ref, exact=False)
        assert client(ckpt)["dp_world_size"] == 2


def test_every_rank_writes_its_zero_shard_and_zero3_exports(runs, tmp_path):
    from megatron_l2e.export import export_checkpoint
    from transformers import GPTNeoXForCausalLM

    z1, z3 = runs["2r_z1"] / "checkpoints/global_step8", runs["2r_z3"] / "checkpoints/global_step8"
    assert {f.name for f in z1.iterdir()} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "config.yaml"}
    assert {f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")} <= \
        {f.name for f in z3.iterdir()}
    # ZeRO-3 partitions the weights: export gathers them (zero_to_fp32) — equal to ZeRO-1's whole copy.
    m1 = GPTNeoXForCausalLM.from_pretrained(export_checkpoint(z1, tmp_path / "z1"))
    m3 = GPTNeoXForCausalLM.from_pretrained(export_checkpoint(z3, tmp_path / "z3"))
    for (k, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        # The key part of query_key_value.bias has a zero gradient in exact arithmetic (softmax is
        # shift-invariant), so Adam turns reduction-order rounding into updates of ~lr: looser there.
        tol = dict(rtol=0, atol=2e-3) if k.endswith("query_key_value.bias") else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, **tol, msg=k)


def test_two_nodes_on_loopback_crash_then_resume(runs):
    """Two launcher invocations (scripts/launch_torchrun.sh, 1 process each) = the 2-rank run. Rank 1 dies
    at step 6: both nodes exit non-zero with rank 1's error shown and `latest` on the complete step-4
    checkpoint; resuming from it finishes bit-identically to the uninterrupted 2-rank run."""
    cfg = runs["root"] / "nodes.yml"
    cfg.write_text(runs["cfgs"]["2r_z1"].read_text().replace(str(runs["2r_z1"]), str(runs["root"] / "nodes")))

    def launch(*extra, env=None):
        port = str(free_port())
        procs = [subprocess.Popen(
            [str(ROOT / "scripts/launch_torchrun.sh"), "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", port, "--torchrun", " ".join(TORCHRUN),
             "--config", str(cfg), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **ENV, "PYTHON": sys.executable, **(env or {})}) for r in (0, 1)]
        outs = [p.communicate(timeout=240) for p in procs]   # a hang would time out here
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]

    (rc0, _, err0), (rc1, _, err1) = launch(env={"MEGATRON_L2E_FAULT": "1:6"})
    assert rc0 != 0 and rc1 != 0
    assert "error: [rank 1/2] InjectedFault: fault injected on rank 1 at step 6" in err1
    assert "megatron_l2e.train FAILED" in err1                          # torchrun's failure summary
    assert "error: [rank 0/2]" in err0                                  # rank 0 left its collective
    run_dir = runs["root"] / "nodes"
    ckpt = run_dir / "checkpoints/global_step4"
    assert (run_dir / "checkpoints/latest").read_text().strip() == "global_step4"
    _allow_deepspeed_globals()
    for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        torch.load(ckpt / f, map_location="cpu", weights_only=True)       # every shard whole and readable
    assert client(ckpt)["step"] == 4 and (ckpt / "config.yaml").is_file()
    assert max(losses(run_dir)) == 5

    outs = launch("--resume", "auto")
    for rc, out, err in outs:
        assert rc == 0, (out[-2000:], err[-4000:])
    assert "resuming from" in outs[0][1] and "at step 4; world size 2" in outs[0][1]
    assert losses(run_dir) == losses(runs["2r_z1"])                      # exact
    a, b = run_dir / "checkpoints/global_step8", runs["2r_z1"] / "checkpoints/global_step8"
    assert_l2e_close(rank_l2e(a, 1), rank_l2e(b, 1), exact=True)
    sa, sb = client(a)["module"], client(b)["module"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def two_nodes(cfg: Path, args: list[list[str]], *, cwds=(ROOT, ROOT), env=None, timeout=240):
    """One torchrun per simulated node (1 process each); ``args[r]``/``cwds[r]``: node r's own."""
    port = str(free_port())
    t0 = time.time()
    procs = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
         "--master-port", port, "-m", "megatron_l2e.train", "--config", str(cfg), *args[r]],
        cwd=cwds[r], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV, **(env or {})})
        for r in (0, 1)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)], time.time() - t0


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error: ")]


def test_ranks_that_resolve_different_checkpoints_stop_within_seconds(runs):
    ck = runs["2r_z1"] / "checkpoints"
    res, took = two_nodes(runs["cfgs"]["2r_z1"], [["--resume", str(ck / f"global_step{s}"), "--set",
                                                   f"output.dir={runs['root']}/disagree"] for s in (4, 8)])
    for r, (rc, _, err) in enumerate(res):
        assert rc != 0
        (line,) = _error_lines(err)
        assert line == (f"error: [rank {r}/2] the ranks resolved different checkpoints to resume from — rank 0: "
                        f"{ck / 'global_step4'}; rank 1: {ck / 'global_step8'}; make every rank see the same "
                        f"output.dir (or pass the same --resume PATH)"), err[-3000:]
    assert took <= 30, took                              # start-up of two processes included; seconds, not 30 min


def test_output_dir_that_is_not_shared_stops_within_seconds(runs, tmp_path):
    """Two 'nodes' with their own working directory and a relative output.dir: rank 1 cannot see rank 0's."""
    cfg = tmp_path / "rel.yml"
    cfg.write_text(runs["cfgs"]["2r_z1"].read_text().replace(str(runs["2r_z1"]), "rel-run"))
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    res, took = two_nodes(cfg, [[], []], cwds=cwds)
    for r, (rc, _, err) in enumerate(res):
        assert rc != 0
        (line,) = _error_lines(err)
        assert line == (f"error: [rank {r}/2] output.dir rel-run is not shared between ranks (rank 1 cannot see the "
                        f"files rank 0 writes there): put output.dir on a shared file system, or set "
                        f"checkpoint.node_local: true"), err[-3000:]
    assert took <= 30, took
    assert not (cwds[0] / "rel-run/checkpoints").exists()


@pytest.mark.slow
def test_node_local_output_dirs_each_get_their_latest(runs, tmp_path):
    """checkpoint.node_local: each node's lowest rank writes `latest` (and the checkpoint's config) into its
    own output.dir; the shards stay where each rank wrote them (the user gathers them to resume elsewhere)."""
    cfg = tmp_path / "local.yml"
    cfg.write_text(runs["cfgs"]["2r_z1"].read_text().replace(str(runs["2r_z1"]), "local-run")
                   .replace("keep_last: null}", "keep_last: null, node_local: true}"))
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    res, _ = two_nodes(cfg, [["--exit-after-steps", "2"]] * 2, cwds=cwds)
    for rc, out, err in res:
        assert rc == 0, err[-3000:]
    for r, c in enumerate(cwds):
        ck = c / "local-run/checkpoints"
        assert (ck / "latest").read_text().strip() == "global_step2"
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_state.rank{r}.pt", "config.yaml"} <= \
            {f.name for f in (ck / "global_step2").iterdir()}


def test_stop_signal_on_one_rank_saves_the_step_in_flight_on_both(runs):
    """SIGTERM reaches rank 1 alone, at the start of step 5: both ranks finish step 5 and save global_step5
    (every shard, each rank's generators), rank 0 writes the marker; the resume is exact."""
    cfg = runs["root"] / "sig.yml"
    cfg.write_text(runs["cfgs"]["2r_z1"].read_text().replace(str(runs["2r_z1"]), str(runs["root"] / "sig")))
    p = train_2rank(cfg, env={"MEGATRON_L2E_SIGNAL": "1:5:SIGTERM"}, check=False)
    assert p.returncode != 0                                          # torchrun reports exit 75 as a failure
    run = runs["root"] / "sig/checkpoints"
    assert (run / "preempted").read_text().strip() == (run / "latest").read_text().strip() == "global_step5"
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} | \
        {f"rng_state.rank{r}.pt" for r in (0, 1)} <= {f.name for f in (run / "global_step5").iterdir()}
    assert f"preempted at step 5: saved {run / 'global_step5'}; continue with --resume auto" in p.stdout
    assert "exitcode  : 75" in p.stderr or "exit code 75" in p.stderr or "75" in p.stderr
    train_2rank(cfg, "--resume", "auto")
    assert losses(runs["root"] / "sig") == losses(runs["2r_z1"])      # exact
    assert not (run / "preempted").exists()
    assert_l2e_close(rank_l2e(run / "global_step8", 0), rank_l2e(runs["2r_z1"] / "checkpoints/global_step8", 0),
                     exact=True)


def _resharded(runs, src: str, name: str, launcher, *extra) -> dict[int, float]:
    ckpt = runs[src] / "checkpoints/global_step4"
    p = launcher(runs["cfgs"][src], "--resume", str(ckpt), "--set", f"output.dir={runs['root'] / name}", *extra)
    world_from = client(ckpt)["dp_world_size"]
    world_to = 2 if launcher is train_2rank else 1
    assert (f"resharded global_step4 from {world_from} to {world_to} data-parallel ranks through DeepSpeed's "
            f"universal checkpoint {ckpt}_universal") in p.stdout, p.stdout[-3000:]
    assert "at step 4" in p.stdout
    return losses(runs["root"] / name)


@pytest.mark.parametrize("src, launcher, ref", [("2r_z1", "1", "2r_z1"), ("1r_mb8_z1", "2", "2r_z1"),
                                                ("2r_z3", "1", "2r_z3")], ids=["z1-2to1", "z1-1to2", "z3-2to1"])
def test_resume_on_another_data_parallel_size_reshards(runs, src, launcher, ref):
    """16 GPUs → 8 after a node loss, in small: the losses of steps 5–8 follow the uninterrupted run's."""
    name = f"reshard-{src}-{launcher}"
    extra = ["--set", "train.micro_batch_size=4"] if launcher == "2" else []
    got = _resharded(runs, src, name, train_2rank if launcher == "2" else train_1rank, *extra)
    want = losses(runs[ref])
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-4), (s, got[s], want[s])
    end = runs["root"] / name / "checkpoints/global_step8"
    assert_l2e_close(client(end)["extensions"]["l2e"], client(runs[ref] / "checkpoints/global_step8")["extensions"]["l2e"],
                     exact=False)


def test_decorrelation_two_ranks_equal_one_rank_with_accumulation(runs, tiny_data):
    """Yan et al.'s term, summed per sample, adds up over real ranks like over micro-batches."""
    dec = "{enabled: true, inhibition: decorrelation, layers: [0, 1], lam: 2.0}"
    curves, logged = {}, {}
    for name, micro, launch in (("dec_1r_ga2", 4, train_1rank), ("dec_2r", 4, train_2rank),
                                ("dec_1r_mb8", 8, train_1rank), ("dec_off", 8, train_1rank)):
        cfg = runs["root"] / f"{name}.yml"
        cfg.write_text(tiny_run_yaml(tiny_data, runs["root"] / name, l2e=dec if name != "dec_off" else
                                     dec.replace("decorrelation", "none"), distributed="{zero_stage: 1}")
                       .replace("micro_batch_size: 4", f"micro_batch_size: {micro}"))
        launch(cfg)
        rows = [json.loads(x) for x in (runs["root"] / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = losses(runs["root"] / name)
        logged[name] = [r["l2e/layer1/decorrelation"] for r in rows if "l2e/layer1/decorrelation" in r]
    assert sorted(curves["dec_2r"]) == list(range(1, 9)) and len(logged["dec_2r"]) == 8
    for other in ("dec_1r_ga2", "dec_1r_mb8"):
        for s in curves[other]:
            assert curves["dec_2r"][s] == pytest.approx(curves[other][s], rel=2e-5), (other, s)
        assert logged["dec_2r"] == pytest.approx(logged[other], rel=1e-4), other
    assert 0 < min(logged["dec_2r"]) and max(logged["dec_2r"]) < 1
    assert logged["dec_off"] == []                                  # monitor-only logs no term …
    assert abs(curves["dec_2r"][8] - curves["dec_off"][8]) > 0.01   # … and the term changes training


def test_ranks_with_different_configs_refuse_to_train(runs):
    cfg, port = runs["cfgs"]["2r_z1"], str(free_port())
    procs = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
         "--master-port", port, "-m", "megatron_l2e.train", "--config", str(cfg),
         "--set", f"output.dir={runs['root']}/mismatch", "--set", f"train.seed={1234 + r}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV}) for r in (0, 1)]
    for r, p in enumerate(procs):
        _, err = p.communicate(timeout=240)
        assert p.returncode != 0
        assert (f"error: [rank {r}/2] the resolved config differs between ranks: rank 1 has train.seed = 1235, "
                f"rank 0 has 1234") in err, err[-3000:]
    assert not (runs["root"] / "mismatch/checkpoints").exists()


@pytest.mark.slow
def test_zero2_matches(runs, tiny_data):
    cfg = write_cfg(tiny_data, runs["root"], "2r_z2", zero=2, micro=4)
    train_2rank(cfg)
    ref = losses(runs["1r_mb8_z1"])
    got = losses(runs["root"] / "2r_z2")
    assert all(got[s] == pytest.approx(ref[s], rel=2e-5) for s in ref)
    ckpt = runs["root"] / "2r_z2/checkpoints/global_step8"
    assert_l2e_close(rank_l2e(ckpt, 0), rank_l2e(ckpt, 1), exact=True)
    runs["cfgs"]["2r_z2"], runs["2r_z2"] = cfg, runs["root"] / "2r_z2"      # ZeRO 2, 2 → 1 ranks
    got, want = _resharded(runs, "2r_z2", "reshard-z2", train_1rank), losses(runs["2r_z2"])
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == pytest.approx(want[s], rel=1e-4) for s in got)
