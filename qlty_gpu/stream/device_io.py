"""The one seam between device memory and files: kvikio when it can pay, else pinned host.

:func:`choose_io_path` decides how a finished chunk travels from a tensor to a Zarr array:

* ``"kvikio"``: the tensor is on a CUDA device, ``kvikio`` imports, and the array is a local,
  uncompressed Zarr v3 array (bytes codec only, no filters, no sharding). The chunk's bytes
  go from device memory straight into the chunk file (GPUDirect Storage, or kvikio's POSIX
  fallback). GPUDirect only pays when nothing must be decoded on the CPU: Zarr's own
  codecs (zstd, blosc) run on the CPU, so a compressed array takes the pinned path.
* ``"pinned"``: a CUDA tensor copied into a reusable page-locked host buffer, then written
  by Zarr.
* ``"host"``: a CPU tensor, written by Zarr directly.

``QLTY_GPU_IO=kvikio|pinned|host`` forces a path (a forced path that cannot run raises,
naming why). :class:`ChunkWriter` writes chunks through the chosen path, counts bytes and
seconds, and :meth:`ChunkWriter.report` logs one line with the path and GB/s.

The kvikio path is only exercised on a CUDA machine (``gpu``-marked tests); on CPU the
tests check the selection logic and the raw chunk-file layout that path writes (the same
bytes written with plain file I/O read back correctly through Zarr).

Example:
    >>> choose_io_path(torch.device("cpu")).path
    'host'
    >>> w = ChunkWriter()
    >>> import zarr
    >>> a = zarr.create_array(store={}, shape=(4, 4), chunks=(2, 2), dtype="float32")
    >>> w.write(a, (slice(0, 2), slice(0, 2)), torch.ones(2, 2))
    >>> float(a[:2, :2].sum()), w.bytes
    (4.0, 16)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import QltyBackendError, QltyError

__all__ = [
    "IOChoice",
    "choose_io_path",
    "ChunkWriter",
    "host_to_device",
    "device_to_host",
    "raw_chunk_file",
    "kvikio_available",
]

log = logging.getLogger("qlty_gpu.io")
PATHS = ("kvikio", "pinned", "host")


@dataclass(frozen=True)
class IOChoice:
    """The chosen path and why (``reasons`` lists why better paths were not taken)."""

    path: str
    reasons: tuple[str, ...] = ()


def kvikio_available() -> tuple[bool, str]:
    """(True, '') if ``import kvikio`` works, else (False, why)."""
    try:
        import kvikio  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"kvikio not importable ({type(exc).__name__}: {exc})"
    return True, ""


def raw_chunk_file(array: Any, coords: tuple[int, ...]) -> tuple[Optional[Path], str]:
    """Path of the chunk file of ``array`` at chunk ``coords`` if its bytes are raw.

    Returns ``(path, '')`` when the array is a Zarr v3 array in a local directory store,
    with only the bytes codec (little-endian, no compression, no filters, no sharding),
    C order and the default ``c/i/j/k`` chunk key encoding; else ``(None, why)``.
    """
    try:
        from zarr.storage import LocalStore
    except ImportError:  # pragma: no cover - zarr is a core dependency
        return None, "zarr missing"
    md = getattr(array, "metadata", None)
    if md is None or getattr(md, "zarr_format", None) != 3:
        return None, "not a Zarr v3 array"
    if not isinstance(array.store, LocalStore):
        return None, f"store {type(array.store).__name__} is not a local directory"
    if array.compressors or array.filters:
        return None, "the array is compressed or filtered (codecs run on the CPU)"
    ser = array.serializer
    if type(ser).__name__ != "BytesCodec" or str(getattr(ser, "endian", "little")).find("little") < 0:
        return None, f"serializer {type(ser).__name__} is not little-endian bytes"
    if array.order != "C":
        return None, "array order is not C"
    enc = md.chunk_key_encoding
    key = enc.encode_chunk_key(tuple(int(c) for c in coords))
    root = Path(str(array.store.root))
    return root / array.path / key if array.path else root / key, ""


def choose_io_path(
    device: torch.device | str,
    array: Any = None,
    force: Optional[str] = None,
) -> IOChoice:
    """Choose how a chunk on ``device`` reaches ``array`` (see the module docstring).

    Args:
        device: where the finished chunk lives.
        array: the destination Zarr array (None: answer for a compressed/unknown array).
        force: 'kvikio', 'pinned' or 'host' (default: ``$QLTY_GPU_IO`` or automatic).

    Raises:
        QltyError: an unknown forced path.
        QltyBackendError: a forced path that cannot run here, naming why.
    """
    device = torch.device(device)
    force = force or os.environ.get("QLTY_GPU_IO") or None
    if force is not None and force not in PATHS:
        raise QltyError(f"io path must be one of {PATHS}, got {force!r} (QLTY_GPU_IO or force=)")
    if device.type != "cuda":
        auto = IOChoice("host", (f"tensor on {device.type}, not CUDA",))
    else:
        reasons: list[str] = []
        ok, why = kvikio_available()
        if not ok:
            reasons.append(why)
        elif array is None:
            reasons.append("no destination array given")
        else:
            path, why = raw_chunk_file(array, (0,) * len(array.shape))
            if path is None:
                reasons.append(why)
        auto = IOChoice("pinned", tuple(reasons)) if reasons else IOChoice("kvikio")
    if force is None or force == auto.path:
        return auto
    if device.type == "cuda" and force in ("pinned", "host"):
        return IOChoice(force, ("forced",))
    raise QltyBackendError(
        f"io path {force!r} was forced but cannot run for a tensor on {device}: "
        f"{'; '.join(auto.reasons) or 'needs a CUDA tensor'}"
    )


_PINNED: dict = {}


def _pinned_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable page-locked host buffer of at least ``numel`` elements."""
    buf = _PINNED.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
        _PINNED[dtype] = buf
    return buf[:numel]


