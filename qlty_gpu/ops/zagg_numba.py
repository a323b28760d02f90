"""Launch side of ``kernels/zagg_numba.py`` (the CPU z-aggregation).

Launches are serialised in a process (numba's parallel layers do not take concurrent
launches from Python threads) and a forked child runs the single-threaded twin (GNU
OpenMP's thread pool does not survive ``fork()``).
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from .zagg_reference import compute_dtype

__all__ = ["zagg_numba", "why_not_numba"]

_LOCK = threading.Lock()
_FORKED = False
_X_DTYPES = (torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.uint16,
             torch.int32, torch.int64, torch.bool)
_OUT_DTYPES = _X_DTYPES


def _after_fork_in_child() -> None:
    global _LOCK, _FORKED
    _LOCK = threading.Lock()
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def why_not_numba(x: torch.Tensor, out: torch.Tensor) -> Optional[str]:
    """Why the numba kernel cannot run on these tensors, or None."""
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return "the 'numba' package is not installed"
    if x.device.type != "cpu" or out.device.type != "cpu":
        return "numba runs on CPU tensors only"
    if x.dtype not in _X_DTYPES or out.dtype not in _OUT_DTYPES:
        return f"numba zagg supports {[str(d) for d in _X_DTYPES]}, got {x.dtype} -> {out.dtype}"
    if out.dtype == torch.bool and x.dtype != torch.bool:
        return "a bool output needs a bool source"
    if x.requires_grad or out.requires_grad:
        return "numba does not record autograd"
    return None


def zagg_numba(out, x, idx, kind, chan_base, chan_cstride, jpos) -> torch.Tensor:
    """Fill ``out`` with the numba kernel (see :mod:`qlty_gpu.ops.zagg_reference`)."""
    from ..kernels import zagg_numba as nk

    tabs = [t.to(dtype=torch.int64).contiguous().numpy()
            for t in (idx, kind, chan_base, chan_cstride, jpos)]
    acc = compute_dtype(x.dtype, out.dtype)
    tmpl = torch.empty(x.shape[-1], dtype=acc).numpy()
    args = (x.detach().numpy(), out.detach().numpy(), *tabs, tmpl)
    if _FORKED:
        nk._zagg_numba_serial(*args)
        return out
    with _LOCK:
        nk._zagg_numba(*args)
    return out
