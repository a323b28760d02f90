"""Pyramids of image batches, arrays in and arrays out (no files, no stores).

Batches are ``(B, C, Y, X)`` tensors (``B`` slices of a stack). Levels are block means
whose edge blocks average only existing pixels; integer results are rounded to nearest and
clipped (:func:`cast`). A Laplacian pyramid stores the coarsest level and, per finer level,
the difference to the upsampled reconstruction *from stored data*, so decoding repeats the
encoder's arithmetic exactly.

Example:
    >>> import torch
    >>> t = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> block_mean(t, 1, 2, 2)[0, 0].tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    >>> base, diffs = laplacian_encode(t, [(1, 1, 1), (1, 2, 2)], "bilinear", torch.float64,
    ...                                np.dtype("float32"))
    >>> bool((laplacian_decode(base, diffs, "bilinear", torch.float64) == t.double()).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QltyError, QltyTypeError
from . import axes as ax

__all__ = [
    "INTERP_MODES",
    "compute_dtype",
    "laplacian_compute_dtype",
    "cast",
    "block_mean",
    "resample",
    "upsample",
    "num_levels",
    "downsample_axes",
    "check_method",
    "cumulative_factors",
    "level_zyx",
    "downsample_levels",
    "laplacian_encode",
    "laplacian_decode",
]

INTERP_MODES = ("bilinear", "bicubic", "nearest")


def compute_dtype(dtype: np.dtype) -> torch.dtype:
    """Precision to average ``dtype`` data in (float64 for float64 and 32/64-bit ints)."""
    if dtype == np.float64 or (dtype.kind in "iu" and dtype.itemsize >= 4):
        return torch.float64
    return torch.float32


def laplacian_compute_dtype(dtype: np.dtype) -> torch.dtype:
    """Precision of Laplacian differences (float64 makes float16/32 round trips bit-exact)."""
    if dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize >= 4):
        return torch.float64
    return torch.float32


def cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert to ``dtype``: round to nearest and clip for integer targets (no wrap-around).

    Example:
        >>> cast(np.array([-3.0, 2.5, 300.0]), np.dtype("uint8")).tolist()
        [0, 2, 255]
    """
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if a.dtype.kind in "fc":
            a = np.nan_to_num(np.rint(a.real), nan=0.0)
            return np.clip(a, info.min, info.max).astype(dtype)
        if a.dtype.kind in "iu":
            src = np.iinfo(a.dtype)
            if src.min < info.min or src.max > info.max:
                a = np.clip(a, max(info.min, src.min), min(info.max, src.max))
        return a.astype(dtype)
    if dtype.kind == "b":
        return a != 0
    return a.astype(dtype)


def block_mean(t: torch.Tensor, fz: int, fy: int, fx: int) -> torch.Tensor:
    """Block mean of a ``(B, C, Y, X)`` batch; edge blocks average only existing pixels."""
    # a factor larger than the axis: the single block is the whole axis
    fz, fy, fx = min(fz, t.shape[0]), min(fy, t.shape[2]), min(fx, t.shape[3])
    if fz == 1:
        if fy == 1 and fx == 1:
            return t
        return F.avg_pool2d(t, (fy, fx), (fy, fx), ceil_mode=True)
    v = t.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, B, Y, X)
    v = F.avg_pool3d(v, (fz, fy, fx), (fz, fy, fx), ceil_mode=True)
    return v.squeeze(0).permute(1, 0, 2, 3)


def resample(t: torch.Tensor, fz: int, fy: int, fx: int, method: str) -> torch.Tensor:
    """Downsample a ``(B, C, Y, X)`` batch by ``method`` (``"mean"`` or ``"scipy_zoom"``)."""
    if method == "scipy_zoom" and (fy > 1 or fx > 1):
        size = (math.ceil(t.shape[2] / fy), math.ceil(t.shape[3] / fx))
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        return block_mean(t, fz, 1, 1)
    return block_mean(t, fz, fy, fx)


