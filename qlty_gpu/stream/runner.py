"""Batches of windows -> model -> weighted accumulate: the inner loop of every inference.

:class:`PatchRunner` holds a model and the settings that decide the result's bits (window,
step, weight, batch size, devices, precision). :meth:`PatchRunner.accumulate` runs a box
of the patch grid (a range of images times a range of patch indices per axis) through the
model, ``batch_size`` consecutive patches (raster order) at a time: each batch splits into
a few grid boxes (:func:`~qlty_gpu.stream.grid.grid_boxes`), each box is gathered with one
fused unstitch of its sub-image, the model runs once on the whole batch, and each box of
the output is weighted and summed with one fused stitch into an fp32 accumulator block.
No more than one batch of windows (and one of outputs) exists at any time.

The output of the model fixes the output geometry: a model mapping ``(B, C, *w)`` to
``(B, K, *w')`` gives ``K`` channels at spatial scale ``w' / w`` per axis (the scaled
grid must land on whole pixels). Tuples and dicts of such tensors are carried as lists.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch

from .._alloc import empty_cpu, zeros_cpu
from ..errors import QltyError, describe
from ..geometry import QuiltPlan
from ..ops import accumulation_dtype, unstitch
from ..weights import WindowWeight, resolve_weight
from .grid import add_overlap, grid_boxes, stitch_box, sub_extent

__all__ = ["OutputSpec", "PatchRunner", "is_oom"]

# model -> {(plan, n_img, device): (batch_size, accumulate on cpu)} remembered after an OOM
_REMEMBERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REMEMBER_FALLBACK: dict = {}  # for models that cannot be weak-referenced

#: How windows are gathered: "views" (strided views of the source, one stacked copy) or
#: "unstitch" (one fused unstitch op per grid box). Module switch for tests/benchmarks.
GATHER_MODE = "views"
#: How outputs are accumulated: None (by device: "windows" on CPU, "stitch" elsewhere),
#: "windows" (one fused multiply-add per window) or "stitch" (one fused stitch per box).
SCATTER_MODE: Optional[str] = None


def is_oom(exc: BaseException) -> bool:
    """True for an allocator out-of-memory error (CUDA or another device)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass(frozen=True)
class OutputSpec:
    """Geometry and type of one model output.

    Attributes:
        channels: ``K`` of ``(B, K, *w')``.
        dtype: dtype the model returns.
        acc_dtype: accumulation dtype (float32; float64 for float64 outputs).
        plan: output-space geometry (scaled shape, window, step; same patch grid).
        weight: the weight for the output window.
        scale: ``w' / w`` per axis.
    """

    channels: int
    dtype: torch.dtype
    acc_dtype: torch.dtype
    plan: QuiltPlan
    weight: WindowWeight
    scale: tuple[Fraction, ...]

    def out_range(self, axis: int, krange: tuple[int, int]) -> tuple[int, int]:
        """Output pixel range spanned by patches ``[k0, k1)`` along ``axis``."""
        return sub_extent(self.plan, axis, krange)


def _flatten(y: Any) -> tuple[list[torch.Tensor], tuple]:
    """Model output -> (list of tensors, structure) with structure ('tensor',) etc."""
    if isinstance(y, torch.Tensor):
        return [y], ("tensor",)
    if isinstance(y, (tuple, list)) and y and all(isinstance(t, torch.Tensor) for t in y):
        return list(y), ("tuple", len(y))
    if isinstance(y, dict) and y and all(isinstance(t, torch.Tensor) for t in y.values()):
        keys = tuple(y)
        return [y[k] for k in keys], ("dict", keys)
    raise QltyError(
        f"model must return a tensor (B, K, *window), or a tuple or dict of them, got "
        f"{describe(y)}"
    )


def unflatten(items: list, structure: tuple) -> Any:
    """Inverse of the output flattening: a tensor, a tuple or a dict."""
    if structure[0] == "tensor":
        return items[0]
    if structure[0] == "tuple":
        return tuple(items)
    return dict(zip(structure[1], items))


