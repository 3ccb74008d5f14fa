"""The CPU kernels' threads: numba's parallel regions run on torch's own OpenMP workers.

Checked in a fresh process (the threading layer is chosen once per process, at the first launch),
from the per-thread CPU time Linux keeps in /proc/self/task/*/schedstat.
"""

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r"""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from megatron_l2e.l2e.kernels import cpu, fused
    import numba

    def cpu_ns():
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:
                out[int(t)] = int(open(f"/proc/self/task/{t}/schedstat").read().split()[0])
            except OSError:
                pass
        return out

    def busy_threads(fn):
        # threads other than this one that got a real share of the CPU time while fn ran
        before = cpu_ns(); fn(); after = cpu_ns()
        delta = {t: after[t] - before.get(t, 0) for t in after if t != threading_id}
        top = max(delta.values(), default=0)
        return {t for t, d in delta.items() if d > 0.2 * top and d > 1e6}

    threading_id = os.getpid()   # the main thread's task id
    cpu._start_pool()            # numba starts its layer: torch's thread count must survive it
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    layer = numba.threading_layer()
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        assert layer == "workqueue", layer
        print("OK workqueue"); sys.exit(0)
    assert layer == "omp", layer

    torch.set_num_threads(2)
    x = torch.randn(1024, 1024)
    torch_workers = busy_threads(lambda: [x @ x for _ in range(20)])
    B, N = 4, 1 << 20                     # 4M elements: a parallel launch on 2 threads
    z = torch.randn(B, N); mean = torch.zeros(N); var = torch.ones(N)
    denom = fused.denominator(var, 0.01); thr = torch.full((B,), 9.0)
    assert cpu._threads(B * N) == 2
    # (libgomp starts one more thread at the very first of these regions, idle from then on: the
    # steady state is what the training loop runs in)
    cpu.forward(z, mean, denom, thr, mean, mode="stats", eps=1e-6)
    torch_workers = busy_threads(lambda: [x @ x for _ in range(20)])
    kernel_workers = busy_threads(lambda: [cpu.forward(z, mean, denom, thr, mean, mode="stats", eps=1e-6)
                                           for _ in range(20)])
    assert torch_workers and kernel_workers == torch_workers, (torch_workers, kernel_workers)
    print("OK omp", sorted(kernel_workers))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread CPU time from /proc")
def test_numba_regions_run_on_torchs_openmp_workers_and_keep_its_thread_count():
    env = {"NUMBA_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    env.pop("NUMBA_THREADING_LAYER", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK"), proc.stdout
