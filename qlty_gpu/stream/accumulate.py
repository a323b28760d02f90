"""Chunk-completion accumulation: patches in any order in, each output chunk written once.

A :class:`ChunkAccumulator` keeps one float32 accumulator ``(C, *chunk)`` (float64 for
float64 patches) per output chunk *in flight*, on the patches' device, plus a counter of
the patches the chunk still awaits (from :meth:`ChunkGrid.awaited`). A patch adds
``patch * W`` into every chunk it touches; when a chunk's counter reaches zero it is divided
by its weight sum (:meth:`ChunkGrid.norm`, ``+ eps``), written once through a
:class:`~qlty_gpu.stream.store.ZarrSink` and recorded in the manifest, and its memory is
freed. With ``patch_var`` a second accumulator gives ``sqrt(|sum(var * W) / (norm + eps)|)``
(qlty's std formula).

Two ways to add a group of patches, same result up to float rounding:

* ``direct``: per patch and touched chunk one fused ``addcmul_`` on the overlap (CPU default);
* ``fused``: the group is laid out as a dense sub-grid of the plan and summed by the fused
  stitch op :func:`qlty_gpu.ops.stitch` (one kernel for the whole group), then each touched
  chunk adds its part of the sum (CUDA default: few launches per batch). Sparse groups are
  split (by leading grid axis, then into runs) until the sub-grid is at least half full.

Memory: the accumulators alive at once, ``C * itemsize * (1 + std) * sum(chunk sizes in
flight)``, plus at most two freed accumulators per chunk shape kept for reuse (a fresh
zeroed buffer costs page faults; a reused one only a fill). In raster order that peak is :meth:`ChunkGrid.raster_peak_elements` (about two
rows of chunks in 2-D, two slabs in 3-D), independent of ``N``; any other order can hold
more. ``max_memory`` bounds it: allocating past the budget raises a QltyError before any
memory is taken.

Example:
    >>> import zarr
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> from qlty_gpu.stream import ChunkGrid, ZarrSink
    >>> grid = ChunkGrid(QuiltPlan((9, 9), window=4, step=3), chunks=(5, 5))
    >>> sink = ZarrSink(zarr.create_array(store={}, shape=(1, 1, 9, 9), chunks=(1, 1, 5, 5),
    ...                 dtype="float32"), shape=(1, 1, 9, 9))
    >>> acc = ChunkAccumulator(grid, sink, channels=1)
    >>> for g in [(i, j) for i in range(3) for j in range(3)]:
    ...     acc.add(0, [g], torch.ones(1, 1, 4, 4))
    >>> acc.unfinished, float(sink.array[:].min()), float(sink.array[:].max())
    (0, 1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from ..errors import QltyError
from .chunks import ChunkGrid
from .grid import add_overlap, stitch_box
from .store import ZarrSink

__all__ = ["ChunkAccumulator", "ACCUMULATE_MODES"]

ACCUMULATE_MODES = ("auto", "direct", "fused")


class ChunkAccumulator:
    """Per-chunk accumulators with completion counting (see the module docstring).

    Args:
        grid: the output chunk grid.
        sink: where finished mean chunks go; its manifest unit is ``(n, *cidx)``.
        channels: C.
        std_sink: where finished std chunks go (None: no variance accumulated).
        images: N (chunks of images ``0..N-1``).
        weight: window-shaped weight map (None: the plan's own weight).
        eps: added to the weight sum before dividing (qlty's ``return_mean`` eps).
        max_memory: budget in bytes for the accumulators in flight (None: unbounded).
        mode: 'auto', 'direct' or 'fused'.
        done: chunks ``(n, *cidx)`` finished earlier (a resumed run): their share of a
            patch is dropped.
    """

    def __init__(
        self,
        grid: ChunkGrid,
        sink: ZarrSink,
        channels: int,
        *,
        std_sink: Optional[ZarrSink] = None,
        images: int = 1,
        weight: Optional[torch.Tensor] = None,
        eps: float = 1e-8,
        max_memory: Optional[int] = None,
        mode: str = "auto",
        done: Optional[set] = None,
    ) -> None:
        if mode not in ACCUMULATE_MODES:
            raise QltyError(f"accumulate mode must be one of {ACCUMULATE_MODES}, got {mode!r}")
        self.grid, self.sink, self.std_sink = grid, sink, std_sink
        self.channels, self.images = int(channels), int(images)
        self.custom_weight = None if weight is None else weight.detach().to("cpu", torch.float64)
        self.eps, self.max_memory, self.mode = float(eps), max_memory, mode
        self.prev_done: set = set(done or ())
        self.done: set = set()  # finished in this run
        self._awaited = grid.awaited_table()
        self._left: dict = {}
        self._acc: dict = {}
        self._var: dict = {}
        self.bytes_in_flight = 0
        self.peak_bytes = 0
        self._pool: dict = {}  # (shape, dtype, device) -> freed accumulators, reused zeroed
        self.pooled_bytes = 0
        self.chunks_written = 0
        self._wcache: dict = {}
        # chunks no patch touches (inside gaps) are complete from the start (fill value 0)
        for n in range(self.images):
            for cidx in grid.all_chunks():
                if self._awaited[cidx] == 0 and (n, *cidx) not in self.prev_done:
                    self.sink.record((n, *cidx))
                    self.done.add((n, *cidx))

    # ------------------------------------------------------------ bookkeeping
    @property
    def total_chunks(self) -> int:
        """Chunks in the whole output (all images)."""
        return self.images * self.grid.chunks_per_image

    @property
    def unfinished(self) -> int:
        """Chunks not yet written (in this run or before it)."""
        return self.total_chunks - len(self.done | self.prev_done)

    @property
    def in_flight(self) -> int:
        """Chunks holding an accumulator now."""
        return len(self._acc)

    def is_done(self, key: tuple) -> bool:
        """True if chunk ``(n, *cidx)`` is written (in this run or an earlier one)."""
        return key in self.done or key in self.prev_done

    def chunk_bytes(self, cidx: Sequence[int], itemsize: int = 4) -> int:
        """Bytes of one chunk's accumulator(s)."""
        per = self.channels * math.prod(self.grid.chunk_shape(cidx)) * itemsize
        return per * (2 if self.std_sink is not None else 1)

    def memory_bound(self, itemsize: int = 4, batch_size: int = 1) -> int:
        """Peak accumulator bytes when patches arrive in raster order, in batches."""
        per = self.channels * itemsize * (2 if self.std_sink is not None else 1)
        return self.grid.raster_peak_elements(batch_size, self.images) * per

    def _weight(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._wcache:
            w = self.custom_weight if self.custom_weight is not None else \
                self.grid.plan.weight("cpu", torch.float64)
            self._wcache[key] = w.to(device=device, dtype=dtype)
        return self._wcache[key]

    def _get(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        acc = self._acc.get(key)
        if acc is not None:
            return acc
        cidx = key[1:]
        need = self.chunk_bytes(cidx, like.element_size())
        if self.max_memory is not None and \
                self.bytes_in_flight + self.pooled_bytes + need > self.max_memory:
            self._pool.clear()  # freed buffers go first
            self.pooled_bytes = 0
        if self.max_memory is not None and self.bytes_in_flight + need > self.max_memory:
            raise QltyError(
                f"max_memory={self.max_memory} bytes would be exceeded: {len(self._acc)} chunks "
                f"in flight hold {self.bytes_in_flight} bytes and chunk {key} needs {need} more. "
                f"Patches in raster order need at most {self.memory_bound(like.element_size())} "
                "bytes (one at a time; more in batches); use raster order (iter_patches / unstitch_next), smaller chunks=, or a "
                "larger max_memory"
            )
        shape = (self.channels, *self.grid.chunk_shape(cidx))
        acc = self._zeros(shape, like)
        self._acc[key] = acc
        if self.std_sink is not None:
            self._var[key] = self._zeros(shape, like)
        self._left[key] = int(self._awaited[cidx])
        self.bytes_in_flight += need
        self.peak_bytes = max(self.peak_bytes, self.bytes_in_flight)
        return acc

    def _zeros(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A zeroed accumulator; a freed one of the same shape is reused (no page faults)."""
        free = self._pool.get((shape, like.dtype, like.device))
        if free:
            t = free.pop()
            self.pooled_bytes -= t.numel() * t.element_size()
            return t.zero_()
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def _release(self, t: torch.Tensor) -> None:
        """Keep at most two freed buffers per shape; they count against ``max_memory`` and
        are dropped first when a new chunk would pass it."""
        free = self._pool.setdefault((tuple(t.shape), t.dtype, t.device), [])
        if len(free) < 2:
            free.append(t)
            self.pooled_bytes += t.numel() * t.element_size()

    # ------------------------------------------------------------ adding
    def add(
        self,
        n: int,
        grids: Sequence[Sequence[int]],
        patches: torch.Tensor,
        var: Optional[torch.Tensor] = None,
        chunks: Optional[Sequence[Sequence[tuple]]] = None,
    ) -> None:
        """Add patches ``(k, C, *window)`` of image ``n`` at grid positions ``grids``.

        ``chunks`` (optional) lists, per patch, the chunks it touches
        (``grid.chunks_of_patch``), when the caller has them already.

        ``var`` (same shape) is required iff the accumulator has a std sink. The caller
        guarantees each patch arrives once (the Large quilts check it).
        """
        grids = [tuple(int(v) for v in g) for g in grids]
        if chunks is None:
            chunks = [self.grid.chunks_of_patch(g) for g in grids]
        touched = [[c for c in cs if not self.is_done((n, *c))] for cs in chunks]
        mode = self.mode
        if mode == "auto":
            mode = "fused" if patches.device.type == "cuda" else "direct"
        if mode == "direct":
            w = self._weight(patches.device, patches.dtype)
            for i, g in enumerate(grids):
                for c in touched[i]:
                    key = (n, *c)
                    acc = self._get(key, patches)
                    cl, pl = self.grid.overlap(g, c)
                    acc[(slice(None), *cl)].addcmul_(patches[(i, slice(None), *pl)], w[pl])
                    if var is not None:
                        self._var[key][(slice(None), *cl)].addcmul_(
                            var[(i, slice(None), *pl)], w[pl]
                        )
                self._count(n, touched[i])
        else:
            for group in self._split(list(range(len(grids))), grids, 0):
                self._add_fused(n, [grids[i] for i in group], patches[group],
                                None if var is None else var[group],
                                sorted({c for i in group for c in touched[i]}))
                for i in group:
                    self._count(n, touched[i])

    def _count(self, n: int, chunks: list) -> None:
        """One more patch arrived for each of ``chunks``; write those now complete."""
        for c in chunks:
            key = (n, *c)
            self._left[key] -= 1
            if self._left[key] == 0:
                self._finish(key)

    def _split(self, items: list, grids: list, axis: int) -> list:
        """Groups whose bounding sub-grid is at least half full (or a single patch)."""
        if len(items) <= 1:
            return [items] if items else []
        nd = self.grid.ndim
        lo = [min(grids[i][a] for i in items) for a in range(nd)]
        hi = [max(grids[i][a] for i in items) for a in range(nd)]
        if math.prod(h - lo_ + 1 for lo_, h in zip(lo, hi)) <= 2 * len(items):
            return [items]
        if axis < nd - 1:
            by: dict = {}
            for i in items:
                by.setdefault(grids[i][axis], []).append(i)
            return [grp for k in sorted(by) for grp in self._split(by[k], grids, axis + 1)]
        runs, cur = [], []
        for i in sorted(items, key=lambda i: grids[i][axis]):
            if cur and grids[i][axis] != grids[cur[-1]][axis] + 1:
                runs.append(cur)
                cur = []
            cur.append(i)
        runs.append(cur)
        return runs

    def _add_fused(self, n, grids, patches, var, chunks) -> None:
        plan = self.grid.plan
        nd = plan.ndim
        lo = [min(g[a] for g in grids) for a in range(nd)]
        hi = [max(g[a] for g in grids) for a in range(nd)]
        kbox = [(l_, h + 1) for l_, h in zip(lo, hi)]
        sub_counts = [h - l_ + 1 for l_, h in zip(lo, hi)]
        flat = torch.tensor(
            [np.ravel_multi_index([g[a] - lo[a] for a in range(nd)], sub_counts) for g in grids],
            device=patches.device,
        )
        w = self._weight(patches.device, patches.dtype)

        def summed(p):
            dense = p.new_zeros((math.prod(sub_counts), *p.shape[1:]))
            dense.index_copy_(0, flat, p)
            ext, total = stitch_box(dense, plan, kbox, weight=w)
            return [e0 for e0, _ in ext], total[0]

        origin, total = summed(patches)
        total_var = summed(var)[1] if var is not None else None
        for c in chunks:
            key = (n, *c)
            acc = self._get(key, patches)
            c0 = [s.start for s in self.grid.chunk_slices(c)]
            add_overlap(acc, c0, total, origin)
            if total_var is not None:
                add_overlap(self._var[key], c0, total_var, origin)

    # ------------------------------------------------------------ finishing
    def _finish(self, key: tuple) -> None:
        n, cidx = key[0], key[1:]
        acc = self._acc.pop(key)
        var = self._var.pop(key, None)
        del self._left[key]
        norm = self.grid.norm(cidx, acc.device, acc.dtype, weight=self.custom_weight) + self.eps
        region = (slice(n, n + 1), slice(0, self.channels), *self.grid.chunk_slices(cidx))
        if var is not None and self.std_sink is not None:
            std = (var / norm).abs_().sqrt_()
            self.std_sink.write(region, std[None])
        mean = acc.div_(norm)
        self.sink.write(region, mean[None], unit=key)
        self._release(acc)
        if var is not None:
            self._release(var)
        self.done.add(key)
        self.chunks_written += 1
        self.bytes_in_flight -= self.chunk_bytes(cidx, acc.element_size())
