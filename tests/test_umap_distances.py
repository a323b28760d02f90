"""umap-learn's small-data distances in one compiled loop: same bits as scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("umap")
pytest.importorskip("sklearn")
import umap  # noqa: E402
import umap.umap_ as umap_mod  # noqa: E402
from sklearn.metrics import pairwise_distances  # noqa: E402
from umap import distances as udist  # noqa: E402

from qlty_gpu.utils import _umap_distances as ud  # noqa: E402

METRICS = ("euclidean", "manhattan", "cosine", "correlation", "chebyshev")


@pytest.mark.parametrize("n,d", [(2, 1), (17, 3), (120, 32), (257, 7), (40, 3072)])
@pytest.mark.parametrize("name", METRICS)
def test_bit_identical_to_scikit_learn(n, d, name):
    rng = np.random.default_rng(n * d)
    x = (rng.standard_normal((n, d)) * 10).astype(np.float32)
    y = rng.standard_normal((n // 2 + 1, d)).astype(np.float32)
    m = udist.named_distances[name]
    with ud.fast_umap_distances():
        fast_self = umap_mod.pairwise_distances(x, metric=m)
        fast_cross = umap_mod.pairwise_distances(x, y, metric=m)
    ref_self = pairwise_distances(x, metric=m)
    ref_cross = pairwise_distances(x, y, metric=m)
    assert fast_self.dtype == ref_self.dtype == np.float32
    assert np.array_equal(fast_self, ref_self)
    assert np.array_equal(fast_cross, ref_cross)
    assert m not in ud._REFUSED


def test_context_restores_and_nests():
    orig = umap_mod.pairwise_distances
    with pytest.raises(RuntimeError):
        with ud.fast_umap_distances():
            with ud.fast_umap_distances():
                assert umap_mod.pairwise_distances is ud.pairwise
            assert umap_mod.pairwise_distances is ud.pairwise
            raise RuntimeError("boom")
    assert umap_mod.pairwise_distances is orig


def test_unrecognised_calls_go_to_scikit_learn(monkeypatch):
    calls = []

    def spy(*a, **k):
        calls.append(k.get("metric"))
        return pairwise_distances(*a, **k)

    monkeypatch.setattr(ud, "_ORIGINAL", spy)
    x = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    e = udist.named_distances["euclidean"]
    ud.pairwise(x, metric="euclidean")            # a string metric
    ud.pairwise(x.astype(np.float64), metric=e)   # float64
    ud.pairwise(np.asfortranarray(x), metric=e)   # not C-contiguous
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):               # scikit-learn's own error for NaN
        ud.pairwise(bad, metric=e)
    ud.pairwise(x, metric=udist.named_distances["minkowski"], p=3)  # keyword arguments
    assert len(calls) == 5
    ud.pairwise(x, metric=e)                       # recognised: compiled, no fallback
    assert len(calls) == 5


def test_mismatch_falls_back_and_refuses_the_metric(monkeypatch):
    """A compiled loop that disagrees with scikit-learn (another compiler) is caught by the
    row check: the answer comes from scikit-learn and the metric is not taken again."""
    monkeypatch.setattr(ud, "_ORIGINAL", pairwise_distances)
    upper, diagonal, cross = ud._kernels()

    def off_by_one_ulp(x, metric, out):
        upper(x, metric, out)
        out[0, 1] = np.nextafter(out[0, 1], np.float32(np.inf))

    monkeypatch.setattr(ud, "_kernels", lambda: (off_by_one_ulp, diagonal, cross))
    m = udist.named_distances["manhattan"]
    monkeypatch.setattr(ud, "_REFUSED", set())
    x = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32)
    got = ud.pairwise(x, metric=m)
    assert np.array_equal(got, pairwise_distances(x, metric=m))
    assert m in ud._REFUSED


@pytest.mark.slow
def test_umap_fit_and_transform_are_bit_identical():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    new = rng.standard_normal((50, 16)).astype(np.float32)

    def run():
        r = umap.UMAP(n_components=3, n_neighbors=10, n_epochs=30, random_state=0, n_jobs=1)
        return r.fit_transform(x), r.transform(new)

    ref = run()
    with ud.fast_umap_distances():
        fast = run()
    assert np.array_equal(ref[0], fast[0])
    assert np.array_equal(ref[1], fast[1])
