"""Compile-time truth for real GPUs, without one: registers, spills, shared memory and
16-byte vectorisation of every Triton kernel variant the ops layer launches.

The launches are captured from the real ops code (``ops/quilt_triton.py``'s launchers
with a recording stand-in for the kernel module), so the signatures, specialisations
(``tt.divisibility=16`` on 16-aligned pointers and ints, ``1`` folded to a constant, as the
JIT does) and constexprs are exactly those of a launch on a CUDA device with the same
shapes. Each variant is then compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and its cubin inspected
with the ``cuobjdump`` bundled in the Triton wheel.

Usage::

    python benchmarks/kernel_report.py            # markdown table, sm_80 and sm_90
    python benchmarks/kernel_report.py --json     # one JSON record per kernel variant

Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions);
this script clears it and re-executes itself when needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
# 4 warps = 128 threads per CTA. At <= 64 registers/thread an SM (64K registers) holds 8
# CTAs = 1024 threads = 50% occupancy, ample for streaming kernels that keep two 16-byte
# loads in flight per thread; above it occupancy halves again.
REG_BUDGET = 64


class _Recorder:
    """Stands in for ``qlty_gpu.kernels.quilt_triton``: records each ``kernel[grid](...)``."""

    def __init__(self):
        self.launches = []

    def __getattr__(self, name):
        rec = self

        class _K:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launches.append((name, grid, args, kwargs))

                return launch

        return _K()


def capture_launches() -> list:
    """(label, kernel name, grid, args, kwargs) of the launches for the standard cases."""
    import torch

    from qlty_gpu.geometry import QuiltPlan, plan_for
    from qlty_gpu.ops import quilt_triton as qt

    rec = _Recorder()
    orig = qt._kernels
    qt._kernels = lambda: rec

    def unstitch(x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
                 normalize):
        plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
        qt.launch_unstitch(x, plan=plan, weight=weight, out_dtype=out_dtype or x.dtype,
                           fill_mask=fill_mask, fill_value=fill_value, positions=positions,
                           normalize_positions=normalize)

    def stitch(patches, shape, step, weight, norm, mode):
        plan = plan_for(tuple(shape), tuple(patches.shape[2:]), tuple(step))
        qt.launch_stitch(patches, plan=plan, weight=weight, norm=norm, mode=mode)

    out = []
    try:
        def grab(label, fn, *a):
            n0 = len(rec.launches)
            fn(*a)
            for name, grid, args, kwargs in rec.launches[n0:]:
                out.append((label, name, grid, args, kwargs))

        x2 = torch.empty(4, 8, 512, 512)
        p2 = QuiltPlan((512, 512), 64, 32, border=8, border_weight=0.1)
        w2 = p2.weight()
        m2 = p2.border_mask() == 0
        x3 = torch.empty(1, 2, 128, 128, 128)
        p3 = QuiltPlan((128, 128, 128), 32, 16)
        win2, st2, win3, st3 = [64, 64], [32, 32], [32, 32, 32], [16, 16, 16]
        grab("unstitch 2d fp32", unstitch, x2, win2, st2, None, None, None, 0.0, "",
             True)
        grab("unstitch 2d fp32 weight+fill+pos", unstitch, x2, win2, st2, w2, None,
             m2, -1.0, "absolute", True)
        grab("unstitch 2d bf16->fp32", unstitch, x2.bfloat16(), win2, st2, None,
             torch.float32, None, 0.0, "", True)
        grab("unstitch 3d fp32", unstitch, x3, win3, st3, None, None, None, 0.0, "",
             True)
        pt2 = torch.empty(4 * p2.patches_per_image, 8, 64, 64)
        pt3 = torch.empty(p3.patches_per_image, 2, 32, 32, 32)
        n2, n3 = p2.norm(), p3.norm()
        for mode in ("deterministic", "atomic"):
            grab(f"stitch 2d fp32 {mode}", stitch, pt2, [512, 512], st2, w2, n2, mode)
            grab(f"stitch 3d fp32 {mode}", stitch, pt3, [128] * 3, st3, None, n3, mode)
        grab("stitch 2d fp16 deterministic", stitch, pt2.half(), [512, 512], st2, w2,
             n2, "deterministic")
        grab("stitch 3d fp64 deterministic", stitch, pt3.double(), [128] * 3, st3,
             None, n3.double(), "deterministic")
        grab("stitch 2d bf16 atomic", stitch, pt2.bfloat16(), [512, 512], st2, w2, n2,
             "atomic")
        grab("unstitch 3d fp16 relative pos", unstitch, x3.half(), win3, st3, None,
             None, None, 0.0, "relative", True)
    finally:
        qt._kernels = orig
    return out


def _specialise_arg(v):
    """(type, 'D' | '' | constexpr value) of one runtime argument, as the JIT specialises it:
    Triton's own routine where it exists (3.5+), else the same rules written out."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(BaseBackend, v, False, True, True)
    except ImportError:  # older Triton: ints == 1 fold to constants, 16-divisibility -> "D"
        if isinstance(v, bool):
            return "u1", None
        if isinstance(v, int):
            if v == 1:
                return "constexpr", 1
            ty = "i32" if -(2**31) <= v < 2**31 else "i64"
            return ty, "D" if v % 16 == 0 else ""
        if isinstance(v, float):
            return "fp32", None
        from triton.runtime.jit import mangle_type

        return mangle_type(v), "D" if v.data_ptr() % 16 == 0 else ""


