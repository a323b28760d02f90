"""The 'torch' backend of unstitch / stitch: strided views and copies, any device.

Each axis splits into its regular patches (starts ``k*s``) and, when ``(D - w) % s != 0``,
one clamped last patch; every combination of the two is one strided view, so unstitch is at
most ``2**ndim`` strided copies. Stitch adds patch groups whose windows cannot overlap
(``k = r mod ceil(w/s)``, plus the clamped patch on its own) one group at a time: no write
conflicts, a fixed order, deterministic.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Union

import torch

from ..geometry import QuiltPlan
from . import _launch
from .quilt_reference import (
    append_positions,
    stitch_index_add,
    stitch_output_dtype,
    weighted_patch_grid,
    weighting_dtype,
)

__all__ = ["launch_unstitch", "launch_stitch"]

_MAX_GROUPS = 64  # more phase groups than this (tiny steps): the index_add path is faster


def _axis_blocks(size: int, w: int, s: int) -> list[tuple[int, int, int, int]]:
    """[(first patch k, count, start of first, stride between starts)] along one axis."""
    n_reg = (size - w) // s + 1
    blocks = [(0, n_reg, 0, s)]
    if (size - w) % s:
        blocks.append((n_reg, 1, size - w, s))
    return blocks


def _window_view(t: torch.Tensor, starts, counts, strides_between, window) -> torch.Tensor:
    """Strided view ``(N, C, *counts, *window)`` of ``t`` (N, C, *S): windows at the starts."""
    nd = len(window)
    st = t.stride()
    size = list(t.shape[:2]) + list(counts) + list(window)
    stride = list(st[:2]) + [strides_between[a] * st[2 + a] for a in range(nd)] + list(st[2:])
    offset = t.storage_offset() + sum(starts[a] * st[2 + a] for a in range(nd))
    return t.as_strided(size, stride, offset)


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
    window = plan.window
    n_img, n_ch = x.shape[:2]
    work = out_dtype
    if weight is not None and work in (torch.float16, torch.bfloat16):
        work = torch.float32  # weight multiply in fp32, cast once at the end
    out = _launch.new_empty((n_img, *plan.counts, n_ch, *window), work, x.device)
    # out viewed as (N, C, n0.., w0..) to match the window views
    out_v = out.permute(0, 1 + nd, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd))
    per_axis = [_axis_blocks(d, w, s) for d, w, s in zip(plan.shape, window, plan.step)]
    for combo in itertools.product(*per_axis):
        src = _window_view(x, [b[2] for b in combo], [b[1] for b in combo],
                           [b[3] for b in combo], window)
        dst = out_v[(slice(None), slice(None), *[slice(b[0], b[0] + b[1]) for b in combo])]
        if weight is not None:
            dst.copy_(src.to(weighting_dtype(x.dtype, out_dtype)) * weight.to(device=x.device))
        else:
            dst.copy_(src)
    out = out.reshape(n_img * plan.patches_per_image, n_ch, *window).to(out_dtype)
    if fill_mask is not None:
        out.masked_fill_(fill_mask.to(device=out.device, dtype=torch.bool), fill_value)
    return append_positions(out, plan, n_img, positions, normalize_positions)


def launch_stitch(
    patches: torch.Tensor,
    *,
    plan: QuiltPlan,
    weight: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """Stitch ``patches`` (N*P, C, *window) into ``(N, C, *shape)``; always deterministic,
    so ``mode`` is accepted and ignored."""
    nd = plan.ndim
    window, step, shape = plan.window, plan.step, plan.shape
    groups = [-(-w // s) for w, s in zip(window, step)]
    if math.prod(groups) > _MAX_GROUPS:
        return stitch_index_add(patches, plan, weight, norm)
    acc, q = weighted_patch_grid(patches, plan, weight)
    n_img, n_ch = q.shape[0], patches.shape[1]
    q = q.permute(0, 1 + nd, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd))  # (N,C,n..,w..)
    out = _launch.new_zeros((n_img, n_ch, *shape), acc, patches.device)
    per_axis = []
    for d, w, s, g in zip(shape, window, step, groups):
        blocks = []
        for k0, cnt, s0, _ in _axis_blocks(d, w, s):
            if cnt == 1:
                blocks.append((k0, 1, s0, s))
            else:  # split the regular patches into g non-overlapping phases
                blocks += [(k0 + r, len(range(r, cnt, g)), s0 + r * s, g * s)
                           for r in range(min(g, cnt))]
        per_axis.append(blocks)
    for combo in itertools.product(*per_axis):
        dst = _window_view(out, [b[2] for b in combo], [b[1] for b in combo],
                           [b[3] for b in combo], window)
        src = q[(slice(None), slice(None),
                 *[slice(b[0], b[0] + (b[1] - 1) * (b[3] // s) + 1, b[3] // s)
                   for b, s in zip(combo, step)])]
        dst.add_(src)
    if norm is not None:
        out = out / norm.to(device=out.device, dtype=acc)
    return out.to(stitch_output_dtype(patches.dtype))

