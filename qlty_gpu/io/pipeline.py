"""Streaming a planned stack of image slices into a Zarr store: read, compute, write.

Stacks are planned by :mod:`qlty_gpu.io.plan`; :func:`run_stack` is the one skeleton every
converter runs: a threaded :class:`Reader` one batch ahead, a progress bar, an atomic store
and a background :class:`Writer`, with a converter-specific ``create`` (arrays of the store)
and ``compute`` (what to write for one batch).

Example:
    >>> import numpy as np, tempfile, pathlib, tifffile, zarr
    >>> from qlty_gpu.io.stacks import find_stacks
    >>> from qlty_gpu.io.plan import plan_stack
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     tifffile.imwrite(d / f"s_{i}.tif", np.full((4, 4), i, np.uint8))
    >>> plan = plan_stack(find_stacks(d, ".tif", r"(.+)_(\\d+)")[0], "ZCYX", None, False, False)
    >>> def create(store):
    ...     a = zarr.create_array(store=store, shape=plan.shape, chunks=(1, 4, 4), dtype="u1")
    ...     return a, [a]
    >>> def compute(arrays, z0, z1, batch):   # batch: (B, C, Y, X)
    ...     return [(arrays[0], plan.region(z0, z1), plan.to_stored(batch))]
    >>> run_stack(plan, d / "s.zarr", create=create, compute=compute, attrs={"a": 1},
    ...           batch=2, num_workers=1)
    >>> zarr.open_array(d / "s.zarr")[:, 0, 0].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QltyError, QltyTypeError
from .atomic import atomic_zarr_store, mark_writer
from .images import ImageReadError, read_image, to_cyx
from .plan import StackPlan, same_dtype
from .pyramid import cast

__all__ = [
    "BATCH_BYTES",
    "ZSTD_LEVEL",
    "Reader",
    "Writer",
    "run_stack",
    "normalization_stats",
    "batch_bounds",
    "filled_batches",
    "batch_size_for",
    "compressors",
    "array_kwargs",
    "plain_writer",
]

#: Default memory budget of one batch of level-0 slices (in compute precision).
BATCH_BYTES = 16 * 2**20
#: Zstandard level of every array written (zarr's default codec, at the fast level 1:
#: about 1.8x faster than zarr's default level on image data, same ratio within 2 %).
ZSTD_LEVEL = 1


@dataclass
# --------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------


class Reader:
    """Loads batches of slices as ``(B, C, Y, X)`` arrays, one batch ahead, with threads."""

    def __init__(
        self,
        plan: StackPlan,
        num_workers: int | None,
        stats: tuple[Any, Any] | None,
        libs: dict | None = None,
    ):
        self.plan = plan
        self.stats = stats  # (mean, std) floats, or ("image", None) for per-image
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise QltyTypeError(f"num_workers must be None or an int >= 0, got {num_workers!r}")
        self.workers = max(1, num_workers)
        self.libs = libs or {}
        self.file_at = {z: f for z, f in zip(plan.z_of_file, plan.stack.files)}
        self.pool = cf.ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self.ahead = cf.ThreadPoolExecutor(1) if self.workers > 1 else None

    def close(self) -> None:
        """Stop the reader threads (pending reads are cancelled)."""
        for ex in (self.ahead, self.pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _read_one(self, path: Path) -> np.ndarray:
        img = read_image(path, **self.libs)
        p = self.plan
        if img.ndim != len(p.layout):
            raise ImageReadError(
                f"Image {path} has shape {img.shape}, expected layout {p.layout} with "
                f"(C, Y, X) = {(p.C, p.Y, p.X)}"
            )
        if not p.mixed_dtypes and not same_dtype(img.dtype, p.src_dtype):
            raise QltyError(
                f"Image {path} has dtype {img.dtype}, but the first slice of stack "
                f"'{p.stack.basename}' has dtype {p.src_dtype}; slices of one stack must share "
                "a dtype, or pass dtype=... to convert every slice to it"
            )
        cyx = to_cyx(img, p.layout)
        if cyx.shape != (p.C, p.Y, p.X):
            raise QltyError(
                f"Image {path} has shape {img.shape}, expected (C, Y, X) = {(p.C, p.Y, p.X)} "
                f"in layout {p.layout}"
            )
        return cyx

    def _convert(self, cyx: np.ndarray) -> np.ndarray:
        p = self.plan
        if self.stats is None:
            return cast(cyx, p.dtype)
        mean, std = self.stats
        f = cyx.astype(np.float64 if p.dtype == np.float64 else np.float32)
        if mean == "image":
            mean = float(f.mean(dtype=np.float64))
            std = float(f.std(dtype=np.float64)) or 1.0
        f -= mean
        f /= std
        return cast(f, p.dtype)

    def load(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0:z1`` as ``(B, C, Y, X)`` in the stored dtype (zeros in gaps)."""
        p = self.plan
        out = np.zeros((z1 - z0, p.C, p.Y, p.X), dtype=p.dtype)

        def work(z: int) -> None:
            path = self.file_at.get(z)
            if path is None:
                return
            try:
                out[z - z0] = self._convert(self._read_one(path))
            except QltyError:
                raise
            except Exception as exc:
                raise ImageReadError(
                    f"Cannot load image {path} (slice z={z} of stack '{p.stack.basename}'): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

        zs = range(z0, z1)
        if self.pool is None:
            for z in zs:
                work(z)
        else:
            for _ in self.pool.map(work, zs):
                pass
        return out

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(z0, z1, batch)`` for each bound, reading the next batch meanwhile."""
        if self.ahead is None:
            for z0, z1 in bounds:
                yield z0, z1, self.load(z0, z1)
            return
        fut = self.ahead.submit(self.load, *bounds[0]) if bounds else None
        for i, (z0, z1) in enumerate(bounds):
            data = fut.result()
            fut = self.ahead.submit(self.load, *bounds[i + 1]) if i + 1 < len(bounds) else None
            yield z0, z1, data


Job = tuple[Any, tuple, np.ndarray]


class Writer:
    """Writes each batch's regions on one background thread, at most one batch in flight.

    Reading (the reader's prefetch thread), computing (the caller) and encoding/writing (this
    thread) overlap, while memory stays bounded: :meth:`put` waits for the previous batch.
    """

    def __init__(self, threaded: bool):
        self.ex = cf.ThreadPoolExecutor(1) if threaded else None
        self.pending: cf.Future | None = None

    @staticmethod
    def _run(jobs: list[Job]) -> None:
        for arr, region, data in jobs:
            arr[region] = data

    def put(self, jobs: list[Job]) -> None:
        """Write ``jobs`` (``(array, region, data)``), after the previous batch finished."""
        if self.ex is None:
            self._run(jobs)
            return
        self.wait()
        self.pending = self.ex.submit(self._run, jobs)

    def wait(self) -> None:
        """Wait for the batch in flight; its error is raised here."""
        fut, self.pending = self.pending, None
        if fut is not None:
            fut.result()

    def close(self) -> None:
        """Finish (or abandon the error of) the write in flight, so nothing writes later."""
        fut, self.pending = self.pending, None
        if fut is not None:
            cf.wait([fut])
        if self.ex is not None:
            self.ex.shutdown(wait=True)


def normalization_stats(
    plan: StackPlan,
    normalize: bool,
    mean: float | None,
    std: float | None,
    per_image_when_unset: bool,
    workers: int | None,
    libs: dict | None = None,
) -> tuple[Any, Any] | None:
    """``None``, ``(mean, std)``, or ``("image", None)`` (each image by its own statistics).

    Unset statistics are computed over the whole stack (pooled, float64 sums) in one
    streaming pass, unless ``per_image_when_unset`` and both are unset (qlty's pyramids).
    """
    if not normalize:
        return None
    if std is not None and float(std) == 0:
        raise QltyError("normalize_std must be non-zero, got 0")
    if mean is not None and std is not None:
        return (float(mean), float(std))
    if mean is None and std is None and per_image_when_unset:
        return ("image", None)
    libs = libs or {}
    total = total_sq = 0.0
    count = 0

    def one(path: Path) -> tuple[float, float, int]:
        a = read_image(path, **libs).astype(np.float64)
        return float(a.sum()), float(np.square(a).sum()), a.size

    n = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(n) as ex:
        for s, sq, k in ex.map(one, plan.stack.files):
            total += s
            total_sq += sq
            count += k
    gmean = total / count
    gstd = math.sqrt(max(total_sq / count - gmean * gmean, 0.0))
    return (gmean if mean is None else float(mean), (gstd or 1.0) if std is None else float(std))


def batch_bounds(Z: int, batch: int) -> list[tuple[int, int]]:
    """``[(0, batch), (batch, 2 * batch), ..., (.., Z)]``."""
    return [(z0, min(z0 + batch, Z)) for z0 in range(0, Z, batch)]


def filled_batches(plan: StackPlan, batch: int) -> list[tuple[int, int]]:
    """The batches of :func:`batch_bounds` that hold at least one file, in O(files).

    Batches without a file (long gaps with ``fill_gaps=True``) are all zeros, the fill
    value of every array written, so they are skipped: a gap of 1e8 counters costs nothing.
    """
    starts = sorted({z // batch for z in plan.z_of_file})
    return [(k * batch, min((k + 1) * batch, plan.Z)) for k in starts]


def batch_size_for(plan: StackPlan, align: int, batch_size: int | None) -> int:
    """Slices per batch: given or from :data:`BATCH_BYTES`, a multiple of ``align``."""
    if batch_size is not None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise QltyTypeError(f"batch_size must be None or a positive int, got {batch_size!r}")
        b = batch_size
    else:
        b = max(1, BATCH_BYTES // max(1, plan.C * plan.Y * plan.X * 4))
    return max(align, (b // align) * align) if b >= align else align


def compressors() -> list:
    """The codec list of every array written (zstd at :data:`ZSTD_LEVEL`)."""
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=ZSTD_LEVEL)]


# --------------------------------------------------------------------------------------
# The skeleton
# --------------------------------------------------------------------------------------


def run_stack(
    plan: StackPlan,
    out_path: str | os.PathLike,
    *,
    create: Callable[[Any], tuple[Any, list]],
    compute: Callable[[list, int, int, np.ndarray], list[Job]],
    attrs: dict,
    batch: int,
    num_workers: int | None = None,
    stats: tuple[Any, Any] | None = None,
    libs: dict | None = None,
    progress: Callable[[int, str], Any] | None = None,
) -> None:
    """Stream ``plan``'s slices into a new store at ``out_path``, all or nothing.

    Args:
        plan: From :func:`plan_stack`.
        out_path: The store; written as ``<out_path>.partial-<pid>`` and renamed when done.
        create: ``create(store) -> (node, arrays)``: make the arrays in the empty store;
            ``node`` receives ``attrs`` at the end.
        compute: ``compute(arrays, z0, z1, batch) -> jobs`` for a ``(B, C, Y, X)`` batch in
            the stored dtype; a job is ``(array, region, data)``.
        attrs: Attributes written last (a store without them is incomplete).
        batch: Slices per batch.
        num_workers: Reader threads (``None``: up to 8).
        stats: Normalisation statistics (:func:`normalization_stats`).
        libs: ``tifffile``/``pil_image`` overrides for the image reader.
        progress: ``progress(total, desc)`` -> a tqdm-like bar or ``None``.

    Raises:
        QltyError: Any failure, naming the stack (and the file where one is at fault). The
            partial store is removed after every write in flight has finished.
    """
    reader = Reader(plan, num_workers, stats, libs)
    bounds = filled_batches(plan, batch)
    total = sum(z1 - z0 for z0, z1 in bounds)
    bar = progress(total, plan.stack.basename) if progress is not None else None
    try:
        with atomic_zarr_store(out_path) as store:
            node, arrays = create(store)
            mark_writer(store.root)
            writer = Writer(reader.workers > 1)
            try:
                for z0, z1, data in reader.batches(bounds):
                    writer.put(compute(arrays, z0, z1, data))
                    if bar is not None:
                        bar.update(z1 - z0)
                writer.wait()
            finally:
                writer.close()
            node.attrs.update(attrs)
    except Exception as exc:
        if isinstance(exc, QltyError):
            raise
        raise QltyError(
            f"converting stack '{plan.stack.basename}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        reader.close()
        if bar is not None:
            bar.close()


def array_kwargs(plan: StackPlan) -> dict:
    """``create_array`` keywords every stored level shares (dtype, fill, codec, axis names)."""
    return {
        "dtype": plan.dtype,
        "fill_value": 0,
        "compressors": compressors(),
        "dimension_names": list(plan.axis_order.lower()),
    }


def plain_writer(plan: StackPlan, chunks: tuple[int, ...]):
    """``(create, compute)`` for :func:`run_stack`: one array, slices in the stored order."""
    import zarr

    def create(store):
        arr = zarr.create_array(store=store, shape=plan.shape, chunks=chunks, **array_kwargs(plan))
        return arr, [arr]

    def compute(arrays, z0, z1, data):
        return [(arrays[0], plan.region(z0, z1), plan.to_stored(data))]

    return create, compute


