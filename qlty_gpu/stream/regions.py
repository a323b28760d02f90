"""The region side of the region engine (design §7): layout, the region task, tails.

A :class:`RegionLayout` cuts the output into *regions* of whole output chunks (a region is
``region_chunks`` chunks per spatial axis, and ``n_block`` images). Every patch belongs to
exactly one region: the one containing its start. A region's *block* is the output box
covering its core (its own pixels) and every window of its patches — core plus a halo
that reaches forward into later regions (patches start inside the region and extend
forward, never backward).

:func:`run_region` is **the region task**, a pure function of (source, region id,
layout, runner): it reads the input box its patches need, runs them through the model in
batches and accumulates the weighted outputs into the block, and returns a
:class:`RegionResult` — the block's core (an unnormalised weighted sum) and its *tails*,
the parts of the halo that fall into later regions' cores, keyed by neighbour offset.

A region is finished by :func:`finish_core`: its own core sum, then the tails left by
earlier neighbours added in a fixed order (sorted neighbour offsets), divided by the
weight sum of the core. Each patch runs once; the order of additions never depends on who
ran the tasks, so any executor gives the same bits.

Seam for executors (a Dask ``client=`` executor plugs in here): submit
``run_region(source, rid, layout, runner)`` for every ``rid`` in
:meth:`RegionLayout.region_ids` (``source`` an :class:`~qlty_gpu.stream.sources.ArraySource`
of a Zarr/HDF5 array every worker can open, ``runner`` a
:class:`~qlty_gpu.stream.runner.PatchRunner` whose ``specs`` were fixed by a probe, see
:func:`qlty_gpu.stream.executor.probe`); keep each result's tails (a scratch Zarr store
works: they are small, keyed by ``(target region, offset)``); a region can be finished
with :func:`finish_core` as soon as its own task and every task in
:meth:`RegionLayout.backward_neighbours` are done, and written with one whole-chunk write
(its core is a union of output chunks, owned by no other region: no locks). Record it in
the manifest after the write. Results are idempotent, so a retried task is harmless.
The in-process executor (:mod:`qlty_gpu.stream.executor`) is this loop in raster order,
with the tails in a dict.

Example:
    >>> from fractions import Fraction
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> lay = RegionLayout(QuiltPlan((20, 18), 6, 4), n_img=1, region=(8, 9),
    ...                    scale=(Fraction(1), Fraction(1)))
    >>> lay.grid, list(lay.region_ids())[:3]
    ((3, 2), [(0, 0, 0), (0, 0, 1), (0, 1, 0)])
    >>> lay.owned((0, 0, 0)), lay.core_out((0, 0, 0)), lay.block_out((0, 0, 0))
    (((0, 2), (0, 3)), ((0, 8), (0, 9)), ((0, 10), (0, 14)))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from ..errors import QltyError
from ..geometry import QuiltPlan
from .runner import OutputSpec, PatchRunner
from .sources import ArraySource

__all__ = ["RegionLayout", "RegionResult", "run_region", "finish_core"]

Rid = tuple[int, ...]  # (image block, *region index per spatial axis)
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RegionLayout:
    """Regions of an inference: geometry only (picklable, no tensors).

    Args:
        plan: input geometry.
        n_img: number of images ``N``.
        region: input-space region extent per spatial axis (output extent / scale).
        scale: output / input spatial scale per axis.
        n_block: images per region (the output chunk along ``N``).
    """

    plan: QuiltPlan
    n_img: int
    region: tuple[int, ...]
    scale: tuple[Fraction, ...]
    n_block: int = 1
    _starts: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.region) != self.plan.ndim or any(r < 1 for r in self.region):
            raise QltyError(f"region must be {self.plan.ndim} positive ints, got {self.region}")
        for ax, (r, f) in enumerate(zip(self.region, self.scale)):
            if (r * f).denominator != 1:
                raise QltyError(
                    f"region extent {r} on axis {ax} times the output scale {f} is not whole"
                )
        object.__setattr__(self, "_starts", tuple(np.asarray(s) for s in self.plan.starts))

    # ------------------------------------------------------------ ids
    @property
    def grid(self) -> tuple[int, ...]:
        """Regions per spatial axis."""
        return tuple(-(-d // r) for d, r in zip(self.plan.shape, self.region))

    @property
    def n_blocks(self) -> int:
        """Image blocks (regions along ``N``)."""
        return -(-self.n_img // self.n_block)

    def region_ids(self) -> Iterator[Rid]:
        """Every region id ``(image block, *index)`` in raster order."""
        return itertools.product(range(self.n_blocks), *[range(g) for g in self.grid])

    def count(self) -> int:
        """Number of regions."""
        return self.n_blocks * math.prod(self.grid)

    def nrange(self, rid: Rid) -> tuple[int, int]:
        """Images ``[n0, n1)`` of a region."""
        n0 = rid[0] * self.n_block
        return n0, min(n0 + self.n_block, self.n_img)

    # ------------------------------------------------------------ pixels
    def core_in(self, rid: Rid) -> Ranges:
        """Input pixel ranges of the region's core."""
        return tuple((i * r, min((i + 1) * r, d))
                     for i, r, d in zip(rid[1:], self.region, self.plan.shape))

    def _scaled(self, v: int, ax: int) -> int:
        return int(v * self.scale[ax])

    def core_out(self, rid: Rid) -> Ranges:
        """Output pixel ranges of the region's core (whole output chunks)."""
        return tuple((self._scaled(lo, a), self._scaled(hi, a))
                     for a, (lo, hi) in enumerate(self.core_in(rid)))

    def owned(self, rid: Rid) -> Ranges:
        """Patch-index ranges ``[k0, k1)`` per axis of the patches starting in the region."""
        out = []
        for st, (lo, hi) in zip(self._starts, self.core_in(rid)):
            out.append((int(np.searchsorted(st, lo)), int(np.searchsorted(st, hi))))
        return tuple(out)

    def n_patches(self, rid: Rid) -> int:
        """Patches the region's task runs."""
        n0, n1 = self.nrange(rid)
        return (n1 - n0) * math.prod(k1 - k0 for k0, k1 in self.owned(rid))

    def extent_in(self, rid: Rid) -> Optional[Ranges]:
        """Input pixels the region's patches read (None if it owns no patch)."""
        kb = self.owned(rid)
        if any(k1 <= k0 for k0, k1 in kb):
            return None
        return tuple((int(st[k0]), int(st[k1 - 1]) + w)
                     for st, (k0, k1), w in zip(self._starts, kb, self.plan.window))

    def block_out(self, rid: Rid) -> Ranges:
        """Output ranges of the region's block: its core plus its patches' windows."""
        core = self.core_out(rid)
        ext = self.extent_in(rid)
        if ext is None:
            return core
        return tuple((c0, max(c1, self._scaled(e1, a)))
                     for a, ((c0, c1), (_, e1)) in enumerate(zip(core, ext)))

    # ------------------------------------------------------------ neighbours
    def _reach(self) -> tuple[int, ...]:
        """Largest forward neighbour offset per axis a halo can reach."""
        return tuple(-(-(w - 1) // r) + 1 for w, r in zip(self.plan.window, self.region))

    def offsets(self) -> list[tuple[int, ...]]:
        """Forward neighbour offsets (not all zero), sorted: the fixed tail order."""
        return [o for o in itertools.product(*[range(m + 1) for m in self._reach()]) if any(o)]

    def neighbour(self, rid: Rid, offset: Sequence[int], sign: int = 1) -> Optional[Rid]:
        """``rid + sign * offset`` if inside the grid, else None."""
        idx = tuple(i + sign * o for i, o in zip(rid[1:], offset))
        if all(0 <= i < g for i, g in zip(idx, self.grid)):
            return (rid[0], *idx)
        return None

    def tail_box(self, src: Rid, offset: Sequence[int]) -> Optional[Ranges]:
        """Output ranges where ``src``'s block meets the core of ``src + offset``."""
        tgt = self.neighbour(src, offset)
        if tgt is None:
            return None
        box = []
        for (b0, b1), (c0, c1) in zip(self.block_out(src), self.core_out(tgt)):
            lo, hi = max(b0, c0), min(b1, c1)
            if lo >= hi:
                return None
            box.append((lo, hi))
        return tuple(box)

    def backward_neighbours(self, rid: Rid) -> list[tuple[tuple[int, ...], Rid]]:
        """``(offset, source region)`` of every earlier region that leaves a tail in ``rid``."""
        out = []
        for o in self.offsets():
            src = self.neighbour(rid, o, sign=-1)
            if src is not None and self.tail_box(src, o) is not None:
                out.append((o, src))
        return out

    def describe(self) -> dict:
        """JSON-able summary (for provenance and fingerprints)."""
        return {"region": list(self.region), "grid": list(self.grid), "n_block": self.n_block,
                "regions": self.count()}


@dataclass
class RegionResult:
    """What a region task returns.

    Attributes:
        rid: the region id.
        core: unnormalised weighted sum over the core ``(n, K, *core)`` (own patches only).
        tails: ``offset -> (output ranges, (n, K, *box))`` for later neighbours.
        patches: number of patches that went through the model.
    """

    rid: Rid
    core: torch.Tensor
    tails: dict
    patches: int


def _slices(ranges: Ranges, origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(ranges, origin))


def run_region(
    source: ArraySource,
    rid: Rid,
    layout: RegionLayout,
    runner: PatchRunner,
    *,
    tails_only: bool = False,
) -> RegionResult:
    """The region task: run the region's patches and return its core sum and tails.

    Args:
        source: the input ``(N, C, *S)``.
        rid: region id.
        layout: the region layout.
        runner: model and settings; ``runner.specs`` must be set (single output).
        tails_only: skip copying the core (used to rebuild tails on resume).

    Returns:
        The :class:`RegionResult`.
    """
    if runner.specs is None or len(runner.specs) != 1:
        raise QltyError("run_region needs a runner probed for exactly one model output")
    n0, n1 = layout.nrange(rid)
    block = layout.block_out(rid)
    b0 = tuple(lo for lo, _ in block)

    def alloc(specs):
        acc = runner.zeros((n1 - n0, specs[0].channels, *[hi - lo for lo, hi in block]),
                           specs[0].acc_dtype)
        return [acc], [b0]

    ext = layout.extent_in(rid)
    before = runner.patches_run
    if ext is None:
        acc = alloc(runner.specs)[0][0]
    else:
        region = (slice(n0, n1), slice(None), *[slice(lo, hi) for lo, hi in ext])
        xin = source.read(region)
        acc = runner.accumulate(xin, tuple(lo for lo, _ in ext), (n0, n1), layout.owned(rid),
                                alloc)[0]
    tails = {}
    for o in layout.offsets():
        box = layout.tail_box(rid, o)
        if box is not None:
            tails[o] = (box, acc[(slice(None), slice(None), *_slices(box, b0))].clone())
    if tails_only:
        core = acc.new_zeros(0)
    else:
        core = acc[(slice(None), slice(None), *_slices(layout.core_out(rid), b0))]
        if core.shape != acc.shape:
            core = core.clone()  # drop the halo's memory
    return RegionResult(rid, core, tails, runner.patches_run - before)


def finish_core(
    result: RegionResult,
    tails_in: Sequence[tuple[tuple[int, ...], tuple[Ranges, torch.Tensor]]],
    layout: RegionLayout,
    spec: OutputSpec,
) -> torch.Tensor:
    """Normalised core of a region: own sum, then earlier neighbours' tails, / weight sum.

    Args:
        result: the region's own task result.
        tails_in: ``(offset, (ranges, tail))`` from earlier neighbours, any order (they are
            added sorted by offset).
        layout: the region layout.
        spec: the output spec (weight and output plan).

    Returns:
        ``(n, K, *core)`` in the accumulation dtype.
    """
    core_r = layout.core_out(result.rid)
    c0 = tuple(lo for lo, _ in core_r)
    total = result.core
    for _, (box, tail) in sorted(tails_in, key=lambda t: t[0]):
        sl = (slice(None), slice(None), *_slices(box, c0))
        total[sl] += tail.to(total.device)
    return spec.weight.normalize_(total, spec.plan, core_r)
