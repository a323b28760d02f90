"""Blending weights for stitch and sliding-window inference, and their exact weight sums.

A weight scheme gives every pixel of a window a weight ``W``; a stitched (or inferred)
pixel is ``sum_p W(i - o_p) y_p(i - o_p) / norm(i)`` with ``norm(i) = sum_p W(i - o_p)``
over the patches ``p`` (origins ``o_p``) whose window covers ``i``.

Schemes, for a window ``w`` (per axis ``a``: ``w_a``, index ``0 <= i < w_a``):

* ``"constant"``: ``W = 1`` (a plain mean of the overlapping predictions).
* ``"border"``: qlty's frame, ``W = bw + (1 - bw) * prod_a m_a(i_a)`` with
  ``m_a(i) = 1`` for ``b_a <= i < w_a - b_a`` else 0 (border ``b``, border weight ``bw``);
  the same map as :meth:`~qlty_gpu.geometry.QuiltPlan.weight`.
* ``"gaussian"``: ``W = prod_a g_a(i_a)``,
  ``g_a(i) = max(exp(-(i - (w_a - 1) / 2)^2 / (2 (sigma * w_a)^2)), 1e-3)`` with
  ``sigma = 0.125`` by default (MONAI's ``sigma_scale``). MONAI clamps the *product* at
  ``max(min W, 1e-3)``; we floor each 1-D factor at 1e-3 instead, so the map stays
  separable and a corner is never below ``1e-3 ** ndim`` (no underflow to 0, no 0/0). Where
  every factor is >= 1e-3 and the product is >= 1e-3 the two maps are equal.
* ``"hann"``: ``W = prod_a h_a(i_a)``, ``h_a(i) = sin^2(pi (i + 1) / (w_a + 1))`` — the
  symmetric Hann window of length ``w_a + 2`` without its two zero end points, so every
  weight is > 0 (``h_a = 1`` for a window of 1).
* a window-shaped tensor: any non-negative map (no separable structure assumed).

The weight sum of a separable scheme is a product of 1-D sums: for ``W = sum_t c_t
prod_a f_{t,a}`` (one term for constant/gaussian/hann, two for border),
``norm(i) = sum_t c_t prod_a F_{t,a}(i_a)`` with ``F_{t,a}(i) = sum_k f_{t,a}(i - s_{a,k})``
over the patch starts ``s_{a,k}`` covering ``i`` — 1-D arrays of the image length, so the
norm of any box costs one outer product and never a full-size pass. Tensor weights are
summed with the fused stitch op over the patches covering the box, a bounded number at a
time.

Example:
    >>> from qlty_gpu.geometry import QuiltPlan
    >>> plan = QuiltPlan((10, 9), window=(4, 3), step=(2, 2))
    >>> w = resolve_weight("hann", plan.window)
    >>> tuple(w.tensor().shape), round(float(w.tensor().max()), 4)
    ((4, 3), 0.9045)
    >>> tuple(w.norm(plan).shape)
    (10, 9)
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .errors import QltyError, QltyTypeError, describe
from .geometry import QuiltPlan, normalize_border, validate_border_weight

__all__ = ["WEIGHT_SCHEMES", "WindowWeight", "resolve_weight", "gaussian_1d", "hann_1d"]

WEIGHT_SCHEMES = ("border", "constant", "gaussian", "hann")
GAUSSIAN_FLOOR = 1e-3
_NORM_CHUNK = 1 << 22  # elements of tiled weight stitched at once for tensor weights

WeightLike = Union[str, torch.Tensor, np.ndarray, "WindowWeight"]


def gaussian_1d(w: int, sigma: float) -> np.ndarray:
    """float64 ``(w,)``: ``max(exp(-(i - (w-1)/2)^2 / (2 (sigma w)^2)), 1e-3)``.

    Example:
        >>> gaussian_1d(5, 0.125).round(4).tolist()
        [0.006, 0.278, 1.0, 0.278, 0.006]
    """
    i = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    g = np.exp(-(i**2) / (2.0 * (sigma * w) ** 2))
    return np.maximum(g, GAUSSIAN_FLOOR)


def hann_1d(w: int) -> np.ndarray:
    """float64 ``(w,)``: ``sin^2(pi (i + 1) / (w + 1))``, strictly positive.

    Example:
        >>> hann_1d(3).round(4).tolist()
        [0.5, 1.0, 0.5]
    """
    i = np.arange(w, dtype=np.float64)
    return np.sin(np.pi * (i + 1) / (w + 1)) ** 2


@dataclass(frozen=True)
class WindowWeight:
    """A resolved window weight: separable terms or a full map, plus exact weight sums.

    Attributes:
        name: the scheme ("constant", "border", "gaussian", "hann" or "tensor").
        window: the window shape.
        terms: for separable schemes, ``((c_t, (f_{t,0}, f_{t,1}, ...)), ...)`` with float64
            1-D factors; ``None`` for a tensor weight.
        full: the float64 window-shaped map of a tensor weight, else ``None``.
        params: scheme parameters recorded in provenance (sigma, border, border weight).
    """

    name: str
    window: tuple[int, ...]
    terms: Optional[tuple] = None
    full: Optional[torch.Tensor] = field(default=None, compare=False)
    params: tuple = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @property
    def is_constant(self) -> bool:
        """True when every weight is 1 (the stitch can skip the multiply)."""
        return self.name == "constant"

    def tensor(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The window-shaped map ``W`` (cached per device and dtype)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = ("tensor", dev, dtype)
        if key not in self._cache:
            if self.full is not None:
                full = self.full
            else:
                full = torch.zeros(self.window, dtype=torch.float64)
                for c, factors in self.terms:
                    full += c * _outer(factors)
            self._cache[key] = full.to(device=dev, dtype=dtype)
        return self._cache[key]

    def fingerprint(self) -> str:
        """Stable text identifying the weight (name, parameters, hash of the map)."""
        digest = hashlib.sha256(self.tensor(dtype=torch.float64).numpy().tobytes()).hexdigest()
        return f"{self.name}{list(self.params)}:{digest[:16]}"

    def axis_sums(self, plan: QuiltPlan) -> list[list[np.ndarray]]:
        """Per term, per axis: float64 ``(D_a,)`` sums ``F_{t,a}`` over the covering patches."""
        if self.terms is None:
            raise QltyError("axis_sums needs a separable weight")
        key = ("axis_sums", plan)
        if key not in self._cache:
            out = []
            for _, factors in self.terms:
                per_axis = []
                for ax, f in enumerate(factors):
                    s = np.zeros(plan.shape[ax], dtype=np.float64)
                    w = plan.window[ax]
                    for st in plan.starts[ax]:
                        s[st : st + w] += f
                    per_axis.append(s)
                out.append(per_axis)
            self._cache[key] = out
        return self._cache[key]

    def norm(
        self,
        plan: QuiltPlan,
        box: Optional[Sequence[tuple[int, int]]] = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Weight sum ``norm`` over ``box`` (per axis ``(lo, hi)``; the whole image if None).

        Args:
            plan: the geometry (its window must equal this weight's window).
            box: pixel ranges per spatial axis.
            device: where the result goes.
            dtype: result dtype (summed in float64 for separable weights).

        Returns:
            ``(hi_0 - lo_0, hi_1 - lo_1, ...)``; 0 where no patch covers a pixel.
        """
        if tuple(plan.window) != self.window:
            raise QltyError(
                f"weight of window {self.window} used with a plan of window {plan.window}"
            )
        if box is None:
            box = [(0, d) for d in plan.shape]
        box = [(int(lo), int(hi)) for lo, hi in box]
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if self.terms is None:
            return _tensor_norm(self.tensor(dev, torch.float64), plan, box).to(dtype)
        if dev.type != "cpu":
            return self._slab(plan, box, 0, box[0][1] - box[0][0]).to(device=dev, dtype=dtype)
        # slab by slab along the first axis: the float64 products stay in cache and no
        # full-size float64 temporary is made (each element is computed exactly as in one
        # pass, so the bits do not depend on the slab size)
        out = torch.empty([hi - lo for lo, hi in box], dtype=dtype)
        for a0, a1 in _slabs(box):
            out[a0:a1].copy_(self._slab(plan, box, a0, a1))
        return out

    def _slab(self, plan: QuiltPlan, box, a0: int, a1: int) -> torch.Tensor:
        """float64 norm of rows ``[a0, a1)`` (along the first axis) of ``box``."""
        acc = None
        lo0 = box[0][0]
        for (c, _), per_axis in zip(self.terms, self.axis_sums(plan)):
            factors = [per_axis[0][lo0 + a0 : lo0 + a1]]
            factors += [s[lo:hi] for s, (lo, hi) in zip(per_axis[1:], box[1:])]
            part = c * _outer(factors)
            acc = part if acc is None else acc + part
        return acc

    def normalize_(
        self, acc: torch.Tensor, plan: QuiltPlan, box: Optional[Sequence[tuple[int, int]]] = None
    ) -> torch.Tensor:
        """Divide weighted sums ``acc`` ``(N, K, *box)`` by :meth:`norm` in place.

        Bit for bit ``acc.div_(self.norm(plan, box, acc.device, acc.dtype))``; on the CPU
        for separable weights the norm is made and applied slab by slab (no full-size norm).

        Returns:
            ``acc``.
        """
        if box is None:
            box = [(0, d) for d in plan.shape]
        box = [(int(lo), int(hi)) for lo, hi in box]
        if self.terms is None or acc.device.type != "cpu" or tuple(plan.window) != self.window:
            return acc.div_(self.norm(plan, box, device=acc.device, dtype=acc.dtype))
        for a0, a1 in _slabs(box):
            slab = self._slab(plan, box, a0, a1).to(acc.dtype)
            acc[:, :, a0:a1].div_(slab)
        return acc


