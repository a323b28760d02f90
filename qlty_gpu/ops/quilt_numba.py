"""The 'numba' backend of unstitch / stitch (CPU): launchers of ``kernels/quilt_numba.py``.

The kernels see 3 spatial axes (1-D/2-D data gets leading singleton axes), numpy views of
the torch tensors, and the plan's start tables (cached on the plan). numba has no half
types: fp16/bf16 input is upcast once (exact) and the output cast back.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..geometry import QuiltPlan, device_cached
from . import _launch
from .quilt_reference import (
    accumulation_dtype,
    append_positions,
    stitch_output_dtype,
    weighting_dtype,
)

__all__ = ["launch_unstitch", "launch_stitch", "numba_slabs"]

_CPU = torch.device("cpu")
# dtypes the kernels read and write directly; others are computed in one of these and cast
_DIRECT = (torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32,
           torch.int64)


def _kernels():
    from ..kernels import quilt_numba

    return quilt_numba


def _run(name: str, *args) -> None:
    nk = _kernels()
    _launch.run_numba(getattr(nk, name), nk.SERIAL[name], *args)


def numba_slabs(planes: int, rows: int) -> int:
    """Y slabs per output plane so that every numba thread gets one job, with slabs of at
    least 8 rows; 1 when there are planes enough. (More slabs than threads measured slower:
    every slab walks the whole patch list, 11.3 / 5.7 / 6.6 / 8.5 ms for 1 / 2 / 4 / 8 slabs
    of a (1, 1, 128^3) stitch on 2 threads.)"""
    want = -(-_launch.numba_threads() // max(planes, 1))
    return max(1, min(want, rows // 8))


def launch_unstitch(
    x: torch.Tensor,
    *,
    plan: QuiltPlan,
    weight: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    fill_mask: Optional[torch.Tensor],
    fill_value: Union[int, float, bool],
    positions: str,
    normalize_positions: bool,
) -> torch.Tensor:
    """Unstitch ``x`` (N, C, *S) into ``(N*P, C (+ndim), *window)`` of ``out_dtype``."""
    nd = plan.ndim
    n_img, n_ch = x.shape[:2]
    src = x if x.dtype in _DIRECT else x.float()  # half types: exact upcast
    if weight is not None:
        work = weighting_dtype(x.dtype, out_dtype)
    else:
        work = out_dtype if out_dtype in _DIRECT else src.dtype
    win3 = _launch.pad3(plan.window, 1)
    out = _launch.new_empty((n_img * plan.patches_per_image, n_ch, *plan.window), work, _CPU)
    out6 = out.view(n_img, plan.patches_per_image, n_ch, *win3)
    sz, sy, sx = device_cached(plan, "starts_numpy", _CPU, None, 3)
    img = _launch.lift3(src, nd).numpy()
    if weight is None:
        _run("_unstitch_numba", img, sz, sy, sx, out6.numpy())
    else:
        w = weight.to(work).reshape(win3).contiguous().numpy()
        _run("_unstitch_weighted_numba", img, sz, sy, sx, w, out6.numpy())
    out = out.to(out_dtype)
    if fill_mask is not None:
        out.masked_fill_(fill_mask.to(torch.bool), fill_value)
    return append_positions(out, plan, n_img, positions, normalize_positions)


def launch_stitch(
    patches: torch.Tensor,
    *,
    plan: QuiltPlan,
    weight: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """Stitch ``patches`` (N*P, C, *window) into ``(N, C, *shape)``; always deterministic
    (each output slab sums its patches in patch order), so ``mode`` is ignored."""
    nd, shape = plan.ndim, plan.shape
    n_p = plan.patches_per_image
    n_img, n_ch = patches.shape[0] // n_p, patches.shape[1]
    acc = accumulation_dtype(patches.dtype)
    src = patches.to(acc).contiguous()
    out = _launch.new_zeros((n_img, n_ch, *shape), acc, _CPU)
    sz, sy, sx = device_cached(plan, "starts_numpy", _CPU, None, 3)
    win3 = _launch.pad3(plan.window, 1)
    one = torch.ones((1, 1, 1), dtype=acc).numpy()
    w = weight.to(acc).reshape(win3).contiguous().numpy() if weight is not None else one
    nrm = (
        norm.to(acc).reshape(_launch.pad3(shape, 1)).contiguous().numpy()
        if norm is not None
        else one
    )
    _run(
        "_stitch_numba",
        src.view(n_img, n_p, n_ch, *win3).numpy(),
        sz, sy, sx, w, nrm, weight is not None, norm is not None,
        numba_slabs(n_img * n_ch, _launch.pad3(shape, 1)[1]),
        _launch.lift3(out, nd).numpy(),
    )
    return out.to(stitch_output_dtype(patches.dtype))