def upsample(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Upsample ``(B, C, y, x)`` to ``size`` exactly as qlty's Laplacian code does."""
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest")
    return F.interpolate(
        t, size=size, mode=mode, align_corners=False, antialias=(mode == "bicubic")
    )


# --------------------------------------------------------------------------------------
# Planning the levels
# --------------------------------------------------------------------------------------


def num_levels(Y: int, X: int, pyramid_levels: int | None, scale_factors: Any) -> int:
    """Number of levels: given, from the scale factors, or one per halving above 256 (<= 5)."""
    if scale_factors is not None:
        return len(scale_factors) + 1
    if pyramid_levels is not None:
        if (
            not isinstance(pyramid_levels, int)
            or isinstance(pyramid_levels, bool)
            or pyramid_levels < 1
        ):
            raise QltyError(f"pyramid_levels must be a positive int, got {pyramid_levels!r}")
        return pyramid_levels
    levels, dim = 1, min(Y, X)
    while dim > 256:
        dim //= 2
        levels += 1
    return max(1, min(levels, 5))


def downsample_axes(downsample_mode: str, downsample_axes: Any) -> set[str]:
    """The lower-case axes to downsample, from ``downsample_axes`` or the ``2d``/``3d`` mode."""
    if downsample_axes is not None:
        if isinstance(downsample_axes, str):
            downsample_axes = tuple(downsample_axes)
        axes = {str(a).lower() for a in downsample_axes}
        if not axes <= {"z", "y", "x"}:
            raise QltyError(
                f"downsample_axes must be a subset of ('z', 'y', 'x'), got {tuple(downsample_axes)!r}"
            )
        return axes
    if downsample_mode == "2d":
        return {"y", "x"}
    if downsample_mode == "3d":
        return {"z", "y", "x"}
    raise QltyError(f"Invalid downsample_mode: {downsample_mode!r}. Must be '2d' or '3d'.")


def check_method(method: str) -> str:
    """``"mean"`` (``dask_coarsen``/``mean``) or ``"scipy_zoom"``; anything else raises."""
    if method in ("dask_coarsen", "mean"):
        return "mean"
    if method == "scipy_zoom":
        return "scipy_zoom"
    raise QltyError(
        f"Unknown downsample_method: {method!r}. Supported methods: 'dask_coarsen' (block mean, "
        "the default), 'mean' (the same), 'scipy_zoom' (antialiased bilinear resampling in y/x)"
    )


def cumulative_factors(
    order: str, levels: int, axes: set[str], scale_factors: Any
) -> list[tuple[int, ...]]:
    """Per level, the integer factor of each axis of ``order`` relative to level 0."""
    nd = len(order)
    out = [tuple([1] * nd)]
    if scale_factors is None:
        for lvl in range(1, levels):
            out.append(tuple((2**lvl if a.lower() in axes else 1) for a in order))
        return out
    for i, f in enumerate(scale_factors, 1):
        try:
            f = tuple(int(v) for v in f)
        except TypeError as exc:
            raise QltyTypeError(
                f"pyramid_scale_factors[{i - 1}] must be a tuple of ints, got {f!r}"
            ) from exc
        if len(f) != nd:
            raise QltyError(
                f"pyramid_scale_factors[{i - 1}] must have {nd} entries for axes {order}, got {f}"
            )
        prev = out[-1]
        for a, v, p in zip(order, f, prev):
            if a == "C" and v != 1:
                raise QltyError(
                    f"pyramid_scale_factors[{i - 1}] downsamples the channel axis ({f}); C must be 1"
                )
            if v < 1 or v % p:
                raise QltyError(
                    f"pyramid_scale_factors must be cumulative integer factors, each a multiple "
                    f"of the previous level's; got {f} after {prev} for axes {order}"
                )
        out.append(f)
    return out


def level_zyx(order: str, cum: Sequence[Sequence[int]], Z: int, Y: int, X: int):
    """``(factors, shapes)``: per level the (z, y, x) factor and the ceil-divided size."""
    zyx = [ax.pick(order, f) for f in cum]
    shapes = [(math.ceil(Z / fz), math.ceil(Y / fy), math.ceil(X / fx)) for fz, fy, fx in zyx]
    return zyx, shapes


# --------------------------------------------------------------------------------------
# One batch through a pyramid
# --------------------------------------------------------------------------------------


def downsample_levels(
    t: torch.Tensor, zyx: Sequence[tuple[int, int, int]], method: str
) -> list[torch.Tensor]:
    """Levels ``1..L-1`` of a ``(B, C, Y, X)`` batch, each from the previous level.

    ``zyx[l]`` is level ``l``'s cumulative (z, y, x) factor; ``zyx[0]`` is ``(1, 1, 1)``.
    """
    out = []
    for lvl in range(1, len(zyx)):
        (pz, py, px), (fz, fy, fx) = zyx[lvl - 1], zyx[lvl]
        t = resample(t, fz // pz, fy // py, fx // px, method)
        out.append(t)
    return out


def laplacian_encode(
    t: torch.Tensor,
    zyx: Sequence[tuple[int, int, int]],
    mode: str,
    cdt: torch.dtype,
    dtype: np.dtype,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Laplacian pyramid of a ``(B, C, Y, X)`` batch (y/x factors only).

    Returns:
        ``(base, diffs)``: the coarsest level in ``dtype`` and ``diffs[k]`` (finest first)
        in the precision ``cdt``, all ``(B, C, y, x)``.
    """
    g = [t.to(cdt)]
    for lvl in range(1, len(zyx)):
        g.append(
            block_mean(g[-1], 1, zyx[lvl][1] // zyx[lvl - 1][1], zyx[lvl][2] // zyx[lvl - 1][2])
        )
    base = cast(g[-1].numpy(), dtype)
    # r: the decoder's reconstruction of the next level, from stored data only
    r = torch.from_numpy(np.ascontiguousarray(base)).to(cdt)
    diffs: list[np.ndarray] = [None] * (len(zyx) - 1)  # type: ignore[list-item]
    for k in range(len(zyx) - 2, -1, -1):
        u = upsample(r, tuple(g[k].shape[-2:]), mode)
        d = g[k] - u
        diffs[k] = d.numpy()
        r = u + d
    return base, diffs


def laplacian_decode(
    base: torch.Tensor | np.ndarray,
    diffs: Sequence[torch.Tensor | np.ndarray],
    mode: str,
    cdt: torch.dtype,
    target: int = 0,
) -> torch.Tensor:
    """Rebuild level ``target`` from the base and ``diffs`` (finest first), in ``cdt``."""

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a).to(cdt)

    r = t(base)
    for k in range(len(diffs) - 1, target - 1, -1):
        d = t(diffs[k])
        r = upsample(r, tuple(d.shape[-2:]), mode) + d
    return r
