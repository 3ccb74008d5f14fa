"""Launch scripts: --dry-run output, one-line refusals before anything starts, and the real DeepSpeed
launcher / sbatch script run against fake pdsh/ssh/srun/sbatch/scontrol/squeue/torchrun shims on PATH that
record their arguments (the commands each node would run). Long runs: the fake launchers can wait for a
stop request, record the signals that reach them and leave the marker the ranks would leave; no real
Slurm, pdsh or GPU is involved (what Slurm itself does with the signals is documented, not tested)."""

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_run_yaml

SHIM = """#!{python}
import json, os, signal, subprocess, sys, time
name = os.path.basename(sys.argv[0])
log = os.environ["SHIM_LOG"]
with open(os.path.join(log, name + ".jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"), "pid": os.getpid(),
                        "env": {{k: os.environ.get(k) for k in ("SLURM_JOB_END_TIME", "DS_ENV_FILE")}}}}) + "\\n")
launching = name != "pdsh" or any("deepspeed.launcher.launch" in a for a in sys.argv)
if name == os.environ.get("SHIM_ACT") and launching:
    # The launcher under test: with SHIM_WAIT it runs until a signal (recorded) or the stop request's
    # release file; then it does what the ranks do on a stop: the marker, and the launcher's status.
    got = []
    if os.environ.get("SHIM_WAIT"):
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
        open(os.path.join(log, name + ".started"), "w").close()
        end = time.time() + 60
        while not got and not os.path.exists(os.path.join(log, "release")) and time.time() < end:
            time.sleep(0.02)
    with open(os.path.join(log, name + ".signals"), "w") as f:
        f.write(" ".join(got))
    if os.environ.get("SHIM_MARKER"):
        os.makedirs(os.path.dirname(os.environ["SHIM_MARKER"]), exist_ok=True)
        with open(os.environ["SHIM_MARKER"], "w") as f:
            f.write(os.environ.get("SHIM_TAG", "global_step6") + "\\n")
    sys.exit(int(os.environ.get("SHIM_EXIT", "1")))
if name == "pdsh" and any("pkill -USR1" in a for a in sys.argv):   # the stop request reaches the ranks
    open(os.path.join(log, "release"), "w").close()
elif name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split(",")))
elif name == "squeue":                       # squeue -h -j JOB -o %e
    if not os.environ.get("FAKE_END"):
        sys.exit(1)
    print(os.environ["FAKE_END"])
elif name == "srun":                         # run the task once per node, as srun would
    args = sys.argv[1:]
    nodes = int(args[args.index("--nodes") + 1])
    task = args[args.index("bash"):]
    for i in range(nodes):
        rc = subprocess.call(task, env={{**os.environ, "SLURM_NODEID": str(i)}})
        if rc:
            sys.exit(rc)
"""

SHIMS = ("pdsh", "ssh", "srun", "sbatch", "scontrol", "squeue", "torchrun")


@pytest.fixture
def shims(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name in SHIMS:
        f = bin_dir / name
        f.write_text(SHIM.format(python=sys.executable))
        f.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_LOG": str(log), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "HOME": str(home)}
    for var in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_JOB_END_TIME",
                "SLURM_RESTART_COUNT", "DS_ENV_FILE"):
        env.pop(var, None)

    def calls(name):
        f = log / f"{name}.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return env, calls


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    f = tmp_path / "tiny.yml"
    f.write_text(tiny_run_yaml(tiny_data, tmp_path / "run"))
    return str(f)


def script(name, *args, env, cwd=ROOT):
    return subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def one_line_error(p, *fragments):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


HOSTS = "# three 8-GPU nodes\nn1 slots=8\nn2 slots=8\n\nn3 slots=8   # last\n"
SPLIT48 = ["--set", "train.global_batch_size=48", "--set", "train.micro_batch_size=2"]


