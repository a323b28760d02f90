"""In-memory quilts: thin 2-D and 3-D faces over one N-d geometry and one op family.

``NCYXQuilt`` and ``NCZYXQuilt`` reproduce qlty 1.5.0's constructors, attributes and
methods (spec §1.2, §2.1-2.4) with its bugs fixed: the 3-D quilt clamps its last patch like
the 2-D one, absolute positional channels work, stitch has no race, results keep the input's
device, dtype and autograd graph, and bad input raises :class:`~qlty_gpu.errors.QltyError`.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .errors import QltyError, QltyShapeAssertionError, QltyTypeError, describe, fail
from .geometry import QuiltPlan, device_cached
from .ops.quilt import _check_backend, _check_input, stitch_unchecked, unstitch_unchecked
from .ops.quilt_reference import (
    STITCH_MODES,
    accumulation_dtype,
    positional_dtype,
    weighting_dtype,
)

__all__ = ["NCYXQuilt", "NCZYXQuilt"]

_POSITION_MODES = ("absolute", "relative")


def _to_tensor(name: str, value, where: str = "quilt") -> tuple[torch.Tensor, bool]:
    """Accept a dense torch tensor or a numpy array (returned as numpy again by unstitch).

    Numpy arrays torch cannot view (negative strides, non-native byte order) are copied
    once into a native contiguous array; object and other non-numeric arrays are refused.
    """
    if isinstance(value, torch.Tensor):
        return _check_input(name, value, where), False
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            fail(QltyTypeError,
                f"{name} must be a numeric array, got a numpy array of dtype {value.dtype}"
            )
        if not value.dtype.isnative or any(s < 0 for s in value.strides):
            value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        return torch.from_numpy(value), True
    fail(QltyTypeError, f"{name} must be a torch.Tensor or numpy.ndarray, got {describe(value)}")


class _Quilt:
    """Shared implementation for 2 and 3 spatial dims; subclasses only name the axes."""

    _AXES: tuple[str, ...] = ()

    def __init__(self, shape, window, step, border, border_weight) -> None:
        self.plan = QuiltPlan(tuple(shape), window, step, border, border_weight)
        for name, size, count in zip(self._AXES, self.plan.shape, self.plan.counts):
            setattr(self, name, size)
            setattr(self, f"n{name}", count)
        self.window = self.plan.window
        self.step = self.plan.step
        self.border = self.plan.border
        self.border_weight = self.plan.border_weight
        self._weight = self.plan.weight("cpu", torch.float32)
        self._weight_seen: Optional[torch.Tensor] = None  # the map _norm_cache belongs to
        self._weight_is_plan = True
        self._norm_cache: dict = {}

    # ------------------------------------------------------------ weight
    @property
    def weight(self) -> torch.Tensor:
        """float32 window-shaped weight map used by :meth:`stitch` (numerator and ``norma``)
        and by ``unstitch(weighted=True)``.

        Like qlty, assigning a new map (``quilt.weight = gaussian``) or editing it in place
        (also through ``.numpy()`` or ``.data``) changes every later call: each call reads
        the map as it is then. Both numerator and ``norma`` use it, so the mean stays exact.
        """
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != self.plan.window:
            fail(QltyError,
                f"weight must be a tensor of the window shape {self.plan.window}, got "
                f"{describe(value)}"
            )
        self._weight = value.detach().to(device="cpu", dtype=torch.float32).clone()

    def _stitch_weights(self, device, acc: torch.dtype):
        """(weight or None, norm) for stitch, from the map as it is now.

        Eager: the map is compared with the one the cached norms were made for (a
        window-sized comparison, so edits through ``.numpy()``/``.data`` count too); the
        plan's cached pair while it is the plan's own map. Under ``torch.compile`` the
        comparison would be data-dependent, so the norm of the current map is computed in
        the graph on every call (one single-channel separable sum; correct whatever
        happens to the map between calls).
        """
        w = self._weight
        if torch.device(device).type == "meta":
            # shapes only: no weight needed (a meta table made inside a traced graph breaks
            # inductor, issue 8.16), and the norm's values do not exist
            return None, torch.empty(self.plan.shape, dtype=acc, device="meta")
        if torch.compiler.is_compiling():
            wd = w.to(device=device, dtype=acc)
            return wd, self.plan.norm(device, acc, weight=wd)
        if self._weight_seen is None or not torch.equal(w, self._weight_seen):
            self._weight_seen = w.clone()
            self._weight_is_plan = bool(
                torch.equal(w, device_cached(self.plan, "weight", torch.device("cpu"),
                                             torch.float32))
            )
            self._norm_cache = {}
        if self._weight_is_plan:
            weight = (
                device_cached(self.plan, "weight", torch.device(device), acc)
                if self.border is not None
                else None
            )
            return weight, device_cached(self.plan, "norm", torch.device(device), acc)
        key = (torch.device(device), acc)
        if key not in self._norm_cache:
            wd = w.to(device=device, dtype=acc)
            self._norm_cache[key] = (wd, self.plan.norm(device, acc, weight=wd))
        return self._norm_cache[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_norm_cache"] = {}
        state["_weight_seen"] = None
        return state

    # ------------------------------------------------------------ geometry
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return self.plan.ndim

    def get_times(self) -> tuple[int, ...]:
        """Number of patches per spatial axis."""
        return self.plan.counts

    def border_tensor(self) -> torch.Tensor:
        """float32 window-shaped mask: 1 in the interior, 0 in the border."""
        return self.plan.border_mask("cpu", torch.float32).clone()

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={getattr(self, a)}" for a in self._AXES)
        return (
            f"{type(self).__name__}({dims}, window={self.window}, step={self.step}, "
            f"border={self.border}, border_weight={self.border_weight}) "
            f"-> {self.plan.patches_per_image} patches/image"
        )

    # ------------------------------------------------------------ checks
    def _spatial_text(self) -> str:
        return ", ".join(f"{a}={getattr(self, a)}" for a in self._AXES)

    def _check_images(self, name: str, t: torch.Tensor) -> None:
        want = 2 + self.ndim
        axes = ", ".join(self._AXES)
        if t.dim() != want or tuple(t.shape[2:]) != self.plan.shape:
            # also an AssertionError: qlty's unstitch_data_pair asserted these shapes
            fail(QltyShapeAssertionError,
                f"{name} must have shape (N, C, {axes}) with {self._spatial_text()}, got "
                f"{describe(t)}"
            )

    def _check_patches(self, name: str, t: torch.Tensor) -> None:
        axes = ", ".join(f"w{a.lower()}" for a in self._AXES)
        if t.dim() != 2 + self.ndim or tuple(t.shape[2:]) != self.plan.window:
            fail(QltyError,
                f"{name} must have shape (M, C, {axes}) = (M, C, {', '.join(map(str, self.window))}), "
                f"got {describe(t)}"
            )
        ppi = self.plan.patches_per_image
        if t.shape[0] % ppi != 0:
            fail(QltyShapeAssertionError,
                f"{name} holds {t.shape[0]} patches, which is not a multiple of the {ppi} patches "
                f"per image ({' x '.join(map(str, self.plan.counts))}) of this quilt"
            )

    # ------------------------------------------------------------ unstitch
    def _positions(self, n_img: int, device, include_n: bool) -> torch.Tensor:
        org = self.plan.origins(device).repeat(n_img, 1)
        if include_n:
            n = torch.arange(n_img, device=device).repeat_interleave(self.plan.patches_per_image)
            org = torch.cat([n[:, None], org], dim=1)
        return org

    def unstitch(
        self,
        tensor,
        return_positions: bool = False,
        include_n_position: bool = False,
        add_positional_channels: bool = False,
        normalize_positions: bool = True,
        position_mode: str = "absolute",
        *,
        weighted: bool = False,
        backend: Optional[str] = None,
    ):
        """Split images into overlapping patches.

        Args:
            tensor: images of shape ``(N, C, *spatial)`` (torch or numpy).
            return_positions: also return the int64 patch starts ``(M, ndim)``.
            include_n_position: prefix the image index to each position ``(M, 1 + ndim)``.
            add_positional_channels: append ``ndim`` coordinate channels after the C channels.
            normalize_positions: scale coordinate channels (absolute: / image size;
                relative: / (window - 1)).
            position_mode: ``"absolute"`` or ``"relative"``.
            weighted: multiply each patch by the current weight map (:attr:`weight`, as
                stitch uses it) on the way out; products in float64 for float64 and
                32/64-bit integer data, float32 otherwise.
            backend: force a compute backend ('triton', 'numba', 'torch').

        Returns:
            Patches ``(M, C, *window)`` (M = N * patches per image, N-major then z, y, x),
            and the positions if asked for.
        """
        t, was_numpy = _to_tensor("tensor", tensor, "unstitch")
        self._check_images("tensor", t)
        if position_mode not in _POSITION_MODES:
            fail(QltyError,
                f"position_mode must be one of {_POSITION_MODES}, got {position_mode!r}"
            )
        positions = position_mode if add_positional_channels else ""
        out_dtype = positional_dtype(t.dtype, bool(normalize_positions)) if positions else None
        weight = None
        if weighted:
            weight = self._weight.to(device=t.device, dtype=weighting_dtype(t.dtype, out_dtype))
        patches = unstitch_unchecked(
            t, list(self.window), list(self.step), weight, out_dtype, None, 0.0, positions,
            bool(normalize_positions), _check_backend(backend, "unstitch"),
        )
        if was_numpy:
            patches = patches.numpy()
        if return_positions:
            return patches, self._positions(t.shape[0], t.device, include_n_position)
        return patches

    def unstitch_data_pair(
        self,
        tensor_in,
        tensor_out,
        missing_label=None,
        return_positions: bool = False,
        include_n_position: bool = False,
        add_positional_channels: bool = False,
        normalize_positions: bool = True,
        position_mode: str = "absolute",
        *,
        backend: Optional[str] = None,
    ):
        """Split an input/target pair; optionally mark target border pixels as missing.

        Args:
            tensor_in: inputs ``(N, C, *spatial)``.
            tensor_out: targets ``(N, C', *spatial)`` or ``(N, *spatial)``; the latter gives
                target patches without a channel axis.
            missing_label: if given, every target pixel in the patch border is set to this
                value (cast into the target dtype).
            return_positions, include_n_position, add_positional_channels,
            normalize_positions, position_mode: as in :meth:`unstitch`, for the inputs.
            backend: force a compute backend.

        Returns:
            ``(in_patches, out_patches)`` or ``(in_patches, out_patches, positions)``.
        """
        t_in, in_numpy = _to_tensor("tensor_in", tensor_in, "unstitch_data_pair")
        t_out, out_numpy = _to_tensor("tensor_out", tensor_out, "unstitch_data_pair")
        squeeze = t_out.dim() == 1 + self.ndim
        if squeeze:
            t_out = t_out.unsqueeze(1)
        self._check_images("tensor_in", t_in)
        self._check_images("tensor_out", t_out)
        if t_in.shape[0] != t_out.shape[0]:
            fail(QltyShapeAssertionError,
                f"tensor_in and tensor_out must hold the same number of images N, got "
                f"{t_in.shape[0]} and {t_out.shape[0]}"
            )
        res = self.unstitch(
            t_in.numpy() if in_numpy else t_in,  # numpy in, numpy out (a view, no copy)
            return_positions=return_positions,
            include_n_position=include_n_position,
            add_positional_channels=add_positional_channels,
            normalize_positions=normalize_positions,
            position_mode=position_mode,
            backend=backend,
        )
        fill_mask = None
        fill_value = 0.0
        if missing_label is not None and self.border is not None:
            mask = device_cached(self.plan, "border_mask", t_out.device, torch.float32)
            fill_mask = mask < 0.5
            fill_value = _cast_label(missing_label, t_out.dtype)
        out = unstitch_unchecked(
            t_out, list(self.window), list(self.step), None, None, fill_mask, fill_value, "",
            True, _check_backend(backend, "unstitch_data_pair"),
        )
        if squeeze:
            out = out.squeeze(1)
        if out_numpy:
            out = out.numpy()
        if return_positions:
            return res[0], out, res[1]
        return res, out

    # ------------------------------------------------------------ stitch
    def stitch(
        self,
        ml_tensor: torch.Tensor,
        use_numba: bool = True,
        *,
        mode: Optional[str] = None,
        backend: Optional[str] = None,
        weight=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge patches back into images by weighted averaging.

        ``result = sum_p scatter(patch_p * weight) / norma`` where ``norma`` is the sum of the
        weights covering each pixel (NaN where no patch covers a pixel, e.g. step > window).

        Args:
            ml_tensor: patches ``(M, C, *window)`` in :meth:`unstitch` order.
            use_numba: accepted for qlty compatibility; the backend is chosen automatically
                (numba on CPU, Triton on CUDA) unless ``backend``/``QLTY_GPU_BACKEND`` says
                otherwise. Every backend is race-free.
            mode: ``'atomic'`` or ``'deterministic'`` stitch on the Triton backend
                (``None``: the documented default).
            backend: force a compute backend.
            weight: ``None`` (this quilt's :attr:`weight`), or a blending scheme for this
                call: ``"border"`` (qlty's frame from this quilt's border), ``"constant"``,
                ``"gaussian"``, ``"hann"`` or a window-shaped tensor (see
                :mod:`qlty_gpu.weights`).

        Returns:
            ``(result (N, C, *spatial), norma (*spatial))``. Floating input keeps its dtype
            (accumulated in float32, float64 for float64); integer input gives float32. Both
            are on the input's device, and the result keeps the autograd graph.
        """
        t, _ = _to_tensor("ml_tensor", ml_tensor, "stitch")
        self._check_patches("ml_tensor", t)
        mode = mode or "auto"
        if mode not in STITCH_MODES:
            fail(QltyError, f"mode must be one of {STITCH_MODES}, got {mode!r}")
        acc = accumulation_dtype(t.dtype)
        if weight is None:
            weight, norm = self._stitch_weights(t.device, acc)
        else:
            from .weights import resolve_weight

            ww = resolve_weight(weight, self.window, border=self.border,
                                border_weight=self.border_weight)
            norm = ww.norm(self.plan, device=t.device, dtype=acc)
            weight = None if ww.is_constant else ww.tensor(t.device, acc)
        result = stitch_unchecked(
            t, list(self.plan.shape), list(self.step), weight, norm, mode,
            _check_backend(backend, "stitch"),
        )
        return result, norm.clone()  # the caller may edit norma; our cached copy stays intact

    # ------------------------------------------------------------ inference
    def infer(self, model, x, batch_size: int = 8, *, weight=None, **kwargs):
        """Sliding-window inference over this quilt's geometry (see :func:`qlty_gpu.infer`).

        Windows are gathered, run through ``model`` and blended batch by batch; all patches
        never exist at once. ``weight=None`` blends with this quilt's :attr:`weight` (qlty's
        border frame unless replaced); other keywords go to :func:`qlty_gpu.infer`.

        Returns:
            ``(N, K, *spatial')`` (or a tuple/dict for such models).
        """
        from .infer import infer as _infer

        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 2 + self.ndim or tuple(shape[2:]) != self.plan.shape:
            raise QltyShapeAssertionError(
                f"x must have shape (N, C, {', '.join(self._AXES)}) with {self._spatial_text()}, "
                f"got {describe(x)}"
            )
        if weight is None:
            same = torch.equal(self._weight, self.plan.weight("cpu", torch.float32))
            weight = "border" if same else self._weight
        return _infer(model, x, self.window, self.step, batch_size=batch_size, weight=weight,
                      border=self.border, border_weight=self.border_weight, **kwargs)


def _cast_label(label, dtype: torch.dtype) -> Union[float, int, bool]:
    """Cast ``missing_label`` into the target dtype the way qlty does (-1.7 -> -1 for ints)."""
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, np.generic):
        label = label.item()
    if not isinstance(label, (bool, int, float)):
        fail(QltyError,
            f"missing_label must be a number representable in the target dtype {dtype}, got "
            f"{describe(label)}"
        )
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        return torch.tensor(label).to(dtype).item()
    info = torch.iinfo(dtype)
    if isinstance(label, float) and not np.isfinite(label):
        fail(QltyError, f"missing_label {label!r} cannot be stored in an integer target ({dtype})")
    value = int(label)  # truncates toward zero like a cast: -1.7 -> -1 (qlty's behaviour)
    if not info.min <= value <= info.max:
        fail(QltyError,
            f"missing_label {label!r} is out of range for the target dtype {dtype} "
            f"([{info.min}, {info.max}])"
        )
    return value


