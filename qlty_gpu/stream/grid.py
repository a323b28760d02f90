"""Patch-grid bookkeeping shared by in-memory inference and the region engine.

Patches are numbered in raster order over a grid ``(n, k_0, k_1, ...)`` (image, then patch
index per spatial axis, as :meth:`~qlty_gpu.geometry.QuiltPlan.patch_index`). A run of
consecutive patch numbers splits into a few *boxes*: products of index ranges. The patches
of a box with grid ranges ``[k0, k1)`` along an axis are exactly the patches of the
sub-image ``[s_{k0}, s_{k1-1} + w)`` under the same window and step (the clamped last
patch stays clamped, a regular one stays regular), so one fused unstitch of that sub-image
gathers them in raster order and one fused stitch into it scatters them back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from ..geometry import QuiltPlan

__all__ = ["grid_boxes", "sub_extent", "box_extent"]

Box = tuple[tuple[int, int], ...]


def grid_boxes(a: int, b: int, sizes: Sequence[int]) -> Iterator[Box]:
    """Boxes covering raster numbers ``[a, b)`` of a grid of ``sizes``, in raster order.

    At most ``2 * len(sizes) - 1`` boxes; each is a tuple of ``(lo, hi)`` per grid axis.

    Example:
        >>> list(grid_boxes(2, 9, (3, 4)))
        [((0, 1), (2, 4)), ((1, 2), (0, 4)), ((2, 3), (0, 1))]
    """
    if a >= b:
        return
    if len(sizes) == 1:
        yield ((a, b),)
        return
    inner = math.prod(sizes[1:])
    i0, r0 = divmod(a, inner)
    i1, r1 = divmod(b, inner)
    rest = sizes[1:]
    if i0 == i1:
        for bx in grid_boxes(r0, r1, rest):
            yield ((i0, i0 + 1), *bx)
        return
    if r0:
        for bx in grid_boxes(r0, inner, rest):
            yield ((i0, i0 + 1), *bx)
        i0 += 1
    if i1 > i0:
        yield ((i0, i1), *((0, s) for s in rest))
    if r1:
        for bx in grid_boxes(0, r1, rest):
            yield ((i1, i1 + 1), *bx)


def sub_extent(plan: QuiltPlan, axis: int, krange: tuple[int, int]) -> tuple[int, int]:
    """Pixel range ``[s_{k0}, s_{k1-1} + w)`` spanned by patches ``[k0, k1)`` on ``axis``."""
    k0, k1 = krange
    st = plan.starts[axis]
    return st[k0], st[k1 - 1] + plan.window[axis]


def box_extent(plan: QuiltPlan, kbox: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Pixel ranges of a box of spatial patch-index ranges."""
    return [sub_extent(plan, ax, r) for ax, r in enumerate(kbox)]
