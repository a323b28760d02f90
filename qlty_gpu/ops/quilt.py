"""Unstitch / stitch op family: pure-torch reference, numba CPU op, Triton op, autograd.

Both ops are registered with ``torch.library.custom_op`` (``qlty_gpu::unstitch`` and
``qlty_gpu::stitch``) with a shape-only fake and an adjoint backward, so they work in eager
mode, under ``torch.compile(fullgraph=True)``, with ``torch.library.opcheck`` and under the
Triton interpreter.

Definitions for an image batch ``x`` of shape ``(N, C, *S)`` and a plan with ``P`` patches
per image, window ``w`` and weight map ``W`` (ones when absent):

* ``unstitch(x)[n*P + p, c] = cast(x[n, c, origin_p : origin_p + w] * W)`` with the
  border region (``fill_mask``) replaced by ``fill_value``;
* ``stitch(y)[n, c] = (sum_p scatter_p(y[n*P + p, c] * W)) / norm``.

The two are adjoint: each one's backward is the other's forward.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from typing import Optional, Union

import torch

from .._alloc import empty_cpu, zeros_cpu
from ..errors import QltyError, QltyShapeAssertionError, QltyTypeError, describe
from ..geometry import patch_count, plan_for
from .backend import choose_backend

__all__ = [
    "unstitch",
    "stitch",
    "unstitch_reference",
    "stitch_reference",
    "accumulation_dtype",
    "STITCH_MODES",
]

STITCH_MODES = ("auto", "atomic", "deterministic")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, complex stays complex, everything else accumulates in float32."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.float32


def stitch_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Stitch returns floating input dtypes unchanged; integers and bool give float32."""
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.float32


