"""qlty 1.5.0's private stack-conversion helpers, kept because qlty's own tests call them.

They are reachable as ``qlty_gpu.utils.stack_to_zarr._load_image`` etc., as in qlty.
``_load_image`` honours the ``tifffile``/``Image`` globals of that module (``None``
disables a library, as qlty's tests do).

Example:
    >>> import numpy as np
    >>> _apply_axis_order(np.zeros((2, 3, 4, 5)), (2, 3, 4, 5), "CZYX")[1]
    (3, 2, 4, 5)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QltyError
from ..io import axes as _axes
from ..io import pyramid as _pyr
from ..io.images import read_image

__all__ = [
    "_normalize_axis_order",
    "_load_image",
    "_apply_axis_order",
    "_load_and_process_image",
    "_create_zarr_array",
    "_downsample_with_torch",
    "_upsample_with_torch",
]


_normalize_axis_order = _axes.normalize_axis_order


def _load_image(filepath: str | os.PathLike) -> np.ndarray:
    """Load an image with tifffile (TIFF) or Pillow; qlty's private loader.

    Raises:
        ImageReadError: (a ``RuntimeError`` too) ``Cannot load image ... No suitable library``
            or a corrupt file, naming the file.
    """
    from .stack_to_zarr import _libs

    return read_image(filepath, **_libs())


def _apply_axis_order(
    data: np.ndarray, current_shape: tuple[int, ...], axis_order: str
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Permute a ``(Z, C, Y, X)`` array to ``axis_order``; ``(Z, Y, X)`` is returned as is."""
    if len(current_shape) == 3:
        return data, tuple(current_shape)
    return _axes.transpose(data, "ZCYX", axis_order), _axes.pick("ZCYX", current_shape, axis_order)


def _load_and_process_image(
    filepath: Path,
    dtype: np.dtype | None,
    normalize: bool = False,
    normalize_mean: float | None = None,
    normalize_std: float | None = None,
) -> np.ndarray:
    """Load one image as ``(Y, X)`` or ``(C, Y, X)``, normalise (in float) and convert."""
    img = _load_image(filepath)
    if img.ndim == 3 and img.shape[2] <= 4:
        img = np.transpose(img, (2, 0, 1))
    if normalize:
        f = img.astype(np.float32)
        mean = float(f.mean()) if normalize_mean is None else float(normalize_mean)
        std = float(f.std()) if normalize_std is None else float(normalize_std)
        img = (f - mean) / (std or 1.0)
        if dtype is None:
            return img
    if dtype is not None:
        img = _pyr.cast(img, np.dtype(dtype))
    return img


def _create_zarr_array(group: Any, name: str, **kwargs: Any) -> Any:
    """Create an array in a zarr group (``data=`` fills it), as qlty's helper did."""
    data = kwargs.pop("data", None)
    kwargs.pop("compressor", None)
    if data is not None:
        data = np.asarray(data)
        kwargs["shape"] = data.shape
        kwargs["dtype"] = data.dtype
    arr = group.create_array(name, **kwargs)
    if data is not None:
        arr[...] = data
    return arr


def _torch_image(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img)).float()
    return t[None, None] if img.ndim == 2 else t[None]


def _downsample_with_torch(img: np.ndarray, y_scale: int, x_scale: int) -> np.ndarray:
    """Block-average ``(Y, X)`` or ``(C, Y, X)`` by integer factors (qlty's helper).

    Edge blocks average only existing pixels and integer results are rounded (qlty floored
    the size and truncated).
    """
    out = _pyr.block_mean(_torch_image(img), 1, int(y_scale), int(x_scale))[0].numpy()
    return _pyr.cast(out[0] if img.ndim == 2 else out, img.dtype)


def _upsample_with_torch(
    img: np.ndarray, target_size: tuple[int, int], mode: str = "bilinear"
) -> np.ndarray:
    """Upsample ``(Y, X)`` or ``(C, Y, X)`` to ``target_size`` (qlty's helper)."""
    if mode not in ("bilinear", "bicubic"):
        raise QltyError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    out = _pyr.upsample(_torch_image(img), tuple(target_size), mode)[0].numpy()
    return _pyr.cast(out[0] if img.ndim == 2 else out, img.dtype)
