"""@triton.jit helpers shared by the Triton kernel files (``quilt_triton``, ``zagg_triton``).

Device code only: nothing here imports torch or qlty_gpu. Every helper is inlined into the
kernel that calls it, so sharing it changes no compiled code.

bf16 tensors travel as their int16 bit patterns and are widened / rounded here by integer
ops (the interpreter's bf16 casts are wrong, and the bit recipe is exactly torch's
round-to-nearest-even).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "_bf16_bits_to_f32",
    "_f32_to_bf16_bits",
    "_load_value",
    "_cast_out",
    "_div_rn",
    "_tile_xy",
]


@triton.jit
def _bf16_bits_to_f32(bits):
    """int16 bit pattern of a bf16 -> the exact fp32 value (a 16-bit shift)."""
    b = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
    return (b << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(v):
    """fp32 -> int16 bit pattern of bf16, round to nearest even (torch's rule), NaN kept."""
    b = v.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _load_value(ptrs, mask, IS_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """Masked load (0 where masked); bf16 bits become fp32, and with UPCAST fp16/int become
    fp32 too."""
    v = tl.load(ptrs, mask=mask, other=0)
    if IS_BF16:
        v = _bf16_bits_to_f32(v)
    elif UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _cast_out(v, out_ptr, OUT_BF16: tl.constexpr, OUT_HALF: tl.constexpr):
    """Cast to ``out_ptr``'s element type (bf16 as its int16 bits); with OUT_HALF (fp16
    output) through fp32, as torch's casts do."""
    if OUT_BF16:
        r = _f32_to_bf16_bits(v.to(tl.float32))
    elif OUT_HALF:
        r = v.to(tl.float32).to(tl.float16)
    else:
        r = v.to(out_ptr.dtype.element_ty)
    return r


@triton.jit
def _div_rn(a, b):
    """IEEE round-to-nearest ``a / b`` in ``a``'s float type (``b`` is cast to it), as
    torch's: fp32 ``/`` is ``div.full.f32`` (a 2-ulp approximation) on CUDA."""
    if a.dtype == tl.float64:
        r = a / b.to(tl.float64)  # div.rn.f64
    else:
        r = tl.div_rn(a, b.to(tl.float32))
    return r


@triton.jit
def _tile_xy(t, n_xb, n_yb):
    """int32 program index of a tiled grid (x block fastest, then y block) -> (x block,
    y block, the index of the rest), all int32.

    Grids stay below 2**31 programs, so every index fits; a 32-bit division inlines where a
    64-bit one calls a subroutine with a stack frame. Callers widen to int64 before any
    address arithmetic.
    """
    xb = t % n_xb
    t = t // n_xb
    yb = t % n_yb
    return xb, yb, t // n_yb
