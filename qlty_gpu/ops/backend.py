"""Choice of compute backend, in one place (design §2).

Candidates in priority order by device: ``triton`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` when asked for explicitly), ``numba`` (CPU), ``torch`` (anywhere).
Each candidate says why it cannot run. ``QLTY_GPU_BACKEND`` (or a ``backend=`` argument)
forces one; a forced backend that cannot run raises :class:`QltyBackendError` with the
reasons, and an unknown name raises too. Nothing falls back silently from a forced choice.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from ..errors import QltyBackendError, QltyError

__all__ = ["BACKENDS", "choose_backend", "why_not", "available_backends", "ENV_BACKEND"]

BACKENDS = ("triton", "numba", "torch")
ENV_BACKEND = "QLTY_GPU_BACKEND"

_NUMBA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@cache
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_kernels_reason() -> str | None:
    """Why the Triton kernels cannot be imported, or None when they can."""
    if not _has_module("triton"):
        return "the 'triton' package is not installed (pip install 'qlty_gpu[triton]')"
    try:
        from .. import kernels  # noqa: F401  (package exists in every install)

        importlib.import_module("qlty_gpu.kernels.triton_quilt")
    except ImportError as exc:
        return f"the Triton kernels could not be imported ({exc})"
    return None


def why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Reason ``backend`` cannot run ``op`` on tensors of this device/dtype, or None."""
    if backend == "torch":
        return None
    if backend == "numba":
        if device.type != "cpu":
            return f"numba runs on CPU tensors only, got a {device.type} tensor"
        if op == "stitch" and dtype not in _NUMBA_DTYPES:
            return f"numba stitch supports {[str(d) for d in _NUMBA_DTYPES]}, got {dtype}"
        if op == "unstitch" and (dtype.is_complex or dtype == torch.bool):
            return f"numba unstitch does not handle {dtype}"
        if not _has_module("numba"):
            return "the 'numba' package is not installed"
        return None
    if backend == "triton":
        reason = _triton_kernels_reason()
        if reason is not None:
            return reason
        if device.type == "cpu" and not _interpreting():
            return "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA tensors, got a {device.type} tensor"
        if op == "stitch" and dtype not in _TRITON_DTYPES:
            return f"Triton stitch supports {[str(d) for d in _TRITON_DTYPES]}, got {dtype}"
        if op == "unstitch" and (dtype.is_complex or dtype == torch.bool):
            return f"Triton unstitch does not handle {dtype}"
        return None
    raise QltyError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _default_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "torch")
    if device.type == "cpu":
        # Triton on CPU only runs in the (slow) interpreter: never chosen implicitly.
        return ("numba", "torch")
    return ("torch",)


def choose_backend(
    op: str, device: torch.device, dtype: torch.dtype, requested: str | None = None
) -> str:
    """Pick the backend for ``op`` ('unstitch' or 'stitch') on this device and dtype.

    Args:
        op: the op family.
        device: device of the input tensor.
        dtype: dtype of the input tensor.
        requested: an explicit backend name; ``None`` or ``""`` reads ``QLTY_GPU_BACKEND``
            and, if that is unset too, chooses automatically.

    Raises:
        QltyError: for an unknown name; QltyBackendError when the forced one cannot run.

    Example:
        >>> choose_backend("stitch", torch.device("cpu"), torch.float32, "torch")
        'torch'
    """
    name = requested or os.environ.get(ENV_BACKEND, "").strip().lower() or None
    if name is not None and name != "auto":
        if name not in BACKENDS:
            raise QltyError(
                f"unknown backend {name!r} (from {'backend=' if requested else ENV_BACKEND}); "
                f"expected one of {BACKENDS} or 'auto'"
            )
        reason = why_not(name, op, device, dtype)
        if reason is not None:
            raise QltyBackendError(f"backend {name!r} cannot run {op} here: {reason}")
        return name
    reasons = []
    for cand in _default_order(device):
        reason = why_not(cand, op, device, dtype)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise QltyBackendError(f"no backend can run {op}: " + "; ".join(reasons))  # pragma: no cover


def available_backends(
    op: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[str]:
    """Backends that can run ``op`` for this device/dtype here (for tests and benchmarks)."""
    dev = torch.device(device)
    return [b for b in BACKENDS if why_not(b, op, dev, dtype) is None]
