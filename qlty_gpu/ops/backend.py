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

__all__ = [
    "BACKENDS",
    "DTYPES",
    "ENV_BACKEND",
    "available_backends",
    "choose_backend",
    "why_not",
]

BACKENDS = ("triton", "numba", "torch")
ENV_BACKEND = "QLTY_GPU_BACKEND"

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
NDIMS = (1, 2, 3)

# The one capability table: dtypes of the input tensor (x for unstitch, patches for stitch)
# each compiled backend runs natively. 'torch' runs anything torch can index and copy.
# The launchers trust this table: nothing is converted or replaced behind an explicit choice.
DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {
    ("numba", "unstitch"): _FLOATS + _INTS,
    ("numba", "stitch"): _FLOATS + _INTS + (torch.bool,),
    ("triton", "unstitch"): _FLOATS + _INTS,
    ("triton", "stitch"): _FLOATS + _INTS,
}
OPS = ("unstitch", "stitch")


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

        importlib.import_module("qlty_gpu.kernels.quilt_triton")
    except ImportError as exc:
        return f"the Triton kernels could not be imported ({exc})"
    return None


def _dtype_reason(backend: str, op: str, dtype: torch.dtype) -> str | None:
    allowed = DTYPES.get((backend, op))
    if allowed is not None and dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"{backend} {op} runs {names}, got {dtype}"
    return None


def why_not(
    backend: str, op: str, device: torch.device, dtype: torch.dtype, ndim: int = 2
) -> str | None:
    """Reason ``backend`` cannot run ``op`` on this input, or None when it can.

    The single capability table of the op family: the launchers run exactly what this
    accepts, and :func:`choose_backend` raises with this reason when a backend it rejects
    is forced.

    Args:
        backend: 'triton', 'numba' or 'torch'.
        op: 'unstitch' or 'stitch'.
        device: device of the input tensor.
        dtype: dtype of the input tensor (x for unstitch, patches for stitch).
        ndim: number of spatial dimensions.

    Example:
        >>> why_not("numba", "stitch", torch.device("cpu"), torch.complex64)  # doctest: +ELLIPSIS
        'numba stitch runs float32, ..., got torch.complex64'
    """
    if op not in OPS:
        raise QltyError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise QltyError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if ndim not in NDIMS:
        return f"{op} handles 1 to 3 spatial dims, got {ndim}"
    if backend == "torch":
        return None
    if backend == "numba":
        if device.type != "cpu":
            return f"numba runs on CPU tensors only, got a {device.type} tensor"
        reason = _dtype_reason(backend, op, dtype)
        if reason is not None:
            return reason
        if not _has_module("numba"):
            return "the 'numba' package is not installed"
        return None
    reason = _triton_kernels_reason()
    if reason is not None:
        return reason
    if device.type == "cpu" and not _interpreting():
        return "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA tensors, got a {device.type} tensor"
    return _dtype_reason(backend, op, dtype)


def _default_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "torch")
    if device.type == "cpu":
        # Triton on CPU only runs in the (slow) interpreter: never chosen implicitly.
        return ("numba", "torch")
    return ("torch",)


def choose_backend(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    requested: str | None = None,
    ndim: int = 2,
) -> str:
    """Pick the backend for ``op`` ('unstitch' or 'stitch') on this device and dtype.

    Args:
        op: the op family.
        device: device of the input tensor.
        dtype: dtype of the input tensor.
        requested: an explicit backend name; ``None`` or ``""`` reads ``QLTY_GPU_BACKEND``
            and, if that is unset too, chooses automatically.
        ndim: number of spatial dimensions of the input.

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
        reason = why_not(name, op, device, dtype, ndim)
        if reason is not None:
            raise QltyBackendError(f"backend {name!r} cannot run {op} here: {reason}")
        return name
    reasons = []
    for cand in _default_order(device):
        reason = why_not(cand, op, device, dtype, ndim)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise QltyBackendError(f"no backend can run {op}: " + "; ".join(reasons))  # pragma: no cover


def available_backends(
    op: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ndim: int = 2,
) -> list[str]:
    """Backends that can run ``op`` for this device/dtype/ndim here (tests, benchmarks)."""
    dev = torch.device(device)
    return [b for b in BACKENDS if why_not(b, op, dev, dtype, ndim) is None]
