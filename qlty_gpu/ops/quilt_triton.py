"""The 'triton' backend of unstitch / stitch: launchers of ``kernels/quilt_triton.py``.

Everything here is shape bookkeeping: the kernels see 3 spatial axes (2-D/1-D data gets
leading singleton axes: window 1, one start 0), explicit strides of the caller's tensors
(no ``.contiguous()`` of x or patches), start tables from the plan (cached on it), and bf16
tensors as their int16 bits. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..geometry import QuiltPlan, device_cached
from . import _launch
from .quilt_reference import accumulation_dtype, stitch_output_dtype, weighting_dtype

__all__ = ["launch_unstitch", "launch_stitch", "DEFAULT_MODE"]

TILE = 1024  # elements per program: 4 warps x 8 per thread (two 16-byte fp32 vectors)
GATHER_TILE = 512  # gather keeps 3 nested accumulators: half the tile, <= 64 regs
WARPS = 4
DEFAULT_MODE = "deterministic"  # what mode='auto' means on this backend (benchmarks/GPU.md)
_POSITIONS = {"": 0, "absolute": 1, "relative": 2}


def _kernels():
    from ..kernels import quilt_triton

    return quilt_triton


def _starts(plan: QuiltPlan, device: torch.device) -> tuple:
    """(starts_z, starts_y, starts_x) int64 device tensors padded to 3 axes (cached)."""
    return device_cached(plan, "starts", torch.device(device), None, 3)


def _tiles(wy: int, wx: int, tile: int = TILE) -> tuple[int, int, int, int]:
    """(BLOCK_Y, BLOCK_X, n_yb, n_xb) for a (wy, wx) plane: whole rows of up to 128
    elements along the contiguous axis, then as many rows as fit in ``tile`` elements."""
    block_x = min(_launch.next_pow2(wx), 128)
    block_y = min(_launch.next_pow2(wy), max(1, tile // block_x))
    return block_y, block_x, _launch.cdiv(wy, block_y), _launch.cdiv(wx, block_x)


def _gather_tiles(dy: int, dx: int, sty: int, stx: int, acc_bytes: int
                  ) -> tuple[int, int, int, int, int]:
    """Output tile of the deterministic stitch: (BLOCK_Y, BLOCK_X, n_yb, n_xb, num_warps).

    An x edge that divides the x step meets exactly ceil(w/s) patches (plus the clamped last
    one), each covering the whole edge, so no masked-off load lanes along x: the largest
    power of two dividing the step, in [16, 128] (64 when the step has no such factor).
    Rows fill 2 KiB of accumulator (y-candidates are then partly masked, see GPU.md); one
    warp per 128 fp32 (4 consecutive per thread: 16-byte vectors). Aligning y to the step
    too (16x16 tiles in 3-D) was tried: on 2 warps it spills on sm_90, on 4 it loses the
    16-byte vectors.
    """
    cap = GATHER_TILE * 4 // acc_bytes  # 2 KiB of accumulator: 512 fp32 / 256 fp64
    ax = stx & -stx  # largest power of two dividing the x step
    block_x = min(ax if ax >= 16 else 64, 128, _launch.next_pow2(dx))
    block_y = min(max(1, cap // block_x), _launch.next_pow2(dy))
    warps = max(1, min(WARPS, block_y * block_x * acc_bytes // 512))
    return block_y, block_x, _launch.cdiv(dy, block_y), _launch.cdiv(dx, block_x), warps


def _x_align(starts_x) -> int:
    """Largest power of two (<= 16) dividing every x start: a tl.multiple_of hint."""
    g = 0
    for s in starts_x:
        g = math.gcd(g, int(s))
    if g == 0:
        return 16
    return min(16, g & -g)


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
    """One fused pass: gather, weight, cast, fill and positional channels."""
    nd = plan.ndim
    dst = out_dtype
    n_img, n_ch = x.shape[:2]
    n_pos = nd if positions else 0
    n_p = plan.patches_per_image
    dev = x.device
    out = _launch.new_empty((n_img * n_p, n_ch + n_pos, *plan.window), dst, dev)
    if out.numel() == 0:
        return out
    tk = _kernels()
    x5 = _launch.lift3(x, nd)
    wz, wy, wx = _launch.pad3(plan.window, 1)
    sz, sy, sx = _starts(plan, dev)
    dz, dy, dx = _launch.pad3(plan.shape, 1)
    counts = _launch.pad3(plan.counts, 1)
    compute_f64 = False
    w_arg = sz  # any valid pointer when unused
    if weight is not None:
        compute = torch.promote_types(weighting_dtype(x.dtype, dst), weight.dtype)
        compute_f64 = compute == torch.float64
        w_arg = weight.to(device=dev, dtype=compute).contiguous()
    m_arg, f_arg = sz, sz
    if fill_mask is not None:
        m_arg = fill_mask.to(device=dev, dtype=torch.int8).contiguous()
        f_arg = _launch.triton_view(torch.empty(1, dtype=dst, device=dev).fill_(fill_value))
    block_y, block_x, n_yb, n_xb = _tiles(wy, wx)
    grid = (out.shape[0] * out.shape[1] * wz * n_yb * n_xb,)
    _launch.launch_triton(
        tk._unstitch_kernel, grid, dev,
        _launch.triton_view(x5), _launch.triton_view(out), w_arg, m_arg, f_arg, sz, sy, sx,
        n_ch, n_ch + n_pos, counts[1], counts[2], n_p,
        dz, dy, dx,
        *x5.stride(),
        n_yb, n_xb,
        WZ=wz, WY=wy, WX=wx, BLOCK_Y=block_y, BLOCK_X=block_x,
        X_ALIGN=_x_align(plan.starts[-1]),
        HAS_WEIGHT=weight is not None, HAS_FILL=fill_mask is not None,
        POSITIONS=_POSITIONS[positions],
        NORMALIZE_POS=bool(normalize_positions), NDIM=nd,
        X_BF16=x.dtype == torch.bfloat16, X_UPCAST=x.dtype == torch.float16,
        COMPUTE_F64=compute_f64,
        OUT_BF16=dst == torch.bfloat16, OUT_HALF=dst == torch.float16,
        num_warps=WARPS,
    )
    return out


def launch_stitch(
    patches: torch.Tensor,
    *,
    plan: QuiltPlan,
    weight: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """'deterministic' output-stationary gather or 'atomic' scatter-add (``mode`` already
    resolved); weighting, normalisation by ``norm`` and the output cast are fused."""
    tk = _kernels()
    nd = plan.ndim
    n_p = plan.patches_per_image
    n_img, n_ch = patches.shape[0] // n_p, patches.shape[1]
    dev = patches.device
    acc = accumulation_dtype(patches.dtype)
    dst = stitch_output_dtype(patches.dtype)
    out = _launch.new_empty((n_img, n_ch, *plan.shape), dst, dev)
    if out.numel() == 0:
        return out
    p5 = _launch.lift3(patches, nd)
    wz, wy, wx = _launch.pad3(plan.window, 1)
    dz, dy, dx = _launch.pad3(plan.shape, 1)
    stz, sty, stx = _launch.pad3(plan.step, 1)
    nz, ny, nx = _launch.pad3(plan.counts, 1)
    sz, sy, sx = _starts(plan, dev)
    w_arg = weight.to(device=dev, dtype=acc).contiguous() if weight is not None else sz
    n_arg = norm.to(device=dev, dtype=acc).contiguous() if norm is not None else sz
    p_bf16 = patches.dtype == torch.bfloat16
    p_up = patches.dtype == torch.float16 or not patches.dtype.is_floating_point
    if mode == "deterministic":
        block_y, block_x, n_yb, n_xb, warps = _gather_tiles(
            dy, dx, sty, stx, acc.itemsize if acc.is_floating_point else 4
        )
        grid = (n_img * n_ch * dz * n_yb * n_xb,)
        _launch.launch_triton(
            tk._stitch_gather_kernel, grid, dev,
            _launch.triton_view(p5), _launch.triton_view(out), w_arg, n_arg, sz, sy, sx,
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
    if dst == acc:
        accum = out.zero_()
    else:
        accum = _launch.new_zeros((n_img, n_ch, *plan.shape), acc, dev)
    block_y, block_x, n_yb, n_xb = _tiles(wy, wx)
    grid = (patches.shape[0] * n_ch * wz * n_yb * n_xb,)
    _launch.launch_triton(
        tk._stitch_atomic_kernel, grid, dev,
        _launch.triton_view(p5), accum, w_arg, sz, sy, sx,
        n_ch, ny, nx, n_p,
        dz, dy, dx,
        *p5.stride(),
        n_yb, n_xb,
        WZ=wz, WY=wy, WX=wx, BLOCK_Y=block_y, BLOCK_X=block_x,
        X_ALIGN=_x_align(plan.starts[-1]),
        HAS_WEIGHT=weight is not None, P_BF16=p_bf16, P_UPCAST=p_up,
        num_warps=WARPS,
    )
    if norm is None and accum is out:
        return out
    numel = accum.numel()
    _launch.launch_triton(
        tk._stitch_finalize_kernel, (_launch.cdiv(numel, TILE),), dev,
        accum, n_arg, _launch.triton_view(out), numel, dz * dy * dx,
        BLOCK=TILE, HAS_NORM=norm is not None,
        OUT_BF16=dst == torch.bfloat16, OUT_HALF=dst == torch.float16,
        num_warps=WARPS,
    )
    return out
