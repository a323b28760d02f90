"""Op level: ``torch.ops.qlty_gpu.unstitch/stitch`` and the validated wrappers.

Every backend that can run here (Triton in its interpreter, tiny shapes) against the tests'
one loop oracle (``tests/oracle.py``) on odd, non-dividing 2-D and 3-D shapes (exact where
the op only moves data), with NaN-poisoned fresh outputs (``tests/conftest.py``); backends
against each other, the dot-product adjoint test, ``gradcheck`` in float64,
``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, dtype/device/autograd
behaviour, backend selection (``QLTY_GPU_BACKEND``) and the capability table: what
``why_not`` accepts runs on that backend, what it rejects raises when forced. Triton's
kernel-specific paths are in ``tests/test_triton_kernels.py``.
"""

from __future__ import annotations

import os

import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlty_gpu.ops.quilt_numba as numba_impl
import qlty_gpu.ops.quilt_reference as opsq
from qlty_gpu.errors import QltyBackendError, QltyError
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.ops import available_backends, choose_backend, stitch, unstitch
from qlty_gpu.ops.backend import BACKENDS, ENV_BACKEND, why_not

CPU = torch.device("cpu")
# every backend that runs here (Triton in its interpreter: tiny shapes only), for the
# comparisons with the oracle; the CPU ones for the heavier tests (gradcheck, opcheck, ...)
UNSTITCH_BACKENDS = available_backends("unstitch")
STITCH_BACKENDS = available_backends("stitch")
CPU_UNSTITCH_BACKENDS = [b for b in UNSTITCH_BACKENDS if b != "triton"]
CPU_STITCH_BACKENDS = [b for b in STITCH_BACKENDS if b != "triton"]

# (shape, window, step): odd, clamped, non-dividing; one with step > window (gaps)
GEOMS = [
    ((13, 11), (5, 4), (3, 3)),
    ((9, 16), (9, 5), (2, 4)),
    ((7, 9, 8), (3, 4, 5), (2, 3, 2)),
    ((5, 6, 7), (5, 2, 3), (1, 5, 3)),
]
GEOM_IDS = ["2d", "2d-full-y", "3d", "3d-gaps"]


# ------------------------------------------------------------------ the loop oracle
def oracle_unstitch(x, window, step):
    return oracle.unstitch(x, window, step)[0]


def oracle_stitch(p, shape, step, weight=None, normalise=True):
    """float64 loop: sum of weighted patches, divided by the weight sum."""
    return oracle.stitch(p, shape, step, weight, normalise)


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _n_patches(shape, window, step):
    return len(oracle.origins(shape, window, step))


# ------------------------------------------------------------------ unstitch
@pytest.mark.parametrize("backend", UNSTITCH_BACKENDS)
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
     torch.uint8],
    ids=str,
)
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_unstitch_exact_vs_oracle(geom, dtype, backend):
    shape, window, step = geom
    x = _rand((2, 3, *shape), dtype)
    got = unstitch(x, window, step, backend=backend)
    assert got.dtype == dtype
    assert torch.equal(got, oracle_unstitch(x, window, step))


@pytest.mark.parametrize("backend", CPU_UNSTITCH_BACKENDS)
def test_unstitch_non_contiguous_inputs(backend):
    base = _rand((2, 3, 11, 13), torch.float32)
    for x in (
        base.transpose(2, 3),  # (2, 3, 13, 11) strided
        base.contiguous(memory_format=torch.channels_last),
        base[:, ::2, 1:, ::2],
        base.permute(1, 0, 2, 3),
    ):
        got = unstitch(x, (4, 3), (3, 2), backend=backend)
        assert torch.equal(got, oracle_unstitch(x, (4, 3), (3, 2)))


@pytest.mark.parametrize("backend", UNSTITCH_BACKENDS)
@pytest.mark.parametrize("geom", GEOMS[:1] + GEOMS[2:3], ids=["2d", "3d"])
def test_unstitch_fused_weight_cast_and_fill(geom, backend):
    shape, window, step = geom
    x = _rand((2, 2, *shape), torch.float32)
    w = torch.rand(window, dtype=torch.float32) + 0.5
    ref = oracle_unstitch(x, window, step)
    got = unstitch(x, window, step, weight=w, backend=backend)
    torch.testing.assert_close(got, ref * w, rtol=1e-6, atol=1e-6)
    got = unstitch(x, window, step, out_dtype=torch.float64, backend=backend)
    assert got.dtype == torch.float64 and torch.equal(got, ref.double())
    mask = torch.rand(window) < 0.4
    got = unstitch(x, window, step, fill_mask=mask, fill_value=-7.0, backend=backend)
    assert torch.equal(got, ref.masked_fill(mask, -7.0))
    # integer data with a fused weight: weighted in float32 then cast back like the reference
    xi = _rand((1, 1, *shape), torch.int64)
    got = unstitch(xi, window, step, weight=w, backend=backend)
    ref_i = unstitch(xi, window, step, weight=w, backend="torch")
    assert got.dtype == ref_i.dtype and torch.equal(got, ref_i)


