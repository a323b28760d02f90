"""Output chunk grid <-> patch geometry, on top of :class:`~qlty_gpu.geometry.QuiltPlan`.

An output array ``(N, C, *S)`` is cut into chunks ``(1, C, *chunks)``. A :class:`ChunkGrid`
answers the three questions the region engine asks (design §7):

* which patches touch an output chunk (:meth:`ChunkGrid.patch_ranges`), so how many patches a
  chunk awaits before it is complete (:meth:`ChunkGrid.awaited`);
* which chunks a patch touches (:meth:`ChunkGrid.chunks_of_patch`) and where the two overlap
  (:meth:`ChunkGrid.overlap`);
* which patches *start* in a chunk (:meth:`ChunkGrid.owned_ranges`: every patch has exactly
  one owning chunk) and how far they reach past it (:meth:`ChunkGrid.owned_extent`).

Everything is derived from ``plan.starts`` (one sorted table per axis), per axis, so a query
costs O(log P) and nothing is stored per patch. Chunk coordinates ``cidx`` are spatial only
(one int per spatial axis); the image ``n`` is separate because every image has the same
geometry. :meth:`ChunkGrid.norm` gives a chunk's weight sum (the stitch divisor) without
materialising the whole image's weight sum.

Example:
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> plan = QuiltPlan((100, 90), window=(32, 32), step=(16, 16))
    >>> grid = ChunkGrid(plan, chunks=(48, 48))
    >>> grid.grid, grid.chunk_slices((1, 1))
    ((3, 2), (slice(48, 96, None), slice(48, 90, None)))
    >>> grid.patch_ranges((0, 0)), grid.awaited((0, 0))
    ((range(0, 3), range(0, 3)), 9)
    >>> grid.chunks_of_patch((2, 0))      # patch starting at (32, 0) touches 2 chunks
    [(0, 0), (1, 0)]
    >>> grid.norm((0, 0)).shape
    torch.Size([48, 48])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import QltyError, QltyTypeError
from ..geometry import QuiltPlan

__all__ = ["ChunkGrid", "default_chunks"]

#: default target chunk extent per spatial axis (before aligning to the step)
DEFAULT_TARGET = {1: 4096, 2: 512, 3: 128}


def default_chunks(plan: QuiltPlan, target: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """Chunk shape aligned to the quilt: per axis a multiple of ``step`` near ``target``.

    Each extent is ``step * max(1, round(target / step))``, at least the window, and at most
    the image size (one chunk spans the whole axis when the image is small).

    Example:
        >>> default_chunks(QuiltPlan((1024, 1000), 64, 32))
        (512, 512)
        >>> default_chunks(QuiltPlan((256, 256, 100), 64, 48))
        (144, 144, 100)
    """
    if target is None:
        target = DEFAULT_TARGET[plan.ndim]
    if isinstance(target, int):
        target = (target,) * plan.ndim
    out = []
    for d, w, s, t in zip(plan.shape, plan.window, plan.step, target):
        c = s * max(1, round(t / s))
        c = max(c, w)
        out.append(min(c, d))
    return tuple(out)


class ChunkGrid:
    """Spatial chunk grid of an output array, related to the patches of a quilt plan.

    Args:
        plan: the patch geometry (spatial shape, window, step, border).
        chunks: spatial chunk shape, one int per axis (``None``: :func:`default_chunks`).

    Raises:
        QltyError: a chunk extent that is not a positive int per axis.
    """

    def __init__(self, plan: QuiltPlan, chunks: Sequence[int] | None = None) -> None:
        if not isinstance(plan, QuiltPlan):
            raise QltyTypeError(f"plan must be a QuiltPlan, got {type(plan).__name__}")
        if chunks is None:
            chunks = default_chunks(plan)
        chunks = tuple(chunks)
        if len(chunks) != plan.ndim or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1 for c in chunks
        ):
            raise QltyError(
                f"chunks must be {plan.ndim} positive ints (one per spatial axis of "
                f"{plan.shape}), got {chunks!r}"
            )
        self.plan = plan
        self.chunks: tuple[int, ...] = tuple(int(c) for c in chunks)
        self.grid: tuple[int, ...] = tuple(-(-d // c) for d, c in zip(plan.shape, self.chunks))
        self._starts = [np.asarray(s, dtype=np.int64) for s in plan.starts]
        self._stops = [s + w for s, w in zip(self._starts, plan.window)]

    # ------------------------------------------------------------ basics
    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return self.plan.ndim

    @property
    def chunks_per_image(self) -> int:
        """Number of chunks covering one image."""
        return math.prod(self.grid)

    def __repr__(self) -> str:
        return f"ChunkGrid(shape={self.plan.shape}, chunks={self.chunks}, grid={self.grid})"

    def _check(self, cidx: Sequence[int]) -> tuple[int, ...]:
        cidx = tuple(int(c) for c in cidx)
        if len(cidx) != self.ndim or not all(0 <= c < g for c, g in zip(cidx, self.grid)):
            raise QltyError(f"chunk index {cidx} out of range for the chunk grid {self.grid}")
        return cidx

    def all_chunks(self) -> Iterator[tuple[int, ...]]:
        """Every spatial chunk index, in raster order."""
        return itertools.product(*[range(g) for g in self.grid])

    def chunk_slices(self, cidx: Sequence[int]) -> tuple[slice, ...]:
        """Spatial region of chunk ``cidx`` (the last chunk on an axis may be short)."""
        cidx = self._check(cidx)
        return tuple(
            slice(c * e, min((c + 1) * e, d)) for c, e, d in zip(cidx, self.chunks, self.plan.shape)
        )

    def chunk_shape(self, cidx: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of chunk ``cidx``."""
        return tuple(s.stop - s.start for s in self.chunk_slices(cidx))

    # ------------------------------------------------------------ patches <-> chunks
    def axis_patch_range(self, axis: int, lo: int, hi: int) -> range:
        """Patch indices along ``axis`` whose window overlaps pixels ``[lo, hi)``."""
        k0 = int(np.searchsorted(self._stops[axis], lo, side="right"))
        k1 = int(np.searchsorted(self._starts[axis], hi, side="left"))
        return range(k0, max(k0, k1))

    def patch_ranges(self, cidx: Sequence[int]) -> tuple[range, ...]:
        """Per-axis ranges of patch grid indices whose window touches chunk ``cidx``."""
        return tuple(
            self.axis_patch_range(a, s.start, s.stop)
            for a, s in enumerate(self.chunk_slices(cidx))
        )

    def patches_of_chunk(self, cidx: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """Grid positions of the patches touching chunk ``cidx`` (raster order)."""
        return itertools.product(*self.patch_ranges(cidx))

    def awaited(self, cidx: Sequence[int]) -> int:
        """How many patches of one image touch chunk ``cidx`` (0 only inside a gap)."""
        return math.prod(len(r) for r in self.patch_ranges(cidx))

    def awaited_table(self) -> np.ndarray:
        """int64 array of shape ``grid``: :meth:`awaited` for every chunk."""
        per_axis = []
        for a, (g, e, d) in enumerate(zip(self.grid, self.chunks, self.plan.shape)):
            per_axis.append(
                np.array([len(self.axis_patch_range(a, j * e, min((j + 1) * e, d))) for j in range(g)],
                         dtype=np.int64)
            )
        out = per_axis[0]
        for v in per_axis[1:]:
            out = np.multiply.outer(out, v)
        return out

    def axis_chunk_range(self, axis: int, k: int) -> range:
        """Chunk indices along ``axis`` touched by patch ``k`` of that axis."""
        s = int(self._starts[axis][k])
        e = self.chunks[axis]
        return range(s // e, (s + self.plan.window[axis] - 1) // e + 1)

    def chunks_of_patch(self, grid_pos: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial chunk indices touched by the patch at grid position ``grid_pos``."""
        grid_pos = tuple(int(g) for g in grid_pos)
        if len(grid_pos) != self.ndim or not all(
            0 <= g < c for g, c in zip(grid_pos, self.plan.counts)
        ):
            raise QltyError(f"patch grid position {grid_pos} out of range {self.plan.counts}")
        return list(itertools.product(*[self.axis_chunk_range(a, k) for a, k in enumerate(grid_pos)]))

    def patch_origin(self, grid_pos: Sequence[int]) -> tuple[int, ...]:
        """Spatial start of the patch at ``grid_pos`` (from ``plan.starts``)."""
        return tuple(int(self._starts[a][k]) for a, k in enumerate(grid_pos))

    def overlap(
        self, grid_pos: Sequence[int], cidx: Sequence[int]
    ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """Where patch ``grid_pos`` and chunk ``cidx`` overlap.

        Returns:
            ``(chunk_local, patch_local)`` slices of the same shape, or None if disjoint.
        """
        cs = self.chunk_slices(cidx)
        chunk_local, patch_local = [], []
        for a, k in enumerate(grid_pos):
            p0 = int(self._starts[a][k])
            p1 = p0 + self.plan.window[a]
            lo, hi = max(p0, cs[a].start), min(p1, cs[a].stop)
            if lo >= hi:
                return None
            chunk_local.append(slice(lo - cs[a].start, hi - cs[a].start))
            patch_local.append(slice(lo - p0, hi - p0))
        return tuple(chunk_local), tuple(patch_local)

    # ------------------------------------------------------------ ownership (region engine)
    def owned_ranges(self, cidx: Sequence[int]) -> tuple[range, ...]:
        """Per-axis ranges of the patches whose *start* lies in chunk ``cidx``.

        Every patch is owned by exactly one chunk, so running each chunk's owned patches
        runs every patch exactly once.
        """
        out = []
        for a, s in enumerate(self.chunk_slices(cidx)):
            st = self._starts[a]
            out.append(range(int(np.searchsorted(st, s.start)), int(np.searchsorted(st, s.stop))))
        return tuple(out)

    def owned_extent(self, cidx: Sequence[int]) -> tuple[slice, ...] | None:
        """Spatial region covered by the patches owned by ``cidx`` (chunk plus its halo).

        None when no patch starts in the chunk.
        """
        out = []
        for a, r in enumerate(self.owned_ranges(cidx)):
            if len(r) == 0:
                return None
            out.append(slice(int(self._starts[a][r.start]), int(self._stops[a][r.stop - 1])))
        return tuple(out)

    # ------------------------------------------------------------ normalisation
    def _axis_cover(self, axis: int, interior: bool) -> np.ndarray:
        """float64 ``(D,)``: how many windows (or window interiors) cover each pixel."""
        d, w = self.plan.shape[axis], self.plan.window[axis]
        b = 0
        if interior and self.plan.border is not None:
            b = self.plan.border[axis]
        lo = self._starts[axis] + b
        hi = self._starts[axis] + w - b
        diff = np.zeros(d + 1, dtype=np.float64)
        ok = hi > lo
        np.add.at(diff, lo[ok], 1.0)
        np.add.at(diff, hi[ok], -1.0)
        return np.cumsum(diff[:-1])

    def norm(
        self,
        cidx: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Chunk-shaped sum of the weights of every patch covering each pixel.

        With the plan's own weight (``weight=None``) the sum is separable: ``bw * cover +
        (1 - bw) * cover_interior``, each a product of per-axis coverage counts, so no
        image-sized array is ever built. A custom window-shaped ``weight`` is summed patch
        by patch over the chunk instead. Zero where no patch covers a pixel.
        """
        cs = self.chunk_slices(cidx)
        if weight is None:
            key = ("cover",)
            cover = self.__dict__.setdefault("_cover_cache", {})
            if key not in cover:
                cover[key] = [self._axis_cover(a, False) for a in range(self.ndim)]
                cover[("interior",)] = [self._axis_cover(a, True) for a in range(self.ndim)]

            def outer(vs):
                out = vs[0]
                for v in vs[1:]:
                    out = np.multiply.outer(out, v)
                return out

            full = outer([v[s] for v, s in zip(cover[key], cs)])
            if self.plan.border is None:
                total = full
            else:
                bw = self.plan.border_weight
                inner = outer([v[s] for v, s in zip(cover[("interior",)], cs)])
                total = bw * full + (1.0 - bw) * inner
            return torch.from_numpy(np.ascontiguousarray(total)).to(device=device, dtype=dtype)
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        acc = torch.zeros(self.chunk_shape(cidx), dtype=torch.float64)
        for pos in self.patches_of_chunk(cidx):
            ov = self.overlap(pos, cidx)
            if ov is not None:
                acc[ov[0]] += w[ov[1]]
        return acc.to(device=device, dtype=dtype)

    # ------------------------------------------------------------ memory planning
    def raster_peak_elements(self, batch_size: int = 1, images: int = 1) -> int:
        """Largest number of chunk elements (spatial, per channel) alive at once when the
        patches of ``images`` images arrive in raster order (``n``, then z, y, x) in batches
        of ``batch_size`` consecutive patches.

        A chunk is alive from the batch holding its first touching patch to the batch
        holding its last one (a batch adds all its patches before any chunk it completes is
        freed). With ``batch_size=1`` images follow one another without overlap, so one
        image gives the peak.
        """
        counts = self.plan.counts
        per = self.plan.patches_per_image
        firsts, lasts, sizes = [], [], []
        for cidx in self.all_chunks():
            r = self.patch_ranges(cidx)
            if any(len(x) == 0 for x in r):
                continue
            firsts.append(np.ravel_multi_index(tuple(x.start for x in r), counts))
            lasts.append(np.ravel_multi_index(tuple(x.stop - 1 for x in r), counts))
            sizes.append(math.prod(self.chunk_shape(cidx)))
        if not sizes:
            return 0
        n_img = 1 if batch_size == 1 else max(1, int(images))
        off = (np.arange(n_img, dtype=np.int64) * per)[:, None]
        start = ((np.asarray(firsts)[None, :] + off) // batch_size).ravel()
        stop = ((np.asarray(lasts)[None, :] + off) // batch_size + 1).ravel()
        size = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (n_img, len(sizes))).ravel()
        times = np.concatenate([stop, start])  # frees sort before allocations at a tie
        deltas = np.concatenate([-size, size])
        order = np.lexsort((deltas, times))
        return int(np.cumsum(deltas[order]).max())
