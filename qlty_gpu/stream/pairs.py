"""Training pairs from a Large quilt's geometry, one image at a time.

:func:`clean_sparse_pairs` is ``unstitch_and_clean_sparse_data_pair`` of the Large quilts:
split an input/target pair into patches, set the target's border pixels to
``missing_label`` (fused into the unstitch op), and keep the patches whose target still
holds a label. Images are read one at a time from any source (:mod:`.sources`), so memory
is one image and its patches plus the kept patches.

Example:
    >>> import torch
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> plan = QuiltPlan((8, 8), 4, 4, border=1)
    >>> lab = torch.full((1, 8, 8), -1.0); lab[0, 1, 1] = 3
    >>> a, b = clean_sparse_pairs(plan, ("Y", "X"), torch.zeros(1, 2, 8, 8), lab, -1)
    >>> a.shape, b.shape
    (torch.Size([1, 2, 4, 4]), torch.Size([1, 4, 4]))
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import QltyShapeAssertionError, describe
from ..geometry import QuiltPlan
from .sources import as_source

__all__ = ["clean_sparse_pairs"]


def clean_sparse_pairs(plan: QuiltPlan, axes: tuple, tensor_in: Any, tensor_out: Any,
                       missing_label) -> tuple:
    """Patches of ``tensor_in (N, C, *S)`` and ``tensor_out (N, [C,] *S)`` whose target has a
    label inside the border.

    Returns:
        ``(in (K, C, *window), out (K, [C,] *window))``, or ``([], [])`` if none is kept.
    """
    from ..ops import unstitch as _unstitch
    from ..quilt import _cast_label

    nd = plan.ndim
    src_in = as_source(tensor_in, "tensor_in")
    src_out = as_source(tensor_out, "tensor_out")
    squeeze = src_out.ndim == nd + 1
    if src_in.ndim != nd + 2 or src_out.ndim not in (nd + 1, nd + 2):
        raise QltyShapeAssertionError(
            f"tensor_in must be (N, C, {', '.join(axes)}) and tensor_out (N, [C,] "
            f"{', '.join(axes)}), got {describe(tensor_in)} and {describe(tensor_out)}")
    if src_in.shape[0] != src_out.shape[0] or src_in.shape[2:] != plan.shape or \
            src_out.shape[-nd:] != plan.shape:
        raise QltyShapeAssertionError(
            f"tensor_in {src_in.shape} and tensor_out {src_out.shape} must hold the same "
            f"images of spatial shape {plan.shape}")
    fill = plan.border_mask("cpu", torch.float32) < 0.5
    kept_in, kept_out = [], []
    for n in range(src_in.shape[0]):
        x = src_in.read((slice(n, n + 1),))
        y = src_out.read((slice(n, n + 1),))
        if squeeze:
            y = y.unsqueeze(1)
        label = _cast_label(missing_label, y.dtype)
        pin = _unstitch(x, plan.window, plan.step)
        pout = _unstitch(y, plan.window, plan.step, fill_mask=fill.to(y.device), fill_value=label)
        keep = (pout != label).reshape(pout.shape[0], -1).any(dim=1)
        kept_in.append(pin[keep.to(pin.device)])
        kept_out.append(pout[keep])
    pin, pout = torch.cat(kept_in), torch.cat(kept_out)
    if pin.shape[0] == 0:
        return [], []
    return pin, (pout.squeeze(1) if squeeze else pout)
