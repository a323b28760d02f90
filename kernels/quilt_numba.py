"""Numba CPU kernels for unstitch and stitch, written once for 3 spatial axes.

2-D data is passed with a singleton Z axis (window 1, one start at 0), so one kernel serves
both. Arrays arrive as numpy views of torch tensors; the caller allocates every output.

Shapes (all int64 start tables hold clamped patch starts, spec §2.1):
    image    (N, C, Z, Y, X)
    patches  (N, P, C, WZ, WY, WX) with P = len(starts_z) * len(starts_y) * len(starts_x)
    weight   (WZ, WY, WX)
"""

from __future__ import annotations

import types

import numba

__all__ = [
    "_unstitch_numba",
    "_unstitch_weighted_numba",
    "_stitch_numba",
    "SERIAL",
]

_OPTS = dict(parallel=True, nogil=True, cache=True, fastmath=False, error_model="numpy")


@numba.njit(**_OPTS)
def _unstitch_numba(image, starts_z, starts_y, starts_x, out):
    """Copy every patch of every image into ``out`` (cast to ``out``'s dtype).

    One parallel iteration handles one (n, patch, channel) block.
    """
    n_img, n_ch = image.shape[0], image.shape[1]
    wz, wy, wx = out.shape[3], out.shape[4], out.shape[5]
    nz, ny, nx = starts_z.shape[0], starts_y.shape[0], starts_x.shape[0]
    n_p = nz * ny * nx
    for job in numba.prange(n_img * n_p * n_ch):
        c = job % n_ch
        p = (job // n_ch) % n_p
        n = job // (n_ch * n_p)
        z0 = starts_z[p // (ny * nx)]
        y0 = starts_y[(p // nx) % ny]
        x0 = starts_x[p % nx]
        for a in range(wz):
            for b in range(wy):
                # one contiguous row per copy: numba lowers the slice to a vector loop
                out[n, p, c, a, b, :] = image[n, c, z0 + a, y0 + b, x0 : x0 + wx]


@numba.njit(**_OPTS)
def _unstitch_weighted_numba(image, starts_z, starts_y, starts_x, weight, out):
    """Like ``_unstitch_numba`` but multiplies each patch by ``weight`` on the way."""
    n_img, n_ch = image.shape[0], image.shape[1]
    wz, wy, wx = out.shape[3], out.shape[4], out.shape[5]
    nz, ny, nx = starts_z.shape[0], starts_y.shape[0], starts_x.shape[0]
    n_p = nz * ny * nx
    for job in numba.prange(n_img * n_p * n_ch):
        c = job % n_ch
        p = (job // n_ch) % n_p
        n = job // (n_ch * n_p)
        z0 = starts_z[p // (ny * nx)]
        y0 = starts_y[(p // nx) % ny]
        x0 = starts_x[p % nx]
        for a in range(wz):
            for b in range(wy):
                out[n, p, c, a, b, :] = image[n, c, z0 + a, y0 + b, x0 : x0 + wx] * weight[a, b, :]


@numba.njit(**_OPTS)
def _stitch_numba(
    patches, starts_z, starts_y, starts_x, weight, norm, has_weight, has_norm, n_slabs, out
):
    """Weighted sum of overlapping patches into ``out`` (then divided by ``norm``).

    One parallel iteration owns the rows ``[y_lo, y_hi)`` (one of ``n_slabs`` slabs along Y)
    of one (n, c) output plane and adds every patch's part in those rows: no write races,
    and each pixel sums its patches in patch order whatever the slab split, so results are
    deterministic and independent of ``n_slabs``. Slabs give a single-channel volume work
    for every core. ``out`` must be zero-filled and of the accumulation dtype.
    """
    n_img, n_p, n_ch = patches.shape[0], patches.shape[1], patches.shape[2]
    wz, wy, wx = patches.shape[3], patches.shape[4], patches.shape[5]
    ny, nx = starts_y.shape[0], starts_x.shape[0]
    zz, yy, xx = out.shape[2], out.shape[3], out.shape[4]
    for job in numba.prange(n_img * n_ch * n_slabs):
        slab = job % n_slabs
        c = (job // n_slabs) % n_ch
        n = job // (n_slabs * n_ch)
        y_lo = slab * yy // n_slabs
        y_hi = (slab + 1) * yy // n_slabs
        for p in range(n_p):
            y0 = starts_y[(p // nx) % ny]
            b_lo = max(y_lo - y0, 0)
            b_hi = min(y_hi - y0, wy)
            if b_lo >= b_hi:
                continue  # the patch misses this slab
            z0 = starts_z[p // (ny * nx)]
            x0 = starts_x[p % nx]
            for a in range(wz):
                for b in range(b_lo, b_hi):
                    # explicit inner loops: a sliced `+=` would allocate a temporary per row
                    if has_weight:
                        for e in range(wx):
                            out[n, c, z0 + a, y0 + b, x0 + e] += (
                                patches[n, p, c, a, b, e] * weight[a, b, e]
                            )
                    else:
                        for e in range(wx):
                            out[n, c, z0 + a, y0 + b, x0 + e] += patches[n, p, c, a, b, e]
        if has_norm:
            for a in range(zz):
                for b in range(y_lo, y_hi):
                    for e in range(xx):
                        out[n, c, a, b, e] = out[n, c, a, b, e] / norm[a, b, e]


# Single-threaded builds of the same kernels (``prange`` runs as ``range``), for processes
# where numba's thread pool must not be used: a child forked after the parent ran a GNU
# OpenMP parallel region dies in its first parallel region (DataLoader workers).
_SERIAL_OPTS = dict(_OPTS, parallel=False)


def _serial(fn):
    """Serial twin of a parallel kernel, under its own name: numba's on-disk cache is keyed
    by qualified name, so a twin sharing the name would load the parallel machine code."""
    py = fn.py_func
    twin = types.FunctionType(py.__code__, py.__globals__, py.__name__ + "_serial",
                              py.__defaults__, py.__closure__)
    twin.__qualname__ = py.__qualname__ + "_serial"
    return numba.njit(**_SERIAL_OPTS)(twin)


# serial twin of each parallel kernel, keyed by the parallel kernel's name
SERIAL = {fn.__name__: _serial(fn)
          for fn in (_unstitch_numba, _unstitch_weighted_numba, _stitch_numba)}

