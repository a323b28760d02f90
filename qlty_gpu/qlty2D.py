"""qlty-compatible module path ``qlty.qlty2D``.

Besides the quilt, qlty 1.5.0 exposed its two numba stitch paths here (its tests call them);
both are thin faces over the one registered stitch op, which is race-free, so the serial
and the "coloured parallel" variants are the same computation.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import QltyError, describe
from .geometry import QuiltPlan
from .ops.quilt import stitch as _stitch_op
from .ops.quilt_reference import accumulation_dtype
from .quilt import NCYXQuilt

__all__ = ["NCYXQuilt", "stitch_serial_numba", "stitch_parallel_colored"]


def _ensure_numpy(array):
    """A torch tensor as a CPU numpy array (detached, contiguous); anything else unchanged."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().contiguous().numpy()
    return array


def stitch_serial_numba(ml_tensor, weight, window, step, Y, X, nY, nX):
    """qlty's stitch helper: ``(sum_p scatter(patch_p * weight) / norma, norma)`` on the CPU.

    Args:
        ml_tensor: patches ``(M, C, wy, wx)`` (torch or numpy) in unstitch order.
        weight: window-shaped weight map (torch or numpy).
        window, step: the quilt's window and step.
        Y, X: image size; nY, nX: patches per axis (checked against the geometry).

    Returns:
        ``(result (N, C, Y, X), norma (Y, X))`` as CPU tensors, ``norma`` in the weight's
        dtype.
    """
    plan = QuiltPlan((int(Y), int(X)), tuple(window), tuple(step))
    if (int(nY), int(nX)) != plan.counts:
        raise QltyError(f"nY, nX = {(nY, nX)} do not match the geometry's patch counts "
                        f"{plan.counts} for Y, X = {(Y, X)}, window {window}, step {step}")
    patches = torch.as_tensor(_ensure_numpy(ml_tensor))
    w = torch.as_tensor(np.asarray(_ensure_numpy(weight)))
    if tuple(w.shape) != plan.window:
        raise QltyError(f"weight must have the window shape {plan.window}, got {describe(w)}")
    acc = accumulation_dtype(patches.dtype)
    norma = plan.norm("cpu", acc, weight=w).to(w.dtype)
    result = _stitch_op(patches, plan.shape, plan.step, weight=w.to(acc),
                        norm=norma.to(acc))
    return result, norma


def stitch_parallel_colored(ml_tensor, weight, window, step, Y, X, nY, nX):
    """qlty's colour-parallel stitch: the same result as :func:`stitch_serial_numba` (our
    stitch is race-free on every backend, so no colouring is needed)."""
    return stitch_serial_numba(ml_tensor, weight, window, step, Y, X, nY, nX)