@pytest.mark.parametrize("backend", UNSTITCH_BACKENDS)
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_unstitch_positional_channels_op(mode, backend):
    x = _rand((2, 1, 10, 7), torch.float32)
    got = unstitch(x, (4, 3), (3, 2), positions=mode, backend=backend)
    plan = QuiltPlan((10, 7), (4, 3), (3, 2))
    assert got.shape == (2 * plan.patches_per_image, 3, 4, 3)
    assert torch.equal(got[:, :1], oracle_unstitch(x, (4, 3), (3, 2)))
    pos = got[:, 1:]
    org = plan.origins().repeat(2, 1).double()
    u = torch.arange(4, dtype=torch.float64).view(1, 4, 1)
    v = torch.arange(3, dtype=torch.float64).view(1, 1, 3)
    if mode == "absolute":
        ey = (org[:, 0].view(-1, 1, 1) + u) / 10
        ex = (org[:, 1].view(-1, 1, 1) + v) / 7
    else:
        ey = (u / 3).expand(org.shape[0], 4, 3)
        ex = (v / 2).expand(org.shape[0], 4, 3)
    torch.testing.assert_close(pos[:, 0].double(), ey.expand(-1, 4, 3), rtol=0, atol=1e-7)
    torch.testing.assert_close(pos[:, 1].double(), ex.expand(-1, 4, 3), rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", UNSTITCH_BACKENDS)
def test_unstitch_returns_a_copy(backend):
    x = torch.zeros(1, 1, 6, 6)
    p = unstitch(x, (6, 6), (1, 1), backend=backend)
    p += 1
    assert float(x.abs().sum()) == 0


# ------------------------------------------------------------------ stitch
@pytest.mark.parametrize("backend", STITCH_BACKENDS)
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_stitch_vs_oracle(geom, weighted, backend):
    shape, window, step = geom
    m = 2 * _n_patches(shape, window, step)
    p = _rand((m, 3, *window), torch.float64, seed=1)
    w = torch.rand(window, dtype=torch.float64) + 0.1 if weighted else None
    acc, nrm = oracle_stitch(p, shape, step, w, normalise=False)
    got = stitch(p, shape, step, weight=w, backend=backend)
    torch.testing.assert_close(got, acc, rtol=1e-12, atol=1e-12)
    got = stitch(p, shape, step, weight=w, norm=nrm, backend=backend)
    torch.testing.assert_close(got, acc / nrm, rtol=1e-12, atol=1e-12, equal_nan=True)
    if any(s > k for s, k in zip(step, window)):
        assert bool(torch.isnan(got).any())  # 0/0 in the gaps, no eps (qlty's rule)
    got32 = stitch(p.float(), shape, step, weight=w, norm=nrm, backend=backend)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), acc / nrm, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_backends_agree_and_are_deterministic():
    if len(CPU_STITCH_BACKENDS) < 2:
        pytest.skip("only one CPU backend available")
    shape, window, step = (67, 67), (32, 32), (16, 16)
    p = _rand((2 * _n_patches(shape, window, step), 8, *window), torch.float32)
    outs = [stitch(p, shape, step, backend=b) for b in CPU_STITCH_BACKENDS for _ in range(2)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-5)
    for i in range(0, len(outs), 2):  # each backend bitwise deterministic
        assert torch.equal(outs[i], outs[i + 1])
    x = _rand((2, 3, 13, 11), torch.float32)
    us = [unstitch(x, (5, 4), (3, 3), backend=b) for b in CPU_UNSTITCH_BACKENDS]
    for u in us[1:]:
        assert torch.equal(u, us[0])


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_stitch_accumulates_in_float32(dtype, backend):
    """Half in, half out, but summed in float32: equals the float32 stitch rounded once."""
    shape, window, step = (21, 19), (8, 8), (2, 3)  # up to 16 patches per pixel
    plan = QuiltPlan(shape, window, step, 2, 0.3)
    p = (_rand((plan.patches_per_image, 2, *window), torch.float32) * 100 + 1000).to(dtype)
    w, nrm = plan.weight(), plan.norm()
    got = stitch(p, shape, step, weight=w, norm=nrm, backend=backend)
    assert got.dtype == dtype
    ref = stitch(p.float(), shape, step, weight=w, norm=nrm, backend=backend).to(dtype)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", STITCH_BACKENDS)
