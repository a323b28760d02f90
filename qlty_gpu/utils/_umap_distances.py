"""umap-learn's small-data distance matrix without a Python call per pair.

For fewer than 4096 points umap-learn computes every distance with scikit-learn's
``pairwise_distances(X, metric=<umap's numba metric>)``, and scikit-learn calls that metric
from a Python loop once per pair (354k calls for the 841 patches of a 256x256 image: ~1.7 s
of a ~2.5 s false colour). :func:`fast_umap_distances` swaps, for the duration of a
``fit``/``transform``, the ``pairwise_distances`` that umap-learn's module uses for one that
runs the *same* numba metric over all pairs inside one compiled loop, and keeps
scikit-learn's bookkeeping exactly: the upper triangle, ``out + out.T``, the diagonal from
``metric(x, x)``, and an output dtype of float32 only when both inputs are float32. The
result is bit-identical to scikit-learn's for float32 input (what umap-learn always passes;
tested on random data of several sizes and metrics). float64 is left to scikit-learn: once
inlined, LLVM may vectorise a float64 sum in another order (measured: 1e-14 differences).
Each call also recomputes three rows the scikit-learn way and compares them; on a mismatch
(another compiler, another CPU) the whole matrix comes from scikit-learn and the metric is not
taken again. Any call it does not recognise (a string or Python metric, keyword arguments,
sparse, float64, non-contiguous or non-finite input, ``n_jobs`` other than 1) goes to
scikit-learn unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_LOCK = threading.Lock()
_DEPTH = 0
_ORIGINAL: Any = None
_KERNELS: dict = {}
_REFUSED: set = set()  # metrics whose compiled loop did not match scikit-learn here


def _kernels() -> tuple:
    if not _KERNELS:
        import numba

        @numba.njit(cache=False)
        def upper(x, metric, out):  # pragma: no cover - compiled
            n = x.shape[0]
            for i in range(n):
                for j in range(i + 1, n):
                    out[i, j] = metric(x[i], x[j])

        @numba.njit(cache=False)
        def diagonal(x, metric, out):  # pragma: no cover - compiled
            for i in range(x.shape[0]):
                out[i, i] = metric(x[i], x[i])

        @numba.njit(cache=False)
        def cross(x, y, metric, out):  # pragma: no cover - compiled
            for i in range(x.shape[0]):
                for j in range(y.shape[0]):
                    out[i, j] = metric(x[i], y[j])

        _KERNELS.update(upper=upper, diagonal=diagonal, cross=cross)
    return _KERNELS["upper"], _KERNELS["diagonal"], _KERNELS["cross"]


def _plain(a: Any) -> bool:
    return (isinstance(a, np.ndarray) and a.ndim == 2 and a.dtype == np.float32
            and a.flags.c_contiguous and a.shape[0] > 0 and a.shape[1] > 0
            and bool(np.isfinite(a).all()))


def pairwise(X: Any, Y: Any = None, metric: Any = "euclidean", *, n_jobs: Any = None,
             **kwds: Any) -> np.ndarray:
    """``sklearn.metrics.pairwise_distances`` with a compiled loop for numba metrics."""
    from numba.core.registry import CPUDispatcher

    if (not isinstance(metric, CPUDispatcher) or metric in _REFUSED or kwds
            or n_jobs not in (None, 1)
            or not _plain(X) or not (Y is None or Y is X or _plain(Y))
            or (Y is not None and Y is not X and Y.shape[1] != X.shape[1])):
        return _ORIGINAL(X, Y, metric=metric, n_jobs=n_jobs, **kwds)
    upper, diagonal, cross = _kernels()
    same = Y is None or Y is X
    if same:
        out = np.zeros((X.shape[0], X.shape[0]), dtype=np.float32)
        upper(X, metric, out)
        out = out + out.T  # as scikit-learn does (not +=)
        diagonal(X, metric, out)
    else:
        out = np.empty((X.shape[0], Y.shape[0]), dtype=np.float32)
        cross(X, Y, metric, out)
    if not _rows_match(X, X if same else Y, metric, out, same):
        _REFUSED.add(metric)
        return _ORIGINAL(X, Y, metric=metric, n_jobs=n_jobs)
    return out


def _rows_match(x: np.ndarray, y: np.ndarray, metric: Any, out: np.ndarray, same: bool) -> bool:
    """Rows 0, n/2 and n-1 of ``out`` recomputed as scikit-learn does (one Python call per
    pair, the upper triangle's argument order for a square matrix)."""
    for r in sorted({0, x.shape[0] // 2, x.shape[0] - 1}):
        ref = np.empty(y.shape[0], dtype=np.float32)
        for j in range(y.shape[0]):
            ref[j] = metric(x[j], x[r]) if same and j < r else metric(x[r], y[j])
        if not np.array_equal(ref, out[r]):
            return False
    return True


@contextlib.contextmanager
def fast_umap_distances() -> Iterator[None]:
    """While active, umap-learn's small-data path computes its distance matrix in one
    compiled loop (same bits). Re-entrant and thread-safe; a no-op without umap-learn."""
    global _DEPTH, _ORIGINAL
    try:
        import umap.umap_ as umap_mod
    except ImportError:
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _ORIGINAL = umap_mod.pairwise_distances
            umap_mod.pairwise_distances = pairwise
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                umap_mod.pairwise_distances = _ORIGINAL
