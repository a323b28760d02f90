"""qlty-compatible helpers of ``qlty.base`` as thin faces over :mod:`qlty_gpu.geometry`."""

from __future__ import annotations

import numpy as np
import torch

from .errors import QltyError
from .geometry import QuiltPlan, normalize_border, patch_count, validate_border_weight

__all__ = [
    "BaseQuilt",
    "normalize_border",
    "validate_border_weight",
    "compute_chunk_times",
    "compute_weight_matrix_torch",
    "compute_weight_matrix_numpy",
    "compute_border_tensor_torch",
    "compute_border_tensor_numpy",
]


def compute_chunk_times(dimension_sizes, window, step) -> tuple[int, ...]:
    """Patches per axis (spec §2.1)."""
    if not len(dimension_sizes) == len(window) == len(step):
        raise QltyError(
            f"dimension_sizes, window and step must have the same length, got "
            f"{len(dimension_sizes)}, {len(window)}, {len(step)}"
        )
    return tuple(patch_count(d, w, s) for d, w, s in zip(dimension_sizes, window, step))


def _plan(window, border, border_weight) -> QuiltPlan:
    return QuiltPlan(tuple(window), window, tuple([1] * len(window)), border, border_weight)


def compute_weight_matrix_torch(window, border, border_weight) -> torch.Tensor:
    """float32 weight map (1 interior, ``border_weight`` border)."""
    return _plan(window, border, border_weight).weight("cpu", torch.float32).clone()


def compute_weight_matrix_numpy(window, border, border_weight) -> np.ndarray:
    """float64 weight map; like qlty, without a border every value is ``border_weight``."""
    plan = _plan(window, border, border_weight)
    if plan.border is None:
        return np.full(plan.window, plan.border_weight, dtype=np.float64)
    return plan.numpy_weight()


def compute_border_tensor_torch(window, border) -> torch.Tensor:
    """float32 mask, 1 interior / 0 border."""
    return _plan(window, border, 1.0).border_mask("cpu", torch.float32).clone()


def compute_border_tensor_numpy(window, border) -> np.ndarray:
    """float64 mask, 1 interior / 0 border."""
    return compute_border_tensor_torch(window, border).double().numpy()


class BaseQuilt:
    """qlty's ``BaseQuilt``: validated window, step, border and border weight.

    Kept for code that subclassed it; the quilts themselves stand on
    :class:`~qlty_gpu.geometry.QuiltPlan`.

    Example:
        >>> BaseQuilt((4, 4), (2, 2), 1, 0.5, 2).border
        (1, 1)
    """

    def __init__(self, window, step, border, border_weight, ndim: int) -> None:
        from .geometry import _int_tuple

        self.window = _int_tuple("window", window, ndim, minimum=1)
        self.step = _int_tuple("step", step, ndim, minimum=1)
        self.border = normalize_border(border, ndim)
        self.border_weight = validate_border_weight(border_weight)
        self.ndim = ndim
