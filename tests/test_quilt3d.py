"""NCZYXQuilt: the 3-D quilt, against a naive loop oracle on any shape.

qlty 1.5.0 does not clamp in 3-D (spec §2.4 [BUG]) and has no position options or
``missing_label``; ours clamps like 2-D and has the same options as ``NCYXQuilt``.
"""

from __future__ import annotations

import math

import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu import NCZYXQuilt, QltyError
from qlty_gpu.errors import QltyShapeAssertionError
from qlty_gpu.ops import available_backends

BACKENDS = [b for b in available_backends("stitch") if b != "triton"]


def _starts(d, w, s):
    return oracle.starts(d, w, s)


def _grid(q):
    return oracle.origins((q.Z, q.Y, q.X), q.window, q.step)


def _sl(o, w):
    return oracle.window_slices(o, w)


def oracle_unstitch(x, q):
    return oracle.unstitch(x, q.window, q.step)


def _weight64(q):
    return oracle.weight_map(q.window, q.border, q.border_weight)


def oracle_stitch(p, q):
    return oracle.stitch(p, (q.Z, q.Y, q.X), q.step, _weight64(q))


def test_constructor_attributes_and_defaults():
    q = NCZYXQuilt(Z=20, Y=18, X=17, window=(8, 6, 5), step=(4, 4, 3), border=(1, 2, 0))
    assert (q.Z, q.Y, q.X) == (20, 18, 17)
    assert q.window == (8, 6, 5) and q.step == (4, 4, 3) and q.border == (1, 2, 0)
    assert q.border_weight == 0.1  # qlty's 3-D default
    assert (q.nZ, q.nY, q.nX) == q.get_times() == (4, 4, 5)
    assert q.weight.dtype == torch.float32 and q.weight.device.type == "cpu"
    assert torch.equal(q.weight, _weight64(q).float())
    bt = q.border_tensor()
    assert bt.dtype == torch.float32 and tuple(bt.shape) == (8, 6, 5)
    assert float(bt.sum()) == 6 * 2 * 5
    q = NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), 1, 0.0)
    assert q.border == (1, 1, 1) and q.border_weight == 1e-8
    assert NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), None).border is None
    assert NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), (0, 0, 0)).border is None