@pytest.mark.parametrize(
    "dtype, out",
    [(torch.float32, torch.float32), (torch.float64, torch.float64),
     (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
     (torch.int32, torch.float32), (torch.int64, torch.float32), (torch.uint8, torch.float32),
     (torch.bool, torch.float32)],
    ids=str,
)
def test_stitch_output_dtype(dtype, out, backend):
    p = _rand((4, 1, 3, 3), dtype) if dtype != torch.bool else torch.ones(4, 1, 3, 3, dtype=dtype)
    if why_not(backend, "stitch", CPU, dtype) is not None:
        with pytest.raises(QltyBackendError, match=backend):
            stitch(p, (5, 5), (2, 2), backend=backend)
        return
    got = stitch(p, (5, 5), (2, 2), backend=backend)
    assert got.dtype == out
    ref, _ = oracle_stitch(p, (5, 5), (2, 2), normalise=False)
    torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)
    auto = stitch(p, (5, 5), (2, 2))  # automatic choice always finds a backend
    assert auto.dtype == out


# ------------------------------------------------------------------ adjoint and gradients
@pytest.mark.parametrize("backend", STITCH_BACKENDS)
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_dot_product_adjoint(geom, backend):
    """<U x, y> == <x, U^T y> with U = weighted unstitch and U^T = weighted plain stitch."""
    shape, window, step = geom
    x = _rand((2, 3, *shape), torch.float64, seed=2)
    y = _rand((2 * _n_patches(shape, window, step), 3, *window), torch.float64, seed=3)
    w = torch.rand(window, dtype=torch.float64) + 0.1
    lhs = (unstitch(x, window, step, weight=w, backend=backend) * y).sum()
    rhs = (x * stitch(y, shape, step, weight=w, backend=backend)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)
    # and without a weight
    lhs = (unstitch(x, window, step, backend=backend) * y).sum()
    rhs = (x * stitch(y, shape, step, backend=backend)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


SMALL = [
    ((6, 5), (3, 2), (2, 2)),
    ((4, 5, 3), (2, 3, 2), (1, 2, 2)),
    ((5, 3, 4), (2, 1, 2), (3, 1, 1)),
]
SMALL_IDS = ["2d", "3d", "3d-gaps"]


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
@pytest.mark.parametrize("geom", [SMALL[0], SMALL[2]], ids=["2d", "3d-gaps"])
def test_gradcheck_unstitch(geom, backend):
    shape, window, step = geom
    x = _rand((1, 2, *shape), torch.float64).requires_grad_(True)
    w = torch.rand(window, dtype=torch.float64) + 0.1
    mask = torch.rand(window) < 0.3
    fast = backend != "torch"  # the numba path pays a thread-pool launch per call
    assert torch.autograd.gradcheck(
        lambda t: unstitch(t, window, step, weight=w, backend=backend), (x,), fast_mode=fast
    )
    assert torch.autograd.gradcheck(
        lambda t: unstitch(t, window, step, fill_mask=mask, fill_value=3.0, backend=backend),
        (x,),
        fast_mode=fast,
    )
    # positional channels carry no gradient
    assert torch.autograd.gradcheck(
        lambda t: unstitch(t, window, step, positions="absolute", backend=backend), (x,),
        fast_mode=fast,
    )


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
@pytest.mark.parametrize("geom", SMALL[:2], ids=SMALL_IDS[:2])
def test_gradcheck_stitch(geom, backend):
    shape, window, step = geom
    plan = QuiltPlan(shape, window, step, 1, 0.25)
    w, nrm = plan.weight(dtype=torch.float64), plan.norm(dtype=torch.float64)
    p = _rand((plan.patches_per_image, 2, *window), torch.float64).requires_grad_(True)
    fast = backend != "torch"
    assert torch.autograd.gradcheck(
        lambda t: stitch(t, shape, step, weight=w, norm=nrm, backend=backend), (p,),
        fast_mode=fast,
    )
    assert torch.autograd.gradcheck(
        lambda t: stitch(t, shape, step, backend=backend), (p,), fast_mode=fast
    )


def test_gradgradcheck_round_trip():
    shape, window, step = (7, 6), (3, 4), (2, 1)
    plan = QuiltPlan(shape, window, step, 1, 0.5)
    w, nrm = plan.weight(dtype=torch.float64), plan.norm(dtype=torch.float64)
    x = _rand((1, 1, *shape), torch.float64).requires_grad_(True)

    def f(t):
        return stitch(unstitch(t, window, step) ** 2, shape, step, weight=w, norm=nrm)

    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
def test_autograd_half_grad_dtypes(backend):
    x = _rand((1, 2, 9, 10), torch.float32).to(torch.bfloat16).requires_grad_(True)
    p = unstitch(x, (4, 4), (3, 3), backend=backend)
    y = stitch(p, (9, 10), (3, 3), backend=backend)
    assert y.dtype == torch.bfloat16 and y.requires_grad
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    cover = stitch(torch.ones_like(p, dtype=torch.float32), (9, 10), (3, 3))
    torch.testing.assert_close(x.grad.float(), cover.expand_as(x), rtol=0, atol=0)


# ------------------------------------------------------------------ opcheck
def _opcheck_samples(backend):
    x2 = _rand((2, 2, 9, 7), torch.float32)
    x3 = _rand((1, 2, 5, 6, 7), torch.float64)
    w2, w3 = torch.rand(4, 3), torch.rand(3, 4, 5, dtype=torch.float64)
    m2 = torch.rand(4, 3) < 0.5
    un = [
        (x2, [4, 3], [2, 3], None, None, None, 0.0, "", True, backend),
        (x2, [4, 3], [2, 3], w2, None, m2, -1.0, "absolute", True, backend),
        (x2, [4, 3], [2, 3], None, torch.float64, None, 0.0, "relative", False, backend),
        (x3, [3, 4, 5], [2, 1, 3], w3, None, None, 0.0, "", True, backend),
        (x3.to(torch.bfloat16), [3, 4, 5], [2, 1, 3], None, None, None, 0.0, "", True, backend),
    ]
    p2 = _rand((2 * _n_patches((9, 7), (4, 3), (2, 3)), 2, 4, 3), torch.float32)
    p3 = _rand((_n_patches((5, 6, 7), (3, 4, 5), (2, 1, 3)), 2, 3, 4, 5), torch.float64)
    n2 = QuiltPlan((9, 7), (4, 3), (2, 3)).norm()
    n3 = QuiltPlan((5, 6, 7), (3, 4, 5), (2, 1, 3)).norm(dtype=torch.float64)
    st_ = [
        (p2, [9, 7], [2, 3], None, None, "auto", backend),
        (p2, [9, 7], [2, 3], w2, n2, "auto", backend),
        (p3, [5, 6, 7], [2, 1, 3], w3, n3, "deterministic", backend),
        (p2.half(), [9, 7], [2, 3], w2, n2, "auto", backend),
    ]
    return un, st_


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
def test_opcheck(backend):
    un, st_ = _opcheck_samples(backend)
    for args in un:
        args = (args[0].clone().requires_grad_(args[0].dtype.is_floating_point), *args[1:])
        torch.library.opcheck(torch.ops.qlty_gpu.unstitch.default, args)
    for args in st_:
        args = (args[0].clone().requires_grad_(True), *args[1:])
        torch.library.opcheck(torch.ops.qlty_gpu.stitch.default, args)


def test_ops_on_meta_device_keep_device():
    """Outputs stay on the input's device (meta stands in for CUDA on a CPU-only machine)."""
    x = torch.empty(2, 3, 13, 11, device="meta")
    p = unstitch(x, (5, 4), (3, 3))
    assert p.device.type == "meta" and p.shape == (2 * 16, 3, 5, 4)
    y = stitch(p.half(), (13, 11), (3, 3))
    assert y.device.type == "meta" and y.shape == (2, 3, 13, 11) and y.dtype == torch.float16


# ------------------------------------------------------------------ torch.compile
def _raw_pipeline(shape, window, step, conv, w, nrm):
    def f(x):
        p = torch.ops.qlty_gpu.unstitch(x, list(window), list(step), None, None, None, 0.0, "",
                                        True, "")
        return torch.ops.qlty_gpu.stitch(conv(p), list(shape), list(step), w, nrm, "auto", "")

    return f


@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[2]], ids=["2d", "3d"])
def test_compile_fullgraph_raw_ops_aot_eager(geom):
    shape, window, step = geom
    torch._dynamo.reset()
    conv_cls = torch.nn.Conv2d if len(shape) == 2 else torch.nn.Conv3d
    conv = conv_cls(3, 3, 3, padding=1)
    plan = QuiltPlan(shape, window, step, 1, 0.3)
    f = _raw_pipeline(shape, window, step, conv, plan.weight(), plan.norm())
    x = _rand((2, 3, *shape), torch.float32).requires_grad_(True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x)
    compiled = cf(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    g_e = torch.autograd.grad(eager.square().sum(), [x, conv.weight])
    g_c = torch.autograd.grad(compiled.square().sum(), [x, conv.weight])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_raw_ops_inductor():
    shape, window, step = (13, 11), (5, 4), (3, 3)
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    plan = QuiltPlan(shape, window, step, 1, 0.3)
    f = _raw_pipeline(shape, window, step, conv, plan.weight(), plan.norm())
    x = _rand((1, 2, *shape), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(f, fullgraph=True, backend="inductor")(x), f(x), rtol=1e-5, atol=1e-5
        )


def test_compile_fullgraph_validated_wrappers():
    shape, window, step = (13, 11), (5, 4), (3, 3)
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    plan = QuiltPlan(shape, window, step, 1, 0.3)
    w, nrm = plan.weight(), plan.norm()

    def f(x):
        return stitch(conv(unstitch(x, window, step)), shape, step, weight=w, norm=nrm)

    x = _rand((2, 3, *shape), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x), rtol=1e-5, atol=1e-5
        )


