"""The output sink: a Zarr v3 array written chunk by chunk, with a manifest, for resume.

:class:`ZarrSink` creates (or opens) the output array at a path or wraps a given Zarr
array, and guarantees:

* **No silent clobbering.** An existing output is replaced only with ``overwrite=True``, and
  only if it is a store qlty_gpu wrote (its ``zarr.json`` carries our marker); anything else
  at the path is never deleted. A given array that already holds data needs
  ``overwrite=True`` too. Without either flag an existing output raises
  :class:`~qlty_gpu.errors.QltyError`.
* **Whole-chunk writes.** :meth:`ZarrSink.write` accepts only chunk-aligned regions, so Zarr
  never reads a chunk back to merge it (no read-modify-write); each region is written once.
* **A manifest of finished units**, named by the caller (a chunk index tuple, a region
  number, any short string). A unit is recorded only after its data is written: one small
  key per unit (``<array>/qlty_gpu_done/<unit>``) set after the chunk write returned. Keys
  are independent, so recording is O(1) and a kill can lose at most the unit in flight.
  Zarr ignores these keys when reading the array.
* **A settings fingerprint** (a JSON-able dict: window, step, weight, model hash, version...)
  kept in the array's attributes. ``resume=True`` on a store made with other settings is
  refused with a QltyError naming every key that changed.
* **Completion marker.** ``attrs['qlty_gpu']['complete']`` is False from creation until
  :meth:`ZarrSink.finish` runs after the last unit; a failed or killed run never leaves a
  store that looks complete (an overwrite first marks the old store incomplete).

Writes survive a killed process (Zarr's local store writes each file atomically); they are
not fsync'ed, so a power cut may lose the last few chunks (the manifest may then claim more
than the disk holds: run with ``fsync=True`` to make every unit durable).

Example:
    >>> import tempfile, os, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "out.zarr")
    >>> sink = ZarrSink(path, shape=(4, 6), chunks=(2, 3), fingerprint={"window": [2, 3]})
    >>> sink.write((slice(0, 2), slice(0, 3)), np.ones((2, 3), np.float32), unit=(0, 0))
    >>> sink.is_finished((0, 0)), sink.is_finished((1, 1)), sink.complete
    (True, False, False)
    >>> again = ZarrSink(path, shape=(4, 6), chunks=(2, 3), fingerprint={"window": [2, 3]},
    ...                  resume=True)
    >>> sorted(again.finished)
    ['0.0']
    >>> ZarrSink(path, shape=(4, 6), chunks=(2, 3), fingerprint={"window": [4, 4]}, resume=True)
    Traceback (most recent call last):
    ...
    qlty_gpu.errors.QltyError: ...window: stored [2, 3], now [4, 4]...
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import QltyError, QltyTypeError, describe
from .device_io import ChunkWriter

__all__ = ["ZarrSink", "MARKER", "unit_key", "fingerprint_diff", "read_marker"]

MARKER = "qlty_gpu"
_DONE = "qlty_gpu_done"
_KIND = "qlty_gpu.stream.ZarrSink"

Unit = Union[str, int, Sequence[int]]


def unit_key(unit: Unit) -> str:
    """The manifest key of a unit: ints joined by '.', or the string itself.

    Example:
        >>> unit_key((0, 2, 1)), unit_key(7), unit_key("region-3")
        ('0.2.1', '7', 'region-3')
    """
    if isinstance(unit, str):
        key = unit
    elif isinstance(unit, (int, np.integer)) and not isinstance(unit, bool):
        key = str(int(unit))
    elif isinstance(unit, (tuple, list)) and all(
        isinstance(u, (int, np.integer)) and not isinstance(u, bool) for u in unit
    ):
        key = ".".join(str(int(u)) for u in unit)
    else:
        raise QltyTypeError(f"unit must be a str, an int or a tuple of ints, got {describe(unit)}")
    if not key or "/" in key or key.startswith(".") or len(key) > 200:
        raise QltyError(f"unit name {key!r} must be 1-200 characters without '/' or a leading '.'")
    return key


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def fingerprint_diff(stored: dict, now: dict) -> list[str]:
    """Human-readable list of the keys whose values differ (added or removed included).

    Example:
        >>> fingerprint_diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 3), "c": 0})
        ['b: stored [1, 2], now [1, 3]', 'c: stored <absent>, now 0']
    """
    stored, now = _jsonable(stored or {}), _jsonable(now or {})
    out = []
    for k in sorted(set(stored) | set(now)):
        a, b = stored.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: stored {json.dumps(a) if a != '<absent>' else a}, "
                       f"now {json.dumps(b) if b != '<absent>' else b}")
    return out


def read_marker(array: Any) -> Optional[dict]:
    """Our marker dict from a Zarr array's attributes, or None if it is not ours."""
    try:
        m = dict(array.attrs).get(MARKER)
    except Exception:  # noqa: BLE001 - unreadable attributes: not ours
        return None
    if isinstance(m, dict) and m.get("kind") == _KIND:
        return m
    return None


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


