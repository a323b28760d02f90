"""Differential tests against qlty 1.5.0 (the ``test`` extra), and qlty's pinned behaviours.

2-D: random non-dividing geometries on qlty's exact serial path (``use_numba=False``; its
default parallel path races, spec §2.2). 3-D: qlty only works on dividing geometries (it does
not clamp, spec §2.4), so it is compared there; other shapes are covered by the loop oracle
in ``test_quilt3d.py``. Where a spec [BUG] is fixed the test says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlty_gpu
import qlty_gpu.base as gbase
from qlty_gpu import NCYXQuilt, NCZYXQuilt, QltyError

qlty = pytest.importorskip("qlty", reason="qlty 1.5.0 is the reference (test extra)")
import qlty.base as qbase  # noqa: E402
import qlty.cleanup as qcleanup  # noqa: E402


def test_reference_version():
    assert qlty.__version__ == "1.5.0"


@st.composite
def geometry2d(draw, allow_gaps=False):
    Y, X = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    wy, wx = draw(st.integers(1, Y)), draw(st.integers(1, X))
    top_y, top_x = (2 * wy, 2 * wx) if allow_gaps else (wy, wx)
    sy, sx = draw(st.integers(1, top_y)), draw(st.integers(1, top_x))
    border = draw(st.one_of(st.none(), st.integers(0, 4),
                            st.tuples(st.integers(0, 4), st.integers(0, 4))))
    bw = draw(st.floats(0.0, 1.0))
    return Y, X, (wy, wx), (sy, sx), border, bw


def _pair2d(geom):
    Y, X, w, s, b, bw = geom
    return NCYXQuilt(Y, X, w, s, b, bw), qlty.NCYXQuilt(Y, X, w, s, b, bw)


def _same_attributes(ours, ref, axes):
    for a in axes:
        assert getattr(ours, a) == getattr(ref, a), a
        assert getattr(ours, f"n{a}") == getattr(ref, f"n{a}")
    assert tuple(ours.window) == tuple(ref.window)
    assert tuple(ours.step) == tuple(ref.step)
    assert ours.border == (None if ref.border is None else tuple(ref.border))
    assert ours.border_weight == ref.border_weight
    assert tuple(ours.get_times()) == tuple(ref.get_times())
    assert ours.weight.dtype == ref.weight.dtype == torch.float32
    assert torch.equal(ours.weight, ref.weight)
    assert ours.border_tensor().dtype == ref.border_tensor().dtype
    assert torch.equal(ours.border_tensor(), ref.border_tensor())


@settings(max_examples=40, deadline=None)
@given(geometry2d(allow_gaps=True), st.integers(1, 2), st.integers(1, 3))
def test_2d_matches_qlty_serial_path(geom, n, c):
    ours, ref = _pair2d(geom)
    _same_attributes(ours, ref, ("Y", "X"))
    x = torch.randn(n, c, ours.Y, ours.X)
    p_ours = ours.unstitch(x)
    p_ref = ref.unstitch(x)
    assert torch.equal(p_ours, p_ref)
    for kw in (dict(return_positions=True), dict(return_positions=True, include_n_position=True)):
        a, pa = ours.unstitch(x, **kw)
        b, pb = ref.unstitch(x, **kw)
        assert torch.equal(a, b) and pa.dtype == pb.dtype and torch.equal(pa, pb)
    patches = torch.randn_like(p_ref)
    r_ours, n_ours = ours.stitch(patches)
    r_ref, n_ref = ref.stitch(patches, use_numba=False)
    assert r_ours.dtype == r_ref.dtype and n_ours.dtype == n_ref.dtype
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_ours, r_ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(geometry2d(), st.booleans())
def test_2d_relative_positional_channels_match_qlty(geom, normalize):
    ours, ref = _pair2d(geom)
    x = torch.randn(2, 2, ours.Y, ours.X)
    a = ours.unstitch(x, add_positional_channels=True, position_mode="relative",
                      normalize_positions=normalize)
    b = ref.unstitch(x, add_positional_channels=True, position_mode="relative",
                     normalize_positions=normalize)
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_2d_absolute_positional_channels_fixed():
    """qlty 1.5.0 crashes in its default absolute mode (spec §2.3 [BUG]); ours works."""
    ours, ref = _pair2d((12, 10, (4, 4), (3, 3), 1, 0.5))
    x = torch.randn(1, 1, 12, 10)
    with pytest.raises(RuntimeError):
        ref.unstitch(x, add_positional_channels=True)
    p = ours.unstitch(x, add_positional_channels=True)
    assert p.shape == (ours.nY * ours.nX, 3, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64], ids=str)
@pytest.mark.parametrize("target_ndim", [3, 4])
@pytest.mark.parametrize("missing_label", [None, -1.7, 5])
def test_2d_unstitch_data_pair_matches_qlty(dtype, target_ndim, missing_label):
    ours, ref = _pair2d((23, 19, (8, 6), (5, 4), (2, 1), 0.3))
    x = torch.randn(2, 3, 23, 19)
    shape = (2, 23, 19) if target_ndim == 3 else (2, 2, 23, 19)
    t = torch.randint(0, 4, shape).to(dtype)
    a_in, a_out = ours.unstitch_data_pair(x, t, missing_label=missing_label)
    b_in, b_out = ref.unstitch_data_pair(x, t, missing_label=missing_label)
    assert torch.equal(a_in, b_in)
    assert a_out.dtype == b_out.dtype and torch.equal(a_out, b_out)
    a = ours.unstitch_data_pair(x, t, missing_label=missing_label, return_positions=True,
                                include_n_position=True)
    b = ref.unstitch_data_pair(x, t, missing_label=missing_label, return_positions=True,
                               include_n_position=True)
    assert len(a) == len(b) == 3
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_2d_stitch_dtype_differences_are_the_documented_fixes():
    """qlty's serial stitch forces float32 CPU; ours keeps float64 (spec §2.2)."""
    ours, ref = _pair2d((16, 16, (8, 8), (4, 4), 2, 0.1))
    p = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    r_ref, _ = ref.stitch(p, use_numba=False)
    r_ours, _ = ours.stitch(p)
    assert r_ref.dtype == torch.float32 and r_ours.dtype == torch.float64
    torch.testing.assert_close(r_ours.float(), r_ref, rtol=1e-6, atol=1e-6)