def _specialise(fn, args, kwargs):
    """signature, constexprs, attrs exactly as the JIT would build them for this launch."""
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        v = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
            continue
        ty, spec = _specialise_arg(v)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(name, args, kwargs, cc: int) -> dict:
    """Compile one launch for ``sm_<cc>``; registers, spills, shared memory, vector widths."""
    import triton
    from qlty_gpu.kernels import quilt_triton as tk
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(tk, name)
    sig, cexp, attrs = _specialise(fn, args, kwargs)
    src = ASTSource(fn=fn, signature=sig, constexprs=cexp, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion")
                                if k in kwargs})
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else -1

    ldg = re.findall(r"\bLDG\.E[.A-Z0-9]*", sass)
    stg = re.findall(r"\bSTG\.E[.A-Z0-9]*", sass)
    red = re.findall(r"\b(?:REDG?|ATOMG?)\.E[.A-Z0-9]*", sass)
    return {
        "kernel": name,
        "sm": cc,
        "regs": field("REG"),
        "local": field("LOCAL"),
        "stack": field("STACK"),
        "shared": field("SHARED"),
        "ldg128": sum(".128" in s for s in ldg),
        "ldg": len(ldg),
        "stg128": sum(".128" in s for s in stg),
        "stg": len(stg),
        "atomics": sorted(set(red)),
        "ptx_wide_mul": len(re.findall(r"mul\.wide\.[su]32|mul\.lo\.s64|mad\.lo\.s64",
                                       k.asm["ptx"])),
        # exactness vs torch: approximate division or mul+add contraction would break it
        "ptx_inexact": sorted(set(re.findall(r"\b(div\.(?:full|approx)\.f32|fma\.rn\.f(?:32|64))",
                                             k.asm["ptx"]))),
    }


def report(archs=ARCHS) -> list[dict]:
    rows = []
    seen = set()
    for label, name, grid, args, kwargs in capture_launches():
        for cc in archs:
            r = compile_variant(name, args, kwargs, cc)
            r["variant"] = label
            r["grid"] = grid[0]
            key = (label, name, cc)
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def _markdown(rows) -> str:
    cols = ["variant", "kernel", "sm", "grid", "regs", "stack", "local", "shared", "ldg128",
            "ldg", "stg128", "stg", "atomics"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        vals = [",".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in cols]
        body += "| " + " | ".join(vals) + " |\n"
    return head + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON records, one per line")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:])], env=env)
    sys.path.insert(0, str(ROOT))
    rows = report(tuple(a.arch) if a.arch else ARCHS)
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        import triton

        print(f"Triton {triton.__version__}; register budget {REG_BUDGET}/thread (4 warps)\n")
        print(_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
