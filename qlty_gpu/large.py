"""Out-of-core quilts: ``LargeNCYXQuilt`` / ``LargeNCZYXQuilt`` with qlty 1.5.0's API.

The user drives the patch loop as with qlty (``unstitch_next`` / ``stitch`` /
``return_mean``), or the fast path (``iter_patches`` batches, ``stitch`` of a batch). Unlike
qlty, which read-modify-writes float64 Zarr caches for every patch and then loads the
whole result into RAM, these quilts keep one float32 accumulator per output chunk in
flight (on the patches' device), count the patches each chunk still awaits, and write each
finished chunk **once** to ``filename + "_mean.zarr"`` (and ``"_std.zarr"``): a Zarr v3
float32 array with chunks ``(1, C, *chunks)`` aligned to the quilt. See
:mod:`qlty_gpu.stream.accumulate` for the memory bound and ``max_memory``.

* Sources: the tensor argument may be a torch tensor, numpy array/memmap, Zarr array, h5py
  dataset or any array-like; only the region a patch (or batch) needs is read.
* ``return_mean`` returns numpy when the result is under ``return_limit`` bytes, else the
  Zarr array; it can be called any number of times. ``normalize`` divides by the sum over
  **channels** (qlty documents that; its code sums over images, a [BUG]).
* An existing output is never clobbered: ``overwrite=True`` replaces a store qlty_gpu
  wrote, ``resume=True`` continues a killed run (finished chunks are in the store's
  manifest; their patches are skipped), otherwise a QltyError.

Example:
    >>> import tempfile, os, torch
    >>> f = os.path.join(tempfile.mkdtemp(), "run")
    >>> quilt = LargeNCYXQuilt(f, N=2, Y=50, X=40, window=(16, 16), step=(8, 8), border=2)
    >>> data = torch.randn(2, 3, 50, 40)
    >>> for idx, patches in quilt.iter_patches(data, batch_size=16):
    ...     quilt.stitch(patches * 2, idx)
    >>> mean = quilt.return_mean()
    >>> mean.shape, bool(abs(mean - 2 * data.numpy()).max() < 1e-5)
    ((2, 3, 50, 40), True)
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from .errors import QltyError, QltyShapeAssertionError, QltyTypeError, describe
from .geometry import QuiltPlan
from .stream.accumulate import ChunkAccumulator
from .stream.chunks import ChunkGrid, default_chunks
from .stream.pairs import clean_sparse_pairs
from .stream.results import derived_stores, transformed_chunks, zeros_store
from .stream.sources import as_source
from .stream.store import ZarrSink, fingerprint_diff, read_marker

__all__ = ["LargeNCYXQuilt", "LargeNCZYXQuilt"]

#: default largest result ``return_mean`` hands back as numpy (bytes)
DEFAULT_RETURN_LIMIT = 2 * 1024**3


def _version() -> str:
    from . import __version__

    return __version__


class _LargeQuilt:
    """Shared implementation; subclasses name the spatial axes."""

    _AXES: tuple[str, ...] = ()

    def __init__(
        self,
        filename: Union[str, os.PathLike],
        N: int,
        shape: Sequence[int],
        window,
        step,
        border,
        border_weight: float = 0.1,
        *,
        chunks: Optional[Sequence[int]] = None,
        dtype: Any = "float32",
        overwrite: bool = False,
        resume: bool = False,
        max_memory: Optional[int] = None,
        return_limit: int = DEFAULT_RETURN_LIMIT,
        eps: float = 1e-8,
        compressors: Any = "auto",
        accumulate: str = "auto",
        fingerprint: Optional[dict] = None,
    ) -> None:
        if not isinstance(filename, (str, os.PathLike)):
            raise QltyTypeError(f"filename must be a str or os.PathLike, got {describe(filename)}")
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise QltyError(f"N (number of images) must be an int >= 1, got {N!r}")
        if overwrite and resume:
            raise QltyError("overwrite=True and resume=True exclude each other; choose one")
        if max_memory is not None and (not isinstance(max_memory, (int, np.integer)) or max_memory <= 0):
            raise QltyError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        self.plan = QuiltPlan(tuple(shape), window, step, border, border_weight)
        self.filename = os.fspath(filename)
        self.N = int(N)
        for name, size, count in zip(self._AXES, self.plan.shape, self.plan.counts):
            setattr(self, name, size)
            setattr(self, f"n{name}", count)
        self.window, self.step = self.plan.window, self.plan.step
        self.border, self.border_weight = self.plan.border, self.plan.border_weight
        self.grid = ChunkGrid(self.plan, chunks if chunks is not None else default_chunks(self.plan))
        self.N_chunks = self.N * self.plan.patches_per_image
        self.chunkerator = iter(np.arange(self.N_chunks))
        self.mean = self.std = self.norma = None
        self.dtype = np.dtype(dtype)
        self.overwrite, self.resume = bool(overwrite), bool(resume)
        self.max_memory, self.return_limit = max_memory, int(return_limit)
        self.eps, self.compressors, self.accumulate = float(eps), compressors, accumulate
        self.user_fingerprint = dict(fingerprint or {})
        self._weight = self.plan.weight("cpu", torch.float64).clone()
        self._acc: Optional[ChunkAccumulator] = None
        self._mean_sink: Optional[ZarrSink] = None
        self._std_sink: Optional[ZarrSink] = None
        self._seen = np.zeros(self.N_chunks, dtype=bool)
        self.skipped = 0
        self._stored: Optional[dict] = None
        self._prev_done: set = set()
        self._check_outputs()

    # ------------------------------------------------------------ outputs and resume
    @property
    def mean_path(self) -> str:
        """Path of the mean output store."""
        return self.filename + "_mean.zarr"

    @property
    def std_path(self) -> str:
        """Path of the std output store."""
        return self.filename + "_std.zarr"

    def _fingerprint(self, channels: Optional[int], with_std: Optional[bool]) -> dict:
        w = self._weight
        custom = not torch.equal(w, self.plan.weight("cpu", torch.float64))
        fp = {
            "class": type(self).__name__, "N": self.N, "shape": list(self.plan.shape),
            "window": list(self.window), "step": list(self.step),
            "border": list(self.border) if self.border else None,
            "border_weight": self.border_weight, "eps": self.eps,
            "chunks": list(self.grid.chunks), "dtype": str(self.dtype),
            "weight": hashlib.sha1(w.numpy().tobytes()).hexdigest()[:16] if custom else "plan",
            "C": channels, "std": with_std, **self.user_fingerprint,
        }
        return fp

    def _check_outputs(self) -> None:
        """Refuse early (before any model runs) what creating the outputs would refuse."""
        import zarr

        for path in (self.mean_path, self.std_path):
            if not os.path.lexists(path):
                continue
            try:
                marker = read_marker(zarr.open_array(path, mode="r"))
            except Exception:  # noqa: BLE001 - unreadable: foreign
                marker = None
            if marker is None and (self.overwrite or self.resume):
                raise QltyError(
                    f"{path!r} exists and was not written by qlty_gpu; it is never deleted or "
                    "resumed: remove it yourself or choose another filename"
                )
            if not (self.overwrite or self.resume):
                raise QltyError(
                    f"output {path!r} already exists; pass overwrite=True to replace it or "
                    "resume=True to continue a killed run"
                )
        if self.resume and os.path.lexists(self.mean_path):
            stored = read_marker(zarr.open_array(self.mean_path, mode="r"))["fingerprint"]
            now = self._fingerprint(stored.get("C"), stored.get("std"))
            now["weight"] = stored.get("weight")  # a custom weight may be assigned later
            diff = fingerprint_diff(stored, now)
            if diff:
                raise QltyError(
                    f"resume=True refused: {self.mean_path!r} was made with other settings ("
                    + "; ".join(diff) + ")"
                )
            self._stored = stored
            sink = ZarrSink(self.mean_path, self._out_shape(stored["C"]),
                            self._out_chunks(stored["C"]), dtype=self.dtype,
                            fingerprint=stored, resume=True)
            self._prev_done = {tuple(int(v) for v in k.split(".")) for k in sink.finished}

    def _out_shape(self, channels: int) -> tuple:
        return (self.N, channels, *self.plan.shape)

    def _out_chunks(self, channels: int) -> tuple:
        return (1, channels, *self.grid.chunks)

    def _open(self, channels: int, with_std: bool, like: torch.Tensor) -> None:
        fp = self._fingerprint(channels, with_std)
        if self._stored is not None:
            diff = fingerprint_diff(self._stored, fp)
            if diff:
                raise QltyError(
                    "resume=True refused: the patches do not match the stored run ("
                    + "; ".join(diff) + ")"
                )
        kw = dict(dtype=self.dtype, fingerprint=fp, overwrite=self.overwrite,
                  resume=self.resume, compressors=self.compressors)
        shape, chunks = self._out_shape(channels), self._out_chunks(channels)
        self._std_sink = ZarrSink(self.std_path, shape, chunks, **kw) if with_std else None
        self._mean_sink = ZarrSink(self.mean_path, shape, chunks, **kw)
        self.mean = self._mean_sink.array
        self.std = self._std_sink.array if with_std else None
        custom = fp["weight"] != "plan"
        self._acc = ChunkAccumulator(
            self.grid, self._mean_sink, channels, std_sink=self._std_sink, images=self.N,
            weight=self._weight if custom else None, eps=self.eps, max_memory=self.max_memory,
            mode=self.accumulate, done=self._prev_done,
        )

    # ------------------------------------------------------------ qlty attributes
    @property
    def weight(self) -> torch.Tensor:
        """float64 window-shaped weight map (1 inside, ``border_weight`` in the border).

        Assign a new map before the first :meth:`stitch` to weight patches differently.
        """
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        if self._acc is not None:
            raise QltyError("weight cannot change after the first stitch (chunks are in flight)")
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != self.plan.window:
            raise QltyError(
                f"weight must be a tensor of the window shape {self.plan.window}, got {describe(value)}"
            )
        self._weight = value.detach().to("cpu", torch.float64).clone()

    def get_times(self) -> tuple[int, ...]:
        """Number of patches per spatial axis."""
        return self.plan.counts

    def border_tensor(self) -> np.ndarray:
        """float64 numpy window-shaped mask: 1 in the interior, 0 in the border (as qlty)."""
        return self.plan.border_mask("cpu", torch.float64).numpy().copy()

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={getattr(self, a)}" for a in self._AXES)
        return (f"{type(self).__name__}({self.filename!r}, N={self.N}, {dims}, "
                f"window={self.window}, step={self.step}, border={self.border}, "
                f"chunks={self.grid.chunks}) -> {self.N_chunks} patches")

    # ------------------------------------------------------------ unstitch
    def _index(self, index: Any) -> int:
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = index.item()
        if isinstance(index, np.ndarray) and index.size == 1:
            index = index.item()
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise QltyTypeError(f"patch index must be an int, got {describe(index)}")
        if not 0 <= int(index) < self.N_chunks:
            raise QltyError(f"patch index {int(index)} is out of range [0, {self.N_chunks})")
        return int(index)

    def _source(self, tensor: Any, name: str = "tensor"):
        src = as_source(tensor, name)
        nd = self.plan.ndim
        if src.ndim != nd + 2 or src.shape[2:] != self.plan.shape:
            raise QltyError(
                f"{name} must have shape (N, C, {', '.join(self._AXES)}) with spatial shape "
                f"{self.plan.shape}, got {describe(tensor)}"
            )
        return src

    def _patch_region(self, index: int, n_src: int) -> tuple:
        n, *grid = self.plan.unravel(index)
        if n >= n_src:
            raise QltyError(f"patch index {index} is for image {n}, but the tensor has {n_src} images")
        origin = self.grid.patch_origin(grid)
        return n, origin, (n, slice(None), *[slice(o, o + w) for o, w in zip(origin, self.window)])

    def unstitch(self, tensor: Any, index: int, return_positions: bool = False,
                 include_n_position: bool = False):
        """Patch ``index`` of ``tensor (N, C, *spatial)`` as ``(C, *window)``.

        A torch tensor gives a view (as qlty); other sources are read (only that region).
        With ``return_positions`` also an int64 ``[(n,) start_z?, start_y, start_x]``.
        """
        index = self._index(index)
        src = self._source(tensor)
        n, origin, region = self._patch_region(index, src.shape[0])
        patch = src.read(region)
        if not return_positions:
            return patch
        pos = [n, *origin] if include_n_position else list(origin)
        return patch, torch.tensor(pos, dtype=torch.int64, device=patch.device)

    def unstitch_next(self, tensor: Any, return_positions: bool = False,
                      include_n_position: bool = False):
        """``(index, patch[, position])`` for index 0, 1, ...; StopIteration after the last."""
        index = next(self.chunkerator)
        if return_positions:
            patch, pos = self.unstitch(tensor, index, True, include_n_position)
            return index, patch, pos
        return index, self.unstitch(tensor, index)

    # ------------------------------------------------------------ pending work
    def needed(self, index: int) -> bool:
        """False if patch ``index`` was stitched already or all its chunks are written."""
        index = self._index(index)
        if self._seen[index]:
            return False
        n, *grid = self.plan.unravel(index)
        done = self._acc.is_done if self._acc is not None else (lambda k: k in self._prev_done)
        return any(not done((n, *c)) for c in self.grid.chunks_of_patch(grid))

    def pending_indices(self) -> np.ndarray:
        """int64 indices of the patches :meth:`needed` (all of them in a fresh run)."""
        if not self._prev_done and self._acc is None:
            return np.arange(self.N_chunks, dtype=np.int64)
        return np.array([i for i in range(self.N_chunks) if self.needed(i)], dtype=np.int64)

    def memory_bound(self, channels: int, std: bool = False, batch_size: int = 1) -> int:
        """Peak accumulator bytes for patches in raster order, ``batch_size`` at a time
        (float32; the ``max_memory`` to allow). Independent of N for ``batch_size=1``."""
        elems = self.grid.raster_peak_elements(batch_size, self.N)
        return elems * channels * 4 * (2 if std else 1)

    def iter_patches(self, tensor: Any, batch_size: int = 64, progress: bool = False,
                     device: Optional[Union[str, torch.device]] = None,
                     dtype: Optional[torch.dtype] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(indices int64 (B,), patches (B, C, *window))`` in raster order.

        Only patches still :meth:`needed` are yielded (a resumed run skips finished work).
        Each batch reads the bounding region of its patches once from ``tensor``.

        Args:
            tensor: the images ``(N, C, *spatial)``, any source kind.
            batch_size: patches per batch.
            progress: show a tqdm progress bar.
            device: where the patches go (default: the source's device / CPU).
            dtype: cast the patches (default: keep).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise QltyError(f"batch_size must be an int >= 1, got {batch_size!r}")
        src = self._source(tensor)
        if src.shape[0] != self.N:
            raise QltyError(f"tensor has {src.shape[0]} images, the quilt was made for N={self.N}")
        todo = self.pending_indices()
        if self.max_memory is not None:
            need = self.memory_bound(src.shape[1], batch_size=int(batch_size))
            if need > self.max_memory:
                raise QltyError(
                    f"max_memory={self.max_memory} bytes is below the {need} bytes the chunks in "
                    f"flight need in raster order (C={src.shape[1]}, chunks {self.grid.chunks}); "
                    "use smaller chunks= or a larger max_memory"
                )
        bar = None
        if progress:
            from .errors import require

            bar = require("tqdm", "io").tqdm(total=len(todo), desc="patches", unit="patch")
        try:
            for b0 in range(0, len(todo), int(batch_size)):
                idx = todo[b0:b0 + int(batch_size)]
                yield torch.from_numpy(idx), self._read_batch(src, idx, device, dtype)
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()

    def _read_batch(self, src, idx: np.ndarray, device, dtype) -> torch.Tensor:
        """Patches ``idx``: one read per (image, leading grid planes) group, of the bounding
        box of its patches (consecutive rows of one image in 2-D, of one z-plane in 3-D)."""
        unr = [self.plan.unravel(int(i)) for i in idx]
        groups: dict = {}
        for j, u in enumerate(unr):
            groups.setdefault((u[0], *u[1:-2]), []).append(j)
        out: list = [None] * len(unr)
        for key, rows in groups.items():
            origins = np.array([self.grid.patch_origin(unr[j][1:]) for j in rows])
            lo = origins.min(axis=0)
            hi = origins.max(axis=0) + np.array(self.window)
            box = src.read((key[0], slice(None), *[slice(int(a), int(b)) for a, b in zip(lo, hi)]),
                           device=device, dtype=dtype)
            for j, o in zip(rows, origins):
                out[j] = box[(slice(None), *[slice(int(a - l_), int(a - l_) + w)
                                             for a, l_, w in zip(o, lo, self.window)])]
        return torch.stack(out)

    # ------------------------------------------------------------ stitch
    def _as_patches(self, name: str, value: Any, count: Optional[int]) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise QltyTypeError(f"{name} must be a torch.Tensor or numpy array, got {describe(value)}")
        nd = self.plan.ndim
        if value.dim() == nd + 1:
            value = value.unsqueeze(0)
        if value.dim() != nd + 2 or (count is not None and value.shape[0] != count):
            want = "(1, C, *window) or (C, *window)" if count == 1 else f"({count}, C, *window)"
            raise QltyError(f"{name} must have shape {want} with window {self.window}, got {describe(value)}")
        if tuple(value.shape[2:]) != self.window:
            raise QltyError(f"{name} has window {tuple(value.shape[2:])}, the quilt's window is "
                            f"{self.window} (got {describe(value)})")
        if value.is_complex() or value.dtype == torch.bool:
            raise QltyTypeError(f"{name} must be real-valued, got dtype {value.dtype}")
        value = value.detach()
        return value.to(torch.float64 if value.dtype == torch.float64 else torch.float32)

    def stitch(self, patch: Any, index_flat: Any, patch_var: Any = None) -> None:
        """Accumulate one patch ``(1, C, *window)`` (or ``(C, *window)``) at ``index_flat``,
        or a batch ``(B, C, *window)`` with ``B`` indices.

        ``patch_var`` (broadcastable to the patches) adds to the std output; give it for
        every patch or for none. In a resumed run a patch whose chunks are all written is
        skipped (counted in ``skipped``).

        Raises:
            QltyError: wrong shape, an index out of range, a patch stitched twice, a patch
                for a chunk already written in this run, or a ``max_memory`` overrun.
        """
        if isinstance(index_flat, (torch.Tensor, np.ndarray)) and np.ndim(index_flat) == 1 or \
                isinstance(index_flat, (list, tuple)):
            indices = [self._index(i) for i in (index_flat.tolist() if hasattr(index_flat, "tolist")
                                                  else index_flat)]
            patches = self._as_patches("patch", patch, len(indices))
        else:
            indices = [self._index(index_flat)]
            patches = self._as_patches("patch", patch, 1)
        if len(set(indices)) != len(indices):
            raise QltyError(f"the batch holds patch index(es) more than once: {sorted(indices)}")
        var = None
        if patch_var is not None:
            if isinstance(patch_var, np.ndarray):
                patch_var = torch.from_numpy(patch_var)
            if not isinstance(patch_var, torch.Tensor):
                raise QltyTypeError(f"patch_var must be a tensor, got {describe(patch_var)}")
            pv = patch_var.detach()
            if pv.dim() == patches.dim() - 1:
                pv = pv.unsqueeze(0)
            try:
                var = torch.broadcast_to(pv.to(patches.device, patches.dtype), patches.shape)
            except RuntimeError as exc:
                raise QltyError(f"patch_var {describe(patch_var)} does not broadcast to the patches "
                                f"{tuple(patches.shape)}") from exc
        if self._acc is None:
            self._open(patches.shape[1], var is not None, patches)
        acc = self._acc
        assert acc is not None
        if patches.shape[1] != acc.channels:
            raise QltyShapeAssertionError(
                f"patch has {patches.shape[1]} channels, earlier patches had {acc.channels}")
        if (var is not None) != (acc.std_sink is not None):
            raise QltyError("patch_var must be given for every patch or for none (it decides "
                            f"whether {self.std_path!r} is written at the first stitch)")
        keep, grids, n_of = [], [], []
        for j, index in enumerate(indices):
            n, *grid = self.plan.unravel(index)
            if self._seen[index]:
                raise QltyError(f"patch index {index} was stitched twice")
            chunks = self.grid.chunks_of_patch(grid)
            written = [c for c in chunks if (n, *c) in acc.done]
            if written:
                raise QltyError(
                    f"patch index {index} touches output chunk {(n, *written[0])}, which is "
                    "already complete and written (was this patch stitched twice?)")
            if all((n, *c) in acc.prev_done for c in chunks):
                self.skipped += 1
                continue
            keep.append(j)
            grids.append(tuple(grid))
            n_of.append(n)
        for j in keep:
            self._seen[indices[j]] = True
        # images in order; the accumulator sees one image per call
        for n in sorted(set(n_of)):
            sel = [k for k, m in enumerate(n_of) if m == n]
            rows = [keep[k] for k in sel]
            p = patches[rows] if len(rows) != len(patches) else patches
            v = None if var is None else (var[rows] if len(rows) != len(patches) else var)
            if acc._acc:  # accumulators exist: patches go to their device
                p = p.to(next(iter(acc._acc.values())).device)
                v = None if v is None else v.to(p.device)
            acc.add(n, [grids[k] for k in sel], p, v)

    # ------------------------------------------------------------ results
    def _finalise(self) -> None:
        if self._acc is None:
            raise QltyError("return_mean called before any stitch: there is no result yet")
        if self._acc.unfinished:
            left = int((~self._seen).sum()) - self.skipped
            raise QltyError(
                f"return_mean: {self._acc.unfinished} of {self._acc.total_chunks} output chunks "
                f"still await patches ({left} patches not stitched); stitch every patch first "
                "(pending_indices() lists them)")
        for sink in (self._std_sink, self._mean_sink):
            if sink is not None and not sink.complete:
                sink.finish(expected_units=None if sink is self._std_sink else self._acc.total_chunks)
        self.io_report = self._mean_sink.writer.report()

    def return_mean(self, std: bool = False, normalize: bool = False, eps: Optional[float] = None,
                    renormalize_channels: bool = False, as_zarr: Optional[bool] = None):
        """The stitched mean ``(N, C, *spatial)`` (and std), after every patch was stitched.

        Args:
            std: also return the std (zeros with a warning if no ``patch_var`` was given,
                as qlty).
            normalize: divide by the sum over channels (``renormalize_channels`` is the 3-D
                spelling).
            eps: added to the weight sum; default the constructor's ``eps`` (results are
                written with it; another value is corrected exactly on the way out).
            as_zarr: True returns the Zarr array(s); None picks numpy under
                ``return_limit`` bytes.

        Returns:
            numpy (store dtype, float32 by default) or Zarr arrays; ``(mean, std)`` if std.
        """
        self._finalise()
        normalize = bool(normalize or renormalize_channels)
        eps = self.eps if eps is None else float(eps)
        mean_arr = self._mean_sink.array
        std_arr = self._std_sink.array if self._std_sink is not None else None
        if std and std_arr is None:
            warnings.warn("return_mean(std=True) but no patch_var was stitched: std is zero",
                          stacklevel=2)
        nbytes = int(np.prod(mean_arr.shape)) * mean_arr.dtype.itemsize * (2 if std else 1)
        to_zarr = bool(as_zarr) if as_zarr is not None else nbytes > self.return_limit
        plain = not normalize and eps == self.eps
        if to_zarr:
            if plain:
                m, s = mean_arr, std_arr
            else:
                m, s = self._derived(normalize, eps, std)
            if std and s is None:
                s = self._zeros_store()
            return (m, s) if std else m
        if plain:
            m = mean_arr[:]
            s = std_arr[:] if std_arr is not None else None
        else:
            m = np.empty(mean_arr.shape, mean_arr.dtype)
            s = np.empty(mean_arr.shape, mean_arr.dtype) if std_arr is not None else None
            for region, cm, cs in self._transformed_chunks(normalize, eps):
                m[region] = cm
                if s is not None:
                    s[region] = cs
        if std and s is None:
            s = np.zeros(mean_arr.shape, mean_arr.dtype)
        return (m, s) if std else m

    def _transformed_chunks(self, normalize: bool, eps: float):
        return transformed_chunks(self._mean_sink.array,
                                  self._std_sink.array if self._std_sink is not None else None,
                                  self.grid, self.N, self.eps, eps, normalize,
                                  self._acc.custom_weight)

    def _derived(self, normalize: bool, eps: float, std: bool):
        tag = ("_normalized" if normalize else "") + (f"_eps{eps:g}" if eps != self.eps else "")
        return derived_stores(self.filename, tag, self._mean_sink, self._std_sink if std else None,
                              self._transformed_chunks(normalize, eps))

    def _zeros_store(self):
        return zeros_store(self.filename + "_std_zero.zarr", self._mean_sink)

    # ------------------------------------------------------------ training pairs
    def unstitch_and_clean_sparse_data_pair(self, tensor_in: Any, tensor_out: Any, missing_label):
        """Patches of an input/target pair, keeping those whose target has a label inside
        the border (border pixels of the target set to ``missing_label``).

        Works one image at a time (memory: one image and its patches, plus the kept ones).

        Returns:
            ``(in (K, C, *window), out (K, [C,] *window))``, or ``([], [])`` if none is kept.
        """
        return clean_sparse_pairs(self.plan, self._AXES, tensor_in, tensor_out, missing_label)


class LargeNCYXQuilt(_LargeQuilt):
    """Out-of-core 2-D quilt for ``(N, C, Y, X)`` (qlty's ``LargeNCYXQuilt`` API).

    Args:
        filename: prefix of the outputs ``filename + "_mean.zarr"`` / ``"_std.zarr"``.
        N, Y, X: images and spatial size.
        window, step, border, border_weight: the patch geometry (qlty's meaning).
        **options: ``chunks``, ``dtype``, ``overwrite``, ``resume``, ``max_memory``,
            ``return_limit``, ``eps``, ``compressors``, ``accumulate``, ``fingerprint``.
    """

    _AXES = ("Y", "X")

    def __init__(self, filename, N, Y, X, window, step, border, border_weight: float = 0.1,
                 **options: Any) -> None:
        super().__init__(filename, N, (Y, X), window, step, border, border_weight, **options)


class LargeNCZYXQuilt(_LargeQuilt):
    """Out-of-core 3-D quilt for ``(N, C, Z, Y, X)`` (qlty's ``LargeNCZYXQuilt`` API); clamps
    its last patch like the 2-D one. Options as :class:`LargeNCYXQuilt`."""

    _AXES = ("Z", "Y", "X")

    def __init__(self, filename, N, Z, Y, X, window, step, border=None,
                 border_weight: float = 0.1, **options: Any) -> None:
        super().__init__(filename, N, (Z, Y, X), window, step, border, border_weight, **options)
