"""z-aggregation op: validated entry point and backend choice.

``zagg(out, x, table, jpos)`` builds every 2.5D channel of a slab in one pass: identity
gathers, MEAN and population STD over z-neighbour groups (see
:mod:`qlty_gpu.ops.zagg_reference` for the definition). CUDA tensors run the Triton kernel
(``kernels/zagg_triton.py``); CPU tensors run the numba kernel (``kernels/zagg_numba.py``)
where it supports the dtypes, else the vectorised torch version.
``QLTY_GPU_BACKEND=triton`` with ``TRITON_INTERPRET=1`` runs the Triton kernel on CPU
tensors (how the tests cover it); ``torch`` forces the reference anywhere.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..errors import QltyBackendError, QltyError, QltyTypeError, describe
from .zagg_reference import zagg_reference

__all__ = ["zagg", "zagg_backend", "ZAGG_BACKENDS"]

ZAGG_BACKENDS = ("triton", "numba", "torch")


def _why_not_triton(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install 'qlty_gpu[triton]')"
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cpu" and not interp:
        return "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton runs on CUDA tensors, got a {device.type} tensor"
    return None


def zagg_backend(
    device: torch.device,
    requested: Optional[str] = None,
    x: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> str:
    """'triton' for CUDA tensors; on CPU 'numba' when it handles ``x``/``out``, else 'torch'.

    ``requested`` (or ``QLTY_GPU_BACKEND``) forces one; a forced backend that cannot run
    raises :class:`QltyBackendError` with the reason.
    """
    from .zagg_numba import why_not_numba

    name = requested or os.environ.get("QLTY_GPU_BACKEND", "").strip().lower() or "auto"
    if name == "auto":
        if device.type == "cuda" and _why_not_triton(device) is None:
            return "triton"
        if device.type == "cpu" and x is not None and why_not_numba(x, out) is None:
            return "numba"
        return "torch"
    if name not in ZAGG_BACKENDS:
        raise QltyError(f"unknown backend {name!r}; expected one of {ZAGG_BACKENDS} or 'auto'")
    reason = None
    if name == "triton":
        reason = _why_not_triton(device)
    elif name == "numba" and x is not None:
        reason = why_not_numba(x, out)
    if reason is not None:
        raise QltyBackendError(f"backend {name!r} cannot run zagg here: {reason}")
    return name


def zagg(
    out: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    kind: torch.Tensor,
    chan_base: torch.Tensor,
    chan_cstride: torch.Tensor,
    jpos: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fill ``out`` ``(N, J', C', Y, X)`` from slab ``x`` ``(N, C, S, Y, X)`` (in place).

    Args:
        out: output view, any strides, on ``x``'s device.
        x: the slab.
        idx: int64 ``(J, K, G)`` slab-relative z per member (-1 zero slice, -2 nothing).
        kind: int64 ``(K,)`` 0 identity, 1 mean, 2 std.
        chan_base, chan_cstride: int64 ``(K,)``: output channel ``base + c * cstride``.
        jpos: int64 ``(J,)`` output row of each table row.
        backend: 'triton', 'numba', 'torch' or None (automatic).

    Returns:
        ``out``.

    Raises:
        QltyError: on inconsistent shapes, devices or table values.
    """
    for name, t in (("out", out), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            raise QltyTypeError(f"{name} must be a 5-D tensor, got {describe(t)}")
    if out.device != x.device:
        raise QltyError(f"out is on {out.device} but x is on {x.device}; they must match")
    N, C, S, Y, X = x.shape
    J, K, G = idx.shape
    if out.shape[0] != N or tuple(out.shape[3:]) != (Y, X):
        raise QltyError(f"out shape {tuple(out.shape)} does not match slab {tuple(x.shape)}")
    if idx.numel() and (int(idx.max()) >= S or int(idx.min()) < -2):
        raise QltyError(f"idx values must lie in [-2, {S}), got [{int(idx.min())}, {int(idx.max())}]")
    chans = chan_base + (C - 1) * chan_cstride
    if K and (int(chans.max()) >= out.shape[2] or int(chan_base.min()) < 0):
        raise QltyError(f"channel map exceeds out's {out.shape[2]} channels")
    if J and (int(jpos.max()) >= out.shape[1] or int(jpos.min()) < 0):
        raise QltyError(f"jpos exceeds out's {out.shape[1]} rows")
    if (x.dtype.is_complex or out.dtype.is_complex):
        raise QltyTypeError(f"complex tensors are not supported (x {x.dtype}, out {out.dtype})")
    chosen = zagg_backend(x.device, backend, x, out)
    if chosen == "triton":
        from .zagg_triton import zagg_triton

        return zagg_triton(out, x, idx, kind, chan_base, chan_cstride, jpos)
    if chosen == "numba":
        from .zagg_numba import zagg_numba

        return zagg_numba(out, x, idx, kind, chan_base, chan_cstride, jpos)
    return zagg_reference(out, x, idx, kind, chan_base, chan_cstride, jpos)