class PatchRunner:
    """A model plus the settings of one inference; runs grid boxes into accumulators.

    Args:
        model: callable ``(B, C, *window) -> (B, K, *window')`` (or a tuple/dict of them).
        plan: input geometry (spatial shape, window, step).
        weight: weight specification (see :func:`~qlty_gpu.weights.resolve_weight`).
        weight_kwargs: ``border``, ``border_weight``, ``sigma`` for the scheme.
        batch_size: windows per model call.
        device: where windows go and the model runs.
        accumulate_device: where the fp32 accumulators live.
        amp: autocast dtype or None.
        model_dtype: dtype windows are cast to before the model, or None.
        pad_last_batch: pad a short last batch with zero windows to ``batch_size``.
        grad: run with autograd enabled.
        backend: force a compute backend for the ops.
        remember_key: key under which an OOM fallback is remembered for this model.
    """

    def __init__(
        self,
        model: Callable,
        plan: QuiltPlan,
        weight: Any,
        weight_kwargs: dict,
        batch_size: int,
        device: torch.device,
        accumulate_device: torch.device,
        amp: Optional[torch.dtype] = None,
        model_dtype: Optional[torch.dtype] = None,
        pad_last_batch: bool = False,
        grad: bool = False,
        backend: Optional[str] = None,
        remember_key: Optional[tuple] = None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.weight_spec = weight
        self.weight_kwargs = weight_kwargs
        self.batch_size = int(batch_size)
        self.device = device
        self.accumulate_device = accumulate_device
        self.amp = amp
        self.model_dtype = model_dtype
        self.pad_last_batch = pad_last_batch
        self.grad = grad
        self.backend = backend
        self.specs: Optional[list[OutputSpec]] = None
        self.structure: Optional[tuple] = None
        self.patches_run = 0
        self.progress: Optional[Any] = None
        self.oom_message: Optional[str] = None
        # CPU: strided views + one multiply-add per window (measured 20-50x faster than a
        # fused op per sub-image there); CUDA: one fused stitch launch per box.
        self.gather_mode = GATHER_MODE
        self._buf: Optional[torch.Tensor] = None
        self.scatter_override: Optional[str] = SCATTER_MODE
        self._remember_key = remember_key
        remembered = self._remembered()
        if remembered is not None:
            self.batch_size = min(self.batch_size, remembered[0])
            if remembered[1]:
                self.accumulate_device = torch.device("cpu")

    @property
    def scatter_mode(self) -> str:
        """'windows' (a multiply-add per window; CPU) or 'stitch' (a fused stitch per box)."""
        if self.scatter_override is not None:
            return self.scatter_override
        return "windows" if self.accumulate_device.type == "cpu" else "stitch"

    # ------------------------------------------------------------ OOM memory
    def _remembered(self):
        if self._remember_key is None:
            return None
        try:
            return _REMEMBERED.get(self.model, {}).get(self._remember_key)
        except TypeError:
            return _REMEMBER_FALLBACK.get((id(self.model), self._remember_key))

    def _remember(self) -> None:
        if self._remember_key is None:
            return
        value = (self.batch_size, self.accumulate_device.type == "cpu")
        try:
            _REMEMBERED.setdefault(self.model, {})[self._remember_key] = value
        except TypeError:
            _REMEMBER_FALLBACK[(id(self.model), self._remember_key)] = value

    # ------------------------------------------------------------ model call
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Run the model on ``(B, C, *window)`` windows; returns the flattened outputs."""
        batch = batch.to(self.device)
        if self.model_dtype is not None:
            batch = batch.to(self.model_dtype)
        amp = (
            torch.autocast(self.device.type, dtype=self.amp)
            if self.amp is not None
            else contextlib.nullcontext()
        )
        with torch.set_grad_enabled(self.grad), amp:
            y = self.model(batch)
        items, structure = _flatten(y)
        if self.structure is None:
            self.structure = structure
        elif structure[0] != self.structure[0] or structure[1:] != self.structure[1:]:
            raise QltyError(
                f"model returned a different structure on a later batch: {structure} after "
                f"{self.structure}"
            )
        return items

    def make_specs(self, items: Sequence[torch.Tensor], n: int) -> list[OutputSpec]:
        """Output geometry from the first outputs (``n`` windows in the batch)."""
        plan = self.plan
        specs = []
        for j, y in enumerate(items):
            name = "model output" if len(items) == 1 else f"model output {j}"
            if y.dim() != 2 + plan.ndim or y.shape[0] < n:
                raise QltyError(
                    f"{name} must have shape (B, K, {', '.join('w' * plan.ndim)}) for a batch "
                    f"of {n} windows of shape {plan.window}, got {describe(y)}"
                )
            w_out = tuple(int(v) for v in y.shape[2:])
            scale = tuple(Fraction(wo, wi) for wo, wi in zip(w_out, plan.window))
            shape_out, step_out = [], []
            for ax, f in enumerate(scale):
                d, s = plan.shape[ax] * f, plan.step[ax] * f
                starts = [st * f for st in plan.starts[ax]]
                if d.denominator != 1 or s.denominator != 1 or any(
                    v.denominator != 1 for v in starts
                ):
                    raise QltyError(
                        f"{name} has spatial shape {w_out} for windows {plan.window}: scale "
                        f"{f} on axis {ax} does not map the image size {plan.shape[ax]}, "
                        f"step {plan.step[ax]} and patch starts to whole pixels"
                    )
                shape_out.append(int(d))
                step_out.append(int(s))
            try:
                plan_out = QuiltPlan(tuple(shape_out), w_out, tuple(step_out))
            except QltyError as exc:
                raise QltyError(f"{name} of shape {tuple(y.shape)} does not fit: {exc}") from exc
            want = tuple(tuple(int(st * f) for st in plan.starts[ax]) for ax, f in enumerate(scale))
            if plan_out.starts != want:
                raise QltyError(
                    f"{name}: scale {tuple(str(f) for f in scale)} does not map the patch grid "
                    f"onto a grid of the output (starts {plan_out.starts} != {want})"
                )
            if not (y.dtype.is_floating_point or y.dtype.is_complex):
                acc = torch.float32
            else:
                acc = accumulation_dtype(y.dtype)
                if acc.is_complex:
                    raise QltyError(f"{name} is complex ({y.dtype}); only real outputs blend")
            weight = resolve_weight(self.weight_spec, w_out, **self.weight_kwargs)
            specs.append(OutputSpec(int(y.shape[1]), y.dtype, acc, plan_out, weight, scale))
        return specs

    # ------------------------------------------------------------ main loop
    def accumulate(
        self,
        xin: torch.Tensor,
        xin_origin: Sequence[int],
        nrange: tuple[int, int],
        kbox: Sequence[tuple[int, int]],
        alloc: Callable[[list[OutputSpec]], tuple[list[torch.Tensor], list[Sequence[int]]]],
    ) -> list[torch.Tensor]:
        """Run every patch of a grid box through the model and accumulate it.

        Args:
            xin: input block ``(n1 - n0, C, *extent)`` holding every window of the box.
            xin_origin: spatial pixel origin of ``xin`` in the image.
            nrange: images ``[n0, n1)`` of the box (``xin`` holds exactly these).
            kbox: patch-index ranges ``[k0, k1)`` per spatial axis.
            alloc: called once with the output specs; returns accumulators
                ``(n1 - n0, K, *block)`` (one per output) and their output-space origins.

        Returns:
            The accumulators (weighted sums, not normalised).
        """
        sizes = [nrange[1] - nrange[0]] + [k1 - k0 for k0, k1 in kbox]
        total = math.prod(sizes)
        accs: Optional[list[torch.Tensor]] = None
        origins: list = []
        if self.specs is not None:
            accs, origins = alloc(self.specs)
        a = 0
        while a < total:
            b = min(a + self.batch_size, total)
            boxes = [self._abs_box(bx, nrange, kbox) for bx in grid_boxes(a, b, sizes)]
            try:
                batch = self._gather(xin, xin_origin, nrange[0], boxes)
                m = b - a
                if self.pad_last_batch and batch.shape[0] < self.batch_size:
                    pad = batch.new_zeros((self.batch_size - m, *batch.shape[1:]))
                    batch = torch.cat([batch, pad])
                items = self.forward(batch)
                if self.specs is None:
                    self.specs = self.make_specs(items, m)
                if accs is None:
                    accs, origins = alloc(self.specs)
                parts = self._scatter(items, m, boxes)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled
                if not is_oom(exc) or not self._fall_back(exc, accs):
                    raise
                if accs is not None and accs[0].device != self.accumulate_device:
                    accs = [t.to(self.accumulate_device) for t in accs]
                continue
            self._commit(accs, origins, parts, nrange[0])
            self.patches_run += m
            if self.progress is not None:
                self.progress.update(m)
            a = b
        if accs is None:  # an empty box: nothing ran, but the caller wants zeros
            if self.specs is None:
                raise QltyError("no patch ran, so the model's output shape is unknown")
            accs, _ = alloc(self.specs)
        return accs

    @staticmethod
    def _abs_box(bx, nrange, kbox):
        n0 = nrange[0]
        return ((n0 + bx[0][0], n0 + bx[0][1]),
                *[(k0 + g0, k0 + g1) for (k0, _), (g0, g1) in zip(kbox, bx[1:])])

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed accumulator on the accumulation device (pooled huge pages on the CPU)."""
        if self.accumulate_device.type == "cpu":
            return zeros_cpu(tuple(shape), dtype)
        return torch.zeros(shape, dtype=dtype, device=self.accumulate_device)

    def _windows(self, boxes):
        """(n, spatial patch index tuple) of every patch of the boxes, in raster order."""
        for box in boxes:
            yield from itertools.product(*[range(lo, hi) for lo, hi in box])

    def _gather(self, xin, xin_origin, n_base, boxes) -> torch.Tensor:
        """The batch's windows ``(m, C, *window)``: one copy of strided views of ``xin``."""
        plan = self.plan
        if self.gather_mode == "unstitch":  # one fused unstitch per box
            parts = []
            for box in boxes:
                sl = [slice(box[0][0] - n_base, box[0][1] - n_base), slice(None)]
                for ax, kr in enumerate(box[1:]):
                    lo = plan.starts[ax][kr[0]] - xin_origin[ax]
                    hi = plan.starts[ax][kr[1] - 1] + plan.window[ax] - xin_origin[ax]
                    sl.append(slice(lo, hi))
                parts.append(unstitch(xin[tuple(sl)], plan.window, plan.step,
                                      backend=self.backend))
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        starts, win = plan.starts, plan.window
        views = [
            xin[(n - n_base, slice(None),
                 *[slice(starts[a][k] - o, starts[a][k] - o + win[a])
                   for a, (k, o) in enumerate(zip(ks, xin_origin))])]
            for n, *ks in self._windows(boxes)
        ]
        if self.grad:  # autograd may keep the batch: a fresh tensor each time
            return torch.stack(views)
        # one reused buffer of batch_size windows: no page faults per batch (a fresh CPU
        # buffer costs more in first-touch faults than the copy itself)
        m = len(views)
        full = self.batch_size if self.pad_last_batch else m
        shape = (max(full, m), *views[0].shape)
        buf = self._buf
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or (
            buf.dtype != xin.dtype or buf.device != xin.device
        ):
            buf = self._buf = (
                empty_cpu(shape, xin.dtype) if xin.device.type == "cpu"
                else torch.empty(shape, dtype=xin.dtype, device=xin.device)
            )
        torch.stack(views, out=buf[:m])
        if full > m:
            buf[m:full].zero_()
        return buf[:full]

    def _scatter(self, items, m, boxes) -> list:
        """Per output: what :meth:`_commit` adds (computed first, so an OOM here leaves the
        accumulators untouched and the batch can be retried)."""
        out = []
        for y, spec in zip(items, self.specs):
            if tuple(y.shape[2:]) != spec.plan.window or y.shape[1] != spec.channels:
                raise QltyError(
                    f"model output changed shape between batches: {tuple(y.shape)}, first "
                    f"(B, {spec.channels}, {', '.join(map(str, spec.plan.window))})"
                )
            y = y[:m].to(device=self.accumulate_device, dtype=spec.acc_dtype)
            w = None if spec.weight.is_constant else spec.weight.tensor(
                self.accumulate_device, spec.acc_dtype)
            if self.scatter_mode == "windows":
                out.append(("windows", spec, y, w, boxes))
                continue
            parts, off = [], 0
            for box in boxes:
                cnt = math.prod(hi - lo for lo, hi in box)
                ext, st = stitch_box(y[off : off + cnt], spec.plan, box[1:], weight=w,
                                     backend=self.backend)
                parts.append((box[0], [lo for lo, _ in ext], st))
                off += cnt
            out.append(("stitch", spec, parts))
        return out

    def _commit(self, accs, origins, parts, n_base) -> None:
        """Add a batch's contributions into the accumulators (in-place, no allocation)."""
        for acc, org, part in zip(accs, origins, parts):
            if part[0] == "windows":  # one fused multiply-add per window, raster order
                _, spec, y, w, boxes = part
                starts, win = spec.plan.starts, spec.plan.window
                for j, (n, *ks) in enumerate(self._windows(boxes)):
                    dst = acc[(n - n_base, slice(None),
                               *[slice(starts[a][k] - o, starts[a][k] - o + win[a])
                                 for a, (k, o) in enumerate(zip(ks, org))])]
                    if w is None:
                        dst.add_(y[j])
                    else:
                        dst.addcmul_(y[j], w)
                continue
            for (n0, n1), lo, st in part[2]:  # one fused stitch per box
                add_overlap(acc[n0 - n_base : n1 - n_base], org, st, lo)

    def _fall_back(self, exc: BaseException, accs) -> bool:
        """Change the setting after an OOM; False when nothing is left to try."""
        if self.accumulate_device.type != "cpu":
            self.accumulate_device = torch.device("cpu")
        elif self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
        else:
            return False
        if self.device.type == "cuda":  # pragma: no cover - needs CUDA
            torch.cuda.empty_cache()
        self._remember()
        if self.oom_message is None:
            self.oom_message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return True

    def finish(self) -> None:
        """Warn once if an OOM changed the setting during this run (call at the end)."""
        if self.oom_message is not None:
            where = "the CPU" if self.accumulate_device.type == "cpu" else str(
                self.accumulate_device)
            warnings.warn(
                f"qlty_gpu.infer ran out of memory ({self.oom_message}); it continued with "
                f"batch_size={self.batch_size}, accumulating on {where}; this setting is "
                f"remembered for this model and geometry",
                RuntimeWarning,
                stacklevel=3,
            )
            self.oom_message = None
