"""Numba CPU kernel of the 2.5D z-aggregation (identity gathers, mean, population std).

One parallel job computes one output plane: image n, table row j, input channel c, slot k,
row by row, reading each group member's row once (twice for std: two-pass, as torch).

Shapes (numpy views of torch tensors; the caller allocates ``out``):
    x        (N, C, S, Y, X)      any strides
    out      (N, J', C', Y, X)    any strides
    idx      (J, K, G)            int64: source z, -1 zero slice (counts), -2 nothing
    kind     (K,)                 int64: 0 identity, 1 mean, 2 std
    base, cstride (K,)            int64: output channel = base[k] + c * cstride[k]
    jpos     (J,)                 int64: output row of table row j
    tmpl     (X,)                 accumulation dtype template (float32 or float64)
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["_zagg_numba", "_zagg_numba_serial"]

_OPTS = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")


def _body(x, out, idx, kind, base, cstride, jpos, tmpl, job):
    n_ch = x.shape[1]
    Y, X = x.shape[3], x.shape[4]
    J, K, G = idx.shape
    k = job % K
    c = (job // K) % n_ch
    j = (job // (K * n_ch)) % J
    n = job // (K * n_ch * J)
    ch = base[k] + c * cstride[k]
    row = jpos[j]
    kd = kind[k]
    if kd == 0:
        z = idx[j, k, 0]
        for y in range(Y):
            if z >= 0:
                out[n, row, ch, y, :] = x[n, c, z, y, :]
            else:
                out[n, row, ch, y, :] = 0
        return
    cnt = 0
    for g in range(G):
        if idx[j, k, g] >= -1:
            cnt += 1
    total = np.zeros_like(tmpl)
    sq = np.zeros_like(tmpl)
    for y in range(Y):
        orow = out[n, row, ch, y]
        total[:] = 0
        for g in range(G):
            z = idx[j, k, g]
            if z >= 0:
                xrow = x[n, c, z, y]
                for i in range(X):
                    total[i] += xrow[i]
        for i in range(X):
            total[i] = total[i] / cnt
        if kd == 1:
            for i in range(X):
                orow[i] = total[i]
            continue
        sq[:] = 0
        for g in range(G):
            z = idx[j, k, g]
            if z >= 0:
                xrow = x[n, c, z, y]
                for i in range(X):
                    d = xrow[i] - total[i]
                    sq[i] += d * d
            elif z == -1:
                for i in range(X):
                    sq[i] += total[i] * total[i]
        for i in range(X):
            orow[i] = math.sqrt(sq[i] / cnt)


_body_jit = numba.njit(inline="always", **_OPTS)(_body)


@numba.njit(parallel=True, **_OPTS)
def _zagg_numba(x, out, idx, kind, base, cstride, jpos, tmpl):
    """All output planes, one parallel job each."""
    jobs = x.shape[0] * idx.shape[0] * x.shape[1] * idx.shape[1]
    for job in numba.prange(jobs):
        _body_jit(x, out, idx, kind, base, cstride, jpos, tmpl, job)


@numba.njit(**_OPTS)
def _zagg_numba_serial(x, out, idx, kind, base, cstride, jpos, tmpl):
    """Single-threaded twin (used in forked children, where OpenMP pools do not survive)."""
    jobs = x.shape[0] * idx.shape[0] * x.shape[1] * idx.shape[1]
    for job in range(jobs):
        _body_jit(x, out, idx, kind, base, cstride, jpos, tmpl, job)
