"""One patch geometry for every quilt, 2 or 3 spatial dimensions alike.

A :class:`QuiltPlan` is a frozen, hashable description of how an image of spatial shape
``shape`` is covered by windows of size ``window`` placed every ``step`` pixels, with the
last window on each axis clamped so that it ends exactly at the image edge (qlty 1.5.0's
grid, spec §2.1). Everything else is derived from it: per-axis starts, patch counts, the
origins table, the weight map, the border mask and the weight sum used to normalise a
stitch. Device tensors are cached per (device, dtype).

Example:
    >>> plan = QuiltPlan((100, 8), window=(32, 4), step=(16, 4))
    >>> plan.counts
    (6, 2)
    >>> plan.starts[0]
    (0, 16, 32, 48, 64, 68)
    >>> plan.origins().shape
    torch.Size([12, 2])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .errors import QltyError, QltyTypeError

__all__ = [
    "QuiltPlan",
    "normalize_border",
    "validate_border_weight",
    "patch_count",
    "patch_starts",
]

_AXES = {1: ("X",), 2: ("Y", "X"), 3: ("Z", "Y", "X")}


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int_tuple(name: str, value: object, ndim: int, *, minimum: int) -> tuple[int, ...]:
    """Validate ``value`` as an int or a length-``ndim`` sequence of ints >= ``minimum``."""
    if _is_int(value):
        value = (int(value),) * ndim
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)):
        raise QltyTypeError(
            f"{name} must be an int or a tuple of {ndim} ints, got {value!r} "
            f"({type(value).__name__})"
        )
    if len(value) != ndim:
        raise QltyError(
            f"{name} must have {ndim} elements (one per axis {_AXES[ndim]}), got {len(value)}: "
            f"{tuple(value)!r}"
        )
    out = []
    for i, v in enumerate(value):
        if not _is_int(v):
            raise QltyTypeError(
                f"{name}[{i}] must be an int, got {v!r} ({type(v).__name__}); "
                f"{name} must be a tuple of {ndim} ints"
            )
        if v < minimum:
            raise QltyError(f"{name}[{i}] must be >= {minimum}, got {v} ({name}={tuple(value)!r})")
        out.append(int(v))
    return tuple(out)


def normalize_border(border: object, ndim: int) -> tuple[int, ...] | None:
    """Normalise a border specification (spec §2.2).

    ``None``, ``0`` or all zeros mean no border; an int ``b`` means ``(b,) * ndim``; a tuple
    must have ``ndim`` non-negative ints. Lists, floats and other types are rejected.

    Example:
        >>> normalize_border(3, 2), normalize_border((0, 0, 0), 3), normalize_border(None, 2)
        ((3, 3), None, None)
    """
    if border is None:
        return None
    if _is_int(border):
        b = int(border)
        if b < 0:
            raise QltyError(f"border must be >= 0, got {b}")
        return None if b == 0 else (b,) * ndim
    if isinstance(border, tuple):
        if len(border) != ndim:
            raise QltyError(
                f"border tuple must have {ndim} elements for {ndim}D data, got {len(border)}"
            )
        out = []
        for i, b in enumerate(border):
            if not _is_int(b):
                raise QltyTypeError(
                    f"border[{i}] must be an int, got {b!r} ({type(b).__name__})"
                )
            if b < 0:
                raise QltyError(f"border[{i}] must be >= 0, got {b} (border={border!r})")
            out.append(int(b))
        return None if all(b == 0 for b in out) else tuple(out)
    raise QltyTypeError(
        f"border must be int, tuple, or None, got {type(border).__name__} ({border!r})"
    )


def validate_border_weight(border_weight: object) -> float:
    """Check ``0 <= border_weight <= 1``; return it clamped below at 1e-8 (qlty's rule).

    Example:
        >>> validate_border_weight(0.0)
        1e-08
    """
    if isinstance(border_weight, bool) or not isinstance(border_weight, numbers.Real):
        raise QltyTypeError(
            f"border_weight must be a float in [0.0, 1.0], got {border_weight!r} "
            f"({type(border_weight).__name__})"
        )
    bw = float(border_weight)
    if math.isnan(bw) or not 0.0 <= bw <= 1.0:
        raise QltyError(f"border_weight must be in [0.0, 1.0], got {border_weight!r}")
    return max(bw, 1e-8)


def patch_count(size: int, window: int, step: int) -> int:
    """Patches along one axis: ``ceil((size - window) / step) + 1`` (qlty's count, spec §2.1).

    Example:
        >>> patch_count(100, 32, 16), patch_count(32, 32, 16), patch_count(100, 32, 33)
        (6, 1, 4)
    """
    return -(-(size - window) // step) + 1


def patch_starts(size: int, window: int, step: int) -> tuple[int, ...]:
    """Start of every patch along one axis; the last one is clamped to end at ``size``.

    Example:
        >>> patch_starts(100, 32, 16)
        (0, 16, 32, 48, 64, 68)
    """
    return tuple(min(i * step, size - window) for i in range(patch_count(size, window, step)))


@dataclass(frozen=True)
class QuiltPlan:
    """Patch geometry of one quilt.

    Args:
        shape: spatial shape ``(Y, X)`` or ``(Z, Y, X)``.
        window: patch size, an int or one int per axis, ``1 <= window <= shape``.
        step: distance between patch starts, an int or one int per axis, ``>= 1``.
        border: border width (see :func:`normalize_border`), or ``None``.
        border_weight: weight of border pixels in ``[0, 1]`` (stored as ``max(bw, 1e-8)``).

    Raises:
        QltyError: on any invalid argument, naming it.
    """

    shape: tuple[int, ...]
    window: tuple[int, ...]
    step: tuple[int, ...]
    border: tuple[int, ...] | None = None
    border_weight: float = 1.0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        shape = self.shape
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if not isinstance(shape, (tuple, list)) or len(shape) not in (1, 2, 3):
            raise QltyError(
                f"shape must be a tuple of 1 to 3 spatial sizes such as (Y, X) or (Z, Y, X), "
                f"got {shape!r}"
            )
        ndim = len(shape)
        names = _AXES[ndim]
        for n, d in zip(names, shape):
            if not _is_int(d):
                raise QltyTypeError(
                    f"image size {n} must be an int >= 1, got {d!r} ({type(d).__name__})"
                )
            if d < 1:
                raise QltyError(f"image size {n} must be an int >= 1, got {d!r}")
        shape = tuple(int(d) for d in shape)
        window = _int_tuple("window", self.window, ndim, minimum=1)
        step = _int_tuple("step", self.step, ndim, minimum=1)
        for ax, (d, w) in enumerate(zip(shape, window)):
            if w > d:
                raise QltyError(
                    f"window {window!r} is larger than the image {shape!r} on axis "
                    f"{names[ax]} ({w} > {d}); window must satisfy 1 <= window <= image size"
                )
        border = normalize_border(self.border, ndim)
        bw = validate_border_weight(self.border_weight)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "border", border)
        object.__setattr__(self, "border_weight", bw)
        # derived once (plain attributes, not fields: equality and hash stay on the fields)
        starts = tuple(patch_starts(d, w, s) for d, w, s in zip(shape, window, step))
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_counts", tuple(len(st) for st in starts))

    # ------------------------------------------------------------------ grid
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape)

    @property
    def counts(self) -> tuple[int, ...]:
        """Patches per axis."""
        return self._counts

    @property
    def starts(self) -> tuple[tuple[int, ...], ...]:
        """Per-axis tuples of patch starts (last one clamped)."""
        return self._starts

    @property
    def patches_per_image(self) -> int:
        """Number of patches one image yields, ``prod(counts)``."""
        return math.prod(self._counts)

    @property
    def has_gaps(self) -> bool:
        """True when some pixels are covered by no patch (step > window on an axis)."""
        return any(s > w for s, w in zip(self.step, self.window))

    def patch_index(self, n: int, *grid: int) -> int:
        """Flat patch index of image ``n`` and per-axis grid position (N-major, then z, y, x)."""
        if len(grid) != self.ndim:
            raise QltyError(f"patch_index needs {self.ndim} grid indices, got {len(grid)}")
        idx = n
        for g, c in zip(grid, self.counts):
            if not 0 <= g < c:
                raise QltyError(f"grid index {g} out of range [0, {c})")
            idx = idx * c + g
        return idx

    def unravel(self, index: int) -> tuple[int, ...]:
        """Inverse of :meth:`patch_index`: ``(n, *grid)`` of a flat patch index."""
        if index < 0:
            raise QltyError(f"patch index must be >= 0, got {index}")
        out = []
        for c in reversed(self.counts):
            out.append(index % c)
            index //= c
        out.append(index)
        return tuple(reversed(out))

    def covering(self, axis: int, i: int) -> tuple[int, ...]:
        """Indices (along ``axis``) of the patches whose window covers pixel ``i``."""
        w = self.window[axis]
        return tuple(k for k, s in enumerate(self.starts[axis]) if s <= i < s + w)

    # ----------------------------------------------------------- device data
    # Public accessors hand out copies (an in-place edit by the caller must not corrupt
    # later stitches); the ops layer reads the cached tables through ``device_cached``.
    def origins(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``(P, ndim)`` table of patch starts for one image, in patch order (a copy)."""
        return device_cached(self, "origins", _dev(device)).clone()

    def axis_index(self, axis: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``(n * w,)`` of ``start_k + j`` for patch k, offset j along one axis (a copy)."""
        return device_cached(self, "axis_index", _dev(device), None, axis).clone()

    def border_mask(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Window-shaped mask: 1 in the interior, 0 in the border (all ones without border)."""
        return device_cached(self, "border_mask", _dev(device), dtype).clone()

    def weight(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Window-shaped weight map: 1 inside, ``border_weight`` in the border (a copy)."""
        return device_cached(self, "weight", _dev(device), dtype).clone()

    def norm(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Spatial-shaped sum of the weights of every patch covering each pixel (a copy).

        Zero where no patch covers a pixel (step > window). The same for every image.

        Args:
            device: where the result lives (CPU by default).
            dtype: its dtype.
            weight: a custom window-shaped weight map (e.g. an edited ``quilt.weight``);
                ``None`` uses the plan's own map (cached). A custom map is summed in
                float64 on its own device, then cast, and is not cached.
        """
        if weight is None:
            return device_cached(self, "norm", _dev(device), dtype).clone()
        if tuple(weight.shape) != self.window:
            raise QltyError(
                f"weight must have the window shape {self.window}, got shape "
                f"{tuple(weight.shape)}"
            )
        return self._norm_of(weight.to(torch.float64)).to(device=_dev(device), dtype=dtype)

    def _norm_of(self, weight: torch.Tensor) -> torch.Tensor:
        """Separable scatter of the tiled weight map, the way the stitch reference sums."""
        blocks = weight.repeat(*self.counts)
        for ax in reversed(range(self.ndim)):
            shp = list(blocks.shape)
            shp[ax] = self.shape[ax]
            idx = device_cached(self, "axis_index", blocks.device, None, ax)
            blocks = blocks.new_zeros(shp).index_add_(ax, idx, blocks)
        return blocks

    # makers of the cached tables (called once per key by ``device_cached``)
    def _make_origins(self, device, dtype, *extra) -> torch.Tensor:
        grids = torch.meshgrid(
            *[torch.tensor(s, dtype=torch.int64) for s in self.starts], indexing="ij"
        )
        return torch.stack([g.reshape(-1) for g in grids], dim=1).to(device)

    def _make_axis_index(self, device, dtype, axis) -> torch.Tensor:
        st = torch.tensor(self.starts[axis], dtype=torch.int64)
        return (st[:, None] + torch.arange(self.window[axis])[None, :]).reshape(-1).to(device)

    def _make_border_mask(self, device, dtype) -> torch.Tensor:
        m = torch.ones(self.window, dtype=dtype)
        if self.border is not None:
            m.zero_()
            m[self._interior()] = 1
        return m.to(device)

    def _make_weight(self, device, dtype) -> torch.Tensor:
        w = torch.ones(self.window, dtype=torch.float64)
        if self.border is not None:
            w.fill_(self.border_weight)
            w[self._interior()] = 1.0
        return w.to(dtype=dtype, device=device)

    def _make_norm(self, device, dtype) -> torch.Tensor:
        w = device_cached(self, "weight", torch.device("cpu"), torch.float64)
        return self._norm_of(w).to(dtype=dtype, device=device)

    def _make_starts(self, device, dtype, ndim) -> tuple:
        """Per-axis int64 start tables padded with leading ``(0,)`` axes to ``ndim`` axes."""
        pad = [(0,)] * (ndim - self.ndim)
        return tuple(torch.tensor(s, dtype=torch.int64).to(device) for s in (*pad, *self.starts))

    def _make_starts_numpy(self, device, dtype, ndim) -> tuple:
        """Like ``_make_starts`` as numpy int64 arrays (the numba kernels' start tables)."""
        pad = [(0,)] * (ndim - self.ndim)
        return tuple(np.asarray(s, dtype=np.int64) for s in (*pad, *self.starts))

    def _interior(self) -> tuple[slice, ...]:
        assert self.border is not None
        return tuple(slice(b, -b) if b > 0 else slice(None) for b in self.border)

    # ---------------------------------------------------------------- compat
    def numpy_weight(self) -> np.ndarray:
        """Weight map as float64 numpy (as the Large quilts expose it)."""
        return self.weight("cpu", torch.float64).numpy()


def _dev(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def device_cached(plan: QuiltPlan, name: str, device: torch.device, dtype=None, *extra):
    """The plan's table ``name`` on ``device``/``dtype``, built once by ``plan._make_<name>``.

    The one cache of every derived device table (origins, axis indices, masks, weight, norm,
    kernel start tables). Callers must not modify the result (public accessors copy it).
    Tables on the meta device carry no values: they are shaped like the CPU table and
    allocated directly (a CPU -> meta copy traced by ``torch.compile`` broke inductor,
    issue 8.16).

    Example:
        >>> plan = QuiltPlan((5, 5), 3, 2)
        >>> device_cached(plan, "starts", torch.device("cpu"), None, 3)[0]
        tensor([0])
    """
    device = torch.device(device)
    key = (name, device, dtype, *extra)
    hit = plan._cache.get(key)
    if hit is None:
        if device.type == "meta":
            cpu = device_cached(plan, name, torch.device("cpu"), dtype, *extra)
            hit = tuple(_meta_like(t) for t in cpu) if isinstance(cpu, tuple) else _meta_like(cpu)
        else:
            hit = getattr(plan, f"_make_{name}")(device, dtype, *extra)
        plan._cache[key] = hit
    return hit


def _meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t


@lru_cache(maxsize=1024)
def plan_for(shape: tuple[int, ...], window: tuple[int, ...], step: tuple[int, ...]) -> QuiltPlan:
    """Cached border-free plan used by the ops layer (geometry from shapes only)."""
    return QuiltPlan(shape, window, step)
