"""Numba CPU kernel for the overlapping pixels of patch pairs (2D lifted to 3 axes).

Arrays arrive as numpy views of torch tensors; the caller allocates the outputs.

Shapes:
    p1, p2   (M, C, U, V, W) -- 2-D patches with U == 1
    disp     (M, 3) int64, displacement (dz, dy, dx) of patch 2 (already truncated)
    rot      (M,) int64 in 0..3: ``p2[m] = rot90(Q, rot[m])`` over the last two axes, Q the
             unrotated window (odd turns need V == W)
    offsets  (M,) int64, first output row of each pair
    o1, o2   (K, C)
"""

from __future__ import annotations

import numba

__all__ = ["_overlap_pixels_numba", "_overlap_pixels_backward_numba"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _overlap_pixels_numba(p1, p2, disp, rot, offsets, o1, o2):
    """Copy, pair by pair, the overlap of patch 1 (raster order) and the matching pixels of
    patch 2 (rotation undone) into rows of ``o1`` / ``o2``. Serial: fork-safe in DataLoader
    workers, and the copy is memory-bound."""
    n_pairs, n_ch, u_, v_, w_ = p1.shape
    for m in range(n_pairs):
        dz, dy, dx = disp[m, 0], disp[m, 1], disp[m, 2]
        r = (4 - rot[m]) % 4  # Q = rot90(p2, -k): Q[b, c] = p2[g_r(b, c)]
        z0, z1 = max(0, dz), min(u_, u_ + dz)
        y0, y1 = max(0, dy), min(v_, v_ + dy)
        x0, x1 = max(0, dx), min(w_, w_ + dx)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        k = offsets[m]
        for a in range(z0, z1):
            sa = a - dz
            for b in range(y0, y1):
                sb = b - dy
                for c in range(x0, x1):
                    sc = c - dx
                    if r == 0:
                        tb, tc = sb, sc
                    elif r == 1:
                        tb, tc = sc, w_ - 1 - sb
                    elif r == 2:
                        tb, tc = v_ - 1 - sb, w_ - 1 - sc
                    else:
                        tb, tc = v_ - 1 - sc, sb
                    for ch in range(n_ch):
                        o1[k, ch] = p1[m, ch, a, b, c]
                        o2[k, ch] = p2[m, ch, sa, tb, tc]
                    k += 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _overlap_pixels_backward_numba(g1, g2, disp, rot, offsets, gp1, gp2):
    """Adjoint of :func:`_overlap_pixels_numba`: scatter the rows of ``g1`` / ``g2`` back to
    the pixels they were read from (``gp1`` / ``gp2`` arrive zeroed; every pixel is read at
    most once, so plain stores suffice)."""
    n_pairs, n_ch, u_, v_, w_ = gp1.shape
    for m in range(n_pairs):
        dz, dy, dx = disp[m, 0], disp[m, 1], disp[m, 2]
        r = (4 - rot[m]) % 4
        z0, z1 = max(0, dz), min(u_, u_ + dz)
        y0, y1 = max(0, dy), min(v_, v_ + dy)
        x0, x1 = max(0, dx), min(w_, w_ + dx)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        k = offsets[m]
        for a in range(z0, z1):
            sa = a - dz
            for b in range(y0, y1):
                sb = b - dy
                for c in range(x0, x1):
                    sc = c - dx
                    if r == 0:
                        tb, tc = sb, sc
                    elif r == 1:
                        tb, tc = sc, w_ - 1 - sb
                    elif r == 2:
                        tb, tc = v_ - 1 - sb, w_ - 1 - sc
                    else:
                        tb, tc = v_ - 1 - sc, sb
                    for ch in range(n_ch):
                        gp1[m, ch, a, b, c] = g1[k, ch]
                        gp2[m, ch, sa, tb, tc] = g2[k, ch]
                    k += 1