def test_2d_pinned_errors():
    with pytest.raises(ValueError, match="border tuple must have 2 elements"):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=(1, 1, 1))
    with pytest.raises(ValueError):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=1, border_weight=1.5)
    with pytest.raises(ValueError):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=1, border_weight=-0.5)
    q = NCYXQuilt(16, 16, (8, 8), (4, 4), border=1)
    with pytest.raises(AssertionError):  # qlty's test_edge_cases pins the bare AssertionError
        q.stitch(torch.randn(10, 1, 8, 8))
    with pytest.raises(AssertionError):
        q.stitch(torch.randn(10, 1, 8, 8), use_numba=False)
    # the same calls raise the same types in qlty itself
    with pytest.raises(ValueError, match="border tuple must have 2 elements"):
        qlty.NCYXQuilt(16, 16, (8, 8), (4, 4), border=(1, 1, 1))
    with pytest.raises(AssertionError):
        qlty.NCYXQuilt(16, 16, (8, 8), (4, 4), border=1).stitch(
            torch.randn(10, 1, 8, 8), use_numba=False
        )


def test_3d_pinned_errors():
    with pytest.raises(ValueError):
        NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), border=(1, 1))
    with pytest.raises(ValueError):
        NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), border=1, border_weight=2.0)
    with pytest.raises(AssertionError):
        NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), border=1).stitch(torch.zeros(5, 1, 4, 4, 4))


# ------------------------------------------------------------------ 3-D
GEOMS3 = [
    (8, 8, 8, (4, 4, 4), (2, 2, 2), (1, 1, 1), 0.1),
    (9, 12, 10, (3, 4, 4), (3, 4, 3), 1, 0.5),
    (6, 10, 7, (6, 2, 3), (1, 2, 2), None, 0.1),
    (10, 9, 8, (4, 3, 2), (2, 3, 2), (2, 0, 1), 0.0),
]


