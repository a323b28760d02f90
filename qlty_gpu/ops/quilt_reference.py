"""The unstitch / stitch family's specification: dtype rules and a pure-torch reference.

Definitions for an image batch ``x`` of shape ``(N, C, *S)`` and a plan with ``P`` patches
per image, window ``w`` and weight map ``W`` (ones when absent):

* ``unstitch(x)[n*P + p, c] = cast(x[n, c, origin_p : origin_p + w] * W)`` with the
  border region (``fill_mask``) replaced by ``fill_value``;
* ``stitch(y)[n, c] = (sum_p scatter_p(y[n*P + p, c] * W)) / norm``.

The functions here are the spec other implementations are tested against (tests compare
every backend with an independent loop oracle too). No backend falls back to them.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..geometry import QuiltPlan, device_cached, plan_for

__all__ = [
    "STITCH_MODES",
    "accumulation_dtype",
    "weighting_dtype",
    "stitch_output_dtype",
    "positional_dtype",
    "unstitch_reference",
    "stitch_reference",
    "positional_channels",
    "append_positions",
]

STITCH_MODES = ("auto", "atomic", "deterministic")

_WIDE_INTS = (torch.int32, torch.int64, torch.uint32, torch.uint64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Stitch sums in float64 for float64, complex stays complex, everything else float32."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.float32


def weighting_dtype(dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """Dtype in which unstitch multiplies by the weight map.

    float64 when the input or the output is float64 or a 32/64-bit integer (float32 would
    round 2**31 - 1 to 2**31; float64 is exact up to 2**53), complex stays complex,
    everything else float32.

    Example:
        >>> weighting_dtype(torch.int32), weighting_dtype(torch.float16)
        (torch.float64, torch.float32)
    """
    for d in (dtype, out_dtype):
        if d is not None and d.is_complex:
            return d
    wide = (torch.float64, *_WIDE_INTS)
    if dtype in wide or out_dtype in wide:
        return torch.float64
    return torch.float32


def stitch_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Stitch returns floating input dtypes unchanged; integers and bool give float32."""
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.float32


def positional_dtype(dtype: torch.dtype, normalize: bool) -> torch.dtype:
    """Dtype of patches with coordinate channels appended (qlty's promotion).

    Normalised coordinates promote with float32; unnormalised ones keep the data dtype,
    except half types, which become float32 so that coordinates above 256 (bf16) or 2048
    (fp16) stay exact.
    """
    if normalize or dtype in (torch.float16, torch.bfloat16):
        return torch.promote_types(dtype, torch.float32)
    return dtype


# ============================================================== torch reference
def unstitch_reference(
    x: torch.Tensor,
    window: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    fill_mask: Optional[torch.Tensor] = None,
    fill_value: Union[int, float, bool] = 0.0,
    positions: str = "",
    normalize_positions: bool = True,
) -> torch.Tensor:
    """Pure-torch unstitch ``(N, C, *S) -> (N*P, C (+ndim), *window)``: separable
    ``index_select`` per axis, then one permute-copy."""
    nd = x.dim() - 2
    n_img, n_ch = x.shape[:2]
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    y = x
    for ax in range(nd):
        y = y.index_select(2 + ax, device_cached(plan, "axis_index", x.device, None, ax))
    # (N, C, n0, w0, n1, w1, ...) -> (N, n0, n1, ..., C, w0, w1, ...)
    y = y.reshape(n_img, n_ch, *[v for a in range(nd) for v in (plan.counts[a], window[a])])
    perm = [0] + [2 + 2 * a for a in range(nd)] + [1] + [3 + 2 * a for a in range(nd)]
    y = y.permute(perm)
    if weight is not None:
        y = y.to(weighting_dtype(x.dtype, out_dtype)) * weight.to(device=y.device)
    y = y.reshape(n_img * plan.patches_per_image, n_ch, *window)
    y = y.to(out_dtype or x.dtype)
    if fill_mask is not None:
        y = y.masked_fill(fill_mask.to(device=y.device, dtype=torch.bool), fill_value)
    return append_positions(y, plan, n_img, positions, normalize_positions)