def test_compile_fullgraph_validated_unstitch():
    torch._dynamo.reset()
    x = _rand((2, 3, 13, 11), torch.float32)

    def f(t):
        return unstitch(t, (5, 4), (3, 3)) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, f(x))


# ------------------------------------------------------------------ backend selection
def test_backend_names_and_auto_choice():
    assert BACKENDS == ("triton", "numba", "torch")
    assert "torch" in available_backends("stitch") and "torch" in available_backends("unstitch")
    auto = choose_backend("stitch", CPU, torch.float32)
    assert auto == ("numba" if "numba" in CPU_STITCH_BACKENDS else "torch")
    assert choose_backend("stitch", CPU, torch.float32, "auto") == auto
    # one capability table: numba stitch sums integers too (in float32)
    assert choose_backend("stitch", CPU, torch.int32) == auto
    assert choose_backend("unstitch", torch.device("meta"), torch.float32) == "torch"
    assert choose_backend("stitch", CPU, torch.float32, "torch") == "torch"


def test_triton_never_chosen_implicitly_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("stitch", CPU, torch.float32) != "triton"
    assert choose_backend("unstitch", CPU, torch.float32) != "triton"


def test_env_backend_routes_the_op(monkeypatch):
    if "numba" not in CPU_STITCH_BACKENDS:
        pytest.skip("numba not available")

    def boom(*a, **k):
        raise RuntimeError("numba path taken")

    monkeypatch.setattr(numba_impl, "launch_stitch", boom)
    monkeypatch.setattr(numba_impl, "launch_unstitch", boom)
    x = torch.randn(1, 1, 6, 6)
    monkeypatch.setenv(ENV_BACKEND, "torch")
    p = unstitch(x, (3, 3), (3, 3))
    stitch(p, (6, 6), (3, 3))
    monkeypatch.setenv(ENV_BACKEND, " NUMBA ")  # case and whitespace are forgiven
    with pytest.raises(RuntimeError, match="numba path taken"):
        stitch(p, (6, 6), (3, 3))
    with pytest.raises(RuntimeError, match="numba path taken"):
        unstitch(x, (3, 3), (3, 3))
    monkeypatch.setenv(ENV_BACKEND, "auto")
    with pytest.raises(RuntimeError, match="numba path taken"):
        stitch(p, (6, 6), (3, 3))
    # an explicit backend= argument wins over the environment
    monkeypatch.setenv(ENV_BACKEND, "numba")
    stitch(p, (6, 6), (3, 3), backend="torch")


