"""Shared fixtures: a tiny smoke corpus + tokenizer built once per session, tiny run configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; the variable counts only if it is set
    # before triton is first imported (transformers and DeepSpeed may import it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB, TINY_SEQ = 320, 32


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only spin against other jobs on a busy 2-core machine.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A real (small) stdlib corpus with a locally trained 320-token BPE, rows of 33 tokens."""
    from megatron_l2e.data import build_smoke_data

    return build_smoke_data(tmp_path_factory.mktemp("tinydata"), vocab_size=TINY_VOCAB, seq_length=TINY_SEQ,
                            max_files=60)


def tiny_run_yaml(data, out_dir, **sections) -> str:
    """A run file for a 2-block, 32-wide GPT-NeoX on ``data``; ``sections`` (YAML flow text) replace
    whole default sections."""
    text = {
        "model": f"{{name: tiny, num_layers: 2, hidden_size: 32, num_attention_heads: 2, "
                 f"vocab_size: {TINY_VOCAB}, seq_length: {TINY_SEQ}}}",
        "data": f"{{format: rows, path: {data.prefix}, valid_path: {data.valid_prefix}, "
                f"tokenizer: {data.tokenizer_dir}}}",
        "optimizer": "{lr: 5.0e-3}",
        "train": "{iters: 8, global_batch_size: 8, micro_batch_size: 4, precision: fp32}",
        "schedule": "{warmup: 0.1}",
        "checkpoint": "{interval: 4, extra_steps: [], keep_last: null}",
        "validation": "{interval: 0}",
        "logging": "{interval: 1, tensorboard: false, wandb: disabled}",
        "output": f"{{dir: {out_dir}}}",
    }
    text.update(sections)
    return f"base: {ROOT}/configs/pythia/common.yml\n" + "".join(f"{k}: {v}\n" for k, v in text.items())


@pytest.fixture(scope="module")
def ds_world():
    """One DeepSpeed process group (gloo on CPU, nccl on CUDA) for a test module, torn down after it."""
    from megatron_l2e import engine as eng
    from megatron_l2e.config import load_config

    cfg = load_config(ROOT / "configs/smoke/cpu.yml", [])
    # init_distributed fills in RANK/WORLD_SIZE/MASTER_PORT...: restore them afterwards, or every later
    # subprocess (tests/test_train.py's runs) would inherit this process's port and fail to bind it.
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    dist = eng.init_distributed(cfg)
    yield dist
    eng.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def watch_penalty_grad_buffers(model, sites) -> tuple[list[bool], list]:
    """Per backward through a site's fused penalty: did z's gradient land in the very buffer that z_out
    (the penalty's output, a view of the block output z) received — i.e. was the add done in place?
    Returns that growing list and the hook handles."""
    landed: list[bool] = []

    def watch(module, args, output):
        zo = output[0] if isinstance(output, tuple) else output
        if zo._base is not None and zo.grad_fn is not None and "Penalty" in type(zo.grad_fn).__name__:
            ptr = {}
            zo.register_hook(lambda g: ptr.__setitem__("in", g.data_ptr()))
            zo._base.register_hook(lambda g: landed.append(ptr.get("in") == g.data_ptr()))
    return landed, [model.gpt_neox.layers[i].register_forward_hook(watch) for i in sites]


def run_train(args, *, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    # One intra-op thread per process: tiny models gain nothing from two, and threads thrash when
    # several processes share the 2 cores.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "megatron_l2e.train", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"train {args} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


# ``@pytest.mark.gpu`` tests need CUDA. pyproject's addopts deselect them by default
# (``-m 'not slow and not gpu'``); ``pytest -m gpu`` (``make test-gpu``) collects them, and on a machine
# without CUDA each one is skipped here with the reason, so the run says why instead of failing.
GPU_SKIP_REASON = "needs CUDA (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)
