"""Triton kernels against the torch reference, on CPU under ``TRITON_INTERPRET=1``.

Every launch here is tiny (< ~200 programs): the interpreter runs each program in Python.
Outputs are NaN-poisoned before the kernels write them (tests/conftest.py swaps
``_launch.new_empty``), so a missed element shows up; shapes are odd and do not divide by window or step, so the clamped
last patch and every mask is exercised. Unstitch only moves data: exact equality. The
deterministic stitch sums in the reference's order: bit-identical too. The atomic stitch
sums in scheduling order: 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlty_gpu.geometry import QuiltPlan, plan_for
from qlty_gpu.ops import quilt as q
from qlty_gpu.ops import quilt_triton as qt
from qlty_gpu.ops.backend import available_backends

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("unstitch", "cuda" if torch.cuda.is_available() else "cpu"),
    reason="Triton kernels cannot run here (no triton, or no CUDA and no TRITON_INTERPRET)",
)

DEV = "cpu"
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (image shape, window, step): 2-D and 3-D, non-dividing, clamped last patch on every axis
CASES = {
    "2d": ((2, 3, 13, 11), (5, 4), (3, 3)),
    "3d": ((1, 2, 7, 9, 6), (3, 4, 4), (2, 3, 3)),
}


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _images(case, dtype=torch.float32, scale=10.0):
    shape, window, step = CASES[case]
    x = torch.randn(shape, dtype=torch.float64) * scale
    return x.to(dtype), list(window), list(step)


def _patches(case, dtype=torch.float32):
    shape, window, step = CASES[case]
    plan = plan_for(tuple(shape[2:]), tuple(window), tuple(step))
    p = torch.randn(shape[0] * plan.patches_per_image, shape[1], *window, dtype=torch.float64)
    return p.to(dtype), list(shape[2:]), list(step), plan


# ------------------------------------------------------------------ unstitch
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", FLOATS + (torch.int32,))
def test_unstitch_exact(case, dtype):
    x, w, s = _images(case, dtype)
    _same(q.unstitch(x, w, s, backend="triton"), q.unstitch_reference(x, w, s))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "dtype,out_dtype,wdtype",
    [
        (torch.float32, None, torch.float32),
        (torch.float64, torch.float16, torch.float64),
        (torch.float16, None, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float64),
        (torch.int64, torch.float32, torch.float32),
    ],
)
def test_unstitch_fused_weight_cast_fill(case, dtype, out_dtype, wdtype):
    x, w, s = _images(case, dtype)
    weight = torch.rand(w, dtype=wdtype)
    weight.view(-1)[0] = 0.0  # border weight 0 allowed
    fill = torch.rand(w) > 0.6
    got = q.unstitch(x, w, s, weight=weight, out_dtype=out_dtype, fill_mask=fill,
                     fill_value=-1.5, backend="triton")
    ref = q.unstitch_reference(x, w, s, weight, out_dtype, fill, -1.5)
    _same(got, ref)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_unstitch_positional_channels(case, mode, normalize, out_dtype):
    x, w, s = _images(case)
    got = q.unstitch(x, w, s, out_dtype=out_dtype, positions=mode,
                     normalize_positions=normalize, backend="triton")
    ref = q.unstitch_reference(x, w, s, None, out_dtype, None, 0.0, mode, normalize)
    _same(got, ref)


def test_unstitch_window_of_one_relative_positions():
    x = torch.randn(1, 1, 5, 6)
    got = q.unstitch(x, [1, 3], [2, 2], positions="relative", backend="triton")
    _same(got, q.unstitch_reference(x, [1, 3], [2, 2], positions="relative"))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(2, 3, 13, 11).to(memory_format=torch.channels_last),
                     id="channels_last"),
        pytest.param(lambda: torch.randn(2, 7, 15, 14)[:, 1::2, 1:-1, 2:-1], id="sliced"),
        pytest.param(lambda: torch.randn(2, 3, 11, 13).transpose(2, 3), id="transposed"),
        pytest.param(lambda: torch.randn(1, 1, 13, 11).expand(2, 3, 13, 11), id="expanded"),
        pytest.param(lambda: torch.randn(1, 2, 7, 9, 6).to(memory_format=torch.channels_last_3d),
                     id="channels_last_3d"),
    ],
)
def test_unstitch_any_strides(make):
    x = make()
    nd = x.dim() - 2
    w, s = ([5, 4], [3, 3]) if nd == 2 else ([3, 4, 4], [2, 3, 3])
    assert not x.is_contiguous()
    _same(q.unstitch(x, w, s, backend="triton"), q.unstitch_reference(x, w, s))


def test_unstitch_gaps_and_full_window():
    x = torch.randn(1, 2, 13, 11)
    for w, s in (([3, 2], [5, 4]), ([13, 11], [1, 1]), ([1, 1], [4, 4])):
        _same(q.unstitch(x, w, s, backend="triton"), q.unstitch_reference(x, w, s))


def test_unstitch_missing_label_int_target():
    y = torch.randint(0, 5, (2, 1, 13, 11))
    mask = QuiltPlan((13, 11), (5, 4), (3, 3), border=1).border_mask() < 0.5
    got = q.unstitch(y, [5, 4], [3, 3], fill_mask=mask, fill_value=-1, backend="triton")
    _same(got, q.unstitch_reference(y, [5, 4], [3, 3], None, None, mask, -1))


# -------------------------------------------------------------------- stitch
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("weighted", [False, True])
def test_stitch_deterministic_bitwise(case, dtype, weighted):
    p, shape, s, plan = _patches(case, dtype)
    bplan = QuiltPlan(tuple(shape), plan.window, tuple(s), border=1, border_weight=0.25)
    acc = q.accumulation_dtype(dtype)
    weight = bplan.weight(DEV, acc) if weighted else None
    norm = bplan.norm(DEV, acc) if weighted else plan.norm(DEV, acc)
    ref = q.stitch_reference(p, shape, s, weight, norm)
    a = q.stitch(p, shape, s, weight=weight, norm=norm, mode="deterministic", backend="triton")
    b = q.stitch(p, shape, s, weight=weight, norm=norm, mode="deterministic", backend="triton")
    _same(a, b)  # run to run
    _same(a, ref)  # and the reference's summation order


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", FLOATS)
def test_stitch_atomic(case, dtype):
    p, shape, s, plan = _patches(case, dtype)
    weight = torch.rand(plan.window, dtype=torch.float64).to(q.accumulation_dtype(dtype))
    ref = q.stitch_reference(p, shape, s, weight, None)
    got = q.stitch(p, shape, s, weight=weight, mode="atomic", backend="triton")
    assert got.dtype == ref.dtype
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


# windows of 1 and window == image on some axis (issue 8.1: a z window of 1 on 3-D data
# was stitched as if the data were 2-D)
DEGENERATE = [
    ((1, 2, 3, 5, 7), (1, 4, 7), (1, 1, 7)),
    ((1, 1, 4, 3, 5), (1, 1, 1), (1, 2, 3)),
    ((2, 1, 3, 4, 5), (3, 1, 5), (2, 1, 1)),
    ((1, 1, 1, 5, 6), (1, 2, 6), (1, 2, 1)),
    ((1, 2, 5, 6), (1, 6), (2, 1)),
]


@pytest.mark.parametrize("shape,window,step", DEGENERATE, ids=str)
def test_degenerate_windows_every_path(shape, window, step):
    x = torch.randn(shape, dtype=torch.float64)
    w, s, sp = list(window), list(step), list(shape[2:])
    _same(q.unstitch(x, w, s, backend="triton"), q.unstitch_reference(x, w, s))
    plan = plan_for(tuple(sp), tuple(window), tuple(step))
    p = torch.randn(shape[0] * plan.patches_per_image, shape[1], *window, dtype=torch.float64)
    n = plan.norm(DEV, torch.float64)
    ref = q.stitch_reference(p, sp, s, None, n)
    _same(q.stitch(p, sp, s, norm=n, mode="deterministic", backend="triton"), ref)
    torch.testing.assert_close(q.stitch(p, sp, s, norm=n, mode="atomic", backend="triton"), ref,
                               equal_nan=True)
    # unstitch's gradient is the (deterministic) stitch: compare with the torch backend's
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(p)
    (gt,) = torch.autograd.grad((q.unstitch(xr, w, s, backend="triton") * g).sum(), xr)
    (gr,) = torch.autograd.grad((q.unstitch(xr, w, s, backend="torch") * g).sum(), xr)
    torch.testing.assert_close(gt, gr)


@pytest.mark.parametrize(
    "shape,window,step",
    [
        ((1, 1, 21, 50), (20, 32), (16, 16)),  # gather x tile = step (16), clamped last patch
        ((1, 1, 5, 20, 40), (3, 17, 32), (2, 16, 16)),
        ((1, 1, 5, 300), (3, 150), (2, 7)),  # several x tiles per window and per image row
    ],
)
def test_multi_tile_and_step_aligned_paths(shape, window, step):
    x = torch.randn(shape)
    w, s = list(window), list(step)
    _same(q.unstitch(x, w, s, backend="triton"), q.unstitch_reference(x, w, s))
    plan = plan_for(tuple(shape[2:]), tuple(window), tuple(step))
    p = torch.randn(plan.patches_per_image, 1, *window)
    ref = q.stitch_reference(p, list(shape[2:]), s, None, plan.norm())
    got = q.stitch(p, shape[2:], s, norm=plan.norm(), mode="deterministic", backend="triton")
    _same(got, ref)
    got = q.stitch(p, shape[2:], s, norm=plan.norm(), mode="atomic", backend="triton")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_stitch_border_weight_zero_and_norm(mode):
    plan = QuiltPlan((13, 11), (5, 4), (3, 3), border=(1, 1), border_weight=0.0)
    p = torch.randn(2 * plan.patches_per_image, 3, 5, 4)
    w, n = plan.weight(), plan.norm()
    ref = q.stitch_reference(p, [13, 11], [3, 3], w, n)
    got = q.stitch(p, [13, 11], [3, 3], weight=w, norm=n, mode=mode, backend="triton")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_stitch_gaps_give_nan(mode):
    plan = plan_for((13, 11), (3, 2), (5, 4))  # step > window: uncovered pixels
    p = torch.randn(plan.patches_per_image, 2, 3, 2)
    n = plan.norm()
    got = q.stitch(p, [13, 11], [5, 4], norm=n, mode=mode, backend="triton")
    ref = q.stitch_reference(p, [13, 11], [5, 4], None, n)
    assert torch.isnan(got[:, :, n == 0]).all() and not torch.isnan(got[:, :, n > 0]).any()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mode", ["atomic", "deterministic"])
def test_stitch_noncontiguous_patches_and_int_input(mode):
    p, shape, s, plan = _patches("2d")
    wide = torch.randn(p.shape[0], 5, *p.shape[2:])[:, 1:4]  # channel slice (as in backward)
    ref = q.stitch_reference(wide, shape, s, None, plan.norm())
    got = qt.launch_stitch(wide, plan=plan, weight=None, norm=plan.norm(), mode=mode)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    ints = torch.randint(-5, 5, p.shape, dtype=torch.int32)
    got = qt.launch_stitch(ints, plan=plan, weight=None, norm=None, mode=mode)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, q.stitch_reference(ints, shape, s, None, None))


def test_stitch_auto_mode_is_documented_default():
    assert q._resolve_mode("auto") == qt.DEFAULT_MODE == "deterministic"


def test_one_dimensional_data():
    x = torch.randn(2, 3, 17)
    _same(q.unstitch(x, [5], [3], backend="triton"), q.unstitch_reference(x, [5], [3]))
    p = q.unstitch_reference(x, [5], [3])
    n = plan_for((17,), (5,), (3,)).norm()
    _same(q.stitch(p, [17], [3], norm=n, backend="triton"), q.stitch_reference(p, [17], [3],
                                                                                None, n))


# --------------------------------------------------------- ops / autograd / compile
def test_dispatch_cpu_tensor_runs_triton_when_forced(monkeypatch):
    calls = []
    real = qt.launch_unstitch

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(qt, "launch_unstitch", spy)
    x, w, s = _images("2d")
    monkeypatch.setenv("QLTY_GPU_BACKEND", "triton")
    q.unstitch(x, w, s)
    assert calls
    monkeypatch.delenv("QLTY_GPU_BACKEND")
    calls.clear()
    q.unstitch(x, w, s)  # CPU default never picks the interpreter
    assert not calls


def test_gradcheck_through_triton():
    torch.manual_seed(1)
    x = torch.randn(1, 1, 6, 5, dtype=torch.float64, requires_grad=True)
    plan = QuiltPlan((6, 5), (3, 3), (2, 2), border=1, border_weight=0.5)
    w, n = plan.weight(DEV, torch.float64), plan.norm(DEV, torch.float64)

    def f(t):
        p = q.unstitch(t, [3, 3], [2, 2], weight=w, positions="relative", backend="triton")
        return q.stitch(p[:, :1].sin(), [6, 5], [2, 2], weight=w, norm=n, backend="triton")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_opcheck_triton_backend():
    x = torch.randn(1, 2, 6, 5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.qlty_gpu.unstitch.default,
        (x, [3, 3], [2, 2], None, None, None, 0.0, "absolute", True, "triton"),
    )
    p = torch.randn(6, 2, 3, 3, requires_grad=True)
    n = plan_for((6, 5), (3, 3), (2, 2)).norm()
    torch.library.opcheck(
        torch.ops.qlty_gpu.stitch.default, (p, [6, 5], [2, 2], None, n, "deterministic", "triton")
    )


def test_compile_fullgraph_through_triton():
    n = plan_for((13, 11), (5, 4), (3, 3)).norm()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(t):
        p = q.unstitch(t, [5, 4], [3, 3], backend="triton")
        return q.stitch(p * 2, [13, 11], [3, 3], norm=n, mode="atomic", backend="triton")

    x = torch.randn(1, 2, 13, 11)
    torch.testing.assert_close(roundtrip(x), 2 * x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- public classes
def test_public_quilt_methods_triton_equals_torch(monkeypatch):
    from qlty_gpu import NCYXQuilt, NCZYXQuilt

    quilts = [
        (NCYXQuilt(13, 11, (5, 4), (3, 3), border=(1, 1), border_weight=0.2),
         torch.randn(2, 2, 13, 11), torch.randint(0, 4, (2, 13, 11))),
        (NCZYXQuilt(7, 9, 6, (3, 4, 4), (2, 3, 3), border=1, border_weight=0.1),
         torch.randn(1, 2, 7, 9, 6), torch.randint(0, 4, (1, 1, 7, 9, 6))),
    ]

    def run_all(quilt, x, y):
        out = [quilt.unstitch(x)]
        out += list(quilt.unstitch(x, return_positions=True, include_n_position=True))
        out.append(quilt.unstitch(x, add_positional_channels=True))
        out.append(quilt.unstitch(x, add_positional_channels=True, position_mode="relative",
                                  normalize_positions=False))
        out.append(quilt.unstitch(x, weighted=True))
        out += list(quilt.unstitch_data_pair(x, y, missing_label=-1))
        patches = out[0]
        summed = list(quilt.stitch(patches))[:1]
        summed.append(quilt.stitch(patches, mode="atomic")[0])
        summed.append(quilt.stitch(patches.half())[0])
        return out, summed

    for quilt, x, y in quilts:
        monkeypatch.setenv("QLTY_GPU_BACKEND", "torch")
        ref, ref_sum = run_all(quilt, x, y)
        monkeypatch.setenv("QLTY_GPU_BACKEND", "triton")
        got, got_sum = run_all(quilt, x, y)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            _same(a, b)
        # the torch backend sums phase groups, the Triton kernels the reference's nested order
        for a, b in zip(got_sum, ref_sum):
            assert a.dtype == b.dtype
            tol = 1e-3 if a.dtype == torch.float16 else 1e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ int64 / rules
@pytest.mark.slow
def test_int64_offsets_in_subprocess():
    """Input offsets past 2**31 elements: unstitch of a 2 GiB uint8 image (8 patches) and
    stitch of patches strided 2**30 apart, each in a launch of a few programs.

    An output with > 2**31 elements would need > 2 million interpreter programs (hours on
    CPU); that side is covered by the same int64 ``pid``-first arithmetic (checked in
    tests/test_kernel_compile.py from the PTX) and by the ``gpu``-marked test below.
    """
    code = textwrap.dedent(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from qlty_gpu.geometry import plan_for
        from qlty_gpu.ops import quilt as q
        from qlty_gpu.ops import quilt_triton as qt
        xdim = 2**30 + 64  # 2 rows: row 1 starts past 2**30, its end past 2**31
        x = torch.empty((1, 1, 2, xdim), dtype=torch.uint8)
        starts = [0, 2**29, 2**30, xdim - 16]
        for s in starts:
            x[0, 0, :, s:s + 16] = torch.arange(32, dtype=torch.uint8).reshape(2, 16) + s % 7
        got = qt.launch_unstitch(x, plan=plan_for((2, xdim), (1, 16), (1, 2**29)), weight=None,
                                 out_dtype=x.dtype, fill_mask=None, fill_value=0.0,
                                 positions="", normalize_positions=True)
        ref = torch.stack([x[0, :, r, s:s + 16] for r in range(2) for s in starts])
        assert got.shape == (8, 1, 1, 16), got.shape
        assert torch.equal(got[:, :, 0], ref), (got, ref)
        del x, got
        # stitch reading patches at element offsets 0, 2**30, 2**31 (3 patches, 1 row)
        big = torch.empty(2**31 + 16, dtype=torch.uint8)
        pt = big.as_strided((3, 1, 1, 16), (2**30, 16, 16, 1))
        for k in range(3):
            pt[k] = torch.arange(16, dtype=torch.uint8) + 10 * k
        ref = q.stitch_reference(pt.clone(), [1, 32], [1, 8])
        for mode in ("deterministic", "atomic"):
            got = qt.launch_stitch(pt, plan=plan_for((1, 32), (1, 16), (1, 8)), weight=None,
                                   norm=None, mode=mode)
            assert torch.equal(got, ref), (mode, got, ref)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_kernel_source_rules():
    src = (ROOT / "kernels" / "quilt_triton.py").read_text()
    assert "make_block_ptr" not in src
    assert "import torch" not in src and "qlty_gpu" not in src
    assert src.count("tl.program_id(0).to(tl.int64)") == 4


# ------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_matches_reference(dtype):
    for case in CASES:
        x, w, s = _images(case, dtype)
        xc = x.cuda()
        _same(q.unstitch(xc, w, s).cpu(), q.unstitch_reference(x, w, s))
        p, shape, st, plan = _patches(case, dtype)
        norm = plan.norm(DEV, q.accumulation_dtype(dtype))
        ref = q.stitch_reference(p, shape, st, None, norm)
        for mode in ("deterministic", "atomic"):
            got = q.stitch(p.cuda(), shape, st, norm=norm.cuda(), mode=mode).cpu()
            tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_deterministic_bitwise_equals_cpu_reference(case):
    """IEEE div_rn + no FMA contraction + the reference's summation order (GPU.md §1)."""
    p, shape, s, plan = _patches(case)
    bplan = QuiltPlan(tuple(shape), plan.window, tuple(s), border=1, border_weight=0.3)
    w, n = bplan.weight(), bplan.norm()
    got = q.stitch(p.cuda(), shape, s, weight=w.cuda(), norm=n.cuda(), mode="deterministic")
    _same(got.cpu(), q.stitch_reference(p, shape, s, w, n))


@pytest.mark.gpu
def test_cuda_deterministic_run_to_run_and_large():
    plan = plan_for((128, 128, 128), (32, 32, 32), (16, 16, 16))
    p = torch.randn(plan.patches_per_image, 2, 32, 32, 32, device="cuda")
    n = plan.norm("cuda")
    a = q.stitch(p, [128] * 3, [16] * 3, norm=n, mode="deterministic")
    b = q.stitch(p, [128] * 3, [16] * 3, norm=n, mode="deterministic")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, q.stitch(p, [128] * 3, [16] * 3, norm=n, mode="atomic"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_int64_output_past_2_31():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    x = torch.randint(0, 255, (1, 1, 2**16 + 8, 2**15), dtype=torch.uint8, device="cuda")
    got = q.unstitch(x, [2**16 + 8, 2**15], [1, 1], out_dtype=torch.uint8)  # one big patch
    assert torch.equal(got[0], x[0])
    big = x.expand(3, 1, -1, -1)  # 3 images: output 3 * 2**31 + ... elements
    got = q.unstitch(big, [2**16 + 8, 2**15], [1, 1])
    assert got.numel() > 2**31 and torch.equal(got[2], x[0])
