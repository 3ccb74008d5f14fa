"""Peak memory of real training runs, for tests/test_memory_plan.py.

    python tests/_memory_probe.py OUT.json --config A.yml [--set ...] [-- --config B.yml ...]

Runs ``megatron_l2e.train.main`` in this process once per ``--``-separated argument list and writes
``[{"baseline": B, "peak": P, "rc": 0, "checkpointing": bool}, ...]`` (bytes; ``checkpointing``:
whether train.py turned activation checkpointing on). ``baseline`` is the resident set right before
the model is built — the interpreter, torch, transformers, DeepSpeed and its process group, the
opened data: what the plan does not count — and ``peak`` the peak resident set (VmHWM) of the run,
reset before each one through /proc/self/clear_refs. ``peak − baseline`` is what the model, the engine
and training added at their worst moment: what the plan predicts. One process for several runs
saves the seconds of start-up each would cost; where the reset is refused, only the first list runs.

The first training run in a process allocates ~35 MB once, whatever the model (thread pools, kernel
caches, DeepSpeed's and autograd's first-use state): host memory that a GPU's would not see. The test
therefore runs a tiny warm-up (the same config with 2 blocks of 32) first and measures the run after it.

Set ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment: glibc then returns every freed block of
≥ 64 KiB at once, so the resident set follows the live tensors (as ``max_memory_allocated`` does on
CUDA) instead of keeping freed activations in its heap while the optimizer step maps new pages.
"""

import gc
import importlib
import json
import resource
import sys
from pathlib import Path

# What DeepSpeed's engine and optimizer import lazily (≈ 570 modules, ~70 MB of RSS: networkx via
# functorch.compile, its MoE / Triton ops, torch.profiler): imported before any baseline, so that it
# counts with the rest of the process, not in the measured peak.
PRELOAD = ("deepspeed", "functorch.compile", "deepspeed.module_inject.auto_ep_layer", "deepspeed.moe.ep_experts",
           "deepspeed.ops.triton_ops", "deepspeed.runtime.zero.muon.muon_optimizer", "torch.profiler")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    out, rest = Path(argv[0]), argv[1:]
    runs, cur = [], []
    for a in rest:
        if a == "--":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional piece missing only changes the overhead
            pass
    import megatron_l2e.engine as engine_mod
    import megatron_l2e.model as model_mod
    from megatron_l2e import train as train_mod

    # One process group for all runs: DeepSpeed caches its groups across engines.
    shutdown, engine_mod.shutdown = engine_mod.shutdown, lambda: None

    build = model_mod.build_model
    rec: dict = {}

    def build_model(*a, **k):
        if "baseline" not in rec and not k.get("meta"):
            gc.collect()
            rec["baseline"] = rss()
            rec["reset"] = reset_peak()
            rec["peak_before_model"] = peak_rss()
        return build(*a, **k)

    enable = model_mod.enable_activation_checkpointing

    def enable_activation_checkpointing(model):
        rec["checkpointing"] = True
        return enable(model)

    model_mod.build_model = build_model
    model_mod.enable_activation_checkpointing = enable_activation_checkpointing
    results = []
    for i, args in enumerate(runs):
        if i and not results[0]["reset"]:
            break                                  # a second run's peak would hide under the first's
        rec = {"checkpointing": False}
        rec["rc"] = train_mod.main(args)
        rec["peak"] = peak_rss()
        results.append(rec)
        gc.collect()
    shutdown()
    out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
