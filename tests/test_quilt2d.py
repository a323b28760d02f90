"""NCYXQuilt: qlty 1.5.0's 2-D in-memory quilt, with its bugs fixed (spec §1.2, §2.1-2.3)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu import NCYXQuilt, QltyError
from qlty_gpu.errors import QltyShapeAssertionError
from qlty_gpu.ops import available_backends

BACKENDS = [b for b in available_backends("stitch") if b != "triton"]


def _starts(d, w, s):
    return oracle.starts(d, w, s)


def oracle_unstitch(x, q):
    return oracle.unstitch(x, q.window, q.step)


def oracle_stitch(p, q):
    """float64 loop of qlty's formula: sum(P * W) / norma, norma = sum of W (image 0)."""
    w = oracle.weight_map(q.window, q.border, q.border_weight)
    return oracle.stitch(p, (q.Y, q.X), q.step, w)


# ------------------------------------------------------------------ construction
def test_constructor_attributes_and_defaults():
    q = NCYXQuilt(Y=40, X=30, window=(16, 12), step=(8, 6), border=(2, 3))
    assert (q.Y, q.X) == (40, 30)
    assert q.window == (16, 12) and q.step == (8, 6) and q.border == (2, 3)
    assert q.border_weight == 1.0  # qlty's 2-D default (its docstring says 0.1)
    assert (q.nY, q.nX) == q.get_times() == (4, 4)
    assert q.weight.dtype == torch.float32 and q.weight.device.type == "cpu"
    assert tuple(q.weight.shape) == (16, 12)
    bt = q.border_tensor()
    assert bt.dtype == torch.float32 and tuple(bt.shape) == (16, 12)
    assert float(bt.sum()) == (16 - 4) * (12 - 6)
    assert float(bt[2:-2, 3:-3].min()) == 1 and float(bt[:2].max()) == 0
    q = NCYXQuilt(40, 30, [16, 12], [8, 6], 2, 0.0)  # lists accepted, int border broadcast
    assert q.border == (2, 2) and q.border_weight == 1e-8
    assert q.window == (16, 12)
    q = NCYXQuilt(40, 30, (16, 12), (8, 6), None)
    assert q.border is None and bool((q.weight == 1).all()) and bool((q.border_tensor() == 1).all())
    assert NCYXQuilt(40, 30, (16, 12), (8, 6), 0).border is None
    assert NCYXQuilt(40, 30, (16, 12), (8, 6), (0, 0)).border is None
    assert "NCYXQuilt" in repr(q)


def test_border_tensor_is_a_fresh_copy():
    q = NCYXQuilt(10, 10, (4, 4), (2, 2), 1)
    bt = q.border_tensor()
    bt.fill_(7)
    assert float(q.border_tensor().max()) == 1


def test_weight_values():
    q = NCYXQuilt(20, 20, (6, 8), (3, 4), (1, 2), 0.25)
    w = q.weight
    assert float(w[0, 0]) == 0.25 and float(w[1, 2]) == 1.0 and float(w[5, 7]) == 0.25
    assert float(w[1:5, 2:6].min()) == 1.0
    assert float((w < 1).sum()) == 6 * 8 - 4 * 4