def device_to_host(t: torch.Tensor, pinned: bool = True) -> np.ndarray:
    """Copy ``t`` to a numpy array (through a pinned staging buffer for CUDA tensors).

    The result is a fresh array the caller owns.
    """
    t = t.detach()
    if t.device.type == "cuda" and pinned:
        stage = _pinned_buffer(t.numel(), t.dtype).view(t.shape)
        stage.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return stage.numpy().copy()
    return t.cpu().numpy()


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a host tensor to ``device``; CUDA copies go through a pinned buffer."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        stage = _pinned_buffer(t.numel(), t.dtype).view(t.shape)
        stage.copy_(t)
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        out.copy_(stage, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the staging buffer is reused
        return out
    return t.to(device)


def _kvikio_write(path: Path, data: torch.Tensor) -> None:  # pragma: no cover - needs CUDA
    import kvikio

    path.parent.mkdir(parents=True, exist_ok=True)
    with kvikio.CuFile(str(path), "w") as f:
        f.write(data)


class ChunkWriter:
    """Writes chunk-aligned regions into Zarr arrays through :func:`choose_io_path`.

    Args:
        force: a forced path (see :func:`choose_io_path`).
        raw_writer: ``fn(path, tensor)`` that writes a whole chunk's bytes to its file
            (default: kvikio's ``CuFile``); tests pass a plain-file writer.

    Attributes:
        bytes: bytes written so far; seconds: time spent writing; paths: paths used.
    """

    def __init__(
        self,
        force: Optional[str] = None,
        raw_writer: Optional[Callable[[Path, torch.Tensor], None]] = None,
    ) -> None:
        self.force = force
        self.raw_writer = raw_writer or _kvikio_write
        self.bytes = 0
        self.seconds = 0.0
        self.paths: dict[str, str] = {}
        self._choice: dict = {}

    def choice(self, device: torch.device, array: Any) -> IOChoice:
        """The (cached) path for tensors on ``device`` written to ``array``."""
        key = (str(device), id(array))
        if key not in self._choice:
            c = choose_io_path(device, array, self.force)
            self._choice[key] = c
            self.paths[c.path] = "; ".join(c.reasons)
        return self._choice[key]

    def write(self, array: Any, region: tuple[slice, ...], data: torch.Tensor | np.ndarray,
              chunk_coords: Optional[tuple[int, ...]] = None) -> None:
        """Write ``data`` (shape of ``region``) into ``array[region]``.

        ``chunk_coords`` names the single chunk the region is (needed by the raw path; a
        short edge chunk is padded with the fill value to the full chunk shape).
        """
        t0 = time.perf_counter()
        if isinstance(data, np.ndarray):
            array[region] = data
            nbytes = data.nbytes
        else:
            c = self.choice(data.device, array)
            nbytes = data.numel() * data.element_size()
            if c.path == "kvikio" and chunk_coords is not None:
                self._write_raw(array, chunk_coords, data)
            else:
                array[region] = device_to_host(data, pinned=(c.path == "pinned"))
        self.bytes += nbytes
        self.seconds += time.perf_counter() - t0

    def _write_raw(self, array: Any, coords: tuple[int, ...], data: torch.Tensor) -> None:
        path, why = raw_chunk_file(array, coords)
        if path is None:
            raise QltyBackendError(f"raw chunk write impossible: {why}")
        full = tuple(array.chunks)
        dt = torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype
        if tuple(data.shape) != full:
            fill = array.fill_value
            pad = torch.full(full, float(fill) if fill is not None else 0.0,
                             dtype=dt, device=data.device)
            pad[tuple(slice(0, s) for s in data.shape)] = data
            data = pad
        self.raw_writer(path, data.to(dt).contiguous())

    def report(self) -> str:
        """One log line: paths used, bytes, seconds and GB/s (also sent to the logger)."""
        gbs = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        paths = ", ".join(f"{p}" + (f" ({why})" if why else "") for p, why in self.paths.items())
        line = (
            f"qlty_gpu io: path={paths or 'none'} wrote {self.bytes / 1e9:.3f} GB in "
            f"{self.seconds:.3f} s = {gbs:.2f} GB/s"
        )
        log.info(line)
        return line
