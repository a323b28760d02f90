"""Unstitch / stitch op family: registered ops, fakes, autograd and validated entry points.

Both ops are registered with ``torch.library.custom_op`` (``qlty_gpu::unstitch`` and
``qlty_gpu::stitch``) with a shape-only fake and an adjoint backward, so they work in eager
mode, under ``torch.compile(fullgraph=True)``, with ``torch.library.opcheck`` and under the
Triton interpreter. Each registered op builds the plan once, asks :mod:`.backend` which
implementation runs (one capability table, no fallbacks) and calls that implementation's
launcher from :data:`IMPLEMENTATIONS`:

=========  ==========================  ==============================
backend    launcher                    device code
=========  ==========================  ==============================
torch      ``ops/quilt_torch.py``      (torch ops)
numba      ``ops/quilt_numba.py``      ``kernels/quilt_numba.py``
triton     ``ops/quilt_triton.py``     ``kernels/quilt_triton.py``
=========  ==========================  ==============================

The spec (dtype rules, pure-torch reference) is ``ops/quilt_reference.py``. The two ops are
adjoint: each one's backward is the other's forward. Forward-mode AD (``torch.func.jvp``,
dual tensors) is handled by the entry points: both ops are linear in their tensor input.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Optional, Union

import numpy as np
import torch

from ..errors import (
    QltyError,
    QltyShapeAssertionError,
    QltyTypeError,
    describe,
)
from ..errors import fail as _fail
from ..geometry import patch_count, plan_for
from . import quilt_numba, quilt_torch, quilt_triton
from .backend import choose_backend
from .quilt_reference import (
    STITCH_MODES,
    accumulation_dtype,
    positional_channels,
    stitch_output_dtype,
    stitch_reference,
    unstitch_reference,
)

__all__ = [
    "unstitch",
    "stitch",
    "unstitch_reference",
    "stitch_reference",
    "accumulation_dtype",
    "positional_channels",
    "STITCH_MODES",
    "IMPLEMENTATIONS",
]

# The one dispatch table: backend name -> module with launch_unstitch / launch_stitch.
IMPLEMENTATIONS: dict[str, ModuleType] = {
    "torch": quilt_torch,
    "numba": quilt_numba,
    "triton": quilt_triton,
}


def _counts(spatial, window, step) -> list:
    """Patches per axis (symbolic sizes allowed: the fakes run on SymInts)."""
    return [patch_count(d, w, s) for d, w, s in zip(spatial, window, step)]


def _resolve_mode(mode: str) -> str:
    """'auto' -> the documented default ('deterministic'); unknown modes raise."""
    if mode in ("auto", ""):
        return quilt_triton.DEFAULT_MODE
    if mode not in STITCH_MODES:
        _fail(QltyError, f"mode must be one of {STITCH_MODES}, got {mode!r}")
    return mode


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
    plan = plan_for(tuple(x.shape[2:]), tuple(window), tuple(step))
    name = choose_backend("unstitch", x.device, x.dtype, backend or None, plan.ndim)
    return IMPLEMENTATIONS[name].launch_unstitch(
        x, plan=plan, weight=weight, out_dtype=out_dtype or x.dtype, fill_mask=fill_mask,
        fill_value=fill_value, positions=positions, normalize_positions=normalize_positions,
    )


@_unstitch_op.register_fake
def _(x, window, step, weight, out_dtype, fill_mask, fill_value, positions, normalize_positions,
      backend):
    m = x.shape[0] * math.prod(_counts(x.shape[2:], window, step))
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
    plan = plan_for(tuple(shape), tuple(patches.shape[2:]), tuple(step))
    name = choose_backend("stitch", patches.device, patches.dtype, backend or None, plan.ndim)
    return IMPLEMENTATIONS[name].launch_stitch(
        patches, plan=plan, weight=weight, norm=norm, mode=_resolve_mode(mode)
    )


@_stitch_op.register_fake
def _(patches, shape, step, weight, norm, mode, backend):
    n_p = math.prod(_counts(shape, patches.shape[2:], step))
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
        # 0 where no patch covers a pixel (norm 0): those pixels reach no patch, and a
        # double backward must not divide by the zero there
        inv = torch.where(norm != 0, 1 / torch.where(norm != 0, norm, 1), 0)
        grad = grad * inv.to(grad.dtype)
    gp = torch.ops.qlty_gpu.unstitch(
        grad, ctx.window, ctx.step, weight, ctx.p_dtype, None, 0.0, "", True, ctx.backend
    )
    return gp, None, None, None, None, None, None


_unstitch_op.register_autograd(_unstitch_backward, setup_context=_unstitch_setup)
_stitch_op.register_autograd(_stitch_backward, setup_context=_stitch_setup)


# ======================================================= unchecked entry points
def _tangent(t: Optional[torch.Tensor]):
    """(primal, tangent or None) of a possibly dual tensor (forward-mode AD)."""
    if t is None or torch.compiler.is_compiling():
        return t, None
    import torch.autograd.forward_ad as fwad

    primal, tangent = fwad.unpack_dual(t)
    return primal, tangent


def _no_tangent(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and _tangent(t)[1] is not None:
        _fail(QltyError, f"forward-mode AD through {name}= is not supported (the ops are "
                         f"linear in their first argument only); pass {name}.detach()")


def unstitch_unchecked(
    x: torch.Tensor,
    window: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    fill_mask: Optional[torch.Tensor] = None,
    fill_value: Union[int, float, bool] = 0.0,
    positions: str = "",
    normalize_positions: bool = True,
    backend: str = "",
) -> torch.Tensor:
    """:func:`unstitch` without argument checks (for callers that validated already, such
    as the quilt classes); handles forward-mode AD."""
    _no_tangent("weight", weight)
    primal, tangent = _tangent(x)
    out = torch.ops.qlty_gpu.unstitch(
        primal, window, step, weight, out_dtype, fill_mask, fill_value, positions,
        normalize_positions, backend,
    )
    if tangent is None:
        return out
    import torch.autograd.forward_ad as fwad

    tan = torch.ops.qlty_gpu.unstitch(
        tangent, window, step, weight, out_dtype, fill_mask, 0, "", True, backend
    )
    if positions:  # coordinate channels are constants
        tan = torch.cat([tan, tan.new_zeros((tan.shape[0], len(window), *tan.shape[2:]))], 1)
    return fwad.make_dual(out, tan)


def stitch_unchecked(
    patches: torch.Tensor,
    shape: list[int],
    step: list[int],
    weight: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
    mode: str = "auto",
    backend: str = "",
) -> torch.Tensor:
    """:func:`stitch` without argument checks; handles forward-mode AD."""
    _no_tangent("weight", weight)
    _no_tangent("norm", norm)
    primal, tangent = _tangent(patches)
    out = torch.ops.qlty_gpu.stitch(primal, shape, step, weight, norm, mode, backend)
    if tangent is None:
        return out
    import torch.autograd.forward_ad as fwad

    tan = torch.ops.qlty_gpu.stitch(tangent, shape, step, weight, norm, mode, backend)
    return fwad.make_dual(out, tan)


# ======================================================= validated entry points
def _is_int(v: object) -> bool:
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def _int_list(name: str, value: object, nd: int, where: str, spatial=None) -> list[int]:
    """``value`` as a list of ``nd`` ints (an int is repeated); floats are refused."""
    if _is_int(value):
        value = [value] * nd
    if not isinstance(value, (list, tuple, torch.Size)):
        _fail(QltyTypeError, f"{where}: {name} must be a sequence of {nd} ints, got "
                             f"{describe(value)}")
    if len(value) != nd:
        shape_text = f" for spatial shape {tuple(spatial)}" if spatial is not None else ""
        _fail(QltyError, f"{where}: {name} {list(value)} must have {nd} elements (one per "
                         f"spatial axis){shape_text}")
    for i, v in enumerate(value):
        if not _is_int(v):
            _fail(QltyTypeError, f"{where}: {name}[{i}] must be an int, got {v!r} "
                                 f"({type(v).__name__}); {name} must be a sequence of {nd} "
                                 f"ints")
    return [v if isinstance(v, torch.SymInt) else int(v) for v in value]


def _check_input(name: str, t: object, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(QltyTypeError, f"{where}: {name} must be a torch.Tensor, got {describe(t)}")
    if t.layout != torch.strided or t.is_quantized:
        kind = "quantized" if t.is_quantized else str(t.layout).replace("torch.", "")
        hint = ".dequantize()" if t.is_quantized else ".to_dense()"
        _fail(QltyTypeError, f"{where}: {name} must be a dense (strided) tensor, got a {kind} "
                             f"tensor; convert it with {name}{hint}")
    return t


def _check_aux(name: str, t: object, shape, ref: torch.Tensor, where: str,
               what: str) -> Optional[torch.Tensor]:
    """A weight / norm / fill_mask argument: None or a dense tensor of ``shape`` on the
    input's device (or the CPU), not requiring grad."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        _fail(QltyTypeError, f"{where}: {name} must be a torch.Tensor of the {what} "
                             f"{tuple(shape)} or None, got {describe(t)}")
    if t.layout != torch.strided or t.is_quantized:
        _fail(QltyTypeError, f"{where}: {name} must be a dense (strided) tensor, got "
                             f"{describe(t)} with layout {t.layout}")
    if tuple(t.shape) != tuple(shape):
        _fail(QltyError, f"{where}: {name} must have the {what} {tuple(shape)}, got "
                         f"{describe(t)}")
    if t.device != ref.device and t.device.type != "cpu":
        _fail(QltyError, f"{where}: {name} is on {t.device} but the input is on {ref.device}; "
                         f"{name} must be on the input's device (or the CPU)")
    if t.requires_grad and torch.is_grad_enabled():
        _fail(QltyError, f"{where}: {name} requires grad, but gradients flow to the input "
                         f"only; pass {name}.detach()")
    return t


