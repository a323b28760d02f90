"""Compile every launched Triton kernel variant for sm_80 and sm_90 on this CPU machine.

``benchmarks/kernel_report.py`` captures the launches the ops layer makes for the standard
2-D/3-D cases (same signatures and specialisations as a real CUDA launch), compiles them
ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
reads the cubins with the ``cuobjdump`` bundled in the Triton wheel. Here we check:

* no kernel spills (``LOCAL:0``, no stack);
* every kernel stays within the register budget (``REG_BUDGET`` = 64 per thread at 4 warps:
  8 CTAs of 128 threads per SM, 50% occupancy, see benchmarks/GPU.md);
* fp32 data loads and stores along the contiguous axis are 16-byte vectorised
  (``LDG.E.128`` / ``STG.E.128``), and stitch atomics compile to fire-and-forget ``RED``;
* address arithmetic is 64-bit in the PTX;
* no approximate division (``div.full.f32``) or FMA contraction where results must equal
  torch's bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "kernel_report.py"


def _tools_present() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


pytestmark = [
    pytest.mark.skipif(not _tools_present(), reason="needs triton with its CUDA tools"),
    pytest.mark.slow,  # AOT compiles in a subprocess
]


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(REPORT), "--json"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert out
    return out


def _budget() -> int:
    spec = importlib.util.spec_from_file_location("kernel_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.REG_BUDGET


def test_every_kernel_compiled_for_both_archs(rows):
    kernels = {(r["kernel"], r["sm"]) for r in rows}
    for name in ("_unstitch_kernel", "_stitch_gather_kernel", "_stitch_atomic_kernel",
                 "_stitch_finalize_kernel"):
        for sm in (80, 90):
            assert (name, sm) in kernels


def test_no_spills_and_register_budget(rows):
    budget = _budget()
    for r in rows:
        label = f"{r['variant']} {r['kernel']} sm_{r['sm']}"
        assert r["local"] == 0, f"{label} spills to local memory: {r}"
        assert r["stack"] == 0, f"{label} uses a stack frame: {r}"
        assert 0 < r["regs"] <= budget, f"{label} uses {r['regs']} registers > {budget}"


def test_vectorised_fp32_loads_and_stores(rows):
    for r in rows:
        if "fp32" not in r["variant"]:
            continue
        label = f"{r['variant']} {r['kernel']} sm_{r['sm']}"
        assert r["ldg128"] > 0, f"{label}: no LDG.E.128 in the SASS"
        if r["kernel"] != "_stitch_atomic_kernel":
            assert r["stg128"] > 0, f"{label}: no STG.E.128 in the SASS"
        else:
            assert r["atomics"] and all(a.startswith("RED") for a in r["atomics"]), r


def test_sixty_four_bit_addressing(rows):
    for r in rows:
        assert r["ptx_wide_mul"] > 0, f"{r['variant']} {r['kernel']}: no 64-bit index math"


def test_exact_arithmetic_where_results_must_match_torch(rows):
    """No approximate fp32 division and no mul+add -> FMA contraction in the kernels whose
    results are compared bit for bit (unstitch, deterministic stitch, finalize)."""
    for r in rows:
        if r["kernel"] in ("_unstitch_kernel", "_stitch_gather_kernel",
                           "_stitch_finalize_kernel"):
            assert not r["ptx_inexact"], f"{r['variant']} {r['kernel']}: {r['ptx_inexact']}"
