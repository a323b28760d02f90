"""QuiltPlan: the one patch geometry behind every quilt (spec §2.1-2.2, design §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu.errors import QltyError, QltyTypeError
from qlty_gpu.geometry import (
    QuiltPlan,
    normalize_border,
    patch_count,
    patch_starts,
    validate_border_weight,
)

SETTINGS = settings(max_examples=50, deadline=None)


# --------------------------------------------------------------------------- 1-D grid
@pytest.mark.parametrize(
    "d, w, s, starts",
    [
        (128, 32, 16, tuple(range(0, 97, 16))),
        (100, 32, 16, (0, 16, 32, 48, 64, 68)),
        (33, 32, 16, (0, 1)),
        (32, 32, 16, (0,)),
        (100, 10, 30, (0, 30, 60, 90)),
        (100, 32, 33, (0, 33, 66, 68)),
        (1, 1, 1, (0,)),
        (7, 1, 3, (0, 3, 6)),
    ],
)
def test_spec_worked_values(d, w, s, starts):
    assert patch_starts(d, w, s) == starts
    assert patch_count(d, w, s) == len(starts)


@st.composite
def axis(draw, max_size=60):
    d = draw(st.integers(1, max_size))
    w = draw(st.integers(1, d))
    s = draw(st.integers(1, 2 * w + 3))
    return d, w, s


@SETTINGS
@given(axis())
def test_count_formula_and_clamped_starts(dws):
    d, w, s = dws
    n = patch_count(d, w, s)
    assert n == math.ceil((d - w) / s) + 1
    starts = patch_starts(d, w, s)
    assert starts == tuple(min(i * s, d - w) for i in range(n))
    assert starts[0] == 0 and starts[-1] == d - w  # last patch ends exactly at the edge
    assert all(b > a for a, b in zip(starts, starts[1:]))  # strictly increasing, no duplicate
    assert all(0 <= a <= d - w for a in starts)


@SETTINGS
@given(axis())
def test_count_matches_qlty_compute_chunk_times(dws):
    base = pytest.importorskip("qlty.base")
    d, w, s = dws
    assert base.compute_chunk_times((d,), (w,), (s,)) == (patch_count(d, w, s),)


# --------------------------------------------------------------------------- plans
@st.composite
def plans(draw, ndim=None, max_size=14):
    nd = draw(st.sampled_from([2, 3])) if ndim is None else ndim
    shape, window, step = [], [], []
    for _ in range(nd):
        d, w, s = draw(axis(max_size))
        shape.append(d)
        window.append(w)
        step.append(s)
    border = draw(st.one_of(st.none(), st.integers(0, 3), st.tuples(*[st.integers(0, 3)] * nd)))
    bw = draw(st.floats(0.0, 1.0))
    return QuiltPlan(tuple(shape), tuple(window), tuple(step), border, bw)


@SETTINGS
@given(plans())
def test_origins_order_and_coverage(plan):
    org = plan.origins()
    assert org.dtype == torch.int64 and org.device.type == "cpu"
    assert org.shape == (plan.patches_per_image, plan.ndim)
    assert plan.patches_per_image == math.prod(plan.counts)
    # N-major then z, y, x: itertools.product order of the per-axis starts
    import itertools

    expect = list(itertools.product(*plan.starts))
    assert [tuple(r) for r in org.tolist()] == expect
    for idx in range(plan.patches_per_image):  # unravel's grid indexes the starts
        grid = plan.unravel(idx)[1:]
        assert tuple(st[g] for st, g in zip(plan.starts, grid)) == expect[idx]
    # coverage: with step <= window every pixel is covered; gaps only when step > window
    cover = np.zeros(plan.shape, dtype=np.int64)
    for o in expect:
        cover[tuple(slice(a, a + w) for a, w in zip(o, plan.window))] += 1
    if not plan.has_gaps:
        assert cover.min() >= 1
    assert plan.has_gaps == any(s > w for s, w in zip(plan.step, plan.window))
    # covering() agrees with the brute-force cover count, axis by axis
    for ax in range(plan.ndim):
        for i in range(plan.shape[ax]):
            cov = plan.covering(ax, i)
            assert all(plan.starts[ax][k] <= i < plan.starts[ax][k] + plan.window[ax] for k in cov)
            assert len(cov) == sum(
                1 for s0 in plan.starts[ax] if s0 <= i < s0 + plan.window[ax]
            )


@SETTINGS
@given(plans(), st.integers(0, 3))
def test_patch_index_unravel_inverse(plan, n):
    for flat in range(n * plan.patches_per_image, (n + 1) * plan.patches_per_image):
        nn, *grid = plan.unravel(flat)
        assert nn == n
        assert plan.patch_index(nn, *grid) == flat


def _brute_weight(plan):
    w = np.ones(plan.window)
    if plan.border is not None:
        w[:] = plan.border_weight
        w[tuple(slice(b, -b) if b > 0 else slice(None) for b in plan.border)] = 1.0
    return w


@SETTINGS
@given(plans())
def test_weight_mask_and_norm(plan):
    w = plan.weight()
    assert w.dtype == torch.float32 and tuple(w.shape) == plan.window
    ref = _brute_weight(plan)
    np.testing.assert_allclose(plan.weight(dtype=torch.float64).numpy(), ref, rtol=0, atol=0)
    mask = plan.border_mask()
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    if plan.border is None:
        assert bool((mask == 1).all()) and bool((w == 1).all())
    else:
        # mask is 1 exactly where the weight is the interior value 1 (unless bw == 1)
        interior = tuple(slice(b, -b) if b > 0 else slice(None) for b in plan.border)
        expect = np.zeros(plan.window)
        expect[interior] = 1
        np.testing.assert_array_equal(mask.numpy(), expect)
    # norm: brute-force sum of the weight map over every patch
    norm = np.zeros(plan.shape)
    for o in plan.origins().tolist():
        norm[tuple(slice(a, a + k) for a, k in zip(o, plan.window))] += ref
    np.testing.assert_allclose(plan.norm(dtype=torch.float64).numpy(), norm, rtol=1e-12)
    assert plan.norm().dtype == torch.float32
    if not plan.has_gaps:
        assert float(plan.norm().min()) > 0


def test_norm_is_weight_sum_not_count():
    """Spec §2.2 example: window 8, step 4, border 2, bw 0.25 on 16x16."""
    plan = QuiltPlan((16, 16), (8, 8), (4, 4), 2, 0.25)
    values = set(np.round(plan.norm().unique().numpy(), 6).tolist())
    assert values == {0.25, 0.5, 1.0, 1.25, 1.75}


def test_norm_zero_in_gaps():
    plan = QuiltPlan((10, 7), (2, 7), (4, 1))
    assert plan.has_gaps
    norm = plan.norm()
    assert bool((norm[2:4] == 0).all()) and bool((norm[0:2] == 1).all())


def test_plan_is_frozen_hashable_and_cached():
    a = QuiltPlan((20, 30), (8, 8), (4, 4), 2, 0.5)
    b = QuiltPlan([20, 30], [8, 8], [4, 4], (2, 2), 0.5)
    assert a == b and hash(a) == hash(b)
    assert {a, b} == {a}
    with pytest.raises((AttributeError, TypeError)):
        a.window = (4, 4)  # type: ignore[misc]
    assert torch.equal(a.weight(), a.weight())
    assert a.weight() is not a.weight()  # copies: the cached table cannot be edited
    assert a.weight(dtype=torch.float64).dtype == torch.float64
    assert a.shape == (20, 30) and a.window == (8, 8) and a.step == (4, 4)
    assert a.border == (2, 2) and a.border_weight == 0.5
    assert QuiltPlan((5, 5), 3, 1).window == (3, 3)  # ints broadcast to every axis


def test_border_weight_stored_clamped():
    assert QuiltPlan((4, 4), 2, 1, 1, 0.0).border_weight == 1e-8
    assert validate_border_weight(0) == 1e-8
    assert validate_border_weight(1) == 1.0
    assert validate_border_weight(np.float32(0.5)) == 0.5


@pytest.mark.parametrize(
    "border, nd, expect",
    [
        (None, 2, None),
        (0, 2, None),
        ((0, 0), 2, None),
        ((0, 0, 0), 3, None),
        (3, 2, (3, 3)),
        (3, 3, (3, 3, 3)),
        ((1, 0), 2, (1, 0)),
        ((1, 2, 3), 3, (1, 2, 3)),
        (np.int64(2), 2, (2, 2)),
    ],
)
def test_normalize_border(border, nd, expect):
    assert normalize_border(border, nd) == expect


def test_border_wider_than_half_window_is_all_border():
    plan = QuiltPlan((10, 10), (4, 4), (2, 2), 2, 0.3)
    assert float(plan.border_mask().sum()) == 0
    assert bool((plan.weight() == torch.tensor(0.3)).all())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(shape=(10, 10), window=(11, 4), step=(2, 2)), QltyError, r"window.*larger than"),
        (dict(shape=(10, 10), window=(4, 4), step=(0, 2)), QltyError, r"step\[0\] must be >= 1"),
        (dict(shape=(10, 10), window=(4, 4), step=(2, -1)), QltyError, r"step\[1\] must be >= 1"),
        (dict(shape=(10, 10), window=(0, 4), step=(2, 2)), QltyError, r"window\[0\] must be >= 1"),
        (dict(shape=(10, 10), window=(4, 4, 4), step=(2, 2)), QltyError, "window must have 2"),
        (dict(shape=(10, 10), window=(4, 4), step=(2,)), QltyError, "step must have 2"),
        (dict(shape=(10, 10), window=4.0, step=2), QltyTypeError, "window"),
        (dict(shape=(10, 10), window=(4, 4.5), step=2), QltyTypeError, r"window\[1\]"),
        (dict(shape=(10, 0), window=1, step=1), QltyError, "image size X"),
        (dict(shape=(10, 10, 10, 10), window=1, step=1), QltyError, "shape"),
        (dict(shape=(10, 10), window=4, step=2, border=-1), QltyError, "border must be >= 0"),
        (dict(shape=(10, 10), window=4, step=2, border=(1, -1)), QltyError, r"border\[1\]"),
        (dict(shape=(10, 10), window=4, step=2, border=[1, 1]), QltyTypeError, "border must be"),
        (dict(shape=(10, 10), window=4, step=2, border=1.5), QltyTypeError, "border must be"),
        (dict(shape=(10, 10), window=4, step=2, border=(1, 2, 3)), QltyError, "2 elements"),
        (dict(shape=(10, 10), window=4, step=2, border=1, border_weight=1.5), QltyError, "1.5"),
        (dict(shape=(10, 10), window=4, step=2, border=1, border_weight=-0.1), QltyError, "-0.1"),
        (dict(shape=(10, 10), window=4, step=2, border=1, border_weight=float("nan")), QltyError,
         "nan"),
        (dict(shape=(10, 10), window=4, step=2, border=1, border_weight=None), QltyTypeError,
         "border_weight"),
        (dict(shape=(10, 10), window=4, step=2, border=1, border_weight="0.5"), QltyTypeError,
         "border_weight"),
    ],
)
def test_plan_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        QuiltPlan(**kwargs)
    assert isinstance(info.value, QltyError) and isinstance(info.value, ValueError)
    if exc is QltyTypeError:
        assert isinstance(info.value, TypeError)


def test_index_helpers_reject_out_of_range():
    plan = QuiltPlan((10, 10), 4, 3)
    with pytest.raises(QltyError, match="grid index"):
        plan.patch_index(0, plan.counts[0], 0)
    with pytest.raises(QltyError, match="needs 2 grid indices"):
        plan.patch_index(0, 0)
    with pytest.raises(QltyError, match="must be >= 0"):
        plan.unravel(-1)


@pytest.mark.parametrize("method", ["norm", "weight", "origins", "border_mask"])
def test_plan_tables_are_copies(method):
    """Issue 8.4: an in-place edit of what a plan hands out never reaches its cache."""
    plan = QuiltPlan((9, 11), (4, 5), (2, 3), 1, 0.2)
    before = getattr(plan, method)().clone()
    getattr(plan, method)().mul_(0).add_(3)
    assert torch.equal(getattr(plan, method)(), before)


def test_norm_of_a_custom_weight_map():
    plan = QuiltPlan((9, 11), (4, 5), (2, 3), 1, 0.2)
    w = torch.rand(4, 5, dtype=torch.float64) + 0.5
    want = torch.zeros(9, 11, dtype=torch.float64)
    for o in plan.origins().tolist():
        want[o[0]:o[0] + 4, o[1]:o[1] + 5] += w
    torch.testing.assert_close(plan.norm(dtype=torch.float64, weight=w), want)
    assert torch.equal(plan.norm(weight=plan.weight()), plan.norm())
    with pytest.raises(QltyError, match="weight"):
        plan.norm(weight=torch.ones(4, 4))