def test_env_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "cuda_magic")
    with pytest.raises(QltyError, match=r"cuda_magic.*QLTY_GPU_BACKEND") as info:
        stitch(torch.ones(4, 1, 3, 3), (5, 5), (2, 2))
    assert "torch" in str(info.value) and "numba" in str(info.value)


def test_unknown_backend_argument_raises():
    with pytest.raises(QltyError, match=r"unknown backend 'fast'.*backend="):
        unstitch(torch.ones(1, 1, 5, 5), (3, 3), (2, 2), backend="fast")
    with pytest.raises(QltyError, match="unknown backend"):
        why_not("fast", "stitch", CPU, torch.float32)


def test_forced_backend_that_cannot_run_names_reasons(monkeypatch):
    # (on the meta device the registered fake runs, so the device rule is checked directly)
    with pytest.raises(QltyBackendError, match=r"'numba' cannot run stitch.*CPU tensors only"):
        choose_backend("stitch", torch.device("meta"), torch.float32, "numba")
    monkeypatch.setenv(ENV_BACKEND, "numba")
    with pytest.raises(QltyBackendError, match=r"numba.*CPU tensors only.*meta"):
        choose_backend("unstitch", torch.device("meta"), torch.float32)
    with pytest.raises(QltyBackendError, match=r"numba.*complex64"):
        unstitch(torch.ones(1, 1, 5, 5, dtype=torch.complex64), (3, 3), (2, 2))
    monkeypatch.delenv(ENV_BACKEND)
    with pytest.raises(QltyBackendError, match=r"numba.*complex64"):
        stitch(torch.ones(4, 1, 3, 3, dtype=torch.complex64), (5, 5), (2, 2), backend="numba")
    with pytest.raises(QltyBackendError, match=r"numba unstitch runs .*got torch.complex64"):
        unstitch(torch.ones(1, 1, 5, 5, dtype=torch.complex64), (3, 3), (2, 2), backend="numba")
    # Triton on a CPU tensor without the interpreter: names the reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(QltyBackendError, match="triton") as info:
        stitch(torch.ones(4, 1, 3, 3), (5, 5), (2, 2), backend="triton")
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, QltyError)
    assert why_not("triton", "stitch", CPU, torch.float32) is not None