def positional_channels(
    plan: QuiltPlan, n_img: int, mode: str, normalize: bool, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``(n_img * P, ndim, *window)`` coordinate channels (z,) y, x for every patch.

    ``absolute``: ``start + u`` (divided by the image size when normalised);
    ``relative``: ``u`` (divided by ``window - 1`` when normalised, 0 for a window of 1).
    """
    nd = plan.ndim
    chans = []
    for ax in range(nd):
        u = torch.arange(plan.window[ax], device=device, dtype=torch.float64)
        shp = [1] * (1 + nd)
        shp[1 + ax] = -1
        u = u.reshape(shp)  # (1, ..., w_ax, ...)
        if mode == "absolute":
            org = device_cached(plan, "origins", torch.device(device))[:, ax]
            v = org.to(torch.float64).reshape([-1] + [1] * nd) + u
            if normalize:
                v = v / plan.shape[ax]
        else:
            v = u
            if normalize:
                v = v / (plan.window[ax] - 1) if plan.window[ax] > 1 else v * 0
        chans.append(v.expand([plan.patches_per_image, *plan.window]))
    pos = torch.stack(chans, dim=1).to(dtype)  # (P, nd, *window)
    return pos.repeat(n_img, *([1] * (1 + nd)))


def append_positions(
    y: torch.Tensor, plan: QuiltPlan, n_img: int, positions: str, normalize_positions: bool
) -> torch.Tensor:
    """``y`` (M, C, *window) with the coordinate channels of ``positions`` appended."""
    if not positions:
        return y
    pos = positional_channels(plan, n_img, positions, normalize_positions, y.dtype, y.device)
    return torch.cat([y, pos], dim=1)


def weighted_patch_grid(
    patches: torch.Tensor, plan: QuiltPlan, weight: Optional[torch.Tensor]
) -> tuple[torch.dtype, torch.Tensor]:
    """(accumulation dtype, weighted patches viewed as ``(N, n0.., C, w0..)``)."""
    acc = accumulation_dtype(patches.dtype)
    q = patches.to(acc)
    if weight is not None:
        q = q * weight.to(device=q.device, dtype=acc)
    n_img = patches.shape[0] // plan.patches_per_image
    return acc, q.reshape(n_img, *plan.counts, patches.shape[1], *plan.window)


def stitch_reference(
    patches: torch.Tensor,
    shape: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch stitch ``(N*P, C, *window) -> (N, C, *shape)``: weighted patches
    scattered with ``index_add`` one axis at a time, then divided by ``norm``."""
    plan = plan_for(tuple(shape), tuple(patches.shape[2:]), tuple(step))
    return stitch_index_add(patches, plan, weight, norm)


def stitch_index_add(
    patches: torch.Tensor, plan: QuiltPlan, weight: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
) -> torch.Tensor:
    """The reference stitch for a given plan (also the torch backend's path for tiny
    steps, where its phase groups would be too many)."""
    nd = plan.ndim
    acc, q = weighted_patch_grid(patches, plan, weight)
    n_img, n_ch, window = q.shape[0], patches.shape[1], plan.window
    # (N, n0, n1, ..., C, w0, w1, ...) -> (N, C, n0, w0, n1, w1, ...)
    perm = [0, 1 + nd] + [v for a in range(nd) for v in (1 + a, 2 + nd + a)]
    q = q.permute(perm).reshape(
        n_img, n_ch, *[plan.counts[a] * window[a] for a in range(nd)]
    )
    for ax in reversed(range(nd)):
        shp = list(q.shape)
        shp[2 + ax] = plan.shape[ax]
        idx = device_cached(plan, "axis_index", q.device, None, ax)
        q = q.new_zeros(shp).index_add_(2 + ax, idx, q)
    if norm is not None:
        q = q / norm.to(device=q.device, dtype=q.dtype)
    return q.to(stitch_output_dtype(patches.dtype))