def test_hostfile_pdsh_launch_through_the_real_deepspeed_launcher(shims, tiny_cfg, tmp_path):
    env, calls = shims
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    p = script("launch.sh", "--hostfile", str(hosts), "--config", tiny_cfg, *SPLIT48,
               "--set", "logging.run_name=two words", "--master-port", "29999", env=env)
    assert p.returncode == 0, p.stderr
    assert "3 node(s), 24 GPUs: 2 micro-batch × 1 accumulation × 24 data-parallel = 48" in p.stdout
    assert calls("ssh")[0]["argv"][-2:] == ["n1", "hostname"]          # DeepSpeed's passwordless-ssh probe
    pdsh, cleanup = calls("pdsh")
    argv = pdsh["argv"]
    assert argv[argv.index("-w") + 1] == "n1,n2,n3"
    remote = " ".join(argv[argv.index("-w") + 2:])
    # pdsh expands %n to each host's index: node i runs the DeepSpeed per-node launcher with rank i.
    assert "-m deepspeed.launcher.launch" in remote and "--node_rank=%n" in remote
    assert "--master_addr=n1" in remote and "--master_port=29999" in remote
    world = remote.split("--world_info=")[1].split()[0]
    assert json.loads(base64.urlsafe_b64decode(world)) == {h: list(range(8)) for h in ("n1", "n2", "n3")}
    assert "--module" in argv
    # --save_pid: each node's launcher writes /tmp/<runner pid>.deepspeed, removed again afterwards.
    runner_pid = remote.split("--save_pid ")[1].split()[0]
    assert cleanup["argv"][-1] == f"rm -f /tmp/{runner_pid}.deepspeed" and "n1,n2,n3" in cleanup["argv"]
    assert argv[argv.index("megatron_l2e.train"):] == [
        "megatron_l2e.train", "--config", tiny_cfg, *SPLIT48,
        "--set", '"logging.run_name=two words"']                        # quoted for the remote shell