class NCYXQuilt(_Quilt):
    """Split ``(N, C, Y, X)`` images into overlapping patches and stitch them back.

    Args:
        Y: image height.
        X: image width.
        window: patch size ``(wy, wx)`` (an int means square).
        step: step ``(sy, sx)`` between patch starts; the last patch is clamped to the edge.
        border: border width (int, tuple or None) whose pixels get ``border_weight``.
        border_weight: weight of border pixels in ``[0, 1]`` (qlty's default here is 1.0).

    Example:
        >>> q = NCYXQuilt(Y=40, X=30, window=(16, 16), step=(8, 8), border=(2, 2),
        ...               border_weight=0.1)
        >>> x = torch.randn(2, 3, 40, 30)
        >>> p = q.unstitch(x)
        >>> p.shape
        torch.Size([24, 3, 16, 16])
        >>> y, norma = q.stitch(p)
        >>> bool(torch.allclose(x, y, atol=1e-6)), tuple(norma.shape)
        (True, (40, 30))
    """

    _AXES = ("Y", "X")

    def __init__(self, Y, X, window, step, border, border_weight=1.0) -> None:
        super().__init__((Y, X), window, step, border, border_weight)


class NCZYXQuilt(_Quilt):
    """Split ``(N, C, Z, Y, X)`` volumes into overlapping patches and stitch them back.

    Same interface as :class:`NCYXQuilt` (positions, ``missing_label`` and all), with
    3-element ``window``/``step``/``border``. Unlike qlty 1.5.0 the last patch on each axis
    is clamped, so any volume size works.

    Example:
        >>> q = NCZYXQuilt(Z=20, Y=20, X=20, window=(8, 8, 8), step=(6, 6, 6), border=1)
        >>> v = torch.randn(1, 2, 20, 20, 20)
        >>> y, _ = q.stitch(q.unstitch(v))
        >>> bool(torch.allclose(v, y, atol=1e-6))
        True
    """

    _AXES = ("Z", "Y", "X")

    def __init__(self, Z, Y, X, window, step, border, border_weight=0.1) -> None:
        super().__init__((Z, Y, X), window, step, border, border_weight)