GEOMS = [
    (9, 10, 11, (4, 5, 6), (3, 3, 4), (1, 1, 1), 0.1),  # non-dividing: qlty 1.5.0 crashes
    (8, 8, 8, (4, 4, 4), (2, 2, 2), None, 0.1),  # dividing
    (7, 5, 6, (7, 2, 3), (2, 3, 1), 1, 0.5),  # window == Z
    (9, 7, 8, (2, 3, 3), (4, 2, 3), (0, 1, 1), 0.3),  # gaps along z
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_unstitch_clamps_and_matches_oracle(geom, backend):
    Z, Y, X, w, s, b, bw = geom
    q = NCZYXQuilt(Z, Y, X, w, s, b, bw)
    x = torch.randn(2, 3, Z, Y, X)
    ref, pos = oracle_unstitch(x, q)
    got = q.unstitch(x, backend=backend)
    assert torch.equal(got, ref)
    assert got.shape[0] == 2 * q.nZ * q.nY * q.nX
    p, positions = q.unstitch(x, return_positions=True)
    assert torch.equal(p, ref) and positions.dtype == torch.int64
    assert torch.equal(positions, pos[:, 1:])
    _, positions = q.unstitch(x, return_positions=True, include_n_position=True)
    assert torch.equal(positions, pos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_stitch_matches_float64_oracle(geom, backend):
    Z, Y, X, w, s, b, bw = geom
    q = NCZYXQuilt(Z, Y, X, w, s, b, bw)
    p = torch.randn(2 * q.nZ * q.nY * q.nX, 2, *w)
    res, norma = q.stitch(p, backend=backend)
    ref, ref_norma = oracle_stitch(p, q)
    assert res.shape == (2, 2, Z, Y, X) and res.dtype == torch.float32
    assert norma.shape == (Z, Y, X) and norma.dtype == torch.float32
    torch.testing.assert_close(norma.double(), ref_norma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    gaps = ref_norma == 0
    assert bool(torch.isnan(res[:, :, gaps]).all())


def test_stitch_accepts_use_numba_keyword():
    q = NCZYXQuilt(6, 6, 6, (4, 4, 4), (2, 2, 2), 1)
    p = torch.randn(8, 1, 4, 4, 4)
    a, _ = q.stitch(p)
    b, _ = q.stitch(p, use_numba=False)
    assert torch.equal(a, b)


@st.composite
def quilts(draw):
    shape = [draw(st.integers(1, 10)) for _ in range(3)]
    window = [draw(st.integers(1, d)) for d in shape]
    step = [draw(st.integers(1, w)) for w in window]
    border = draw(st.one_of(st.none(), st.integers(0, 3),
                            st.tuples(*[st.integers(0, 3)] * 3)))
    bw = draw(st.floats(0.0, 1.0))
    return NCZYXQuilt(*shape, tuple(window), tuple(step), border, bw)


@settings(max_examples=30, deadline=None)
@given(quilts(), st.integers(1, 2))
def test_round_trip_identity_and_count(q, n):
    x = torch.randn(n, 2, q.Z, q.Y, q.X)
    p = q.unstitch(x)
    counts = [math.ceil((d - w) / s) + 1 for d, w, s in zip((q.Z, q.Y, q.X), q.window, q.step)]
    assert (q.nZ, q.nY, q.nX) == tuple(counts)
    assert p.shape == (n * math.prod(counts), 2, *q.window)
    res, norma = q.stitch(p)
    assert float(norma.min()) > 0
    torch.testing.assert_close(res, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("normalize", [True, False])
def test_positional_channels_3d(mode, normalize):
    q = NCZYXQuilt(7, 8, 9, (3, 4, 5), (2, 3, 2), 1)
    x = torch.randn(2, 1, 7, 8, 9)
    p = q.unstitch(x, add_positional_channels=True, normalize_positions=normalize,
                   position_mode=mode)
    assert p.shape == (2 * q.nZ * q.nY * q.nX, 4, 3, 4, 5)
    assert torch.equal(p[:, :1], oracle_unstitch(x, q)[0])
    grid = _grid(q) * 2
    for i in (0, len(grid) // 2 + 3, len(grid) - 1):
        o = grid[i]
        for ax, (size, w) in enumerate(zip((7, 8, 9), q.window)):
            u = torch.arange(w, dtype=torch.float64)
            if mode == "absolute":
                expect = (o[ax] + u) / (size if normalize else 1)
            else:
                expect = u / ((w - 1) if normalize else 1)
            shape = [1, 1, 1]
            shape[ax] = w
            torch.testing.assert_close(
                p[i, 1 + ax].double(), expect.view(shape).expand(q.window), rtol=0, atol=1e-6
            )
    with pytest.raises(QltyError, match="position_mode"):
        q.unstitch(x, add_positional_channels=True, position_mode="typo")


def test_data_pair_3d_missing_label_and_4d_target():
    q = NCZYXQuilt(8, 9, 10, (4, 4, 4), (2, 3, 3), (1, 1, 1))
    x = torch.randn(2, 2, 8, 9, 10)
    t = torch.full((2, 8, 9, 10), 3, dtype=torch.int32)
    pin, pout = q.unstitch_data_pair(x, t)
    assert pout.shape == (pin.shape[0], 4, 4, 4) and pout.dtype == torch.int32
    assert torch.equal(pin, oracle_unstitch(x, q)[0])
    pin, pout, pos = q.unstitch_data_pair(x, t, missing_label=-2.9, return_positions=True)
    border = q.border_tensor() < 0.5
    assert bool((pout[:, border] == -2).all()) and bool((pout[:, ~border] == 3).all())
    assert pos.shape == (pin.shape[0], 3)
    t5 = torch.ones(2, 2, 8, 9, 10)
    _, pout = q.unstitch_data_pair(x, t5, missing_label=0.5)
    assert pout.shape == (pin.shape[0], 2, 4, 4, 4)
    assert bool((pout[:, :, border] == 0.5).all())
    q0 = NCZYXQuilt(8, 9, 10, (4, 4, 4), (2, 3, 3), None)
    _, pout = q0.unstitch_data_pair(x, t5, missing_label=0.5)
    assert bool((pout == 1).all())


@pytest.mark.parametrize(
    "dtype, out",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
     (torch.float64, torch.float64), (torch.int32, torch.float32)],
    ids=str,
)
def test_stitch_dtypes_3d(dtype, out):
    q = NCZYXQuilt(7, 6, 5, (3, 3, 3), (2, 2, 2), 1)
    x = (torch.rand(1, 2, 7, 6, 5) * 10).to(dtype)
    res, _ = q.stitch(q.unstitch(x))
    assert res.dtype == out
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(res.double(), x.double(), rtol=tol, atol=tol)


def test_autograd_3d():
    q = NCZYXQuilt(6, 5, 7, (3, 3, 3), (2, 1, 2), 1, 0.3)
    x = torch.randn(1, 1, 6, 5, 7, dtype=torch.float64, requires_grad=True)

    def f(t):
        return q.stitch(q.unstitch(t) * 2)[0]

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    res = f(x)
    (g,) = torch.autograd.grad(res.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))  # weights cancel: d/dx = 2


def test_inputs_must_match_the_quilt_shape_3d():
    q = NCZYXQuilt(8, 9, 10, (4, 4, 4), (2, 3, 3), 1)
    with pytest.raises(QltyError, match=r"\(N, C, Z, Y, X\) with Z=8, Y=9, X=10.*\(1, 1, 8, 9, 11\)"):
        q.unstitch(torch.zeros(1, 1, 8, 9, 11))
    with pytest.raises(QltyError, match=r"\(N, C, Z, Y, X\)"):
        q.unstitch(torch.zeros(1, 8, 9, 10))
    with pytest.raises(QltyError, match=r"\(M, C, wz, wy, wx\) = \(M, C, 4, 4, 4\)"):
        q.stitch(torch.zeros(3, 1, 4, 4))
    n_p = q.nZ * q.nY * q.nX
    with pytest.raises(QltyShapeAssertionError, match=rf"{n_p + 1} patches.*{n_p} patches") as e:
        q.stitch(torch.zeros(n_p + 1, 1, 4, 4, 4))
    assert isinstance(e.value, AssertionError)
    with pytest.raises(AssertionError, match="same number of images"):
        q.unstitch_data_pair(torch.zeros(2, 1, 8, 9, 10), torch.zeros(3, 8, 9, 10))


def test_compile_fullgraph_3d():
    q = NCZYXQuilt(7, 8, 9, (3, 4, 5), (2, 3, 2), 1)
    conv = torch.nn.Conv3d(2, 2, 3, padding=1)

    def f(v):
        return q.stitch(conv(q.unstitch(v)))[0]

    torch._dynamo.reset()
    v = torch.randn(1, 2, 7, 8, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(v), f(v),
                                   rtol=1e-5, atol=1e-5)
