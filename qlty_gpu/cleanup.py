"""Drop training pairs whose target has no labels outside the patch border (spec §2.6)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import QltyError, QltyTypeError, describe

__all__ = [
    "weed_sparse_classification_training_pairs_2D",
    "weed_sparse_classification_training_pairs_3D",
]


def _weed(tensor_in, tensor_out, missing_label, border_tensor, nd: int):
    for name, t in (("tensor_in", tensor_in), ("tensor_out", tensor_out)):
        if not isinstance(t, torch.Tensor):
            raise QltyTypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if isinstance(border_tensor, np.ndarray):
        border_tensor = torch.from_numpy(border_tensor)
    if not isinstance(border_tensor, torch.Tensor):
        raise QltyTypeError(
            f"border_tensor must be a torch.Tensor or numpy.ndarray, got {describe(border_tensor)}"
        )
    axes = "(Y, X)" if nd == 2 else "(Z, Y, X)"
    if tensor_out.dim() not in (1 + nd, 2 + nd):
        raise QltyError(
            f"tensor_out must have shape (M, *{axes}) or (M, C, *{axes}), got {describe(tensor_out)}"
        )
    if tensor_in.shape[0] != tensor_out.shape[0]:
        raise QltyError(
            f"tensor_in and tensor_out must hold the same number of patches, got "
            f"{tensor_in.shape[0]} and {tensor_out.shape[0]}"
        )
    win = tuple(tensor_out.shape[-nd:])
    if tuple(border_tensor.shape[-nd:]) != win or border_tensor.dim() > tensor_out.dim():
        raise QltyError(
            f"border_tensor must have the patch shape {win} (optionally with leading channel "
            f"axes), got {describe(border_tensor)}"
        )
    mask = border_tensor.to(device=tensor_out.device) > 0.5
    valid = (tensor_out != missing_label) & mask
    count = valid.reshape(valid.shape[0], -1).sum(dim=1)
    removed = count == 0
    keep = ~removed
    return tensor_in[keep.to(tensor_in.device)], tensor_out[keep], removed


def weed_sparse_classification_training_pairs_2D(
    tensor_in: torch.Tensor, tensor_out: torch.Tensor, missing_label, border_tensor
):
    """Remove 2-D patch pairs whose target holds only ``missing_label`` inside the border.

    Args:
        tensor_in: input patches ``(M, C, Y, X)``.
        tensor_out: target patches ``(M, Y, X)`` or ``(M, C, Y, X)``.
        missing_label: the value marking unlabelled pixels (NaN never matches).
        border_tensor: 1 for interior, 0 for border, ``(Y, X)`` or ``(C, Y, X)``; torch or
            numpy (the Large quilts return numpy).

    Returns:
        ``(kept_in, kept_out, removed)`` with ``removed`` a bool ``(M,)`` mask, True = dropped.

    Example:
        >>> t_in = torch.zeros(2, 1, 4, 4)
        >>> t_out = torch.full((2, 4, 4), -1.0); t_out[1, 1, 1] = 3
        >>> _, kept, removed = weed_sparse_classification_training_pairs_2D(
        ...     t_in, t_out, -1, torch.ones(4, 4))
        >>> kept.shape[0], removed.tolist()
        (1, [True, False])
    """
    return _weed(tensor_in, tensor_out, missing_label, border_tensor, 2)


def weed_sparse_classification_training_pairs_3D(
    tensor_in: torch.Tensor, tensor_out: torch.Tensor, missing_label, border_tensor
):
    """3-D version of :func:`weed_sparse_classification_training_pairs_2D`.

    Shapes: ``tensor_out (M, Z, Y, X)`` or ``(M, C, Z, Y, X)``; ``border_tensor (Z, Y, X)``,
    ``(C, Z, Y, X)`` or 5-D.
    """
    return _weed(tensor_in, tensor_out, missing_label, border_tensor, 3)