def _check_3d_against_qlty(geom):
    """Attributes, unstitch (exact) and stitch (result and norma) equal qlty's; returns the
    quilts and the input used."""
    Z, Y, X, w, s, b, bw = geom
    ours, ref = NCZYXQuilt(Z, Y, X, w, s, b, bw), qlty.NCZYXQuilt(Z, Y, X, w, s, b, bw)
    _same_attributes(ours, ref, ("Z", "Y", "X"))
    x = torch.randn(2, 2, Z, Y, X)
    p = ours.unstitch(x)
    assert torch.equal(p, ref.unstitch(x))
    patches = torch.randn_like(p)
    (r_ours, n_ours), (r_ref, n_ref) = ours.stitch(patches), ref.stitch(patches)
    assert r_ours.dtype == r_ref.dtype and n_ours.dtype == n_ref.dtype
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_ours, r_ref, rtol=1e-5, atol=1e-5)
    return ours, ref, x


@pytest.mark.parametrize("geom", GEOMS3)
def test_3d_matches_qlty_on_dividing_geometries(geom):
    Z, Y, X = geom[:3]
    ours, ref, x = _check_3d_against_qlty(geom)
    for t in (torch.randn(2, Z, Y, X), torch.randn(2, 3, Z, Y, X)):
        a = ours.unstitch_data_pair(x, t)
        b_ = ref.unstitch_data_pair(x, t)
        assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])


def test_3d_non_dividing_fixed():
    """qlty 1.5.0 fails on non-dividing 3-D sizes (spec §2.4 [BUG]); ours clamps."""
    geom = (9, 10, 11, (4, 5, 6), (3, 3, 4), 1, 0.1)
    Z, Y, X = geom[:3]
    x = torch.randn(1, 1, Z, Y, X)
    with pytest.raises(Exception):  # noqa: B017 - whatever qlty raises here
        qlty.NCZYXQuilt(*geom).unstitch(x)
    res, _ = NCZYXQuilt(*geom).stitch(NCZYXQuilt(*geom).unstitch(x))
    torch.testing.assert_close(res, x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ qlty.base helpers
@pytest.mark.parametrize(
    "border, nd",
    [(None, 2), (0, 2), (0, 3), (2, 2), (3, 3), ((1, 2), 2), ((0, 0), 2), ((1, 0, 2), 3),
     ((0, 0, 0), 3)],
)
def test_normalize_border_matches_qlty(border, nd):
    assert gbase.normalize_border(border, nd) == qbase.normalize_border(border, nd)


@pytest.mark.parametrize("bad, nd", [((1, 2, 3), 2), ((1, 2), 3)])
def test_normalize_border_length_error_matches_qlty(bad, nd):
    with pytest.raises(ValueError) as ref:
        qbase.normalize_border(bad, nd)
    with pytest.raises(ValueError) as ours:
        gbase.normalize_border(bad, nd)
    assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize("bad", [[1, 1], 1.5, "2"])
def test_normalize_border_type_error_matches_qlty(bad):
    with pytest.raises(TypeError):
        qbase.normalize_border(bad, 2)
    with pytest.raises(TypeError, match="border must be int, tuple, or None"):
        gbase.normalize_border(bad, 2)


@pytest.mark.parametrize("bw", [0.0, 1e-9, 0.1, 0.5, 1.0, 1])
def test_validate_border_weight_matches_qlty(bw):
    assert gbase.validate_border_weight(bw) == qbase.validate_border_weight(bw)


@pytest.mark.parametrize("bw", [-0.1, 1.1, float("nan"), float("inf")])
def test_validate_border_weight_errors_match_qlty(bw):
    with pytest.raises(ValueError, match=r"border_weight must be in \[0.0, 1.0\]"):
        qbase.validate_border_weight(bw)
    with pytest.raises(ValueError, match=r"border_weight must be in \[0.0, 1.0\]"):
        gbase.validate_border_weight(bw)


@pytest.mark.parametrize(
    "window, border, bw",
    [((8, 8), (2, 2), 0.1), ((8, 6), (0, 2), 0.3), ((5, 5), None, 0.1), ((4, 6, 5), (1, 2, 1),
     0.25), ((4, 4), (2, 2), 0.5), ((6, 6, 6), None, 1.0), ((7, 3), (3, 1), 1e-8)],
)
def test_weight_and_border_helpers_match_qlty(window, border, bw):
    a = gbase.compute_weight_matrix_torch(window, border, bw)
    b = qbase.compute_weight_matrix_torch(window, border, bw)
    assert a.dtype == b.dtype and torch.equal(a, b)
    a = gbase.compute_weight_matrix_numpy(window, border, bw)
    b = qbase.compute_weight_matrix_numpy(window, border, bw)
    assert a.dtype == b.dtype and np.array_equal(a, b)
    a = gbase.compute_border_tensor_torch(window, border)
    b = qbase.compute_border_tensor_torch(window, border)
    assert a.dtype == b.dtype and torch.equal(a, b)
    a = gbase.compute_border_tensor_numpy(window, border)
    b = qbase.compute_border_tensor_numpy(window, border)
    assert a.dtype == b.dtype and np.array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50), st.integers(1, 30)),
                min_size=1, max_size=3))
