"""Large CPU output buffers: huge pages and a small caching pool.

A fresh 100 MB CPU tensor costs ~25k page faults on first touch with 4 KiB pages, which is
slower than the unstitch copy itself (measured on a 2-core machine: 30 ms to allocate and
touch 118 MB against 6 ms for the copy). So large CPU outputs (>= 8 MiB) are

* private anonymous mappings advised ``MADV_HUGEPAGE`` (like torch's
  ``THP_MEM_ALLOC_ENABLE``, but local to our outputs): 7 ms instead of 30 ms for 118 MB;
* returned to a small per-process pool when the tensor that uses them is freed, and reused
  for the next output of the same size class, as the CUDA caching allocator does: in a
  training or inference loop the patch tensor of every iteration reuses the last one's
  pages, with no page faults and no compaction stalls.

The pool holds at most ``QLTY_GPU_CPU_CACHE_MB`` MiB (default 1024; 0 disables pooling) of
buffers nobody uses; ``QLTY_GPU_HUGEPAGES=0`` turns both off (plain ``torch.empty``).
:func:`empty_cache` releases the pool.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref

import numpy as np
import torch

__all__ = ["empty_cpu", "zeros_cpu", "empty_cache", "cached_bytes"]

_HUGE = 2 << 20
_MIN_BYTES = 8 << 20
_CAN = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")
_LOCK = threading.Lock()
_POOL: dict[int, list[mmap.mmap]] = {}
_POOLED = 0


def _enabled() -> bool:
    return _CAN and os.environ.get("QLTY_GPU_HUGEPAGES", "1") not in ("0", "false", "off")


def _cap_bytes() -> int:
    try:
        return max(0, int(os.environ.get("QLTY_GPU_CPU_CACHE_MB", "1024"))) << 20
    except ValueError:
        return 1024 << 20


def _give_back(mm: mmap.mmap) -> None:
    """Finaliser of a buffer's array: keep the mapping for reuse while under the cap."""
    global _POOLED
    size = len(mm)
    with _LOCK:
        if _POOLED + size <= _cap_bytes():
            _POOL.setdefault(size, []).append(mm)
            _POOLED += size
    # otherwise the last reference goes away here and the mapping is unmapped


def _take(size: int) -> mmap.mmap | None:
    global _POOLED
    with _LOCK:
        bucket = _POOL.get(size)
        if bucket:
            _POOLED -= size
            return bucket.pop()
    return None


def empty_cache() -> None:
    """Release every pooled CPU buffer to the operating system."""
    global _POOLED
    with _LOCK:
        _POOL.clear()
        _POOLED = 0


def cached_bytes() -> int:
    """Bytes held by the pool (buffers no tensor uses)."""
    return _POOLED


def _alloc(shape, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(tensor, True if its memory is known to be zero-filled)."""
    shape = tuple(int(s) for s in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes < _MIN_BYTES or not _enabled():
        return torch.empty(shape, dtype=dtype), False
    size = -(-(nbytes + _HUGE) // _HUGE) * _HUGE  # size class: whole huge pages + alignment
    mm = _take(size)
    fresh = mm is None
    if fresh:
        try:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):  # pragma: no cover - kernel without THP support
            return torch.empty(shape, dtype=dtype), False
    raw = np.frombuffer(mm, dtype=np.uint8)
    weakref.finalize(raw, _give_back, mm)
    off = (-raw.ctypes.data) % _HUGE
    t = torch.from_numpy(raw[off : off + nbytes]).view(dtype).view(shape)
    return t, fresh


def empty_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised CPU tensor; pooled huge-page memory when large (see module docstring)."""
    return _alloc(shape, dtype)[0]


def zeros_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """Zero-filled CPU tensor (a fresh anonymous mapping is already zero)."""
    t, zero = _alloc(shape, dtype)
    return t if zero else t.zero_()
