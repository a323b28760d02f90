"""Launch side of ``kernels/zagg_triton.py``: tiles, strides, dtype flags.

The kernel reads the slab and writes the output through their own strides (no
``.contiguous()`` copies); bf16 travels as int16 bits and bool as uint8 (same storage).
"""

from __future__ import annotations

import torch

from ..errors import QltyError
from .zagg_reference import compute_dtype

__all__ = ["zagg_triton"]

_WARPS = 4
_TILE = 1024  # elements per program: 4 warps x 8 fp32 per thread


def _kernels():
    from ..kernels import zagg_triton

    return zagg_triton


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _view(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


def zagg_triton(out, x, idx, kind, chan_base, chan_cstride, jpos) -> torch.Tensor:
    """Fill ``out`` with one launch (see :mod:`qlty_gpu.ops.zagg_reference` for the spec)."""
    N, C, _, Y, X = x.shape
    J, K, G = idx.shape
    if N * J * C * K * Y * X == 0:
        return out
    dev = x.device
    tables = [t.to(device=dev, dtype=torch.int64).contiguous()
              for t in (idx, kind, chan_base, chan_cstride, jpos)]
    acc = compute_dtype(x.dtype, out.dtype)
    tile = _TILE // 2 if acc == torch.float64 else _TILE  # fp64: 2 accumulators <= 64 regs
    block_x = min(_pow2(X), 128)
    block_y = min(_pow2(Y), max(1, tile // block_x))
    n_yb, n_xb = -(-Y // block_y), -(-X // block_x)
    grid = (N * J * C * K * n_yb * n_xb,)
    if grid[0] >= 2**31:
        raise QltyError(
            f"this conversion needs {grid[0]} Triton programs, more than one launch can have; "
            f"convert fewer z-slices at a time (slab_bytes=)"
        )
    kernel = _kernels()._zagg_kernel
    args = (_view(x), _view(out), *tables, C, K, J, Y, X, *x.stride(), *out.stride(), n_yb, n_xb)
    kw = dict(
        G=G, BLOCK_Y=block_y, BLOCK_X=block_x,
        X_BF16=x.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
        COMPUTE_F64=acc == torch.float64, SAME_DTYPE=x.dtype == out.dtype,
        num_warps=_WARPS,
    )
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            kernel[grid](*args, **kw)
    else:
        kernel[grid](*args, **kw)
    return out