def test_compute_chunk_times_matches_qlty(axes):
    dims = tuple(max(d, w) for d, w, _ in axes)
    win = tuple(w for _, w, _ in axes)
    step = tuple(s for _, _, s in axes)
    assert tuple(gbase.compute_chunk_times(dims, win, step)) == tuple(
        qbase.compute_chunk_times(dims, win, step)
    )


def test_base_quilt_exists():
    bq = gbase.BaseQuilt((4, 4), (2, 2), 1, 0.5, 2)
    assert bq.border == (1, 1) and bq.border_weight == 0.5
    with pytest.raises(ValueError, match="window must have 2 elements"):
        gbase.BaseQuilt((4, 4, 4), (2, 2), 1, 0.5, 2)
    with pytest.raises(ValueError, match="step must have 3 elements"):
        gbase.BaseQuilt((4, 4, 4), (2, 2), 1, 0.5, 3)


# ------------------------------------------------------------------ cleanup
@pytest.mark.parametrize("label", [-1, 0, float("nan")])
def test_weed_2d_matches_qlty(label):
    g = torch.Generator().manual_seed(1)
    t_in = torch.randn(12, 2, 8, 8, generator=g)
    t_out = torch.full((12, 8, 8), -1.0)
    t_out[::3, 4, 4] = 2.0  # interior label: kept
    t_out[1::3, 0, 0] = 2.0  # border-only label: removed
    t_out[5] = 0.0
    bt = qlty.NCYXQuilt(16, 16, (8, 8), (4, 4), 2).border_tensor()
    a = qlty_gpu.weed_sparse_classification_training_pairs_2D(t_in, t_out, label, bt)
    b = qcleanup.weed_sparse_classification_training_pairs_2D(t_in, t_out, label, bt)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)


def test_weed_3d_matches_qlty():
    g = torch.Generator().manual_seed(2)
    t_in = torch.randn(6, 1, 4, 4, 4, generator=g)
    t_out = torch.zeros(6, 2, 4, 4, 4)
    t_out[0, 1, 1, 2, 2] = 1
    t_out[2, 0, 0, 0, 0] = 1
    t_out[4, :, 1:3, 1:3, 1:3] = 3
    bt = qlty.NCZYXQuilt(8, 8, 8, (4, 4, 4), (2, 2, 2), 1).border_tensor()
    a = qlty_gpu.weed_sparse_classification_training_pairs_3D(t_in, t_out, 0, bt)
    b = qcleanup.weed_sparse_classification_training_pairs_3D(t_in, t_out, 0, bt)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_module_paths():
    import qlty_gpu.cleanup
    import qlty_gpu.qlty2D
    import qlty_gpu.qlty3D

    assert qlty_gpu.qlty2D.NCYXQuilt is NCYXQuilt
    assert qlty_gpu.qlty3D.NCZYXQuilt is NCZYXQuilt
    for name in ("weed_sparse_classification_training_pairs_2D",
                 "weed_sparse_classification_training_pairs_3D"):
        assert getattr(qlty_gpu.cleanup, name) is getattr(qlty_gpu, name)
    for name in ("normalize_border", "validate_border_weight", "compute_weight_matrix_torch",
                 "compute_weight_matrix_numpy", "compute_border_tensor_torch",
                 "compute_border_tensor_numpy", "compute_chunk_times"):
        assert callable(getattr(gbase, name))