def _counts(spatial, window, step) -> list:
    return [-(-(d - w) // s) + 1 for d, w, s in zip(spatial, window, step)]


# ============================================================== torch reference
def unstitch_reference(
    x: torch.Tensor,
    window: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    fill_mask: Optional[torch.Tensor] = None,
    fill_value: float = 0.0,
    positions: str = "",
    normalize_positions: bool = True,
) -> torch.Tensor:
    """Pure-torch unstitch: separable ``index_select`` per axis, then one permute-copy."""
    nd = x.dim() - 2
    n_img, n_ch = x.shape[:2]
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    y = x
    for ax in range(nd):
        y = y.index_select(2 + ax, plan.axis_index(ax, x.device))
    # (N, C, n0, w0, n1, w1, ...) -> (N, n0, n1, ..., C, w0, w1, ...)
    y = y.reshape(n_img, n_ch, *[v for a in range(nd) for v in (plan.counts[a], window[a])])
    perm = [0] + [2 + 2 * a for a in range(nd)] + [1] + [3 + 2 * a for a in range(nd)]
    y = y.permute(perm)
    if weight is not None:
        y = y.to(accumulation_dtype(y.dtype)) * weight.to(device=y.device)
    y = y.reshape(n_img * plan.patches_per_image, n_ch, *window)
    y = y.to(out_dtype or x.dtype)
    if fill_mask is not None:
        y = y.masked_fill(fill_mask.to(device=y.device, dtype=torch.bool), fill_value)
    return _append_positions(y, plan, n_img, positions, normalize_positions)


def positional_channels(
    plan, n_img: int, mode: str, normalize: bool, dtype: torch.dtype, device
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
            org = plan.origins(device)[:, ax].to(torch.float64).reshape([-1] + [1] * nd)
            v = org + u
            if normalize:
                v = v / plan.shape[ax]
        else:
            v = u
            if normalize:
                v = v / (plan.window[ax] - 1) if plan.window[ax] > 1 else v * 0
        chans.append(v.expand([plan.patches_per_image, *plan.window]))
    pos = torch.stack(chans, dim=1).to(dtype)  # (P, nd, *window)
    return pos.repeat(n_img, *([1] * (1 + nd)))


def _append_positions(y, plan, n_img, positions, normalize_positions):
    if not positions:
        return y
    pos = positional_channels(plan, n_img, positions, normalize_positions, y.dtype, y.device)
    return torch.cat([y, pos], dim=1)


def _weighted_patch_grid(patches, shape, step, weight):
    """(plan, accumulation dtype, weighted patches viewed as ``(N, n0.., C, w0..)``)."""
    window = tuple(patches.shape[2:])
    plan = plan_for(tuple(shape), window, tuple(step))
    acc = accumulation_dtype(patches.dtype)
    q = patches.to(acc)
    if weight is not None:
        q = q * weight.to(device=q.device, dtype=acc)
    n_img = patches.shape[0] // plan.patches_per_image
    return plan, acc, q.reshape(n_img, *plan.counts, patches.shape[1], *window)


def stitch_reference(
    patches: torch.Tensor,
    shape: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch stitch: weighted patches scattered with ``index_add`` one axis at a time."""
    nd = len(shape)
    plan, acc, q = _weighted_patch_grid(patches, shape, step, weight)
    n_img, n_ch, window = q.shape[0], patches.shape[1], plan.window
    # (N, n0, n1, ..., C, w0, w1, ...) -> (N, C, n0, w0, n1, w1, ...)
    perm = [0, 1 + nd] + [v for a in range(nd) for v in (1 + a, 2 + nd + a)]
    q = q.permute(perm).reshape(
        n_img, n_ch, *[plan.counts[a] * window[a] for a in range(nd)]
    )
    for ax in reversed(range(nd)):
        shp = list(q.shape)
        shp[2 + ax] = shape[ax]
        q = q.new_zeros(shp).index_add_(2 + ax, plan.axis_index(ax, q.device), q)
    if norm is not None:
        q = q / norm.to(device=q.device, dtype=q.dtype)
    return q.to(stitch_output_dtype(patches.dtype))


# ============================================================ torch strided op
# The 'torch' backend: any device torch runs on. Each axis splits into its regular patches
# (starts k*s) and, when (D - w) % s != 0, one clamped last patch; every combination of the
# two is one strided view, so unstitch is at most 2**ndim strided copies. Stitch adds
# patch groups whose windows cannot overlap (k = r mod ceil(w/s), plus the clamped patch on
# its own) one group at a time: no write conflicts, a fixed order, deterministic.
def _axis_blocks(size: int, w: int, s: int) -> list:
    """[(first patch k, count, start of first, stride between starts)] along one axis."""
    n_reg = (size - w) // s + 1
    blocks = [(0, n_reg, 0, s)]
    if (size - w) % s:
        blocks.append((n_reg, 1, size - w, s))
    return blocks


def _empty(shape, dtype, device) -> torch.Tensor:
    return empty_cpu(shape, dtype) if device.type == "cpu" else torch.empty(
        shape, dtype=dtype, device=device)


def _zeros(shape, dtype, device) -> torch.Tensor:
    return zeros_cpu(shape, dtype) if device.type == "cpu" else torch.zeros(
        shape, dtype=dtype, device=device)


def _window_view(t: torch.Tensor, starts, counts, strides_between, window) -> torch.Tensor:
    """Strided view ``(N, C, *counts, *window)`` of ``t`` (N, C, *S): windows at the starts."""
    nd = len(window)
    st = t.stride()
    size = list(t.shape[:2]) + list(counts) + list(window)
    stride = list(st[:2]) + [strides_between[a] * st[2 + a] for a in range(nd)] + list(st[2:])
    offset = t.storage_offset() + sum(starts[a] * st[2 + a] for a in range(nd))
    return t.as_strided(size, stride, offset)


def _unstitch_torch(
    x, window, step, weight, out_dtype, fill_mask, fill_value, positions, normalize_positions
):
    nd = x.dim() - 2
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    n_img, n_ch = x.shape[:2]
    work = out_dtype or x.dtype
    if weight is not None and work in (torch.float16, torch.bfloat16):
        work = torch.float32  # weight multiply in fp32, cast once at the end
    out = _empty((n_img, *plan.counts, n_ch, *window), work, x.device)
    # out viewed as (N, C, n0.., w0..) to match the window views
    out_v = out.permute(0, 1 + nd, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd))
    per_axis = [_axis_blocks(d, w, s) for d, w, s in zip(plan.shape, window, step)]
    for combo in itertools.product(*per_axis):
        src = _window_view(x, [b[2] for b in combo], [b[1] for b in combo],
                           [b[3] for b in combo], window)
        dst = out_v[(slice(None), slice(None), *[slice(b[0], b[0] + b[1]) for b in combo])]
        if weight is not None:
            dst.copy_(src.to(accumulation_dtype(src.dtype)) * weight.to(device=x.device))
        else:
            dst.copy_(src)
    out = out.reshape(n_img * plan.patches_per_image, n_ch, *window).to(out_dtype or x.dtype)
    if fill_mask is not None:
        out.masked_fill_(fill_mask.to(device=out.device, dtype=torch.bool), fill_value)
    return _append_positions(out, plan, n_img, positions, normalize_positions)


def _stitch_torch(patches, shape, step, weight, norm):
    nd = len(shape)
    window = list(patches.shape[2:])
    groups = [-(-w // s) for w, s in zip(window, step)]
    if math.prod(groups) > 64:  # tiny steps: too many groups, the index_add path is faster
        return stitch_reference(patches, shape, step, weight, norm)
    plan, acc, q = _weighted_patch_grid(patches, shape, step, weight)
    n_img, n_ch = q.shape[0], patches.shape[1]
    q = q.permute(0, 1 + nd, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd))  # (N,C,n..,w..)
    out = _zeros((n_img, n_ch, *shape), acc, patches.device)
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


# ================================================================ numba CPU op
# numba's parallel kernels are launched through `_numba_call`: one launch at a time in a
# process (the 'workqueue' threading layer aborts on concurrent launches from Python
# threads; the others run the launches one after the other anyway, each using every core),
# and single-threaded kernels in a forked child (GNU OpenMP's pool does not survive fork(),
# so a DataLoader worker forked after the parent used numba would die).
_NUMBA_LOCK = threading.Lock()
_FORKED = False


def _after_fork_in_child() -> None:
    global _NUMBA_LOCK, _FORKED
    _NUMBA_LOCK = threading.Lock()
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _numba_slabs(planes: int, rows: int) -> int:
    """Y slabs per output plane so that every numba thread gets one job, with slabs of at
    least 8 rows; 1 when there are planes enough. (More slabs than threads measured slower:
    every slab walks the whole patch list, 11.3 / 5.7 / 6.6 / 8.5 ms for 1 / 2 / 4 / 8 slabs
    of a (1, 1, 128^3) stitch on 2 threads.)"""
    import numba

    threads = 1 if _FORKED else numba.get_num_threads()
    want = -(-threads // max(planes, 1))
    return max(1, min(want, rows // 8))


def _numba_call(name: str, *args) -> None:
    from ..kernels import numba_quilt as nk

    if _FORKED:
        nk.SERIAL[name](*args)
        return
    with _NUMBA_LOCK:
        getattr(nk, name)(*args)


def _as5d(t: torch.Tensor, nd: int) -> torch.Tensor:
    """(N, C, Y, X) -> (N, C, 1, Y, X); 3-D data passes through."""
    return t.unsqueeze(2) if nd == 2 else t


def _starts3(plan) -> list:
    import numpy as np

    starts = [np.asarray(s, dtype=np.int64) for s in plan.starts]
    if plan.ndim == 2:
        starts = [np.zeros(1, dtype=np.int64)] + starts
    return starts


def _win3(window) -> list:
    return [1, *window] if len(window) == 2 else list(window)


def _unstitch_numba(
    x, window, step, weight, out_dtype, fill_mask, fill_value, positions, normalize_positions
):

    nd = x.dim() - 2
    if nd not in (2, 3):
        return unstitch_reference(
            x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
            normalize_positions,
        )
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    n_img, n_ch = x.shape[:2]
    src = x
    if src.dtype in (torch.float16, torch.bfloat16):
        src = src.float()  # numba has no half types: upcast once, exact
    dst_dtype = out_dtype or x.dtype
    work_dtype = dst_dtype
    if weight is not None:
        work_dtype = accumulation_dtype(src.dtype if src.dtype.is_floating_point else dst_dtype)
    if work_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32
    out = empty_cpu((n_img * plan.patches_per_image, n_ch, *window), work_dtype)
    out6 = out.view(n_img, plan.patches_per_image, n_ch, *_win3(window))
    sz, sy, sx = _starts3(plan)
    img = _as5d(src, nd).numpy()
    if weight is None:
        _numba_call("_unstitch_numba", img, sz, sy, sx, out6.numpy())
    else:
        w = weight.to(work_dtype).reshape(_win3(window)).contiguous().numpy()
        _numba_call("_unstitch_weighted_numba", img, sz, sy, sx, w, out6.numpy())
    out = out.to(dst_dtype)
    if fill_mask is not None:
        out.masked_fill_(fill_mask.to(torch.bool), fill_value)
    return _append_positions(out, plan, n_img, positions, normalize_positions)


def _stitch_numba(patches, shape, step, weight, norm):
    nd = len(shape)
    if nd not in (2, 3):
        return stitch_reference(patches, shape, step, weight, norm)
    window = list(patches.shape[2:])
    plan = plan_for(tuple(shape), tuple(window), tuple(step))
    n_p = plan.patches_per_image
    n_img, n_ch = patches.shape[0] // n_p, patches.shape[1]
    acc = accumulation_dtype(patches.dtype)
    src = patches.to(acc).contiguous()
    out = zeros_cpu((n_img, n_ch, *shape), acc)
    sz, sy, sx = _starts3(plan)
    one = torch.ones((1, 1, 1), dtype=acc).numpy()
    w = weight.to(acc).reshape(_win3(window)).contiguous().numpy() if weight is not None else one
    nrm = (
        norm.to(acc).reshape([1] * (3 - nd) + list(shape)).contiguous().numpy()
        if norm is not None
        else one
    )
    _numba_call(
        "_stitch_numba",
        src.view(n_img, n_p, n_ch, *_win3(window)).numpy(),
        sz, sy, sx, w, nrm, weight is not None, norm is not None,
        _numba_slabs(n_img * n_ch, shape[-2]),
        _as5d(out, nd).numpy(),
    )
    return out.to(stitch_output_dtype(patches.dtype))


# ================================================================ Triton op
# The launch side of kernels/triton_quilt.py. Everything below is shape bookkeeping: the
# kernels see 3 spatial axes (2-D/1-D data gets leading singleton axes: window 1, one start
# 0), explicit strides of the caller's tensors (no .contiguous() of x or patches), start
# tables from QuiltPlan (cached per plan and device), and bf16 tensors as their int16 bits.
_TRITON_TILE = 1024  # elements per program: 4 warps x 8 per thread (two 16-byte fp32 vectors)
_TRITON_GATHER_TILE = 512  # gather keeps 3 nested accumulators: half the tile, <= 64 regs
_TRITON_WARPS = 4
_TRITON_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_TRITON_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STITCH_DEFAULT_MODE = "deterministic"  # GPU default for mode='auto', see benchmarks/GPU.md
_triton_empty = torch.empty  # output allocator; tests swap in a NaN-filling one


def _triton_kernels():
    from ..kernels import triton_quilt

    return triton_quilt


def _launch(kernel, grid: tuple, device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the tensors' CUDA device (not just the current
    one). Grids are 1-D and must stay below 2**31 programs (the CUDA limit, and what lets
    the kernels decompose ``pid`` in int32)."""
    if grid[0] >= 2**31:
        raise QltyError(
            f"this quilt needs {grid[0]} Triton programs, more than the 2**31 - 1 one launch "
            f"can have; split the batch (N) or the channels (C) and call again"
        )
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _triton_starts(plan, device) -> tuple:
    """(starts_z, starts_y, starts_x) int64 device tensors of the plan padded to 3 axes,
    cached with the plan's other device tables."""

    def make():
        pad = [(0,)] * (3 - plan.ndim)
        return tuple(
            torch.tensor(s, dtype=torch.int64, device=device) for s in (*pad, *plan.starts)
        )

    return plan._cached(("triton_starts", torch.device(device)), make)


def _pad3(seq, fill) -> list:
    return [fill] * (3 - len(seq)) + list(seq)


def _lift3(t: torch.Tensor, nd: int) -> torch.Tensor:
    """(N, C, *S) -> (N, C, 1.., *S) with 3 spatial axes: a view, strides kept."""
    for _ in range(3 - nd):
        t = t.unsqueeze(2)
    return t


def _triton_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 travels as its int16 bit pattern (same storage, same strides)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _triton_tiles(wy: int, wx: int, tile: int = _TRITON_TILE) -> tuple:
    """(BLOCK_Y, BLOCK_X, n_yb, n_xb) for a (wy, wx) plane: whole rows of up to 128
    elements along the contiguous axis, then as many rows as fit in ``tile`` elements."""
    block_x = min(triton_next_pow2(wx), 128)
    block_y = min(triton_next_pow2(wy), max(1, tile // block_x))
    return block_y, block_x, -(-wy // block_y), -(-wx // block_x)


def _gather_tiles(dy: int, dx: int, sty: int, stx: int, acc_bytes: int) -> tuple:
    """Output tile of the deterministic stitch: (BLOCK_Y, BLOCK_X, n_yb, n_xb, num_warps).

    An x edge that divides the x step meets exactly ceil(w/s) patches (plus the clamped last
    one), each covering the whole edge, so no masked-off load lanes along x: the largest
    power of two dividing the step, in [16, 128] (64 when the step has no such factor).
    Rows fill 2 KiB of accumulator (y-candidates are then partly masked, see GPU.md); one
    warp per 128 fp32 (4 consecutive per thread: 16-byte vectors). Aligning y to the step
    too (16x16 tiles in 3-D) was tried: on 2 warps it spills on sm_90, on 4 it loses the
    16-byte vectors.
    """
    cap = _TRITON_GATHER_TILE * 4 // acc_bytes  # 2 KiB of accumulator: 512 fp32 / 256 fp64
    ax = stx & -stx  # largest power of two dividing the x step
    block_x = min(ax if ax >= 16 else 64, 128, triton_next_pow2(dx))
    block_y = min(max(1, cap // block_x), triton_next_pow2(dy))
    warps = max(1, min(_TRITON_WARPS, block_y * block_x * acc_bytes // 512))
    return block_y, block_x, -(-dy // block_y), -(-dx // block_x), warps


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _x_align(starts_x) -> int:
    """Largest power of two (<= 16) dividing every x start: a tl.multiple_of hint."""
    g = 0
    for s in starts_x:
        g = math.gcd(g, int(s))
    if g == 0:
        return 16
    return min(16, g & -g)


def _triton_supported(dtype: torch.dtype) -> bool:
    return dtype in _TRITON_FLOAT_DTYPES or dtype in _TRITON_INT_DTYPES


def _unstitch_triton(
    x, window, step, weight, out_dtype, fill_mask, fill_value, positions, normalize_positions
):
    """Triton unstitch: one fused pass (gather, cast, weight, fill, positional channels)."""
    nd = x.dim() - 2
    dst = out_dtype or x.dtype
    if nd > 3 or not (_triton_supported(x.dtype) and _triton_supported(dst)):
        return unstitch_reference(
            x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
            normalize_positions,
        )
    tk = _triton_kernels()
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    n_img, n_ch = x.shape[:2]
    n_pos = nd if positions else 0
    n_p = plan.patches_per_image
    out = _triton_empty((n_img * n_p, n_ch + n_pos, *window), dtype=dst, device=x.device)
    if out.numel() == 0:
        return out
    dev = x.device
    x5 = _lift3(x, nd)
    wz, wy, wx = _pad3(window, 1)
    sz, sy, sx = _triton_starts(plan, dev)
    dz, dy, dx = _pad3(plan.shape, 1)
    counts = _pad3(plan.counts, 1)
    compute_f64 = False
    w_arg = sz  # any valid pointer when unused
    if weight is not None:
        compute = torch.promote_types(accumulation_dtype(x.dtype), weight.dtype)
        compute_f64 = compute == torch.float64
        w_arg = weight.to(device=dev, dtype=compute).contiguous()
    m_arg, f_arg = sz, sz
    if fill_mask is not None:
        m_arg = fill_mask.to(device=dev, dtype=torch.int8).contiguous()
        f_arg = _triton_view(torch.empty(1, dtype=dst, device=dev).fill_(fill_value))
    block_y, block_x, n_yb, n_xb = _triton_tiles(wy, wx)
    grid = (out.shape[0] * out.shape[1] * wz * n_yb * n_xb,)
    _launch(tk._unstitch_kernel, grid, dev,
        _triton_view(x5), _triton_view(out), w_arg, m_arg, f_arg, sz, sy, sx,
        n_ch, n_ch + n_pos, counts[1], counts[2], n_p,
        dz, dy, dx,
        *x5.stride(),
        n_yb, n_xb,
        WZ=wz, WY=wy, WX=wx, BLOCK_Y=block_y, BLOCK_X=block_x,
        X_ALIGN=_x_align(plan.starts[-1]),
        HAS_WEIGHT=weight is not None, HAS_FILL=fill_mask is not None,
        POSITIONS={"": 0, "absolute": 1, "relative": 2}[positions],
        NORMALIZE_POS=bool(normalize_positions), NDIM=nd,
        X_BF16=x.dtype == torch.bfloat16, X_UPCAST=x.dtype == torch.float16,
        COMPUTE_F64=compute_f64,
        OUT_BF16=dst == torch.bfloat16, OUT_HALF=dst == torch.float16,
        num_warps=_TRITON_WARPS,
    )
    return out


def _resolve_mode(mode: str) -> str:
    return _STITCH_DEFAULT_MODE if mode in ("auto", "", None) else mode


def _stitch_triton(patches, shape, step, weight, norm, mode):
    """Triton stitch: 'deterministic' output-stationary gather (default) or 'atomic'
    scatter-add; weighting, normalisation by ``norm`` and the output cast are fused."""
    nd = len(shape)
    if nd > 3 or not _triton_supported(patches.dtype):
        return stitch_reference(patches, shape, step, weight, norm)
    mode = _resolve_mode(mode)
    if mode not in ("atomic", "deterministic"):
        raise QltyError(f"mode must be one of {STITCH_MODES}, got {mode!r}")
    tk = _triton_kernels()
    window = list(patches.shape[2:])
    plan = plan_for(tuple(shape), tuple(window), tuple(step))
    n_p = plan.patches_per_image
    n_img, n_ch = patches.shape[0] // n_p, patches.shape[1]
    dev = patches.device
    acc = accumulation_dtype(patches.dtype)
    dst = stitch_output_dtype(patches.dtype)
    out = _triton_empty((n_img, n_ch, *shape), dtype=dst, device=dev)
    if out.numel() == 0:
        return out
    p5 = _lift3(patches, nd)
    wz, wy, wx = _pad3(window, 1)
    dz, dy, dx = _pad3(shape, 1)
    stz, sty, stx = _pad3(step, 1)
    nz, ny, nx = _pad3(plan.counts, 1)
    sz, sy, sx = _triton_starts(plan, dev)
    w_arg = weight.to(device=dev, dtype=acc).contiguous() if weight is not None else sz
    n_arg = norm.to(device=dev, dtype=acc).contiguous() if norm is not None else sz
    p_bf16 = patches.dtype == torch.bfloat16
    p_up = patches.dtype == torch.float16 or not patches.dtype.is_floating_point
    if mode == "deterministic":
        block_y, block_x, n_yb, n_xb, warps = _gather_tiles(
            dy, dx, sty, stx, acc.itemsize if acc.is_floating_point else 4
        )
        grid = (n_img * n_ch * dz * n_yb * n_xb,)
        _launch(tk._stitch_gather_kernel, grid, dev,
            _triton_view(p5), _triton_view(out), w_arg, n_arg, sz, sy, sx,
            n_ch, nz, ny, nx, n_p,
            dz, dy, dx, stz, sty, stx,
            *p5.stride(),
            n_yb, n_xb,
            WZ=wz, WY=wy, WX=wx, BLOCK_Y=block_y, BLOCK_X=block_x,
            X_ALIGN=_x_align(plan.starts[-1]),
            HAS_WEIGHT=weight is not None, HAS_NORM=norm is not None,
            ACC_F64=acc == torch.float64, P_BF16=p_bf16, P_UPCAST=p_up,
            OUT_BF16=dst == torch.bfloat16, OUT_HALF=dst == torch.float16,
            FLAT_Z=dz == 1,
            num_warps=warps, num_stages=1,  # 2-3 trip loops: nothing to pipeline
            enable_fp_fusion=False,  # separate mul and add, as torch: bit-identical sums
        )
        return out
    # atomic: scatter-add into a zeroed accumulator, then one fused divide + cast pass
    accum = out if dst == acc else torch.zeros((n_img, n_ch, *shape), dtype=acc, device=dev)
    if dst == acc:
        accum.zero_()
    block_y, block_x, n_yb, n_xb = _triton_tiles(wy, wx)
    grid = (patches.shape[0] * n_ch * wz * n_yb * n_xb,)
    _launch(tk._stitch_atomic_kernel, grid, dev,
        _triton_view(p5), accum, w_arg, sz, sy, sx,
        n_ch, ny, nx, n_p,
        dz, dy, dx,
        *p5.stride(),
        n_yb, n_xb,
        WZ=wz, WY=wy, WX=wx, BLOCK_Y=block_y, BLOCK_X=block_x,
        X_ALIGN=_x_align(plan.starts[-1]),
        HAS_WEIGHT=weight is not None, P_BF16=p_bf16, P_UPCAST=p_up,
        num_warps=_TRITON_WARPS,
    )
    if norm is None and accum is out:
        return out
    numel = accum.numel()
    _launch(tk._stitch_finalize_kernel, (triton_cdiv(numel, _TRITON_TILE),), dev,
        accum, n_arg, _triton_view(out), numel, dz * dy * dx,
        BLOCK=_TRITON_TILE, HAS_NORM=norm is not None,
        OUT_BF16=dst == torch.bfloat16, OUT_HALF=dst == torch.float16,
        num_warps=_TRITON_WARPS,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ============================================================ registered ops
@torch.library.custom_op("qlty_gpu::unstitch", mutates_args=())
def _unstitch_op(
    x: torch.Tensor,
    window: list[int],
    step: list[int],
    weight: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    fill_mask: Optional[torch.Tensor],
    fill_value: Union[int, float, bool],
    positions: str,
    normalize_positions: bool,
    backend: str,
) -> torch.Tensor:
    args = (x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
            normalize_positions)
    name = choose_backend("unstitch", x.device, x.dtype, backend or None)
    if name == "numba":
        return _unstitch_numba(*args)
    if name == "triton":
        return _unstitch_triton(*args)
    return _unstitch_torch(*args)


@_unstitch_op.register_fake
def _(x, window, step, weight, out_dtype, fill_mask, fill_value, positions, normalize_positions,
      backend):
    counts = _counts(x.shape[2:], window, step)
    m = x.shape[0] * math.prod(counts)
    c = x.shape[1] + (len(window) if positions else 0)
    return x.new_empty((m, c, *window), dtype=out_dtype or x.dtype)


@torch.library.custom_op("qlty_gpu::stitch", mutates_args=())
def _stitch_op(
    patches: torch.Tensor,
    shape: list[int],
    step: list[int],
    weight: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    mode: str,
    backend: str,
) -> torch.Tensor:
    name = choose_backend("stitch", patches.device, patches.dtype, backend or None)
    if name == "numba":
        return _stitch_numba(patches, shape, step, weight, norm)
    if name == "triton":
        return _stitch_triton(patches, shape, step, weight, norm, mode)
    return _stitch_torch(patches, shape, step, weight, norm)


@_stitch_op.register_fake
def _(patches, shape, step, weight, norm, mode, backend):
    window = patches.shape[2:]
    n_p = math.prod(_counts(shape, window, step))
    return patches.new_empty(
        (patches.shape[0] // n_p, patches.shape[1], *shape),
        dtype=stitch_output_dtype(patches.dtype),
    )


# ----------------------------------------------------------------- autograd
def _unstitch_setup(ctx, inputs, output):
    x, window, step, weight, out_dtype, fill_mask, fill_value, positions, _, backend = inputs
    ctx.n_ch = x.shape[1]
    ctx.shape = list(x.shape[2:])
    ctx.step = step
    ctx.x_dtype = x.dtype
    ctx.backend = backend
    ctx.save_for_backward(weight, fill_mask)


def _unstitch_backward(ctx, grad):
    weight, fill_mask = ctx.saved_tensors
    grad = grad[:, : ctx.n_ch]  # positional channels carry no gradient to x
    if fill_mask is not None:
        grad = grad.masked_fill(fill_mask.to(torch.bool), 0)
    gx = torch.ops.qlty_gpu.stitch(grad, ctx.shape, ctx.step, weight, None, "auto", ctx.backend)
    return gx.to(ctx.x_dtype), None, None, None, None, None, None, None, None, None


def _stitch_setup(ctx, inputs, output):
    patches, shape, step, weight, norm, mode, backend = inputs
    ctx.window = list(patches.shape[2:])
    ctx.step = step
    ctx.p_dtype = patches.dtype
    ctx.backend = backend
    ctx.save_for_backward(weight, norm)


def _stitch_backward(ctx, grad):
    weight, norm = ctx.saved_tensors
    if norm is not None:
        grad = grad / norm
    gp = torch.ops.qlty_gpu.unstitch(
        grad, ctx.window, ctx.step, weight, ctx.p_dtype, None, 0.0, "", True, ctx.backend
    )
    return gp, None, None, None, None, None, None


_unstitch_op.register_autograd(_unstitch_backward, setup_context=_unstitch_setup)
_stitch_op.register_autograd(_stitch_backward, setup_context=_stitch_setup)


# ======================================================= validated entry points
def _check_tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise QltyTypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise QltyError(f"{name} must be {ndim}-D, got {describe(t)}")
    return t


def _check_geometry(spatial, window, step, where: str) -> tuple[list[int], list[int]]:
    nd = len(spatial)
    window = [int(w) for w in window]
    step = [int(s) for s in step]
    if len(window) != nd or len(step) != nd:
        raise QltyError(
            f"{where}: window {window} and step {step} must have {nd} elements for spatial "
            f"shape {tuple(spatial)}"
        )
    for w, s, d in zip(window, step, spatial):
        if not 1 <= w <= d or s < 1:
            raise QltyError(
                f"{where}: need 1 <= window <= image size and step >= 1, got window={window}, "
                f"step={step}, image={tuple(spatial)}"
            )
    return window, step


def _check_mode(mode: str) -> str:
    if mode not in STITCH_MODES:
        raise QltyError(f"mode must be one of {STITCH_MODES}, got {mode!r}")
    return mode


def unstitch(
    x: torch.Tensor,
    window,
    step,
    *,
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    fill_mask: Optional[torch.Tensor] = None,
    fill_value: Union[int, float, bool] = 0.0,
    positions: str = "",
    normalize_positions: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Split ``x`` of shape ``(N, C, *S)`` into patches ``(N*P, C, *window)``.

    Args:
        x: the images, 2 or 3 spatial dims, any strides, any device.
        window: patch size per spatial axis.
        step: patch step per spatial axis (last patch clamped to the edge).
        weight: optional window-shaped map multiplied into each patch (fused).
        out_dtype: optional output dtype (cast fused).
        fill_mask: optional window-shaped bool mask of positions set to ``fill_value``.
        fill_value: value written where ``fill_mask`` is true.
        positions: '' for none, 'absolute' or 'relative' to append ``ndim`` coordinate
            channels (z,) y, x after the C data channels (see :func:`positional_channels`).
        normalize_positions: scale the coordinate channels (see :func:`positional_channels`).
        backend: 'triton', 'numba', 'torch' or None for automatic.

    Returns:
        Patches in N-major, then z, y, x order.

    Example:
        >>> x = torch.arange(2 * 1 * 5 * 5.).reshape(2, 1, 5, 5)
        >>> unstitch(x, (3, 3), (2, 2)).shape
        torch.Size([8, 1, 3, 3])
    """
    _check_tensor("x", x)
    if x.dim() < 3:
        raise QltyError(f"x must have shape (N, C, *spatial), got {describe(x)}")
    window, step = _check_geometry(x.shape[2:], window, step, "unstitch")
    if weight is not None and tuple(weight.shape) != tuple(window):
        raise QltyError(f"weight must have the window shape {tuple(window)}, got {describe(weight)}")
    if fill_mask is not None and tuple(fill_mask.shape) != tuple(window):
        raise QltyError(
            f"fill_mask must have the window shape {tuple(window)}, got {describe(fill_mask)}"
        )
    if positions not in ("", "absolute", "relative"):
        raise QltyError(f"positions must be '', 'absolute' or 'relative', got {positions!r}")
    if isinstance(fill_value, torch.Tensor) and fill_value.numel() == 1:
        fill_value = fill_value.item()
    if not isinstance(fill_value, (bool, int, float)):
        raise QltyError(f"fill_value must be a Python number, got {describe(fill_value)}")
    return torch.ops.qlty_gpu.unstitch(
        x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
        bool(normalize_positions), backend or "",
    )


def stitch(
    patches: torch.Tensor,
    shape,
    step,
    *,
    weight: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
    mode: str = "auto",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sum weighted patches ``(N*P, C, *window)`` back into images ``(N, C, *shape)``.

    Args:
        patches: patches in :func:`unstitch` order.
        shape: spatial shape of the images.
        step: patch step per spatial axis.
        weight: optional window-shaped weight map.
        norm: optional spatial-shaped divisor (the weight sum); None returns the plain sum.
        mode: 'auto', 'atomic' or 'deterministic' (only the Triton backend distinguishes;
            the CPU backends are always deterministic).
        backend: 'triton', 'numba', 'torch' or None for automatic.

    Returns:
        Floating input keeps its dtype (accumulated in float32, float64 for float64);
        integer input gives float32.

    Example:
        >>> p = torch.ones(8, 1, 3, 3)
        >>> stitch(p, (5, 5), (2, 2))[0, 0, :, 2]
        tensor([2., 2., 4., 2., 2.])
    """
    _check_tensor("patches", patches)
    shape = [int(d) for d in shape]
    if patches.dim() != 2 + len(shape):
        raise QltyError(
            f"patches must have shape (M, C, *window) with {len(shape)} window dims, "
            f"got {describe(patches)}"
        )
    window, step = _check_geometry(shape, patches.shape[2:], step, "stitch")
    n_p = math.prod([patch_count(d, w, s) for d, w, s in zip(shape, window, step)])
    if patches.shape[0] % n_p != 0:
        raise QltyShapeAssertionError(
            f"patches has {patches.shape[0]} patches, not a multiple of the {n_p} patches per "
            f"image of this geometry"
        )
    if weight is not None and tuple(weight.shape) != tuple(window):
        raise QltyError(f"weight must have the window shape {tuple(window)}, got {describe(weight)}")
    if norm is not None and tuple(norm.shape) != tuple(shape):
        raise QltyError(f"norm must have the spatial shape {tuple(shape)}, got {describe(norm)}")
    return torch.ops.qlty_gpu.stitch(
        patches, shape, step, weight, norm, _check_mode(mode), backend or ""
    )