class ZarrSink:
    """A Zarr v3 output array with a manifest of finished units (see the module docstring).

    Args:
        target: a path (str or ``os.PathLike``) for a directory store, or a Zarr array.
        shape: full array shape, e.g. ``(N, C, Y, X)``.
        chunks: chunk shape (at a path; a given array must already have these chunks;
            ``None`` accepts the given array's chunks).
        dtype: array dtype (default float32).
        fingerprint: JSON-able settings; ``resume=True`` requires them to be equal.
        overwrite: replace an existing qlty_gpu store (or take over a given non-empty array).
        resume: reopen an existing store made with the same fingerprint, keeping its
            manifest (with nothing there, a new store is created).
        fill_value: value of never-written elements.
        compressors: Zarr compressors (``"auto"``: Zarr's default; ``None``: uncompressed,
            which lets CUDA chunks go through kvikio).
        writer: the :class:`~qlty_gpu.stream.device_io.ChunkWriter` to write through.
        fsync: also fsync each chunk file and manifest key (local stores only).

    Raises:
        QltyError: an existing output without ``overwrite``/``resume``; a foreign store or
            file at the path for ``overwrite``/``resume``; a fingerprint, shape, chunk or
            dtype mismatch on resume.
    """

    def __init__(
        self,
        target: Union[str, os.PathLike, Any],
        shape: Sequence[int],
        chunks: Optional[Sequence[int]] = None,
        *,
        dtype: Any = "float32",
        fingerprint: Optional[dict] = None,
        overwrite: bool = False,
        resume: bool = False,
        fill_value: float = 0.0,
        compressors: Any = "auto",
        writer: Optional[ChunkWriter] = None,
        fsync: bool = False,
    ) -> None:
        import zarr

        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.fingerprint = _jsonable(fingerprint or {})
        self.writer = writer or ChunkWriter()
        self.fsync = bool(fsync)
        self.resumed = False
        if overwrite and resume:
            raise QltyError("overwrite=True and resume=True exclude each other; choose one")
        if isinstance(target, (str, os.PathLike)):
            self.path: Optional[str] = os.fspath(target)
            if chunks is None:
                raise QltyError("chunks must be given to create an output at a path")
            self.array = self._open_path(zarr, tuple(int(c) for c in chunks), overwrite, resume,
                                         fill_value, compressors)
        elif type(target).__module__.startswith("zarr") and hasattr(target, "attrs"):
            self.path = None
            self.array = self._adopt(target, chunks, overwrite, resume)
        else:
            raise QltyTypeError(
                f"target must be a path (str/os.PathLike) or a Zarr array, got {describe(target)}"
            )
        self.chunks = tuple(int(c) for c in self.array.chunks)
        self._finished: set[str] = self._load_manifest() if self.resumed else set()

    # ------------------------------------------------------------ opening
    def _new_marker(self) -> dict:
        return {"kind": _KIND, "version": 1, "fingerprint": self.fingerprint, "complete": False}

    def _check_layout(self, array: Any, chunks: Optional[tuple], where: str) -> None:
        problems = []
        if tuple(array.shape) != self.shape:
            problems.append(f"shape {tuple(array.shape)} != {self.shape}")
        if chunks is not None and tuple(array.chunks) != tuple(chunks):
            problems.append(f"chunks {tuple(array.chunks)} != {tuple(chunks)}")
        if np.dtype(array.dtype) != self.dtype:
            problems.append(f"dtype {array.dtype} != {self.dtype}")
        if problems:
            raise QltyError(f"{where} does not match this output: " + "; ".join(problems))

    def _check_resume(self, marker: dict, where: str) -> None:
        diff = fingerprint_diff(marker.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise QltyError(
                f"resume=True refused: {where} was made with other settings ("
                + "; ".join(diff) + "); pass overwrite=True to start again, or use the "
                "original settings"
            )

    def _open_path(self, zarr, chunks, overwrite, resume, fill_value, compressors):
        path = self.path
        assert path is not None
        if os.path.lexists(path):
            existing = None
            try:
                existing = zarr.open_array(path, mode="r")
            except Exception:  # noqa: BLE001 - not a readable Zarr array: foreign
                existing = None
            marker = read_marker(existing) if existing is not None else None
            if resume:
                if marker is None:
                    raise QltyError(
                        f"resume=True refused: {path!r} exists but is not a qlty_gpu output "
                        "(no qlty_gpu marker in its zarr.json)"
                    )
                self._check_resume(marker, repr(path))
                self._check_layout(existing, chunks, repr(path))
                self.resumed = True
                return zarr.open_array(path, mode="r+")
            if not overwrite:
                raise QltyError(
                    f"output {path!r} already exists; pass overwrite=True to replace it "
                    "or resume=True to continue it"
                )
            if marker is None:
                raise QltyError(
                    f"overwrite=True refused: {path!r} exists and was not written by qlty_gpu "
                    "(no qlty_gpu marker); it is never deleted: remove it yourself or choose "
                    "another path"
                )
            # first make the old store look unfinished (atomic), then delete it
            old = zarr.open_array(path, mode="r+")
            m = dict(marker)
            m["complete"] = False
            old.update_attributes({MARKER: m})
            shutil.rmtree(path)
        return zarr.create_array(
            store=path, shape=self.shape, chunks=chunks, dtype=self.dtype,
            fill_value=fill_value, compressors=compressors,
            attributes={MARKER: self._new_marker()},
        )

    def _adopt(self, array, chunks, overwrite, resume):
        where = f"the given Zarr array {describe(array)}"
        self._check_layout(array, tuple(chunks) if chunks is not None else None, where)
        marker = read_marker(array)
        if marker is not None:
            if resume:
                self._check_resume(marker, where)
                self.resumed = True
                return array
            if not overwrite:
                raise QltyError(
                    f"{where} already holds a qlty_gpu output; pass overwrite=True to replace "
                    "it or resume=True to continue it"
                )
        elif not overwrite and getattr(array, "nchunks_initialized", 0):
            raise QltyError(
                f"{where} already holds data ({array.nchunks_initialized} chunks written); "
                "pass overwrite=True to write over it"
            )
        self.array = array
        self._clear_manifest()
        array.update_attributes({MARKER: self._new_marker()})
        return array

    # ------------------------------------------------------------ manifest
    def _prefix(self) -> str:
        p = self.array.path
        return f"{p}/{_DONE}/" if p else f"{_DONE}/"

    def _load_manifest(self) -> set[str]:
        prefix = self._prefix()

        async def collect():
            return [k async for k in self.array.store.list_prefix(prefix)]

        return {k[len(prefix):] for k in _sync(collect())}

    def _clear_manifest(self) -> None:
        store = self.array.store
        if getattr(store, "supports_deletes", True):
            _sync(store.delete_dir(self._prefix().rstrip("/")))

    def record(self, unit: Unit) -> None:
        """Record ``unit`` as finished (call only after its data is written)."""
        from zarr.core.buffer import default_buffer_prototype

        key = unit_key(unit)
        buf = default_buffer_prototype().buffer.from_bytes(b"1")
        _sync(self.array.store.set(self._prefix() + key, buf))
        if self.fsync and self.path is not None:
            self._fsync(Path(self.path) / (self.array.path or "") / _DONE / key)
        self._finished.add(key)

    @staticmethod
    def _fsync(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def finished(self) -> frozenset[str]:
        """Keys of the finished units (see :func:`unit_key`)."""
        return frozenset(self._finished)

    def is_finished(self, unit: Unit) -> bool:
        """True if ``unit`` was recorded (in this run or a resumed one)."""
        return unit_key(unit) in self._finished

    # ------------------------------------------------------------ data
    def region_of_chunk(self, coords: Sequence[int]) -> tuple[slice, ...]:
        """Array region of chunk ``coords`` (clipped at the array edge)."""
        if len(coords) != len(self.shape):
            raise QltyError(f"chunk coords {tuple(coords)} need {len(self.shape)} entries")
        return tuple(
            slice(c * e, min((c + 1) * e, d)) for c, e, d in zip(coords, self.chunks, self.shape)
        )

    def _check_aligned(self, region: tuple[slice, ...]) -> None:
        for ax, (r, e, d) in enumerate(zip(region, self.chunks, self.shape)):
            if r.start % e or (r.stop % e and r.stop != d) or r.stop <= r.start:
                raise QltyError(
                    f"region {region!r} is not chunk-aligned on axis {ax} (chunks {self.chunks}, "
                    f"shape {self.shape}): writes must cover whole chunks"
                )

    def write(
        self,
        region: Sequence[slice],
        data: Union[np.ndarray, torch.Tensor],
        unit: Optional[Unit] = None,
    ) -> None:
        """Write ``data`` into the chunk-aligned ``region``; then record ``unit`` if given.

        Raises:
            QltyError: a region that is not chunk-aligned, or data of another shape.
        """
        if len(region) != len(self.shape) or not all(isinstance(r, slice) for r in region):
            raise QltyError(f"region must be {len(self.shape)} slices, got {region!r}")
        region = tuple(
            slice(0 if r.start is None else r.start, d if r.stop is None else r.stop)
            for r, d in zip(region, self.shape)
        )
        self._check_aligned(region)
        want = tuple(r.stop - r.start for r in region)
        if tuple(data.shape) != want:
            raise QltyError(f"data has shape {tuple(data.shape)}, region {region!r} needs {want}")
        coords = None
        if all(r.stop - r.start <= e for r, e in zip(region, self.chunks)):
            coords = tuple(r.start // e for r, e in zip(region, self.chunks))
        if isinstance(data, torch.Tensor):
            data = data.detach()
            if data.dtype != torch.from_numpy(np.zeros(0, self.dtype)).dtype:
                data = data.to(torch.from_numpy(np.zeros(0, self.dtype)).dtype)
        else:
            data = np.asarray(data, dtype=self.dtype)
        self.writer.write(self.array, region, data, chunk_coords=coords)
        if self.fsync and self.path is not None:
            self._fsync_region(region)
        if unit is not None:
            self.record(unit)

    def _fsync_region(self, region: tuple[slice, ...]) -> None:
        """fsync the chunk files holding ``region`` (before its unit is recorded)."""
        import itertools

        enc = self.array.metadata.chunk_key_encoding
        root = Path(str(self.array.store.root)) / (self.array.path or "")
        ranges = [range(r.start // e, -(-r.stop // e)) for r, e in zip(region, self.chunks)]
        for coords in itertools.product(*ranges):
            self._fsync(root / enc.encode_chunk_key(coords))

    def write_chunk(self, coords: Sequence[int], data, unit: Optional[Unit] = None) -> None:
        """Write one whole chunk (see :meth:`write`); ``unit`` defaults to nothing."""
        self.write(self.region_of_chunk(coords), data, unit)

    # ------------------------------------------------------------ completion
    @property
    def marker(self) -> dict:
        """The current marker dict (fingerprint, completion state)."""
        return read_marker(self.array) or {}

    @property
    def complete(self) -> bool:
        """True once :meth:`finish` has run."""
        return bool(self.marker.get("complete", False))

    def finish(self, expected_units: Optional[int] = None, **info: Any) -> None:
        """Mark the store complete (after every unit is written and recorded).

        Args:
            expected_units: if given, the number of units that must be finished.
            **info: extra JSON-able facts kept in the marker (timings, counts...).

        Raises:
            QltyError: fewer finished units than ``expected_units``.
        """
        if expected_units is not None and len(self._finished) < expected_units:
            raise QltyError(
                f"cannot mark the output complete: {len(self._finished)} of {expected_units} "
                "units are finished"
            )
        m = self.marker or self._new_marker()
        m.update(_jsonable(info))
        m["complete"] = True
        m["finished_units"] = len(self._finished)
        self.array.update_attributes({MARKER: m})

    def __repr__(self) -> str:
        where = self.path if self.path is not None else describe(self.array)
        return (f"ZarrSink({where!r}, shape={self.shape}, chunks={self.chunks}, "
                f"finished={len(self._finished)}, complete={self.complete})")
