"""Launch side of ``kernels/zagg_numba.py`` (the CPU z-aggregation).

Launches go through the ops layer's numba runner (:func:`qlty_gpu.ops._launch.run_numba`):
serialised in a process, and the single-threaded twin in a forked child.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .zagg_reference import compute_dtype

__all__ = ["zagg_numba", "why_not_numba"]

_X_DTYPES = (torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.uint16,
             torch.int32, torch.int64, torch.bool)
_OUT_DTYPES = _X_DTYPES


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
    _launch.run_numba(nk._zagg_numba, nk._zagg_numba_serial, *args)
    return out