def test_errors_still_catchable_as_qlty_types():
    """Code written against qlty catches ValueError/TypeError/AssertionError; ours still works."""
    with pytest.raises(TypeError):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=[1, 1])
    with pytest.raises(TypeError):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=1, border_weight=None)
    with pytest.raises(QltyError):
        NCYXQuilt(16, 16, (8, 8), (4, 4), border=[1, 1])


# ------------------------------------------------------------------ the weight attribute
def _gauss_window(wy, wx):
    gy = torch.exp(-((torch.arange(wy) - (wy - 1) / 2) ** 2) / 8)
    gx = torch.exp(-((torch.arange(wx) - (wx - 1) / 2) ** 2) / 8)
    return (gy[:, None] * gx[None, :]).float()


def test_in_place_weight_edit_keeps_stitch_consistent():
    ours, ref = _pair2d((16, 16, (8, 8), (4, 4), 2, 0.5))
    x = torch.randn(1, 1, 16, 16)
    for q in (ours, ref):
        q.weight.mul_(0.5)
    r_ref, n_ref = ref.stitch(ref.unstitch(x), use_numba=False)
    r_ours, n_ours = ours.stitch(ours.unstitch(x))
    torch.testing.assert_close(r_ref, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_ours, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n_ours, n_ref)


def test_assigned_weight_is_used_by_stitch_like_qlty():
    ours, ref = _pair2d((16, 16, (8, 8), (4, 4), 2, 0.5))
    for q in (ours, ref):
        q.weight = _gauss_window(8, 8)
    p = torch.randn(9, 2, 8, 8)
    r_ref, n_ref = ref.stitch(p, use_numba=False)
    r_ours, n_ours = ours.stitch(p)
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_ours, r_ref, rtol=1e-5, atol=1e-5)


@st.composite
def dividing_geometry3d(draw):
    shape, window, step = [], [], []
    for _ in range(3):
        w = draw(st.integers(1, 5))
        s = draw(st.integers(1, w))
        n = draw(st.integers(1, 3))
        shape.append(w + s * (n - 1))  # (D - w) % s == 0: the only sizes qlty 1.5.0 handles
        window.append(w)
        step.append(s)
    border = draw(st.one_of(st.none(), st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * 3)))
    return (*shape, tuple(window), tuple(step), border, draw(st.floats(0.0, 1.0)))


@settings(max_examples=25, deadline=None)
@given(dividing_geometry3d())
def test_3d_matches_qlty_on_random_dividing_geometries(geom):
    _check_3d_against_qlty(geom)


def test_int64_missing_label_is_exact():
    ours, ref = _pair2d((16, 16, (8, 8), (4, 4), 1, 0.5))
    t = torch.zeros(1, 16, 16, dtype=torch.int64)
    label = 2**53 + 1
    _, a = ours.unstitch_data_pair(torch.zeros(1, 1, 16, 16), t, missing_label=label)
    _, b = ref.unstitch_data_pair(torch.zeros(1, 1, 16, 16), t, missing_label=label)
    assert int(b[0, 0, 0]) == label
    assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(geometry2d(), st.sampled_from([None, -1, 0.5]), st.booleans())
def test_2d_data_pair_random_geometries_match_qlty(geom, missing_label, target_3d):
    ours, ref = _pair2d(geom)
    x = torch.randn(2, 2, ours.Y, ours.X)
    t = torch.randn(2, ours.Y, ours.X) if target_3d else torch.randn(2, 2, ours.Y, ours.X)
    a_in, a_out = ours.unstitch_data_pair(x, t, missing_label=missing_label)
    b_in, b_out = ref.unstitch_data_pair(x, t, missing_label=missing_label)
    assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64, torch.uint8],
                         ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_2d_relative_channels_dtypes_match_qlty(dtype, normalize):
    ours, ref = _pair2d((19, 14, (5, 4), (4, 3), 1, 0.2))
    x = (torch.rand(2, 2, 19, 14) * 50).to(dtype)
    kw = dict(add_positional_channels=True, position_mode="relative",
              normalize_positions=normalize)
    a, b = ours.unstitch(x, **kw), ref.unstitch(x, **kw)
    if dtype == torch.float16 and not normalize:
        b = b.float()  # issue 8.6: raw coordinates of half data are float32 here (exact)
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