_SLAB = 1 << 15  # float64 elements per slab of a separable norm (256 KiB: stays in cache)


def _slabs(box) -> list[tuple[int, int]]:
    """Row ranges along the first axis of ``box``, each about ``_SLAB`` elements."""
    n0 = box[0][1] - box[0][0]
    rows = max(1, _SLAB // max(1, math.prod(hi - lo for lo, hi in box[1:])))
    return [(a, min(a + rows, n0)) for a in range(0, n0, rows)] or [(0, 0)]


def _outer(factors: Sequence[np.ndarray]) -> torch.Tensor:
    """float64 outer product of 1-D arrays."""
    out = torch.from_numpy(np.asarray(factors[0], dtype=np.float64))
    for f in factors[1:]:
        out = out[..., None] * torch.from_numpy(np.asarray(f, dtype=np.float64))
    return out


def covering_range(plan: QuiltPlan, axis: int, lo: int, hi: int) -> tuple[int, int]:
    """Patch indices ``[k0, k1)`` along ``axis`` whose window meets pixels ``[lo, hi)``."""
    st = np.asarray(plan.starts[axis])
    w = plan.window[axis]
    k0 = int(np.searchsorted(st + w, lo, side="right"))
    k1 = int(np.searchsorted(st, hi, side="left"))
    return k0, max(k0, k1)


def _tensor_norm(w: torch.Tensor, plan: QuiltPlan, box) -> torch.Tensor:
    """Weight sum of a full (non-separable) map over ``box`` by stitching tiled weights."""
    from .stream.grid import add_overlap, grid_boxes, stitch_box

    out = torch.zeros([hi - lo for lo, hi in box], dtype=torch.float64, device=w.device)
    ranges = [covering_range(plan, a, lo, hi) for a, (lo, hi) in enumerate(box)]
    sizes = [k1 - k0 for k0, k1 in ranges]
    total = math.prod(sizes)
    if total == 0:
        return out
    per = max(1, _NORM_CHUNK // max(1, math.prod(plan.window)))
    for a in range(0, total, per):
        for gbox in grid_boxes(a, min(a + per, total), sizes):
            kr = [(k0 + g0, k0 + g1) for (k0, _), (g0, g1) in zip(ranges, gbox)]
            m = math.prod(g1 - g0 for g0, g1 in gbox)
            tiled = w.expand(m, 1, *plan.window).contiguous()
            ext, part = stitch_box(tiled, plan, kr)
            add_overlap(out, [lo for lo, _ in box], part[0, 0], [e0 for e0, _ in ext])
    return out


def _real(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise QltyTypeError(f"{name} must be a number in ({lo}, {hi}], got {describe(value)}")
    v = float(value)
    if not lo < v <= hi:
        raise QltyError(f"{name} must be in ({lo}, {hi}], got {value!r}")
    return v


def resolve_weight(
    weight: WeightLike,
    window: Sequence[int],
    *,
    border: object = None,
    border_weight: float = 1.0,
    sigma: float = 0.125,
) -> WindowWeight:
    """Turn a weight specification into a :class:`WindowWeight` for ``window``.

    Args:
        weight: ``"border"``, ``"constant"``, ``"gaussian"``, ``"hann"``, a window-shaped
            tensor / numpy array (non-negative), or a :class:`WindowWeight`.
        window: the window shape (2 or 3 ints).
        border: border width for ``"border"`` (int, tuple or None; see
            :func:`~qlty_gpu.geometry.normalize_border`).
        border_weight: weight of border pixels for ``"border"``, in ``[0, 1]``.
        sigma: gaussian sigma as a fraction of the window, in ``(0, 10]``.

    Returns:
        The resolved weight.

    Raises:
        QltyError: an unknown scheme name, a map of the wrong shape, negative or non-finite
            weights, or invalid parameters.

    Example:
        >>> resolve_weight("border", (4, 4), border=1, border_weight=0.5).tensor()[0]
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    window = tuple(int(w) for w in window)
    if isinstance(weight, WindowWeight):
        if weight.window != window:
            raise QltyError(f"weight is for window {weight.window}, expected window {window}")
        return weight
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if isinstance(weight, torch.Tensor):
        if tuple(weight.shape) != window:
            raise QltyError(
                f"weight tensor must have the window shape {window}, got {describe(weight)}"
            )
        full = weight.detach().to(device="cpu", dtype=torch.float64).clone()
        if not bool(torch.isfinite(full).all()) or bool((full < 0).any()):
            raise QltyError("weight tensor must be finite and >= 0 everywhere")
        if not bool((full > 0).any()):
            raise QltyError("weight tensor is zero everywhere; every pixel would be 0/0")
        return WindowWeight("tensor", window, None, full, ())
    if not isinstance(weight, str):
        raise QltyTypeError(
            f"weight must be one of {WEIGHT_SCHEMES} or a window-shaped tensor, got "
            f"{describe(weight)}"
        )
    nd = len(window)
    ones = tuple(np.ones(w) for w in window)
    if weight == "constant":
        return WindowWeight("constant", window, ((1.0, ones),), None, ())
    if weight == "gaussian":
        s = _real("sigma", sigma, 0.0, 10.0)
        return WindowWeight(
            "gaussian", window, ((1.0, tuple(gaussian_1d(w, s) for w in window)),), None, (s,)
        )
    if weight == "hann":
        return WindowWeight("hann", window, ((1.0, tuple(hann_1d(w) for w in window)),), None, ())
    if weight == "border":
        b = normalize_border(border, nd)
        bw = validate_border_weight(border_weight)
        if b is None:
            return WindowWeight("border", window, ((1.0, ones),), None, (None, bw))
        masks = []
        for w, bb in zip(window, b):
            m = np.zeros(w)
            m[bb : w - bb] = 1.0
            masks.append(m)
        return WindowWeight(
            "border", window, ((bw, ones), (1.0 - bw, tuple(masks))), None, (list(b), bw)
        )
    raise QltyError(
        f"weight must be one of {WEIGHT_SCHEMES} or a window-shaped tensor, got {weight!r}"
    )