def test_stitch_modes_accepted_and_validated():
    p = torch.ones(4, 1, 3, 3)
    ref = stitch(p, (5, 5), (2, 2))
    for mode in ("auto", "atomic", "deterministic"):
        assert torch.equal(stitch(p, (5, 5), (2, 2), mode=mode), ref)
    with pytest.raises(QltyError, match=r"mode must be one of.*'racy'"):
        stitch(p, (5, 5), (2, 2), mode="racy")


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("backend", STITCH_BACKENDS)
def test_empty_batch_and_channels(backend):
    for shape in ((0, 2, 13, 12), (2, 0, 13, 12), (0, 1, 5, 6, 7)):
        x = torch.zeros(shape)
        window = (5, 4) if len(shape) == 4 else (3, 3, 3)
        step = (3, 3) if len(shape) == 4 else (2, 2, 2)
        p = unstitch(x, window, step, backend=backend)
        assert p.shape == (shape[0] * _n_patches(shape[2:], window, step), shape[1], *window)
        assert stitch(p, shape[2:], step, backend=backend).shape == shape


@pytest.mark.parametrize("backend", STITCH_BACKENDS)
def test_stitch_strided_and_expanded_patches(backend):
    shape, window, step = (13, 12), (5, 4), (3, 3)
    m = 2 * _n_patches(shape, window, step)
    p = _rand((m, 2, *window), torch.float32)
    ref, _ = oracle_stitch(p, shape, step, normalise=False)
    for q in (p.transpose(2, 3).contiguous().transpose(2, 3),
              p.contiguous(memory_format=torch.channels_last),
              torch.stack([p, torch.zeros_like(p)], dim=2).flatten(1, 2)[:, ::2]):
        torch.testing.assert_close(stitch(q, shape, step, backend=backend).double(), ref,
                                   rtol=1e-6, atol=1e-5)
    one = torch.ones(1, 1, *window).expand(m, 3, *window)  # stride-0 batch
    cover, _ = oracle_stitch(one, shape, step, normalise=False)
    assert torch.equal(stitch(one, shape, step, backend=backend).double(), cover)


def test_complex_and_bool_take_the_torch_path():
    x = _rand((1, 2, 9, 8), torch.float32) + 1j * _rand((1, 2, 9, 8), torch.float32, seed=5)
    p = unstitch(x, (4, 4), (3, 2))
    assert p.dtype == torch.complex64 and torch.equal(p, oracle_unstitch(x, (4, 4), (3, 2)))
    nrm = QuiltPlan((9, 8), (4, 4), (3, 2)).norm()
    y = stitch(p, (9, 8), (3, 2), norm=nrm)
    assert y.dtype == torch.complex64
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    b = torch.rand(1, 1, 9, 8) > 0.5
    assert torch.equal(unstitch(b, (4, 4), (3, 2)), oracle_unstitch(b, (4, 4), (3, 2)))


@st.composite
def _nd_geometry(draw):
    nd = draw(st.sampled_from([2, 3]))
    shape = [draw(st.integers(1, 12)) for _ in range(nd)]
    window = [draw(st.integers(1, d)) for d in shape]
    step = [draw(st.integers(1, w + 2)) for w in window]
    return tuple(shape), tuple(window), tuple(step)


