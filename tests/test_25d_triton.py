"""The Triton z-aggregation kernel against the torch reference, under TRITON_INTERPRET=1.

Outputs are poisoned with NaN (or a sentinel for integers) so a missed store shows; shapes
do not divide the tiles; sources and outputs are strided views (3-d mode writes through a
permuted view).
"""

from __future__ import annotations

import pytest
import torch

from qlty_gpu.ops.zagg import zagg, zagg_backend
from qlty_gpu.ops.zagg_reference import zagg_reference
from qlty_gpu.twofive.spec import build_table, parse_channel_spec, slots

pytest.importorskip("triton")

SPEC = {"identity": [-1, 0, 2], "mean": [[-2, -1], [1, 2, 4]], "std": [[-1, 0, 1]]}


def _poison(shape, dtype):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, 77, dtype=dtype)


def _case(N, C, Z, Y, X, spec, mode, centres, dtype, out_dtype=None, layout="2d"):
    g = torch.Generator().manual_seed(N * 100 + Z)
    x = (torch.randn(N, C, Z + 2, Y + 1, X + 3, generator=g) * 4)
    x = x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)
    x = x[:, :, 1:Z + 1, 1:, 2:X + 2]  # strided view (N, C, Z, Y, X)
    ops = parse_channel_spec(spec)
    t = build_table(slots(ops, C), centres, Z, mode)
    Cp = C * sum(o.output_channels for o in ops)
    J = len(centres)
    od = out_dtype or dtype
    outs = []
    for be in ("torch", "triton"):
        if layout == "2d":
            out = _poison((N, J, Cp, Y, X), od)
            view = out
        else:
            out = _poison((N, Cp, J, Y, X), od)
            view = out.permute(0, 2, 1, 3, 4)
        zagg(view, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.arange(J), backend=be)
        outs.append(out)
    return outs


@pytest.mark.parametrize("mode", ["clamp", "zero", "reflect"])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_triton_equals_torch_fp32(mode, layout):
    ref, tri = _case(2, 2, 7, 5, 9, SPEC, mode, [0, 6, 3, 3], torch.float32, layout=layout)
    assert not torch.isnan(tri).any()
    torch.testing.assert_close(tri, ref, rtol=1e-6, atol=1e-6)


def test_triton_skip_and_jpos():
    spec = {"identity": [0], "mean": [[-3, 0, 3]], "std": [[0, 1, 5]]}
    N, C, Z, Y, X = 1, 1, 6, 3, 4
    x = torch.randn(N, C, Z, Y, X)
    t = build_table(slots(parse_channel_spec(spec), C), [0, 5, 2], Z, "skip")
    jpos = torch.tensor([3, 0, 1])  # rows land out of order, row 2 stays untouched
    res = []
    for be in ("torch", "triton"):
        out = torch.full((N, 4, 3, Y, X), float("nan"))
        zagg(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, jpos, backend=be)
        res.append(out)
    assert torch.isnan(res[1][:, 2]).all()
    torch.testing.assert_close(res[1], res[0], rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype, out_dtype, tol", [
    (torch.float16, None, 1e-3),
    (torch.bfloat16, None, 1e-2),
    (torch.float64, None, 1e-12),
    (torch.int16, torch.float32, 1e-6),
    (torch.uint8, torch.float32, 1e-6),
    (torch.bfloat16, torch.float32, 1e-6),
])
def test_triton_dtypes(dtype, out_dtype, tol):
    ref, tri = _case(1, 2, 5, 3, 5, SPEC, "reflect", [0, 4], dtype, out_dtype)
    assert tri.dtype == (out_dtype or dtype)
    torch.testing.assert_close(tri.double(), ref.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16, torch.float16, torch.bool])
def test_triton_identity_is_an_exact_copy(dtype):
    spec = {"identity": [-2, 0, 1]}
    ref, tri = _case(2, 1, 4, 3, 6, spec, "zero", [0, 3], dtype if dtype != torch.bool else torch.uint8)
    assert torch.equal(tri, ref)
    if dtype == torch.bool:
        x = torch.rand(1, 1, 4, 3, 3) > 0.5
        t = build_table(slots(parse_channel_spec(spec), 1), [0, 3], 4, "zero")
        outs = []
        for be in ("torch", "triton"):
            out = torch.zeros((1, 2, 3, 3, 3), dtype=torch.bool)
            zagg(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.arange(2), backend=be)
            outs.append(out)
        assert torch.equal(outs[0], outs[1])