# ------------------------------------------------------------------ unstitch
GEOMS = [
    (37, 29, (8, 6), (5, 4), (1, 2), 0.3),
    (16, 16, (8, 4), (4, 4), None, 1.0),
    (20, 11, (20, 11), (3, 5), 2, 0.1),  # window == image
    (23, 17, (5, 3), (7, 4), 1, 0.5),  # step > window: gaps
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_unstitch_matches_oracle_and_positions(geom, backend):
    Y, X, w, s, b, bw = geom
    q = NCYXQuilt(Y, X, w, s, b, bw)
    x = torch.randn(3, 2, Y, X)
    ref, pos = oracle_unstitch(x, q)
    got = q.unstitch(x, backend=backend)
    assert torch.equal(got, ref)
    assert got.shape[0] == 3 * q.nY * q.nX
    p, positions = q.unstitch(x, return_positions=True)
    assert torch.equal(p, ref)
    assert positions.dtype == torch.int64 and torch.equal(positions, pos[:, 1:])
    _, positions = q.unstitch(x, return_positions=True, include_n_position=True)
    assert torch.equal(positions, pos)


def test_unstitch_keeps_dtype_and_autograd():
    q = NCYXQuilt(12, 10, (4, 4), (3, 3), 1, 0.5)
    for dt in (torch.float16, torch.bfloat16, torch.float64, torch.int16, torch.uint8):
        x = (torch.rand(2, 1, 12, 10) * 50).to(dt)
        assert q.unstitch(x).dtype == dt
    x = torch.randn(1, 1, 12, 10, requires_grad=True)
    p = q.unstitch(x)
    assert p.requires_grad
    p.sum().backward()
    cover = torch.zeros(12, 10)
    for y0, x0 in itertools.product(_starts(12, 4, 3), _starts(10, 4, 3)):
        cover[y0:y0 + 4, x0:x0 + 4] += 1
    assert torch.equal(x.grad[0, 0], cover)


def test_unstitch_numpy_in_numpy_out():
    q = NCYXQuilt(9, 9, (3, 3), (3, 3), None)
    x = np.arange(2 * 9 * 9, dtype=np.float32).reshape(1, 2, 9, 9)
    p = q.unstitch(x)
    assert isinstance(p, np.ndarray) and p.shape == (9, 2, 3, 3)
    np.testing.assert_array_equal(p[4], x[0, :, 3:6, 3:6])


def _pos_channels(q, mode, normalize, n_img):
    wy, wx = q.window
    u = torch.arange(wy, dtype=torch.float64).view(1, wy, 1).expand(1, wy, wx)
    v = torch.arange(wx, dtype=torch.float64).view(1, 1, wx).expand(1, wy, wx)
    rows = []
    for y0, x0 in itertools.product(_starts(q.Y, wy, q.step[0]), _starts(q.X, wx, q.step[1])):
        if mode == "absolute":
            cy, cx = y0 + u, x0 + v
            if normalize:
                cy, cx = cy / q.Y, cx / q.X
        else:
            cy, cx = u.clone(), v.clone()
            if normalize:
                cy = cy / (wy - 1) if wy > 1 else cy * 0
                cx = cx / (wx - 1) if wx > 1 else cx * 0
        rows.append(torch.cat([cy, cx]))
    return torch.stack(rows).repeat(n_img, 1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("normalize", [True, False])
def test_positional_channels(mode, normalize, backend):
    """Absolute mode works (it crashes in qlty 1.5.0, spec §2.3)."""
    q = NCYXQuilt(19, 14, (5, 4), (4, 3), 1, 0.2)
    x = torch.randn(2, 3, 19, 14)
    p = q.unstitch(x, add_positional_channels=True, normalize_positions=normalize,
                   position_mode=mode, backend=backend)
    assert p.shape == (2 * q.nY * q.nX, 5, 5, 4) and p.dtype == torch.float32
    assert torch.equal(p[:, :3], oracle_unstitch(x, q)[0])
    torch.testing.assert_close(p[:, 3:].double(), _pos_channels(q, mode, normalize, 2),
                               rtol=0, atol=1e-6)
    if mode == "absolute" and normalize:
        assert float(p[:, 3].max()) == pytest.approx((19 - 1) / 19)
        assert float(p[:, 4].max()) == pytest.approx((14 - 1) / 14)
    if mode == "relative" and normalize:
        assert float(p[:, 3:].min()) == 0 and float(p[:, 3:].max()) == 1


def test_positional_channels_window_of_one_relative_is_zero():
    q = NCYXQuilt(5, 6, (1, 3), (1, 1), None)
    p = q.unstitch(torch.randn(1, 1, 5, 6), add_positional_channels=True,
                   position_mode="relative")
    assert float(p[:, 1].abs().max()) == 0
    torch.testing.assert_close(p[0, 2, 0], torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize(
    "dtype, normalize, expect",
    [
        (torch.float32, True, torch.float32),
        (torch.float64, True, torch.float64),
        (torch.float16, True, torch.float32),
        (torch.bfloat16, True, torch.float32),
        (torch.int64, True, torch.float32),
        (torch.int64, False, torch.int64),
        (torch.float16, False, torch.float32),  # issue 8.6: exact coordinates past 2048
        (torch.bfloat16, False, torch.float32),
        (torch.float64, False, torch.float64),
    ],
    ids=str,
)
def test_positional_channel_dtype_promotion(dtype, normalize, expect):
    """qlty: normalised coordinates are float32 and promote the data; raw ones keep its dtype
    (except half types: float32, so coordinates stay exact; qlty kept fp16/bf16)."""
    q = NCYXQuilt(10, 10, (4, 4), (3, 3), None)
    x = (torch.rand(1, 2, 10, 10) * 9).to(dtype)
    p = q.unstitch(x, add_positional_channels=True, normalize_positions=normalize)
    assert p.dtype == expect
    assert torch.equal(p[:, :2], oracle_unstitch(x, q)[0].to(expect))
    if not normalize:  # absolute, unnormalised: exact integer coordinates
        assert p[:, 2].max().item() == 9 and p[:, 3].max().item() == 9


def test_position_mode_is_validated():
    q = NCYXQuilt(10, 10, (4, 4), (3, 3), None)
    with pytest.raises(QltyError, match=r"position_mode.*'bogus'"):
        q.unstitch(torch.randn(1, 1, 10, 10), add_positional_channels=True, position_mode="bogus")


def test_positional_channels_gradient_flows_to_data_only():
    q = NCYXQuilt(10, 9, (4, 4), (3, 2), 1, 0.5)
    x = torch.randn(1, 2, 10, 9, requires_grad=True)
    p = q.unstitch(x, add_positional_channels=True)
    p.sum().backward()
    ref = torch.zeros(1, 2, 10, 9, requires_grad=True)
    q.unstitch(ref).sum().backward()
    assert torch.equal(x.grad, ref.grad)


# ------------------------------------------------------------------ unstitch_data_pair
def test_data_pair_basic_and_3d_target():
    q = NCYXQuilt(21, 18, (6, 5), (4, 4), (1, 1), 0.1)
    x = torch.randn(2, 3, 21, 18)
    t4 = torch.randint(0, 5, (2, 2, 21, 18))
    pin, pout = q.unstitch_data_pair(x, t4)
    assert torch.equal(pin, oracle_unstitch(x, q)[0])
    assert torch.equal(pout, oracle_unstitch(t4, q)[0]) and pout.dtype == torch.int64
    t3 = torch.randint(0, 5, (2, 21, 18))
    pin, pout = q.unstitch_data_pair(x, t3)
    assert pout.shape == (pin.shape[0], 6, 5)
    assert torch.equal(pout, oracle_unstitch(t3[:, None], q)[0][:, 0])


def test_data_pair_missing_label_masks_border_only():
    q = NCYXQuilt(16, 16, (8, 8), (4, 4), (2, 1), 0.1)
    x = torch.randn(2, 1, 16, 16)
    t = torch.full((2, 2, 16, 16), 7, dtype=torch.int64)
    _, pout = q.unstitch_data_pair(x, t, missing_label=-1.7)  # cast: -1.7 -> -1 in int64
    border = q.border_tensor() < 0.5
    assert pout.dtype == torch.int64
    assert bool((pout[:, :, border] == -1).all())  # every channel
    assert bool((pout[:, :, ~border] == 7).all())
    t = torch.ones(2, 16, 16)
    _, pout = q.unstitch_data_pair(x, t, missing_label=float("nan"))
    assert bool(torch.isnan(pout[:, border]).all()) and bool((pout[:, ~border] == 1).all())
    # no border: nothing masked
    q0 = NCYXQuilt(16, 16, (8, 8), (4, 4), None)
    _, pout = q0.unstitch_data_pair(x, t, missing_label=-1)
    assert bool((pout == 1).all())
    # the input itself is never modified
    assert bool((t == 1).all())


def test_data_pair_positions_apply_to_inputs():
    q = NCYXQuilt(12, 12, (6, 6), (3, 3), 1, 0.5)
    x = torch.randn(2, 2, 12, 12)
    t = torch.randn(2, 12, 12)
    pin, pout, pos = q.unstitch_data_pair(
        x, t, missing_label=0.0, return_positions=True, include_n_position=True,
        add_positional_channels=True, position_mode="relative",
    )
    assert pin.shape == (2 * 9, 4, 6, 6) and pout.shape == (2 * 9, 6, 6)
    assert torch.equal(pos, oracle_unstitch(x, q)[1])
    ref_in, ref_pos = q.unstitch(x, return_positions=True, include_n_position=True,
                                 add_positional_channels=True, position_mode="relative")
    assert torch.equal(pin, ref_in) and torch.equal(pos, ref_pos)


# ------------------------------------------------------------------ stitch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geom", GEOMS)
def test_stitch_matches_float64_oracle(geom, backend):
    Y, X, w, s, b, bw = geom
    q = NCYXQuilt(Y, X, w, s, b, bw)
    p = torch.randn(2 * q.nY * q.nX, 3, *w)
    res, norma = q.stitch(p, backend=backend)
    ref, ref_norma = oracle_stitch(p, q)
    assert res.shape == (2, 3, Y, X) and res.dtype == torch.float32
    assert norma.shape == (Y, X) and norma.dtype == torch.float32
    torch.testing.assert_close(norma.double(), ref_norma, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    gaps = ref_norma == 0
    assert bool(torch.isnan(res[:, :, gaps]).all())  # step > window: NaN, no eps
    assert not bool(torch.isnan(res[:, :, ~gaps]).any())


def test_norma_is_sum_of_weights():
    q = NCYXQuilt(16, 16, (8, 8), (4, 4), 2, 0.25)
    _, norma = q.stitch(torch.zeros(9, 1, 8, 8))
    assert set(np.round(norma.unique().numpy(), 6).tolist()) == {0.25, 0.5, 1.0, 1.25, 1.75}


@pytest.mark.parametrize("run", range(5))
def test_colour_race_geometry_is_exact(run):
    """qlty's parallel colour stitch races here (spec §2.2 [BUG]); ours is exact every run."""
    q = NCYXQuilt(67, 67, (32, 32), (16, 16), None)
    p = torch.randn(2 * q.nY * q.nX, 8, 32, 32, generator=torch.Generator().manual_seed(run))
    ref, ref_norma = oracle_stitch(p, q)
    for use_numba in (True, False):
        res, norma = q.stitch(p, use_numba=use_numba)
        torch.testing.assert_close(res.double(), ref, rtol=0, atol=2e-6)
        assert torch.equal(norma.double(), ref_norma)


def test_use_numba_is_accepted_and_ignored():
    q = NCYXQuilt(30, 25, (8, 8), (5, 6), 2, 0.3)
    p = torch.randn(q.nY * q.nX, 2, 8, 8)
    a, na = q.stitch(p)
    b, nb = q.stitch(p, use_numba=False)
    c, nc = q.stitch(p, True)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(na, nb)


@st.composite
def quilts(draw):
    Y, X = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    wy, wx = draw(st.integers(1, Y)), draw(st.integers(1, X))
    sy, sx = draw(st.integers(1, wy)), draw(st.integers(1, wx))  # no gaps
    border = draw(st.one_of(st.none(), st.integers(0, 4),
                            st.tuples(st.integers(0, 4), st.integers(0, 4))))
    bw = draw(st.floats(0.0, 1.0))
    return NCYXQuilt(Y, X, (wy, wx), (sy, sx), border, bw)


@settings(max_examples=40, deadline=None)
@given(quilts(), st.integers(1, 2), st.integers(1, 3))
def test_round_trip_identity(q, n, c):
    x = torch.randn(n, c, q.Y, q.X)
    p = q.unstitch(x)
    assert p.shape[0] == n * math.prod(
        math.ceil((d - w) / s) + 1 for d, w, s in zip((q.Y, q.X), q.window, q.step)
    )
    assert p.shape[0] == n * q.nY * q.nX
    res, norma = q.stitch(p)
    assert float(norma.min()) > 0  # every pixel covered
    torch.testing.assert_close(res, x, rtol=1e-5, atol=1e-5)
    r64, _ = q.stitch(q.unstitch(x.double()))
    assert r64.dtype == torch.float64
    torch.testing.assert_close(r64, x.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, out",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
     (torch.float64, torch.float64), (torch.float32, torch.float32),
     (torch.int32, torch.float32), (torch.int64, torch.float32), (torch.uint8, torch.float32)],
    ids=str,
)
def test_stitch_dtypes(dtype, out):
    q = NCYXQuilt(13, 12, (5, 4), (3, 3), 1, 0.3)
    x = (torch.rand(2, 2, 13, 12) * 10).to(dtype)
    res, norma = q.stitch(q.unstitch(x))
    assert res.dtype == out
    assert norma.dtype in (torch.float32, torch.float64)
    assert norma.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(res.double(), x.double(), rtol=tol, atol=tol)


def test_stitch_half_accumulates_in_float32():
    q = NCYXQuilt(21, 19, (8, 8), (2, 3), 2, 0.3)
    p = (torch.randn(q.nY * q.nX, 2, 8, 8) * 100 + 1000).half()
    res, _ = q.stitch(p)
    ref, _ = q.stitch(p.float())
    assert torch.equal(res, ref.half())


def test_stitch_keeps_autograd():
    q = NCYXQuilt(15, 14, (6, 5), (3, 4), (1, 1), 0.2)
    p = torch.randn(q.nY * q.nX, 2, 6, 5, requires_grad=True)
    for use_numba in (True, False):
        res, norma = q.stitch(p, use_numba=use_numba)
        assert res.requires_grad and not norma.requires_grad
        (g,) = torch.autograd.grad((res * 3).sum(), p)
        ref = torch.zeros_like(p)
        # d result / d patch = W / norma at the patch's pixels
        w = q.weight
        for i, (y0, x0) in enumerate(
            itertools.product(_starts(15, 6, 3), _starts(14, 5, 4))
        ):
            ref[i] = 3 * w / norma[y0:y0 + 6, x0:x0 + 5]
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_stitch_output_on_input_device_meta():
    """A meta tensor stands in for CUDA: result and norma follow the input's device."""
    q = NCYXQuilt(13, 12, (5, 4), (3, 3), 1, 0.3)
    p = torch.empty(2 * q.nY * q.nX, 2, 5, 4, device="meta")
    res, norma = q.stitch(p)
    assert res.device.type == "meta" and norma.device.type == "meta"
    assert res.shape == (2, 2, 13, 12) and norma.shape == (13, 12)
    out = q.unstitch(torch.empty(2, 2, 13, 12, device="meta"))
    assert out.device.type == "meta" and out.shape == p.shape


def test_stitch_compiles_fullgraph():
    q = NCYXQuilt(13, 11, (5, 4), (3, 3), 1, 0.3)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def f(x):
        return q.stitch(conv(q.unstitch(x)))[0]

    torch._dynamo.reset()
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------ shape checks
def test_inputs_must_match_the_quilt_shape():
    q = NCYXQuilt(20, 16, (8, 8), (4, 4), None)
    with pytest.raises(QltyError, match=r"\(N, C, Y, X\) with Y=20, X=16.*\(2, 1, 20, 17\)"):
        q.unstitch(torch.zeros(2, 1, 20, 17))
    with pytest.raises(QltyError, match=r"Y=20, X=16.*\(1, 1, 21, 16\)"):
        q.unstitch(torch.zeros(1, 1, 21, 16))  # larger inputs are no longer silently cropped
    with pytest.raises(QltyError, match=r"\(N, C, Y, X\)"):
        q.unstitch(torch.zeros(20, 16))
    with pytest.raises(QltyError, match=r"\(M, C, wy, wx\) = \(M, C, 8, 8\)"):
        q.stitch(torch.zeros(4, 1, 8, 7))
    with pytest.raises(QltyShapeAssertionError, match=r"7 patches.*12 patches per image") as e:
        q.stitch(torch.zeros(7, 1, 8, 8))
    assert isinstance(e.value, AssertionError) and isinstance(e.value, QltyError)
    with pytest.raises(QltyError, match="tensor_out"):
        q.unstitch_data_pair(torch.zeros(1, 1, 20, 16), torch.zeros(1, 1, 20, 15))
    with pytest.raises(AssertionError, match="same number of images"):
        q.unstitch_data_pair(torch.zeros(2, 1, 20, 16), torch.zeros(1, 20, 16))


def test_compile_dynamic_batch_with_positions():
    q = NCYXQuilt(13, 11, (5, 4), (3, 3), 1, 0.3)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def f(x):
        p, pos = q.unstitch(x, return_positions=True, add_positional_channels=True)
        return q.stitch(conv(p[:, :3]))[0], pos

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for n in (2, 3):
            x = torch.randn(n, 3, 13, 11)
            (a, pa), (b, pb) = cf(x), f(x)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(pa, pb)


def test_double_backward_through_quilt():
    q = NCYXQuilt(9, 8, (4, 3), (2, 2), 1, 0.4)
    x = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: q.stitch(q.unstitch(t) ** 2)[0], (x,),
                                        fast_mode=True)


@pytest.mark.slow
def test_forked_dataloader_workers_can_unstitch(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "loader.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from qlty_gpu import NCYXQuilt\n"
        "q = NCYXQuilt(32, 32, (16, 16), (8, 8), 2, 0.5)\n"
        "imgs = torch.randn(4, 3, 32, 32)\n"
        "labels = torch.randint(0, 3, (4, 32, 32))\n"
        "q.stitch(q.unstitch(imgs[:1]))  # e.g. a sanity check in the main process first\n"
        "class DS(Dataset):\n"
        "    def __len__(self):\n"
        "        return 4\n"
        "    def __getitem__(self, i):\n"
        "        return q.unstitch_data_pair(imgs[i:i + 1], labels[i:i + 1], missing_label=-1)\n"
        "dl = DataLoader(DS(), batch_size=2, num_workers=2, multiprocessing_context='fork')\n"
        "print('ok', sum(a.shape[0] for a, _ in dl))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=240)
    assert proc.returncode == 0 and "ok 4" in proc.stdout, proc.stderr[-800:]


def test_quilts_pickle_and_deepcopy():
    """Datasets holding a quilt are pickled by spawn-based DataLoader workers."""
    import copy
    import pickle

    from qlty_gpu import NCZYXQuilt

    for q, x in ((NCYXQuilt(20, 16, (8, 8), (4, 4), 1, 0.3), torch.randn(2, 1, 20, 16)),
                 (NCZYXQuilt(8, 9, 7, (4, 4, 4), (2, 3, 2), 1), torch.randn(1, 2, 8, 9, 7))):
        ref, ref_n = q.stitch(q.unstitch(x))
        for other in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
            assert other.plan == q.plan and other.get_times() == q.get_times()
            assert torch.equal(other.weight, q.weight)
            res, n = other.stitch(other.unstitch(x))
            assert torch.equal(res, ref) and torch.equal(n, ref_n)
