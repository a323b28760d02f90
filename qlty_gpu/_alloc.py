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
buffers nobody uses; ``QLTY_GPU_HUGEPAGES=0`` (or false/off/no) turns both off (plain
``torch.empty``). A value of either variable that is not understood raises
:class:`~qlty_gpu.errors.QltyError` naming it at the next allocation. :func:`empty_cache`
releases the pool.

Buffers come back through a finaliser, which may run inside any garbage collection, also
one that starts while this module holds its lock: finalisers therefore never wait for the
lock (see ``_drain``). The lock is re-created in a forked child.
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from .errors import QltyError

__all__ = ["empty_cpu", "zeros_cpu", "empty_cache", "cached_bytes"]

_HUGE = 2 << 20
_MIN_BYTES = 8 << 20
_CAN = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")
ENV_HUGEPAGES = "QLTY_GPU_HUGEPAGES"
ENV_CACHE_MB = "QLTY_GPU_CPU_CACHE_MB"
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")

# The pool. Finalisers never block on _LOCK: a garbage collection can run a finaliser at any
# allocation, including one made while this very thread holds the lock (issue 8.15: that
# deadlocked). A finaliser appends its mapping to _RETURNED (a deque: append/popleft are
# atomic) and files it only if it gets the lock without waiting; whoever holds the lock
# drains _RETURNED again after letting go, so nothing is left behind.
_LOCK = threading.Lock()
_POOL: dict[int, list[mmap.mmap]] = {}
_POOLED = 0
_RETURNED: collections.deque = collections.deque()


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock would leave the child's copy held forever."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise QltyError(
        f"environment variable {name}={raw!r} is not understood; expected one of "
        f"{_TRUE + _FALSE} (case-insensitive)"
    )


def _env_cache_mb() -> int:
    raw = os.environ.get(ENV_CACHE_MB)
    if raw is None or raw.strip() == "":
        return 1024
    try:
        mb = int(raw.strip())
    except ValueError:
        mb = -1
    if mb < 0:
        raise QltyError(
            f"environment variable {ENV_CACHE_MB}={raw!r} is not understood; expected a whole "
            f"number of MiB >= 0 (0 disables the pool), such as 1024"
        )
    return mb


def _check_env() -> None:
    """Raise :class:`QltyError` naming a ``QLTY_GPU_*`` allocator variable with a bad value."""
    _env_switch(ENV_HUGEPAGES, True)
    _env_cache_mb()


def _enabled() -> bool:
    return _CAN and _env_switch(ENV_HUGEPAGES, True)


def _cap_bytes() -> int:
    """Pool cap; a bad value (reported by the next allocation) pools nothing."""
    try:
        return _env_cache_mb() << 20
    except QltyError:
        return 0


def _drain() -> None:
    """File returned mappings into the pool (those over the cap are unmapped)."""
    global _POOLED
    while _RETURNED:
        if not _LOCK.acquire(blocking=False):
            return  # the holder drains after releasing (see above)
        dropped = []
        try:
            cap = _cap_bytes()
            while True:
                try:
                    mm = _RETURNED.popleft()
                except IndexError:
                    break
                size = len(mm)
                if _POOLED + size <= cap:
                    _POOL.setdefault(size, []).append(mm)
                    _POOLED += size
                else:
                    dropped.append(mm)
        finally:
            _LOCK.release()
        del dropped  # unmapped here, outside the lock


def _give_back(mm: mmap.mmap) -> None:
    """Finaliser of a buffer's array: keep the mapping for reuse while under the cap."""
    _RETURNED.append(mm)
    _drain()


def _take(size: int) -> mmap.mmap | None:
    global _POOLED
    _drain()
    mm = None
    with _LOCK:
        bucket = _POOL.get(size)
        if bucket:
            _POOLED -= size
            mm = bucket.pop()
    _drain()  # what finalisers returned while we held the lock
    return mm


def empty_cache() -> None:
    """Release every pooled CPU buffer to the operating system."""
    global _POOLED
    _drain()
    with _LOCK:
        released = list(_POOL.values())
        _POOL.clear()
        _POOLED = 0
    del released  # unmapped outside the lock
    _drain()
    with _LOCK:  # mappings returned meanwhile go too
        _RETURNED.clear()


def cached_bytes() -> int:
    """Bytes held by the pool (buffers no tensor uses)."""
    _drain()
    return _POOLED


def _alloc(shape, dtype: torch.dtype, min_bytes: Optional[int] = None
           ) -> tuple[torch.Tensor, bool]:
    """(tensor, True if its memory is known to be zero-filled); pooled from ``min_bytes``
    on (None: ``_MIN_BYTES``, read at each call)."""
    _check_env()
    shape = tuple(int(s) for s in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    floor = _MIN_BYTES if min_bytes is None else int(min_bytes)
    if nbytes < max(floor, 1) or not _enabled():
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


def empty_cpu(shape, dtype: torch.dtype, min_bytes: Optional[int] = None) -> torch.Tensor:
    """Uninitialised CPU tensor; pooled huge-page memory from ``min_bytes`` on (default
    8 MiB; see the module docstring)."""
    return _alloc(shape, dtype, min_bytes)[0]


def zeros_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    """Zero-filled CPU tensor (a fresh anonymous mapping is already zero)."""
    t, zero = _alloc(shape, dtype)
    return t if zero else t.zero_()