def test_reference_is_the_default_on_cpu_and_backend_errors(monkeypatch):
    assert zagg_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("QLTY_GPU_BACKEND", "triton")
    assert zagg_backend(torch.device("cpu")) == "triton"  # interpreter is on in tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton needs a CUDA tensor"):
        zagg_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        zagg_backend(torch.device("cpu"), "cuda")


def test_zagg_validates_its_inputs():
    x = torch.zeros(1, 1, 3, 2, 2)
    t = build_table(slots(parse_channel_spec({"identity": [0]}), 1), [0], 3, "clamp")
    out = torch.zeros(1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="idx values must lie in"):
        zagg(out, x, t.idx + 5, t.kind, t.chan_base, t.chan_cstride, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match slab"):
        zagg(torch.zeros(1, 1, 1, 3, 2), x, t.idx, t.kind, t.chan_base, t.chan_cstride,
             torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="jpos exceeds"):
        zagg(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.ones(1, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a 5-D tensor"):
        zagg(out, x[0], t.idx, t.kind, t.chan_base, t.chan_cstride, torch.zeros(1, dtype=torch.long))


def test_quilt_end_to_end_with_forced_triton(monkeypatch):
    from qlty_gpu import NCZYX25DQuilt

    v = torch.randn(1, 2, 5, 4, 3)
    want = NCZYX25DQuilt(v, SPEC, "reflect", "3d").convert()
    monkeypatch.setenv("QLTY_GPU_BACKEND", "triton")
    got = NCZYX25DQuilt(v, SPEC, "reflect", "3d").convert(slab_bytes=1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    from qlty_gpu import NCZYX25DQuilt

    v = torch.randn(2, 2, 9, 37, 41)
    want = NCZYX25DQuilt(v, SPEC, "reflect").convert()
    got = NCZYX25DQuilt(v.cuda(), SPEC, "reflect").convert()
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    got2 = NCZYX25DQuilt(v, SPEC, "reflect").convert(device="cuda", slab_bytes=1 << 16)
    torch.testing.assert_close(got2.cpu(), want, rtol=1e-5, atol=1e-5)


def test_reference_alone_on_strided_out():
    x = torch.randn(1, 1, 4, 2, 3)
    t = build_table(slots(parse_channel_spec({"mean": [[0, 1]]}), 1), [0, 3], 4, "clamp")
    out = torch.full((1, 1, 2, 2, 3), float("nan")).permute(0, 2, 1, 3, 4)
    zagg_reference(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.arange(2))
    torch.testing.assert_close(out[0, 0, 0], (x[0, 0, 0] + x[0, 0, 1]) / 2)
    torch.testing.assert_close(out[0, 1, 0], x[0, 0, 3])


# ------------------------------------------------------------------ numba CPU kernel
@pytest.mark.parametrize("dtype, out_dtype", [
    (torch.float32, None), (torch.float64, None), (torch.int16, torch.float32),
    (torch.uint16, torch.float32), (torch.float32, torch.float64),
])
@pytest.mark.parametrize("mode", ["zero", "reflect", "skip"])
def test_numba_equals_torch(dtype, out_dtype, mode):
    pytest.importorskip("numba")
    spec = SPEC if mode != "skip" else {"identity": [0], "mean": [[-3, 0, 3]], "std": [[0, 1, 5]]}
    N, C, Z, Y, X = 2, 2, 6, 3, 5
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(N, C, Z + 1, Y, X + 2, generator=g) * 5)
    x = (x if dtype.is_floating_point else x.abs().round()).to(dtype)[:, :, 1:, :, 1:X + 1]
    t = build_table(slots(parse_channel_spec(spec), C), [0, 5, 2, 2], Z, mode)
    Cp = C * int(t.kind.numel())
    res = []
    for be in ("torch", "numba"):
        out = _poison((N, Cp, 4, Y, X), out_dtype or dtype).permute(0, 2, 1, 3, 4)
        zagg(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.arange(4), backend=be)
        res.append(out)
    tol = 1e-12 if (out_dtype or dtype) == torch.float64 else 1e-6
    torch.testing.assert_close(res[1], res[0], rtol=tol, atol=tol)


def test_numba_is_chosen_on_cpu_and_refuses_what_it_cannot_do():
    pytest.importorskip("numba")
    x = torch.zeros(1, 1, 2, 2, 2)
    assert zagg_backend(x.device, None, x, x) == "numba"
    h = x.half()
    assert zagg_backend(h.device, None, h, h) == "torch"
    with pytest.raises(RuntimeError, match="numba zagg supports"):
        zagg_backend(h.device, "numba", h, h)


def _child(q):
    from qlty_gpu import NCZYX25DQuilt

    v = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).reshape(1, 2, 5, 3, 3)
    q.put(NCZYX25DQuilt(v, SPEC, "reflect").convert().sum().item())


def test_numba_in_a_forked_child():
    """The parent used the parallel kernel; a forked child (DataLoader worker) still works."""
    import multiprocessing as mp

    pytest.importorskip("numba")
    from qlty_gpu import NCZYX25DQuilt

    v = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).reshape(1, 2, 5, 3, 3)
    want = NCZYX25DQuilt(v, SPEC, "reflect").convert().sum().item()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    got = q.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ ahead-of-time compile
_AOT = r'''
import importlib.util, json, sys, tempfile, subprocess, re
from pathlib import Path
ROOT = Path(sys.argv[1])  # noqa: E501
spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "benchmarks" / "kernel_report.py")
kr = importlib.util.module_from_spec(spec); spec.loader.exec_module(kr)
import torch
from qlty_gpu.ops import zagg_triton as zt
from qlty_gpu.twofive.spec import build_table, parse_channel_spec, slots
rec = kr._Recorder()
zt._kernels = lambda: rec
SPEC = {"identity": [-1, 0, 1], "mean": [[-2, -1], [1, 2]], "std": [[-1, 0, 1]]}
t = build_table(slots(parse_channel_spec(SPEC), 1), list(range(8)), 64, "clamp")
for label, dt, odt in (("fp32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16),
                       ("uint16->fp32", torch.uint16, torch.float32), ("fp64", torch.float64, torch.float64)):
    x = torch.empty(2, 1, 64, 256, 256, dtype=dt)
    out = torch.empty(2, 8, 6, 256, 256, dtype=odt)
    zt.zagg_triton(out, x, t.idx, t.kind, t.chan_base, t.chan_cstride, torch.arange(8))
    name, grid, args, kwargs = rec.launches[-1]
    from qlty_gpu.kernels import zagg_triton as kz
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(kz, name)
    sig, cexp, attrs = kr._specialise(fn, args, kwargs)
    for cc in (80, 90):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cexp, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": kwargs["num_warps"]})
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"; cubin.write_bytes(k.asm["cubin"])
            res = subprocess.run([kr._tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([kr._tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        f = lambda key: int(re.search(rf"\b{key}:(\d+)", res).group(1))
        ldg = re.findall(r"\bLDG\.E[.A-Z0-9]*", sass); stg = re.findall(r"\bSTG\.E[.A-Z0-9]*", sass)
        print(json.dumps({"variant": label, "sm": cc, "regs": f("REG"), "local": f("LOCAL"), "stack": f("STACK"),
                          "ldg128": sum(".128" in s for s in ldg), "ldg": len(ldg), "stg128": sum(".128" in s for s in stg), "stg": len(stg),
                          "inexact": sorted(set(re.findall(r"\b(div\.(?:full|approx)\.f32|sqrt\.approx\.f32)", k.asm["ptx"]))),
                          "wide": len(re.findall(r"mul\.wide\.[su]32|mul\.lo\.s64|mad\.lo\.s64", k.asm["ptx"]))}))
'''


def _cuda_tools() -> bool:
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_tools(), reason="needs triton with its CUDA tools")
def test_zagg_kernel_compiles_for_sm80_sm90_without_spills():
    """The launches the ops layer makes, compiled for real GPUs: no local-memory spills,
    <= 64 registers (50% occupancy at 4 warps), no approximate division or sqrt, 16-byte
    vector loads (a few 8-byte CALL stack slots come from the IEEE division slow path)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT, str(root)], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8
    for r in rows:
        assert r["local"] == 0 and r["stack"] <= 8, r
        assert 0 < r["regs"] <= 64, r
        assert r["inexact"] == [] and r["ldg128"] > 0 and r["wide"] > 0, r