@settings(max_examples=30, deadline=None)
@given(_nd_geometry(), st.integers(1, 2), st.integers(1, 2), st.booleans())
def test_backends_agree_on_random_geometries(geom, n, c, weighted):
    shape, window, step = geom
    x = torch.randn(n, c, *shape, dtype=torch.float64)
    w = torch.rand(window, dtype=torch.float64) + 0.1 if weighted else None
    ref_p = oracle_unstitch(x, window, step)
    y = torch.randn_like(ref_p)
    ref_s, _ = oracle_stitch(y, shape, step, w, normalise=False)
    for b in CPU_STITCH_BACKENDS:
        assert torch.equal(unstitch(x, window, step, backend=b), ref_p)
        torch.testing.assert_close(stitch(y, shape, step, weight=w, backend=b), ref_s,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", UNSTITCH_BACKENDS)
def test_unstitch_int64_beyond_float_precision_is_exact(backend):
    x = torch.randint(2**60, 2**62, (1, 2, 7, 6), dtype=torch.int64)
    assert torch.equal(unstitch(x, (3, 4), (2, 1), backend=backend),
                       oracle_unstitch(x, (3, 4), (2, 1)))


@pytest.mark.parametrize(
    "geom",
    [((20, 19), (9, 9), (1, 1)),  # 81 phase groups: the torch backend's index_add path
     ((21, 18), (8, 8), (2, 3)),  # phase-grouped strided adds
     ((9, 10, 11), (4, 5, 6), (1, 1, 1))],  # 3-D, 120 groups
    ids=["many-groups", "phases", "3d-many-groups"],
)
def test_torch_backend_paths_and_exported_references(geom):
    shape, window, step = geom
    x = _rand((2, 2, *shape), torch.float64)
    ref_p = oracle_unstitch(x, window, step)
    assert torch.equal(opsq.unstitch_reference(x, list(window), list(step)), ref_p)
    assert torch.equal(unstitch(x, window, step, backend="torch"), ref_p)
    w = torch.rand(window, dtype=torch.float64) + 0.1
    y = torch.randn_like(ref_p)
    ref_s, nrm = oracle_stitch(y, shape, step, w)
    got = stitch(y, shape, step, weight=w, norm=nrm, backend="torch")
    torch.testing.assert_close(got, ref_s, rtol=1e-12, atol=1e-12)
    got = opsq.stitch_reference(y, list(shape), list(step), w, nrm)
    torch.testing.assert_close(got, ref_s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)
def test_large_outputs_reused_safely(backend, monkeypatch):
    """Large CPU outputs come from a reuse pool (qlty_gpu._alloc): live views must never be
    handed out again, and a reused stitch accumulator must start from zero. The size
    threshold is lowered so that small tensors exercise the pool."""
    import gc

    from qlty_gpu import _alloc

    monkeypatch.setattr(_alloc, "_MIN_BYTES", 1)
    monkeypatch.setenv("QLTY_GPU_HUGEPAGES", "1")
    monkeypatch.setenv("QLTY_GPU_CPU_CACHE_MB", "64")
    _alloc.empty_cache()
    shape, window, step = (40, 36), (8, 8), (4, 4)
    x1 = _rand((2, 3, *shape), torch.float32, seed=11)
    x2 = _rand((2, 3, *shape), torch.float32, seed=12)
    ref1, ref2 = oracle_unstitch(x1, window, step), oracle_unstitch(x2, window, step)
    p1 = unstitch(x1, window, step, backend=backend)
    view, arr = p1[5:7], p1.numpy()[5:7]
    del p1
    gc.collect()
    p2 = unstitch(x2, window, step, backend=backend)
    assert torch.equal(view, ref1[5:7]) and (arr == ref1[5:7].numpy()).all()
    del view, arr
    gc.collect()
    pooled = _alloc.cached_bytes()
    p3 = unstitch(x1, window, step, backend=backend)
    assert torch.equal(p2, ref2) and torch.equal(p3, ref1)
    nrm = QuiltPlan(shape, window, step).norm()
    for _ in range(3):  # accumulators reused from the pool must not keep old sums
        y = stitch(p3, shape, step, norm=nrm, backend=backend)
        torch.testing.assert_close(y, x1, rtol=1e-5, atol=1e-5)
        del y
        gc.collect()
    if backend == "numba" and _alloc._enabled():
        assert pooled > 0 or _alloc.cached_bytes() > 0  # the pool really was exercised
    _alloc.empty_cache()


@pytest.mark.parametrize("backend", CPU_STITCH_BACKENDS)  # the interpreter is not thread-safe
def test_concurrent_calls_from_threads(backend):
    """Ops called from several Python threads at once (data loaders, thread pools)."""
    from concurrent.futures import ThreadPoolExecutor

    shape, window, step = (40, 36), (8, 8), (4, 4)
    plan = QuiltPlan(shape, window, step, 2, 0.5)
    w, nrm = plan.weight(), plan.norm()
    stitch(unstitch(torch.zeros(1, 1, *shape), window, step, backend=backend), shape, step,
           backend=backend)  # warm up (JIT, threading layer)
    if backend == "numba":
        import numba

        if numba.threading_layer() == "workqueue":
            pytest.skip("numba's workqueue threading layer aborts on concurrent calls")
    xs = [_rand((2, 2, *shape), torch.float32, seed=20 + i) for i in range(6)]

    def work(x):
        for _ in range(5):
            y = stitch(unstitch(x, window, step, weight=w, backend=backend), shape, step,
                       norm=nrm * nrm, backend=backend)  # weight on the way out this time
        ref = stitch(unstitch(x, window, step, backend="torch"), shape, step, weight=w,
                     norm=nrm * nrm, backend="torch")
        return float((y - ref).abs().max())

    with ThreadPoolExecutor(3) as ex:
        errs = list(ex.map(work, xs))
    assert max(errs) < 1e-5


@pytest.mark.slow
def test_numba_concurrent_calls_survive_the_workqueue_layer(tmp_path):
    if "numba" not in CPU_STITCH_BACKENDS:
        pytest.skip("numba not available")
    import subprocess
    import sys

    script = tmp_path / "threads.py"
    script.write_text(
        "import torch\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from qlty_gpu.ops import stitch, unstitch\n"
        "def work(seed):\n"
        "    x = torch.randn(2, 3, 96, 96)\n"
        "    for _ in range(30):\n"
        "        stitch(unstitch(x, (16, 16), (8, 8), backend='numba'), (96, 96), (8, 8),\n"
        "               backend='numba')\n"
        "    return 0\n"
        "work(0)\n"
        "with ThreadPoolExecutor(6) as ex:\n"
        "    list(ex.map(work, range(12)))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-500:]


@pytest.mark.parametrize("backend", STITCH_BACKENDS)
def test_inference_mode_and_no_grad(backend):
    shape, window, step = (20, 16), (8, 8), (4, 4)
    nrm = QuiltPlan(shape, window, step).norm()
    x = _rand((2, 1, *shape), torch.float32)
    with torch.inference_mode():
        y = stitch(unstitch(x, window, step, backend=backend), shape, step, norm=nrm,
                   backend=backend)
    assert y.is_inference()
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        y = stitch(unstitch(xg, window, step, backend=backend), shape, step, backend=backend)
    assert not y.requires_grad


# ------------------------------------------------------------------ capability table
_ENUM_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.bool,
                torch.complex64, torch.float8_e4m3fn]
_ENUM_GEOM = {1: ((7,), (3,), (2,)), 2: ((5, 4), (3, 2), (2, 3)), 3: ((3, 4, 5), (2, 3, 2),
                                                                     (1, 2, 3))}


def _enum_input(op, dtype, nd):
    shape, window, step = _ENUM_GEOM[nd]
    if op == "unstitch":
        base = torch.randint(0, 3, (1, 2, *shape)).double()
    else:
        base = torch.randint(0, 3, (_n_patches(shape, window, step), 2, *window)).double()
    return base.to(dtype), shape, window, step


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("dtype", _ENUM_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["unstitch", "stitch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_capability_table_is_what_runs(backend, op, dtype, nd, monkeypatch):
    """Issue 9.1: what ``why_not`` accepts runs on that backend's launcher (instrumented),
    and agrees with the oracle; what it rejects raises QltyBackendError when forced."""
    from qlty_gpu.ops.quilt import IMPLEMENTATIONS

    if backend == "triton" and "triton" not in UNSTITCH_BACKENDS:
        pytest.skip("Triton cannot run here")
    x, shape, window, step = _enum_input(op, dtype, nd)
    ran = []
    for name, impl in IMPLEMENTATIONS.items():
        real = getattr(impl, f"launch_{op}")

        def spy(*a, _name=name, _real=real, **k):
            ran.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(impl, f"launch_{op}", spy)

    def run():
        if op == "unstitch":
            return unstitch(x, window, step, backend=backend)
        return stitch(x, shape, step, backend=backend)

    reason = why_not(backend, op, CPU, dtype, nd)
    if reason is not None:
        with pytest.raises(QltyBackendError, match=backend):
            run()
        assert not ran
        return
    got = run()
    assert ran == [backend]
    plain = x.to(torch.float64) if dtype != torch.bool else x.double()
    if op == "unstitch":
        assert got.dtype == dtype
        assert torch.equal(got.to(torch.float64), oracle_unstitch(plain, window, step))
    else:
        want, _ = oracle_stitch(plain, shape, step, normalise=False)
        torch.testing.assert_close(got.to(torch.float64), want, rtol=0.07, atol=0.07)


def test_capability_table_rejects_more_than_three_dims():
    for b in BACKENDS:
        for op in ("unstitch", "stitch"):
            assert "1 to 3 spatial dims" in why_not(b, op, CPU, torch.float32, 4)
