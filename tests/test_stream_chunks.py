"""ChunkGrid against brute-force oracles on hypothesis geometries (2D and 3D)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlty_gpu.errors import QltyError
from qlty_gpu.geometry import QuiltPlan
from qlty_gpu.stream.chunks import ChunkGrid, default_chunks


@st.composite
def geometries(draw, ndim=None):
    nd = draw(st.sampled_from([2, 3])) if ndim is None else ndim
    shape, window, step, chunks = [], [], [], []
    for _ in range(nd):
        d = draw(st.integers(1, 23))
        w = draw(st.sampled_from([1, d, max(1, d // 2), max(1, d // 3)]))
        s = draw(st.integers(1, w + 3))
        c = draw(st.integers(1, d + 2))
        shape.append(d), window.append(w), step.append(s), chunks.append(c)
    border = draw(st.sampled_from([None, 1, 2]))
    bw = draw(st.sampled_from([0.1, 0.5, 1.0]))
    return QuiltPlan(tuple(shape), tuple(window), tuple(step), border, bw), tuple(chunks)


def _patch_boxes(plan):
    for grid in itertools.product(*[range(c) for c in plan.counts]):
        origin = tuple(plan.starts[a][g] for a, g in enumerate(grid))
        yield grid, origin


def _touch(origin, window, region):
    return all(o < r.stop and o + w > r.start for o, w, r in zip(origin, window, region))


@settings(max_examples=30, deadline=None)
@given(geometries())
def test_patch_chunk_relations_match_brute_force(geo):
    plan, chunks = geo
    grid = ChunkGrid(plan, chunks)
    touching = {c: set() for c in grid.all_chunks()}
    owned = {c: set() for c in grid.all_chunks()}
    for g, origin in _patch_boxes(plan):
        hit = set()
        for c in grid.all_chunks():
            reg = grid.chunk_slices(c)
            if _touch(origin, plan.window, reg):
                touching[c].add(g)
                hit.add(c)
            if all(r.start <= o < r.stop for o, r in zip(origin, reg)):
                owned[c].add(g)
        assert set(grid.chunks_of_patch(g)) == hit
    table = grid.awaited_table()
    for c in grid.all_chunks():
        assert set(grid.patches_of_chunk(c)) == touching[c]
        assert grid.awaited(c) == len(touching[c]) == table[c]
        assert set(itertools.product(*grid.owned_ranges(c))) == owned[c]
    # every patch owned exactly once
    assert sum(len(v) for v in owned.values()) == plan.patches_per_image


@settings(max_examples=20, deadline=None)
@given(geometries())
def test_norm_per_chunk_equals_plan_norm(geo):
    plan, chunks = geo
    grid = ChunkGrid(plan, chunks)
    full = plan.norm("cpu", torch.float64)
    for c in grid.all_chunks():
        torch.testing.assert_close(grid.norm(c, dtype=torch.float64), full[grid.chunk_slices(c)])


@settings(max_examples=15, deadline=None)
@given(geometries())
def test_norm_with_custom_weight_and_overlap(geo):
    plan, chunks = geo
    grid = ChunkGrid(plan, chunks)
    w = torch.rand(plan.window, dtype=torch.float64) + 0.5
    ref = torch.zeros(plan.shape, dtype=torch.float64)
    for _, origin in _patch_boxes(plan):
        ref[tuple(slice(o, o + k) for o, k in zip(origin, plan.window))] += w
    for c in grid.all_chunks():
        torch.testing.assert_close(grid.norm(c, dtype=torch.float64, weight=w),
                                   ref[grid.chunk_slices(c)])
        # overlap slices have equal shapes and address the same pixels
        cs = grid.chunk_slices(c)
        for g in grid.patches_of_chunk(c):
            ov = grid.overlap(g, c)
            assert ov is not None
            o = grid.patch_origin(g)
            for a in range(plan.ndim):
                assert ov[0][a].stop - ov[0][a].start == ov[1][a].stop - ov[1][a].start
                assert cs[a].start + ov[0][a].start == o[a] + ov[1][a].start


@settings(max_examples=20, deadline=None)
@given(geometries())
def test_raster_peak_matches_simulation(geo):
    plan, chunks = geo
    grid = ChunkGrid(plan, chunks)
    left = {c: grid.awaited(c) for c in grid.all_chunks()}
    alive, peak = set(), 0
    for g in itertools.product(*[range(c) for c in plan.counts]):
        touched = grid.chunks_of_patch(g)
        alive |= set(touched)
        peak = max(peak, sum(math.prod(grid.chunk_shape(c)) for c in alive))
        for c in touched:
            left[c] -= 1
            if left[c] == 0:
                alive.discard(c)
    assert grid.raster_peak_elements() == peak


def test_owned_extent_is_chunk_plus_halo():
    plan = QuiltPlan((100, 90), (32, 32), (16, 16))
    grid = ChunkGrid(plan, (48, 48))
    assert grid.owned_ranges((0, 0)) == (range(0, 3), range(0, 3))
    assert grid.owned_extent((0, 0)) == (slice(0, 64), slice(0, 64))
    # the last chunk along X owns the clamped patch starting at 58
    assert grid.owned_ranges((0, 1)) == (range(0, 3), range(3, 5))
    assert grid.owned_extent((0, 1)) == (slice(0, 64), slice(48, 90))


def test_default_chunks_align_to_step():
    assert default_chunks(QuiltPlan((1024, 1024), 64, 32)) == (512, 512)
    assert default_chunks(QuiltPlan((256, 256, 256), 64, 32)) == (128, 128, 128)
    assert default_chunks(QuiltPlan((20, 30), 8, 5)) == (20, 30)
    assert default_chunks(QuiltPlan((300, 300), 64, 100), target=64) == (100, 100)


def test_errors():
    plan = QuiltPlan((10, 10), 4, 2)
    with pytest.raises(QltyError, match="chunks must be 2 positive ints"):
        ChunkGrid(plan, (4,))
    with pytest.raises(QltyError, match="chunks must be 2 positive ints"):
        ChunkGrid(plan, (0, 4))
    with pytest.raises(QltyError, match="plan must be a QuiltPlan"):
        ChunkGrid((10, 10), (4, 4))
    grid = ChunkGrid(plan, (4, 4))
    with pytest.raises(QltyError, match="out of range"):
        grid.chunk_slices((3, 0))
    with pytest.raises(QltyError, match="out of range"):
        grid.chunks_of_patch((4, 0))
    assert grid.overlap((0, 0), (2, 2)) is None
    assert np.all(grid.awaited_table() > 0)