def test_hostfile_no_ssh_runs_the_local_node_only(shims, tiny_cfg, tmp_path):
    env, calls = shims
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    p = script("launch.sh", "--hostfile", str(hosts), "--no-ssh", "--node-rank", "2", "--config", tiny_cfg, *SPLIT48,
               "--dry-run", env=env)
    assert p.returncode == 0, p.stderr
    cmd = shlex.split(p.stdout.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--node_rank") + 1] == "2" and "--no_ssh" in cmd and "--force_multi" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "n1"
    assert cmd[cmd.index("--module"):] == ["--module", "megatron_l2e.train", "--config", tiny_cfg, *SPLIT48]
    assert not calls("pdsh") and not calls("ssh")


@pytest.mark.parametrize("text,fragment", [
    ("n1 slots=8\nn2 slot=8\n", "hosts:2: 'n2 slot=8': expected 'HOSTNAME slots=N'"),
    ("n1 slots=8\nn2\n", "hosts:2: 'n2': expected 'HOSTNAME slots=N'"),
    ("n1 slots=0\n", "slots=0: expected a positive whole number"),
    ("n1 slots=eight\n", "slots=eight"),
    ("n1 slots=8\nn1 slots=8\n", "host n1 is listed twice"),
    ("# nothing\n\n", "no 'HOSTNAME slots=N' lines"),
])
def test_bad_hostfiles_refused_in_one_line(tiny_cfg, tmp_path, capsys, text, fragment):
    """In process (the scripts exec tools/launch.py; the script-level path is covered above/below)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import launch

    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    assert launch.main(["hostfile", "--hostfile", str(hosts), "--config", tiny_cfg]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: ") and fragment in out.err


def test_missing_hostfile_and_bad_node_rank(shims, tiny_cfg, tmp_path):
    env, calls = shims
    one_line_error(script("launch.sh", "--hostfile", str(tmp_path / "nope"), "--config", tiny_cfg, env=env),
                   "nope: no such file")
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    one_line_error(script("launch.sh", "--hostfile", str(hosts), "--no-ssh", "--config", tiny_cfg, *SPLIT48, env=env),
                   "--no-ssh needs --node-rank")
    one_line_error(script("launch.sh", "--hostfile", str(hosts), "--no-ssh", "--node-rank", "3", "--config", tiny_cfg,
                          *SPLIT48, env=env), "--node-rank 3 is outside the hostfile's 3 node(s)")
    one_line_error(script("launch.sh", "--hostfile", str(hosts), "--config", tiny_cfg, "--set", "train.iters=x",
                          env=env), "train.iters")
    assert not calls("pdsh")


def test_24_gpus_refused_for_the_paper_batch_before_launching(shims, tmp_path):
    """1024 sequences with micro-batch 32 do not split over 3 × 8 GPUs: refused, with 16 and 32 offered."""
    env, calls = shims
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    for name, args in [("launch.sh", ["--hostfile", str(hosts)]),
                       ("paper_run.sh", ["configs/pythia/70m.yml", "--nodes", "n1,n2,n3"]),
                       ("slurm/submit.sh", ["--nodes", "3"])]:
        cfg = [] if name == "paper_run.sh" else ["--config", "configs/pythia/70m.yml"]
        p = script(name, *args, *cfg, env=env)
        one_line_error(p, "train.global_batch_size 1024 does not split over 24 GPUs with micro-batch 32",
                       "nearest valid GPU counts: 16 (2 nodes × 8) or 32 (4 nodes × 8)")
    assert not any(calls(n) for n in SHIMS)
    # Where a smaller micro-batch splits over the same GPUs, the error says which.
    one_line_error(script("launch.sh", "--hostfile", str(hosts), "--config", "configs/pythia/70m.yml", "--set",
                          "train.global_batch_size=48", "--set", "train.micro_batch_size=4", "--set",
                          "data.format=rows", env=env),
                   "48 does not split over 24 GPUs with micro-batch 4",
                   "or keep 24 GPUs with --set train.micro_batch_size=2")
    p = subprocess.run([sys.executable, "tools/launch.py", "check", "--nodes", "2", "--config",
                        "configs/pythia/70m.yml"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0 and "32 micro-batch × 2 accumulation × 16 data-parallel = 1024" in p.stdout


def test_slurm_sbatch_script_runs_one_torchrun_per_node(shims, tiny_cfg, tmp_path):
    env, calls = shims
    env = {**env, "SLURM_JOB_NODELIST": "gpu[01-03]", "FAKE_HOSTS": "gpu01,gpu02,gpu03", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    p = script("slurm/train.sbatch", "--config", tiny_cfg, "--set", "train.global_batch_size=12",
               "--set", "train.micro_batch_size=2", "--set", "logging.run_name=a b", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert calls("scontrol")[0]["argv"] == ["show", "hostnames", "gpu[01-03]"]
    (srun,) = calls("srun")
    assert srun["argv"][:5] == ["--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    runs = calls("torchrun")
    assert [r["node"] for r in runs] == ["0", "1", "2"]
    for i, r in enumerate(runs):
        a = r["argv"]
        opt = {k: a[a.index(k) + 1] for k in ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr")}
        assert opt == {"--nnodes": "3", "--nproc-per-node": "2", "--node-rank": str(i), "--master-addr": "gpu01"}
        assert a[a.index("-m"):] == ["-m", "megatron_l2e.train", "--config", tiny_cfg, "--set",
                                     "train.global_batch_size=12", "--set", "train.micro_batch_size=2",
                                     "--set", "logging.run_name=a b", "--resume", "auto"]


def test_slurm_refusals(shims, tiny_cfg, tmp_path):
    env, calls = shims
    one_line_error(script("slurm/train.sbatch", "--config", tiny_cfg, env=env), "not inside a Slurm allocation")
    env = {**env, "SLURM_JOB_NODELIST": "gpu[01-03]", "FAKE_HOSTS": "gpu01,gpu02,gpu03", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": str(ROOT)}
    one_line_error(script("slurm/train.sbatch", "--config", "configs/pythia/2.8b.yml", env=env),
                   "does not split over 24 GPUs with micro-batch 16", "16 (2 nodes × 8) or 32 (4 nodes × 8)")
    assert not calls("srun")


def test_submit_and_paper_wrappers(shims, tiny_cfg):
    env, calls = shims
    p = script("slurm/submit.sh", "--nodes", "2", "--config", "configs/pythia/2.8b.yml", "--sbatch-arg=--time=1:00:00",
               "--set", "output.dir=/ckpt/2.8b", env=env)
    assert p.returncode == 0, p.stderr
    (sb,) = calls("sbatch")
    a = sb["argv"]
    assert a[:5] == ["--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node=8"] and "--time=1:00:00" in a
    assert a[a.index(str(ROOT / "scripts/slurm/train.sbatch")) + 1:] == [
        "--gpus-per-node", "8", "--master-port", "29500", "--config", "configs/pythia/2.8b.yml",
        "--set", "output.dir=/ckpt/2.8b"]
    # The paper wrapper: a node list becomes output.dir/hostfile, then the DeepSpeed launcher.
    p = script("paper_run.sh", "configs/pythia/410m.yml", "--nodes", "gpu07", "--set", "output.dir=/ckpt/410m",
               "--dry-run", env=env)
    assert p.returncode == 0, p.stderr
    assert "# would write /ckpt/410m/hostfile:\n#   gpu07 slots=8" in p.stdout
    assert "1 node(s), 8 GPUs: 32 micro-batch × 4 accumulation × 8 data-parallel = 1024" in p.stdout
    cmd = shlex.split(p.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("--hostfile") + 1] == "/ckpt/410m/hostfile" and "--force_multi" in cmd
    assert cmd[-4:] == ["--config", "configs/pythia/410m.yml", "--set", "output.dir=/ckpt/410m"]
    p = script("paper_run.sh", "configs/pythia/2.8b.yml", "--slurm", "--num-nodes", "4", "--dry-run", env=env)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1].startswith("sbatch --nodes 4 "), p.stderr
    one_line_error(script("paper_run.sh", "99m/l2e", "--nodes", "a", env=env), "no configs/runs/99m/l2e.yml")
    one_line_error(script("paper_run.sh", "configs/pythia/70m.yml", env=env), "--nodes n1,n2,... or --hostfile")
    assert len(calls("sbatch")) == 1 and not calls("pdsh")


# ----------------------------------------------------------------------------------------------
# Long runs: stop requests, the marker, exit 75, requeue, environment forwarding
# ----------------------------------------------------------------------------------------------

def start(name, *args, env, cwd=ROOT):
    return subprocess.Popen([str(ROOT / "scripts" / name), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)


def wait_for(path, proc, timeout=60):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


GB12 = ["--set", "train.global_batch_size=12", "--set", "train.micro_batch_size=2"]


def slurm_env(env, **extra):
    return {**env, "SLURM_JOB_NODELIST": "gpu[01-03]", "FAKE_HOSTS": "gpu01,gpu02,gpu03", "SLURM_GPUS_ON_NODE": "2",
            "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def test_torchrun_gets_the_signal_list_and_timeout_and_a_stop_gives_75(shims, tiny_cfg, tmp_path):
    """A first Ctrl-C reaches torchrun once, as SIGUSR1; torchrun's status 1 becomes 75 by the marker."""
    env, calls = shims
    log = Path(env["SHIM_LOG"])
    marker = tmp_path / "run" / "checkpoints" / "preempted"
    marker.parent.mkdir(parents=True)
    marker.write_text("global_step2\n")                       # a stale one: removed before the launch
    env = {**env, "SHIM_ACT": "torchrun", "SHIM_WAIT": "1", "SHIM_MARKER": str(marker)}
    p = start("launch_torchrun.sh", "--nnodes", "1", "--node-rank", "0", "--master-addr", "localhost",
              "--nproc-per-node", "2", "--config", tiny_cfg, "--shutdown-timeout", "900", env=env)
    wait_for(log / "torchrun.started", p)
    assert not marker.exists()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 75, (out, err)
    assert (log / "torchrun.signals").read_text() == "SIGUSR1"
    (tr,) = calls("torchrun")
    a = tr["argv"]
    assert a[a.index("--signals-to-handle") + 1] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert a[a.index("--shutdown-timeout") + 1] == "900" and a.index("--shutdown-timeout") < a.index("-m")
    assert f"preempted: saved {tmp_path}/run/checkpoints/global_step6; continue with --resume auto" in out


def test_old_torchrun_without_the_signal_options(tiny_cfg, monkeypatch):
    """A torch whose torchrun lacks --signals-to-handle/--shutdown-timeout (NGC 25.04's 2.7): no unknown
    options, stop requests as SIGTERM, and the plan says what that costs."""
    sys.path.insert(0, str(ROOT / "tools"))
    import launch

    monkeypatch.setattr(launch, "torchrun_options", lambda: frozenset())
    args = launch.parse_args(["torchrun", "--nnodes", "1", "--node-rank", "0", "--master-addr", "h",
                              "--nproc-per-node", "2", "--config", tiny_cfg])
    plan = launch.plan_torchrun(args, launch.load(args))
    assert "--signals-to-handle" not in plan.cmd and "--shutdown-timeout" not in plan.cmd
    assert plan.stop_signal == signal.SIGTERM and len(plan.warnings) == 2 and "30 s" in plan.show()


def test_hostfile_env_file_reaches_every_node_and_home_deepspeed_env_is_untouched(shims, tiny_cfg, tmp_path):
    env, calls = shims
    user_file = Path(env["HOME"]) / ".deepspeed_env"
    user_text = "FOO_USER=1\n\nWANDB_PROJECT=from-file\n"     # a blank line would crash DeepSpeed's reader
    user_file.write_text(user_text)
    hosts = tmp_path / "hosts"
    hosts.write_text("n1 slots=4\nn2 slots=4\n")
    secret = 'k$y `x` "q" \\ end'
    env = {**env, "WANDB_API_KEY": secret, "WANDB_PROJECT": "from-env", "HF_HOME": "/shared/hf",
           "MEGATRON_L2E_FAULT": "1:3", "UNRELATED_VAR": "no"}
    p = script("launch.sh", "--hostfile", str(hosts), "--config", tiny_cfg, "--set", "train.micro_batch_size=1",
               env=env)
    assert p.returncode == 0, p.stderr
    env_file = tmp_path / "run" / "launch.env"
    text = env_file.read_text()
    assert text.endswith("\n") and "\n\n" not in text and (env_file.stat().st_mode & 0o777) == 0o600
    lines = dict(line.split("=", 1) for line in text.splitlines())
    assert lines["HF_HOME"] == "/shared/hf" and lines["MEGATRON_L2E_FAULT"] == "1:3"
    assert lines["FOO_USER"] == "1" and lines["WANDB_PROJECT"] == "from-file"    # the user's file wins, as in DS
    assert "UNRELATED_VAR" not in lines and "DS_ENV_FILE" not in lines
    assert user_file.read_text() == user_text
    launch = calls("pdsh")[0]
    assert launch["env"]["DS_ENV_FILE"] == str(env_file)
    # The real DeepSpeed runner turned the file into exports on the remote command line; a shell reads
    # them back as the exact values.
    exports = launch["argv"][launch["argv"].index("-w") + 2]
    got = subprocess.run(["bash", "-c", exports + ' printf "%s|%s|%s" "$WANDB_API_KEY" "$FOO_USER" "$HF_HOME"'],
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert got.stdout == f"{secret}|1|/shared/hf", got.stderr


def test_hostfile_pdsh_stop_request_reaches_every_rank_as_usr1(shims, tiny_cfg, tmp_path):
    """SIGTERM to the wrapper: SIGUSR1 to the children of every node's DeepSpeed launcher (pdsh + pkill -P
    its pid file), not DeepSpeed's SIGTERM path (30 s to SIGKILL); the runner's status 1 becomes 75."""
    env, calls = shims
    log = Path(env["SHIM_LOG"])
    marker = tmp_path / "run" / "checkpoints" / "preempted"
    hosts = tmp_path / "hosts"
    hosts.write_text("n1 slots=4\nn2 slots=4\n")
    env = {**env, "SHIM_ACT": "pdsh", "SHIM_WAIT": "1", "SHIM_MARKER": str(marker)}
    p = start("launch.sh", "--hostfile", str(hosts), "--config", tiny_cfg, "--set", "train.micro_batch_size=1",
              env=env)
    wait_for(log / "pdsh.started", p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 75, (out, err)
    launch, stop, cleanup = calls("pdsh")
    runner_pid = " ".join(launch["argv"]).split("--save_pid ")[1].split()[0]
    assert stop["argv"] == ["-S", "-f", "1024", "-w", "n1,n2", f'pkill -USR1 -P "$(cat /tmp/{runner_pid}.deepspeed)"']
    assert (log / "pdsh.signals").read_text() == ""            # pdsh itself got no signal
    assert cleanup["argv"][-1] == f"rm -f /tmp/{runner_pid}.deepspeed"
    assert "preempted: saved" in out


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_slurm_stop_forwards_usr1_to_srun_then_requeues(shims, tiny_cfg, tmp_path, sig):
    """sbatch --signal=B:USR1@300 (or a SIGTERM) reaches the batch step; srun gets SIGUSR1 (srun turns
    SIGTERM into SIGKILL for its tasks), the run leaves the marker, the wrapper requeues and exits 0."""
    env, calls = shims
    log = Path(env["SHIM_LOG"])
    marker = tmp_path / "run" / "checkpoints" / "preempted"
    end = "2031-05-06T07:08:09"
    env = slurm_env(env, SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="16", FAKE_END=end, SHIM_ACT="srun",
                    SHIM_WAIT="1", SHIM_MARKER=str(marker))
    p = start("slurm/train.sbatch", "--config", tiny_cfg, *GB12, env=env, cwd=tmp_path)
    wait_for(log / "srun.started", p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    assert (log / "srun.signals").read_text() == "SIGUSR1"
    assert calls("scontrol")[-1]["argv"] == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in out
    (srun,) = calls("srun")
    a = srun["argv"]
    assert "--cpus-per-task=16" in a[:a.index("bash")]
    inner = a[a.index("-c") + 1]
    assert inner.startswith('trap "" USR1; exec torchrun ') and inner.endswith(" --resume auto")
    assert srun["env"]["SLURM_JOB_END_TIME"] == str(int(time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))))


def test_slurm_without_marker_passes_the_status_and_no_progress_is_not_requeued(shims, tiny_cfg, tmp_path):
    env, calls = shims
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "preempted").write_text("global_step4\n")          # stale, from an earlier allocation
    env = slurm_env(env, SLURM_JOB_ID="77", SHIM_ACT="srun", SHIM_EXIT="3")
    p = script("slurm/train.sbatch", "--config", tiny_cfg, *GB12, "--resume", "/ckpt/x", env=env, cwd=tmp_path)
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert not (ckpts / "preempted").exists()
    inner = calls("srun")[0]["argv"][-1]
    assert inner.endswith(" --resume /ckpt/x") and "--resume auto" not in inner     # the user's --resume stays
    # Stopped at the checkpoint it started from: a requeue would loop without progress.
    (ckpts / "latest").write_text("global_step4\n")
    env = {**env, "SHIM_MARKER": str(ckpts / "preempted"), "SHIM_TAG": "global_step4"}
    p = script("slurm/train.sbatch", "--config", tiny_cfg, *GB12, env=env, cwd=tmp_path)
    assert p.returncode == 75 and "not requeued" in p.stderr, (p.stdout, p.stderr)
    assert not [c for c in calls("scontrol") if c["argv"][0] == "requeue"]
