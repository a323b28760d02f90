"""Triton kernel of the 2.5D z-aggregation (identity gathers, mean, population std).

One program computes one ``(BLOCK_Y, BLOCK_X)`` tile of one output channel: image n, table
row j, input channel c, slot k. It walks the slot's G table entries (source z, -1 for a
zero slice that counts, -2 for nothing), so every channel of a slab comes out of one launch.

Shapes (the ops layer passes every stride; nothing here assumes contiguity):
    x        (N, C, S, Y, X)      the slab, any strides; bf16 arrives as int16 bits
    out      (N, J', C', Y, X)    any strides (a 2-d or 3-d mode output view)
    idx      (J, K, G)            int64, contiguous
    kind     (K,)                 int64: 0 identity, 1 mean, 2 std
    chan_base, chan_cstride (K,)  int64: output channel = chan_base[k] + c * chan_cstride[k]
    jpos     (J,)                 int64: output row of table row j

Constexprs: BLOCK_Y/BLOCK_X tile; G group width; X_BF16/OUT_BF16 bf16 bit patterns;
COMPUTE_F64 accumulate in fp64 (else fp32); SAME_DTYPE identity is a raw copy.
Numerics: int64 addresses (grid indices widened first), fp32 accumulation (fp64 for fp64),
masked loads on both spatial axes, two-pass std; no block pointers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import _cast_out, _div_rn, _load_value, _tile_xy

__all__ = ["_zagg_kernel"]


@triton.jit
def _load_acc(ptrs, mask, X_BF16: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """Masked load widened to the accumulation type (0 where masked)."""
    v = _load_value(ptrs, mask, X_BF16, False)
    if COMPUTE_F64:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
    return v


@triton.jit
def _sqrt(a):
    """Correctly rounded square root, as torch's."""
    if a.dtype == tl.float64:
        r = tl.sqrt(a)
    else:
        r = tl.sqrt_rn(a)
    return r


@triton.jit
def _zagg_kernel(
    x_ptr, out_ptr, idx_ptr, kind_ptr, base_ptr, cstride_ptr, jpos_ptr,
    n_ch, n_slots, n_rows, Y, X,
    stride_x_n, stride_x_c, stride_x_z, stride_x_y, stride_x_x,
    stride_o_n, stride_o_j, stride_o_c, stride_o_y, stride_o_x,
    n_yb, n_xb,
    G: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
    X_BF16: tl.constexpr, OUT_BF16: tl.constexpr, COMPUTE_F64: tl.constexpr,
    SAME_DTYPE: tl.constexpr,
):
    """Program ``pid`` -> (x block, y block, slot k, channel c, row j, image n).

    Decomposed in int32 (the grid stays below 2**31, so every index does): a 64-bit
    division would call a subroutine with a stack frame. Widened before any address math.
    """
    xb, yb, t = _tile_xy(tl.program_id(0), n_xb, n_yb)
    k = t % n_slots
    t = t // n_slots
    c = t % n_ch
    t = t // n_ch
    j = t % n_rows
    n = t // n_rows
    xb, yb, k, c = xb.to(tl.int64), yb.to(tl.int64), k.to(tl.int64), c.to(tl.int64)
    j, n = j.to(tl.int64), n.to(tl.int64)

    offs_y = yb * BLOCK_Y + tl.arange(0, BLOCK_Y).to(tl.int64)  # (BLOCK_Y,)
    offs_x = xb * BLOCK_X + tl.arange(0, BLOCK_X).to(tl.int64)  # (BLOCK_X,)
    mask = (offs_y[:, None] < Y) & (offs_x[None, :] < X)  # (BLOCK_Y, BLOCK_X)
    x_tile = offs_y[:, None] * stride_x_y + offs_x[None, :] * stride_x_x
    x_base = x_ptr + n * stride_x_n + c * stride_x_c

    kind = tl.load(kind_ptr + k)
    ch = tl.load(base_ptr + k) + c * tl.load(cstride_ptr + k)
    row = tl.load(jpos_ptr + j)
    o_ptrs = (out_ptr + n * stride_o_n + row * stride_o_j + ch * stride_o_c
              + offs_y[:, None] * stride_o_y + offs_x[None, :] * stride_o_x)
    t_base = idx_ptr + (j * n_slots + k) * G

    if kind == 0:
        z = tl.load(t_base)
        ptrs = x_base + tl.maximum(z, 0) * stride_x_z + x_tile
        m_real = (offs_y[:, None] < tl.where(z >= 0, Y, 0)) & (offs_x[None, :] < X)
        if SAME_DTYPE:
            v = tl.load(ptrs, mask=m_real, other=0)  # raw copy (bits for bf16)
            tl.store(o_ptrs, v, mask=mask)
        else:
            v = _load_acc(ptrs, m_real, X_BF16, COMPUTE_F64)
            tl.store(o_ptrs, _cast_out(v, out_ptr, OUT_BF16, False), mask=mask)
    else:
        if COMPUTE_F64:
            total = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float64)
        else:
            total = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
        cnt = tl.full((), 0, tl.int32)
        for g in range(G):
            z = tl.load(t_base + g)
            ptrs = x_base + tl.maximum(z, 0) * stride_x_z + x_tile
            m_real = (offs_y[:, None] < tl.where(z >= 0, Y, 0)) & (offs_x[None, :] < X)
            total += _load_acc(ptrs, m_real, X_BF16, COMPUTE_F64)
            cnt += (z >= -1).to(tl.int32)
        res = _div_rn(total, cnt)
        if kind == 2:
            mean = res
            ss = tl.zeros_like(total)
            for g in range(G):
                z = tl.load(t_base + g)
                ptrs = x_base + tl.maximum(z, 0) * stride_x_z + x_tile
                m_real = (offs_y[:, None] < tl.where(z >= 0, Y, 0)) & (offs_x[None, :] < X)
                d = _load_acc(ptrs, m_real, X_BF16, COMPUTE_F64) - mean
                ss += tl.where(z >= -1, d * d, 0.0)
            res = _sqrt(_div_rn(ss, cnt))
        tl.store(o_ptrs, _cast_out(res, out_ptr, OUT_BF16, False), mask=mask)