def _check_backend(backend: object, where: str) -> str:
    if backend is None:
        return ""
    if not isinstance(backend, str):
        _fail(QltyTypeError, f"{where}: backend must be None or one of 'triton', 'numba', "
                             f"'torch', got {describe(backend)}")
    return backend


def _check_geometry(spatial, window, step, where: str, names=("window", "step")
                    ) -> tuple[list[int], list[int]]:
    nd = len(spatial)
    window = _int_list(names[0], window, nd, where, spatial)
    step = _int_list(names[1], step, nd, where, spatial)
    for w, s, d in zip(window, step, spatial):
        if not 1 <= w <= d or s < 1:
            _fail(QltyError, f"{where}: need 1 <= window <= image size and step >= 1, got "
                             f"window={window}, step={step}, image={tuple(spatial)}")
    return window, step


def _check_fill_value(value: object, where: str) -> Union[int, float, bool]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, (bool, int, float)):
        _fail(QltyTypeError, f"{where}: fill_value must be a number, got {describe(value)}")
    return value


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
        x: the images, 1 to 3 spatial dims, any strides, any device (dense tensors).
        window: patch size per spatial axis (ints).
        step: patch step per spatial axis (ints; last patch clamped to the edge).
        weight: optional window-shaped map multiplied into each patch (fused), on x's
            device or the CPU; products are computed in float64 for float64 and 32/64-bit
            integer data, float32 otherwise.
        out_dtype: optional output dtype (cast fused).
        fill_mask: optional window-shaped bool mask of positions set to ``fill_value``.
        fill_value: value written where ``fill_mask`` is true (a Python or numpy number).
        positions: '' for none, 'absolute' or 'relative' to append ``ndim`` coordinate
            channels (z,) y, x after the C data channels (see :func:`positional_channels`).
        normalize_positions: scale the coordinate channels (see :func:`positional_channels`).
        backend: 'triton', 'numba', 'torch' or None for automatic.

    Returns:
        Patches in N-major, then z, y, x order.

    Raises:
        QltyError: naming the argument, for any invalid one (a ``QltyBackendError`` when
            the requested backend cannot run this input).

    Example:
        >>> x = torch.arange(2 * 1 * 5 * 5.).reshape(2, 1, 5, 5)
        >>> unstitch(x, (3, 3), (2, 2)).shape
        torch.Size([8, 1, 3, 3])
    """
    where = "unstitch"
    _check_input("x", x, where)
    if not 3 <= x.dim() <= 5:
        _fail(QltyError, f"{where}: x must have shape (N, C, *spatial) with 1 to 3 spatial "
                         f"dims, got {describe(x)}")
    window, step = _check_geometry(x.shape[2:], window, step, where)
    weight = _check_aux("weight", weight, window, x, where, "window shape")
    fill_mask = _check_aux("fill_mask", fill_mask, window, x, where, "window shape")
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        _fail(QltyTypeError, f"{where}: out_dtype must be a torch.dtype or None, got "
                             f"{describe(out_dtype)}")
    if positions not in ("", "absolute", "relative"):
        _fail(QltyError, f"{where}: positions must be '', 'absolute' or 'relative', got "
                         f"{positions!r}")
    fill_value = _check_fill_value(fill_value, where)
    return unstitch_unchecked(
        x, window, step, weight, out_dtype, fill_mask, fill_value, positions,
        bool(normalize_positions), _check_backend(backend, where),
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
        patches: patches in :func:`unstitch` order (a dense tensor).
        shape: spatial shape of the images (ints).
        step: patch step per spatial axis (ints).
        weight: optional window-shaped weight map (on the patches' device or the CPU).
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
    where = "stitch"
    _check_input("patches", patches, where)
    if not 3 <= patches.dim() <= 5:
        _fail(QltyError, f"{where}: patches must have shape (M, C, *window) with 1 to 3 "
                         f"window dims, got {describe(patches)}")
    nd = patches.dim() - 2
    if isinstance(shape, (list, tuple, torch.Size)) and len(shape) != nd:
        _fail(QltyError, f"{where}: patches must have shape (M, C, *window) with {len(shape)} "
                         f"window dims for shape={tuple(shape)}, got {describe(patches)}")
    shape = _int_list("shape", shape, nd, where)
    window, step = _check_geometry(shape, list(patches.shape[2:]), step, where)
    n_p = math.prod(_counts(shape, window, step))
    if patches.shape[0] % n_p != 0:
        _fail(QltyShapeAssertionError,
              f"{where}: patches has {patches.shape[0]} patches, not a multiple of the {n_p} "
              f"patches per image of this geometry")
    weight = _check_aux("weight", weight, window, patches, where, "window shape")
    norm = _check_aux("norm", norm, shape, patches, where, "spatial shape")
    if mode not in STITCH_MODES:
        _fail(QltyError, f"{where}: mode must be one of {STITCH_MODES}, got {mode!r}")
    return stitch_unchecked(patches, shape, step, weight, norm, mode,
                            _check_backend(backend, where))

