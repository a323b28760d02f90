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
from typing import Optional

import torch

from ..geometry import QuiltPlan

__all__ = ["grid_boxes", "sub_extent", "box_extent", "stitch_box", "add_overlap"]

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


def stitch_box(
    patches: torch.Tensor,
    plan: QuiltPlan,
    kbox: Sequence[tuple[int, int]],
    weight: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Weighted sum of the patches of a box over the pixels they span: one fused stitch.

    Args:
        patches: ``(n * P, C, *window)``, the ``P`` patches of the box for each of ``n``
            images in raster order (a patch left out of the box is a zero patch).
        plan: the geometry the box indexes.
        kbox: patch-index ranges ``[k0, k1)`` per spatial axis.
        weight: window-shaped weight map, or None for none.
        backend: force a compute backend of :func:`qlty_gpu.ops.stitch`.

    Returns:
        ``(extent, summed)``: the box's pixel ranges (:func:`box_extent`) and the sums
        ``(n, C, *extent shape)`` (not normalised).
    """
    from ..ops import stitch

    ext = box_extent(plan, kbox)
    summed = stitch(patches, [hi - lo for lo, hi in ext], plan.step, weight=weight,
                    backend=backend)
    return ext, summed


def add_overlap(
    dst: torch.Tensor, dst_origin: Sequence[int], src: torch.Tensor, src_origin: Sequence[int]
) -> None:
    """``dst += src`` where the two blocks overlap, in place.

    The last ``len(dst_origin)`` axes of each are spatial, placed at pixel ``*_origin``;
    the leading axes (images, channels) match one to one. Disjoint blocks add nothing.
    """
    nd = len(dst_origin)
    d_sl, s_sl = [], []
    for a, (do, so) in enumerate(zip(dst_origin, src_origin)):
        lo = max(do, so)
        hi = min(do + dst.shape[a - nd], so + src.shape[a - nd])
        if lo >= hi:
            return
        d_sl.append(slice(lo - do, hi - do))
        s_sl.append(slice(lo - so, hi - so))
    dst[(..., *d_sl)].add_(src[(..., *s_sl)])
