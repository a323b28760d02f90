"""What every op family's launchers share: output allocation, lifting to 3 spatial axes,
the numba runner and the Triton launch.

Kernels (``kernels/``) are written once for 3 spatial axes; 2-D and 1-D data get leading
singleton axes (window 1, one start 0) by :func:`lift3` / :func:`pad3`. Every fresh output
of every backend comes from :func:`new_empty` (tests swap in a NaN-filling allocator, so an
element a kernel forgets to write shows up).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .._alloc import empty_cpu, zeros_cpu
from ..errors import QltyError

__all__ = [
    "new_empty",
    "new_zeros",
    "lift3",
    "pad3",
    "next_pow2",
    "cdiv",
    "run_numba",
    "numba_threads",
    "launch_triton",
    "triton_view",
]


# ------------------------------------------------------------------ allocation
def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        return empty_cpu(shape, dtype)  # pooled huge-page memory when large
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output of a launcher (every element must be written by the kernel).

    Tests replace this function (``monkeypatch.setattr(_launch, "new_empty", ...)``) with one
    that fills the buffer with NaN (or a sentinel for integers).
    """
    return _empty(shape, dtype, device)


def new_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled accumulator of a launcher."""
    if torch.device(device).type == "cpu":
        return zeros_cpu(shape, dtype)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


# ------------------------------------------------------------------ 3 axes
def pad3(seq: Sequence[int], fill: int) -> list[int]:
    """``seq`` with ``fill`` prepended up to 3 entries: ``(Y, X) -> (fill, Y, X)``."""
    return [fill] * (3 - len(seq)) + list(seq)


def lift3(t: torch.Tensor, nd: int) -> torch.Tensor:
    """``(N, C, *S)`` with ``nd`` spatial axes -> ``(N, C, 1.., *S)`` with 3: a view."""
    for _ in range(3 - nd):
        t = t.unsqueeze(2)
    return t


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


# ------------------------------------------------------------------ numba
# numba's parallel kernels run one launch at a time in a process (the 'workqueue' threading
# layer aborts on concurrent launches from Python threads; the others run the launches one
# after the other anyway, each using every core), and single-threaded kernels in a forked
# child (GNU OpenMP's pool does not survive fork(), so a DataLoader worker forked after the
# parent used numba would die).
_NUMBA_LOCK = threading.Lock()
_FORKED = False


def _after_fork_in_child() -> None:
    global _NUMBA_LOCK, _FORKED
    _NUMBA_LOCK = threading.Lock()
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def numba_threads() -> int:
    """Threads a numba launch will use here (1 in a forked child)."""
    import numba

    return 1 if _FORKED else numba.get_num_threads()


def run_numba(parallel: Any, serial: Any, *args: Any) -> None:
    """Run a numba kernel: ``parallel`` under the process-wide launch lock, or its
    single-threaded twin ``serial`` in a forked child."""
    if _FORKED:
        serial(*args)
        return
    with _NUMBA_LOCK:
        parallel(*args)


# ------------------------------------------------------------------ Triton
def launch_triton(kernel: Any, grid: tuple, device: torch.device, *args: Any, **kwargs: Any
                  ) -> None:
    """``kernel[grid](*args, **kwargs)`` on the tensors' CUDA device (not just the current
    one). Grids are 1-D and must stay below 2**31 programs (the CUDA limit, and what lets
    the kernels decompose ``pid`` in int32)."""
    if grid[0] >= 2**31:
        raise QltyError(
            f"this call needs {grid[0]} Triton programs, more than the 2**31 - 1 one launch "
            f"can have; split the batch (N) or the channels (C) and call again"
        )
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def triton_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 travels to Triton as its int16 bit pattern (same storage, same strides)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
