"""The Triton kernels compile for a real GPU (sm_90, the H100) to cubin — no GPU needed, Triton's own ptxas.

The interpreter (used by the numerical tests) accepts code a GPU compile rejects; this catches that,
and checks the PTX for what the numerics rely on: an IEEE-rounded division for φ, no FMA contraction,
integer atomics only. Runs in a subprocess: ``TRITON_INTERPRET`` must be unset when the kernels are
decorated, and the numerical tests set it in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from megatron_l2e.l2e.kernels import triton_kernels as tk

    P = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
    def sig(names, types):
        return dict(zip(names, types))
    out = {}
    for arch in (90,):
        target = GPUTarget("cuda", arch, 32)
        for dt in ("float32", "float16", "bfloat16"):
            z = P[dt]
            jobs = {
                "forward_rd": (tk._forward_kernel, [z, z] + ["*fp32"] * 4 + ["*i32", "*fp32", "*fp32", "*fp32",
                               "i32", "i32", "fp32", "constexpr", "constexpr", "constexpr"],
                               {"MODE": 2, "ACCUMULATE": False, "BLOCK": 1024}),
                "forward_pen": (tk._forward_kernel, [z, z] + ["*fp32"] * 4 + ["*i32", "*fp32", "*fp32", "*fp32",
                                "i32", "i32", "fp32", "constexpr", "constexpr", "constexpr"],
                                {"MODE": 1, "ACCUMULATE": True, "BLOCK": 1024}),
                "penalty_bwd": (tk._penalty_backward_kernel, [z, z, z] + ["*fp32"] * 4 + ["fp32", "i32", "fp32",
                                "constexpr", "constexpr"], {"HAS_GOUT": True, "BLOCK": 1024}),
                "rd_bwd": (tk._rd_backward_kernel, [z, z, z] + ["*fp32"] * 3 + ["i32", "fp32", "constexpr"],
                           {"BLOCK": 1024}),
                "score": (tk._score_kernel, [z] + ["*fp32"] * 3 + ["i32", "constexpr"], {"BLOCK": 1024}),
            }
            for name, (fn, types, consts) in jobs.items():
                src = ASTSource(fn=fn, signature=sig(fn.arg_names, types), constexprs=consts)
                k = triton.compile(src, target=target, options={"enable_fp_fusion": False})
                ptx = k.asm["ptx"]
                out[f"sm{arch}/{dt}/{name}"] = {
                    "cubin": len(k.asm["cubin"]), "div_rn": ptx.count("div.rn.f32"),
                    "div_approx": ptx.count("div.full.f32") + ptx.count("div.approx.f32"),
                    "fma": ptx.count("fma.rn.f32"), "atom_int": len(re.findall(r"atom\\.\\S*add\\.[us]32", ptx)),
                    "atom_float": len(re.findall(r"(atom|red)\\.\\S*\\.(f16|bf16|f32|f64)", ptx))}
    json.dump(out, sys.stdout)
""")


def test_triton_kernels_compile_for_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert len(res) == 3 * 5
    for name, r in res.items():
        assert r["cubin"] > 0, name
        assert r["div_approx"] == 0, name          # every division IEEE-rounded
        assert r["fma"] == 0, name                 # no contraction: the reference's rounding
        assert r["atom_float"] == 0, name          # only int32 atomics
        if "forward" in name:
            assert r["atom_int"] >= 1, name        # the per-sample counts
        assert r["div_rn"] >= 1, name              # φ
