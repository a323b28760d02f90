"""``NCZYX25DQuilt``: z-neighbourhoods of a ``(N, C, Z, Y, X)`` volume become channels.

qlty 1.5.0's class (spec §2.7) with its constructor, attributes, channel order
(operation -> input channel -> offset) and methods, rebuilt around one gather table:

* boundaries are resolved against the **volume** ``[0, Z)`` (qlty resolves them against the
  z-window it loaded, which is wrong for one-sided offsets); ``reflect`` is half-sample
  symmetric, as qlty pins, and never leaves the volume;
* ``skip`` drops out-of-volume members of MEAN/STD groups and never duplicates or drops a
  channel: an IDENTITY offset (or a whole group) outside the volume raises a clear error;
* :meth:`get_channel_metadata` lists channels in :meth:`convert`'s order;
  ``group_by_operation=True`` merges operations of the same type (IDENTITY, then MEAN, then
  STD), ``False`` keeps the spec's order (qlty's output);
* :meth:`convert` reads every needed z-slice once (qlty re-reads each ``2k+1`` times) and
  builds all channels of a slab with one fused op (:func:`qlty_gpu.ops.zagg.zagg`: Triton
  on CUDA, vectorised torch on CPU); sources larger than memory stream slab by slab into
  ``out=`` (a tensor or a Zarr array) or through :meth:`iter_convert`;
* integer sources give float32 when the spec has MEAN or STD (qlty crashes); identity-only
  specs keep the source dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional, Union

import numpy as np
import torch

from ..backends_2_5D import TensorLike3D
from ..errors import QltyError, QltyTypeError, describe
from ..ops.zagg import zagg, zagg_backend
from ._util import _contiguous, _empty, _progress, _runs, _runs_of_positions, _set_attr
from .plans import ExtractionPlan, PatchExtraction, StitchingPlan, grid_2d, safe_colour_mod
from .spec import (
    BOUNDARY_MODES,
    KIND_IDENTITY,
    PAD,
    ZERO,
    ChannelOperation,
    ZOperation,
    build_table,
    compute_channel_count,
    parse_channel_spec,
    resolve_z,
    slots,
)

__all__ = ["NCZYX25DQuilt", "DEFAULT_SLAB_BYTES"]

DEFAULT_SLAB_BYTES = 256 << 20


def _merge_by_type(ops: list[ChannelOperation]) -> list[ChannelOperation]:
    """Operations of one type merged into one, in ZOperation order (group_by_operation)."""
    merged = []
    for t in ZOperation:
        same = [o for o in ops if o.op_type == t]
        if same:
            offs = tuple(x for o in same for x in o.offsets)
            merged.append(ChannelOperation(t, offs, sum(o.output_channels for o in same),
                                           same[0].name))
    return merged


class NCZYX25DQuilt:
    """Turn a volume's z-neighbours into channels so 2-D networks see 3-D context.

    Args:
        data_source: ``(N, C, Z, Y, X)`` tensor or :class:`~qlty_gpu.backends_2_5D.TensorLike3D`.
        channel_spec: e.g. ``{"identity": [-1, 0, 1], "mean": [[-2, -1], [1, 2]],
            "std": [[-1, 0, 1]]}`` (string or :class:`ZOperation` keys).
        boundary_mode: ``"clamp"``, ``"zero"``, ``"reflect"`` or ``"skip"`` (see module doc).
        accumulation_mode: ``"2d"``: output ``(N * Zsel, C', Y, X)``; ``"3d"``:
            ``(N, C', Zsel, Y, X)``.
        z_slices: centre slices: None (all), a slice, or a list/tuple of indices.
        group_by_operation: merge operations of the same type (IDENTITY, MEAN, STD order).

    Example:
        >>> v = torch.arange(5.).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 2, 2)
        >>> q = NCZYX25DQuilt(v, {"identity": [3]})
        >>> q.convert()[:, 0, 0, 0].tolist()  # clamp against the volume: z0+3 -> min(z0+3, 4)
        [3.0, 4.0, 4.0, 4.0, 4.0]
    """

    def __init__(
        self,
        data_source: Union[torch.Tensor, TensorLike3D],
        channel_spec: dict,
        boundary_mode: str = "clamp",
        accumulation_mode: str = "2d",
        z_slices: Union[slice, list[int], tuple[int, ...], None] = None,
        group_by_operation: bool = False,
    ):
        if not isinstance(data_source, (torch.Tensor, TensorLike3D)):
            raise QltyTypeError(
                f"data_source must be torch.Tensor or TensorLike3D, got {type(data_source)} "
                f"({describe(data_source)}); wrap numpy arrays with torch.from_numpy"
            )
        shape = tuple(int(s) for s in data_source.shape)
        if len(shape) != 5:
            raise QltyError(f"data_source must be 5D (N, C, Z, Y, X), got shape {shape}")
        if accumulation_mode not in ("2d", "3d"):
            raise QltyError(f"accumulation_mode must be '2d' or '3d', got '{accumulation_mode}'")
        if boundary_mode not in BOUNDARY_MODES:
            raise QltyError(
                f"boundary_mode must be 'clamp', 'zero', 'reflect', or 'skip', got '{boundary_mode}'"
            )
        if data_source.dtype.is_complex:
            raise QltyTypeError(f"data_source dtype {data_source.dtype} is not supported (complex)")
        self.data_source = data_source
        self.boundary_mode = boundary_mode
        self.accumulation_mode = accumulation_mode
        self.group_by_operation = bool(group_by_operation)
        self.operations = parse_channel_spec(channel_spec)
        self.N, self.C, self.Z, self.Y, self.X = shape
        Z = self.Z
        if z_slices is None:
            z_indices = list(range(Z))
        elif isinstance(z_slices, slice):
            z_indices = list(range(Z)[z_slices])
        elif isinstance(z_slices, (list, tuple)):
            try:
                z_indices = [int(z) for z in z_slices]
            except (TypeError, ValueError) as exc:
                raise QltyError(f"z_slices must hold ints, got {describe(z_slices)}") from exc
            for z in z_indices:
                if z < 0 or z >= Z:
                    raise QltyError(f"z_slices contains invalid index {z} (Z={Z})")
        else:
            raise QltyError(
                f"z_slices must be slice, list, or None, got {type(z_slices)}"
            )
        if not z_indices:
            raise QltyError("z_slices results in empty list")
        self.z_indices = z_indices
        self._ops = _merge_by_type(self.operations) if self.group_by_operation else self.operations
        self._slots = slots(self._ops, self.C)
        self.output_channels = compute_channel_count(self.operations, self.C)
        J = len(z_indices)
        if accumulation_mode == "2d":
            self.output_shape = (self.N * J, self.output_channels, self.Y, self.X)
        else:
            self.output_shape = (self.N, self.output_channels, J, self.Y, self.X)

    # ------------------------------------------------------------------ basics
    @property
    def output_dtype(self) -> torch.dtype:
        """The source dtype when floating (or the spec is identity-only), else float32."""
        dt = self.data_source.dtype
        if dt.is_floating_point or all(s[0] == KIND_IDENTITY for s in self._slots):
            return dt
        return torch.float32

    def _resolved(self, z0: int) -> list[int]:
        """Sorted source slices the centre ``z0`` needs (volume-relative)."""
        need = {resolve_z(z0 + o, 0, self.Z, self.boundary_mode) for s in self._slots for o in s[1]}
        return sorted(z for z in need if z >= 0)

    def _table(self, centres: list[int]):
        return build_table(self._slots, centres, self.Z, self.boundary_mode)

    def _read(self, z: slice, n=None, y=None, x=None) -> torch.Tensor:
        """Read a 5-D block from the source (a view for tensors)."""
        src = self.data_source
        if isinstance(src, torch.Tensor):
            idx = tuple(slice(i, i + 1) if isinstance(i, int) else (i or slice(None))
                        for i in (n, None, z, y, x))
            return src[idx]
        return src.read_block(n=n, z=z, y=y, x=x)

    def _out_view(self, out: torch.Tensor) -> torch.Tensor:
        """Output tensor -> ``(N, Zsel, C', Y, X)`` view."""
        J = len(self.z_indices)
        if self.accumulation_mode == "2d":
            return out.view(self.N, J, self.output_channels, self.Y, self.X)
        return out.permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ convert
    def _batch_size(self, slab_bytes: int, out_item: int) -> int:
        """Centres per batch so that the slab ring (halo + new slices), the slices read in
        one batch and the output block (plus one copy for a sink) fit in ``slab_bytes``."""
        in_item = torch.empty(0, dtype=self.data_source.dtype).element_size()
        plane = self.N * self.Y * self.X
        offs = [o for s in self._slots for o in s[1]]
        halo = (max(offs) - min(offs) + 1) * plane * self.C * in_item
        per = plane * (self.output_channels * out_item * 2 + 2 * self.C * in_item)
        return max(1, int((slab_bytes - halo) // per))

    def _schedule(self, slab_bytes: Optional[int]):
        """(batches of output positions, their tables, needed slices, last batch using
        each slice, ring size)."""
        budget = DEFAULT_SLAB_BYTES if slab_bytes is None else int(slab_bytes)
        if budget <= 0:
            raise QltyError(f"slab_bytes must be a positive number of bytes, got {slab_bytes!r}")
        B = self._batch_size(budget, torch.empty(0, dtype=self.output_dtype).element_size())
        order = sorted(range(len(self.z_indices)), key=lambda j: self.z_indices[j])
        batches = [order[i:i + B] for i in range(0, len(order), B)]
        tables = [self._table([self.z_indices[j] for j in b]) for b in batches]  # errors first
        needs = [sorted({z for j in b for z in self._resolved(self.z_indices[j])})
                 for b in batches]
        last_use: dict[int, int] = {}
        for bi, need in enumerate(needs):
            for z in need:
                last_use[z] = bi
        live, ring = set(), 1
        for bi, need in enumerate(needs):  # slices held while batch bi runs
            live |= set(need)
            ring = max(ring, len(live))
            live = {z for z in live if last_use[z] > bi}
        return batches, tables, needs, last_use, ring

    def iter_convert(
        self,
        slab_bytes: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        backend: Optional[str] = None,
        progress: bool = False,
        reuse_block: bool = False,
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Stream the conversion: yields ``(positions, block)`` per batch of centre slices.

        ``block`` is ``(N, len(positions), C', Y, X)``; ``positions`` index
        ``z_indices``. Centres are visited in increasing z and source slices live in a ring
        buffer until their last use, so each z-slice is read from storage exactly once and
        memory stays within ``slab_bytes`` (default 256 MiB) whatever the volume's size
        (at least one centre slice of all N images is processed at a time).

        Args:
            slab_bytes: memory budget: slice ring, slices read per batch and output block.
            device: where to compute (default: the source's device).
            backend: zagg backend ('triton', 'numba', 'torch' or None for automatic).
            progress: show a tqdm progress bar.
            reuse_block: yield the same output buffer every time (its contents are only
                valid until the next iteration); saves an allocation per batch.
        """
        yield from self._stream(slab_bytes, device, backend, progress, reuse_block, None)

    def _stream(self, slab_bytes, device, backend, progress, reuse_block, target):
        """iter_convert's engine; with ``target`` (an ``(N, Zsel, C', Y, X)`` view) every
        batch is written straight into it and ``None`` is yielded for the block."""
        dev = torch.device(device) if device is not None else self.data_source.device
        dt = self.output_dtype
        batches, tables, needs, last_use, ring = self._schedule(slab_bytes)
        N, C, Y, X = self.N, self.C, self.Y, self.X
        slab = torch.zeros((N, C, ring, Y, X), dtype=self.data_source.dtype, device=dev)
        slot: dict[int, int] = {}
        free = list(range(ring - 1, -1, -1))
        lut = torch.full((self.Z + 2,), PAD, dtype=torch.int64)
        lut[ZERO] = ZERO  # ZERO (-1) stays ZERO, PAD (-2) stays PAD
        block = None
        bar = _progress(len(self.z_indices), progress)
        for bi, (b, table, need) in enumerate(zip(batches, tables, needs)):
            for lo, hi in _runs([z for z in need if z not in slot]):
                got = self._read(slice(lo, hi)).to(dev)  # only the missing slices
                for i, z in enumerate(range(lo, hi)):
                    slot[z] = free.pop()
                    slab[:, :, slot[z]] = got[:, :, i]
                del got
            if need:
                lut[torch.tensor(need)] = torch.tensor([slot[z] for z in need])
            idx = lut[table.idx]
            if target is not None:
                zagg(target, slab, idx, table.kind, table.chan_base, table.chan_cstride,
                     torch.tensor(b, dtype=torch.int64), backend=backend)
            else:
                if block is None or not reuse_block or block.shape[1] != len(b):
                    block = _empty((N, len(b), self.output_channels, Y, X), dt, dev)
                zagg(block, slab, idx, table.kind, table.chan_base, table.chan_cstride,
                     torch.arange(len(b)), backend=backend)
            for z in need:
                if last_use[z] == bi:
                    free.append(slot.pop(z))
            if bar is not None:
                bar.update(len(b))
            yield list(b), block
        if bar is not None:
            bar.close()

    def convert(
        self,
        out: Any = None,
        *,
        slab_bytes: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        backend: Optional[str] = None,
        progress: bool = False,
    ):
        """Convert the volume (all channels, every selected centre slice).

        Args:
            out: None (allocate), a tensor of ``output_shape``, or an array-like sink of
                ``output_shape`` with numpy slice assignment (e.g. a Zarr array opened for
                writing), filled batch by batch so memory stays bounded.
            slab_bytes: memory budget per batch when streaming (default 256 MiB).
            device: compute device (default: ``out``'s for a tensor, else the source's).
            backend: zagg backend ('triton', 'torch' or None for automatic).
            progress: show a tqdm progress bar.

        Returns:
            ``out`` (or the new tensor): ``(N * Zsel, C', Y, X)`` in "2d" mode,
            ``(N, C', Zsel, Y, X)`` in "3d" mode.
        """
        dt = self.output_dtype
        if out is None:
            dev = torch.device(device) if device is not None else self.data_source.device
            out = _empty(self.output_shape, dt, dev)
        if isinstance(out, torch.Tensor):
            if tuple(out.shape) != self.output_shape:
                raise QltyError(f"out must have shape {self.output_shape}, got {tuple(out.shape)}")
            if out.dtype.is_complex:
                raise QltyTypeError(f"out dtype {out.dtype} is not supported")
            dev = out.device if device is None else torch.device(device)
            src = self.data_source
            if isinstance(src, torch.Tensor) and src.device == dev:
                # in memory: the source is the slab and the output view is written directly;
                # batches of centres only bound the torch reference's temporaries
                view = self._out_view(out)
                batches, tables = self._schedule(slab_bytes)[:2]
                if zagg_backend(dev, backend, src, out) != "torch":
                    batches, tables = [list(range(len(self.z_indices)))], [None]
                bar = _progress(len(self.z_indices), progress)
                for b, t in zip(batches, tables):
                    t = t or self._table(self.z_indices)
                    zagg(view, src, t.idx, t.kind, t.chan_base, t.chan_cstride,
                         torch.tensor(b, dtype=torch.int64), backend=backend)
                    if bar is not None:
                        bar.update(len(b))
                if bar is not None:
                    bar.close()
                return out
            for _ in self._stream(slab_bytes, dev, backend, progress, True, self._out_view(out)):
                pass
            return out
        return self._convert_to_sink(out, slab_bytes, device, backend, progress)

    def _convert_to_sink(self, sink, slab_bytes, device, backend, progress):
        shape = tuple(getattr(sink, "shape", ()))
        if shape != self.output_shape or not hasattr(sink, "__setitem__"):
            raise QltyError(
                f"out must be None, a tensor or an array (e.g. zarr) of shape "
                f"{self.output_shape}, got {describe(sink)}"
            )
        if self.output_dtype == torch.bfloat16:
            raise QltyTypeError("bfloat16 output cannot be written to a numpy-style array sink")
        if getattr(sink, "read_only", False):
            raise QltyError("out is read-only: open the Zarr array with mode='w', 'a' or 'r+'")
        attrs = getattr(sink, "attrs", None)
        _set_attr(attrs, "qlty_gpu_complete", False)
        J, Cp = len(self.z_indices), self.output_channels
        # one channel chunk per write: a Zarr array encodes every chunk of a write at once,
        # so whole-block writes would hold several encoded copies of the block
        chunks = getattr(sink, "chunks", None)
        cstep = max(1, int(chunks[1])) if chunks is not None and len(chunks) > 1 else Cp
        for pos, block in self.iter_convert(slab_bytes, device, backend, progress, True):
            arr = block.cpu().numpy()
            for a, b in _runs_of_positions(pos):
                if _contiguous(pos):
                    part = arr[:, a - pos[0]: b - pos[0]]
                else:
                    part = arr[:, [pos.index(p) for p in range(a, b)]]
                for c0 in range(0, Cp, cstep):
                    c1 = min(Cp, c0 + cstep)
                    if self.accumulation_mode == "2d":
                        for n in range(self.N):
                            sink[n * J + a: n * J + b, c0:c1] = part[n, :, c0:c1]
                    else:
                        sink[:, c0:c1, a:b] = np.ascontiguousarray(
                            part[:, :, c0:c1].transpose(0, 2, 1, 3, 4))
        _set_attr(attrs, "qlty_gpu_complete", True)
        return sink

    # ------------------------------------------------------------------ metadata
    def get_channel_metadata(self) -> list[dict]:
        """One dict per output channel, in :meth:`convert`'s order.

        Keys: ``channel_index, input_channel, operation, operation_type, offsets, z0``
        (``z0`` is None: the same channels are built at every centre slice).
        """
        meta = []
        for op in self._ops:
            name = op.name or op.op_type.name.lower()
            for c in range(self.C):
                for g in op.groups():
                    meta.append({
                        "channel_index": len(meta), "input_channel": c, "operation": name,
                        "operation_type": op.op_type.name, "offsets": g, "z0": None,
                    })
        return meta

    def validate_spec(self) -> tuple[bool, list[str]]:
        """``(ok, messages)``: errors (conversion would fail) first, then warnings.

        Warns for offsets that never reach inside the volume (``|offset| >= Z``); errors
        when ``boundary_mode='skip'`` would leave a channel empty at some centre slice.
        """
        errors, warnings = [], []
        for op in self.operations:
            for g in op.groups():
                for o in g:
                    if abs(o) >= self.Z:
                        warnings.append(
                            f"{op.op_type.name} offset {o} is larger than Z dimension ({self.Z})"
                        )
        if self.boundary_mode == "skip":
            try:
                self._table(sorted(set(self.z_indices)))
            except QltyError as exc:
                errors.append(str(exc))
        return not errors, errors + warnings

    # ------------------------------------------------------------------ 2-D helpers
    def _need_2d(self, what: str) -> None:
        if self.accumulation_mode != "2d":
            raise QltyError(
                f"{what} requires accumulation_mode='2d'. Current mode: {self.accumulation_mode}"
            )

    def to_ncyx_quilt(self, **quilt_kwargs):
        """An :class:`~qlty_gpu.NCYXQuilt` of the converted images' size ``(Y, X)``.

        Unlike qlty, nothing is converted here (qlty runs and discards a full convert).
        """
        self._need_2d("to_ncyx_quilt")
        from ..quilt import NCYXQuilt

        return NCYXQuilt(Y=self.Y, X=self.X, **quilt_kwargs)

    def _patch_pairs(self):
        try:
            from .. import patch_pairs_2d
        except ImportError as exc:
            raise QltyError(
                "2.5D patch pairs need qlty_gpu.patch_pairs_2d, which this build lacks "
                f"({exc})"
            ) from exc
        return patch_pairs_2d

    def extract_patch_pairs(self, window, num_patches, delta_range, random_seed=None,
                            rotation_choices=None):
        """Convert, then :func:`qlty_gpu.patch_pairs_2d.extract_patch_pairs` on the
        ``(N * Zsel, C', Y, X)`` result (``num_patches`` per converted image)."""
        self._need_2d("extract_patch_pairs")
        pp = self._patch_pairs()
        return pp.extract_patch_pairs(self.convert(), window=window, num_patches=num_patches,
                                      delta_range=delta_range, random_seed=random_seed,
                                      rotation_choices=rotation_choices)

    def extract_overlapping_pixels(self, window, num_patches, delta_range, random_seed=None,
                                   rotation_choices=None):
        """:meth:`extract_patch_pairs`, then the overlapping pixels ``(K, C')`` of each pair."""
        self._need_2d("extract_overlapping_pixels")
        pp = self._patch_pairs()
        p1, p2, deltas, rots = self.extract_patch_pairs(window, num_patches, delta_range,
                                                        random_seed, rotation_choices)
        return pp.extract_overlapping_pixels(patches1=p1, patches2=p2, deltas=deltas,
                                             rotations=rots)

    # ------------------------------------------------------------------ plans
    def create_extraction_plan(self, color_y_mod=None, color_x_mod=None, window=None,
                               step=None) -> ExtractionPlan:
        """Every ``(n, z0[, y, x])`` patch with its colour and required source slices.

        With ``window`` the image is quilted on the :class:`~qlty_gpu.geometry.QuiltPlan`
        grid (``step`` defaults to ``window``; qlty ignores a window without a step). Colour
        moduli default to the smallest ones ``>= ceil(w/s)`` (capped by the patch count)
        whose groups hold no overlapping patches. ``required_z_indices`` are the
        volume-relative slices the patch reads; every ``(n, z0)`` gets its patches.
        """
        if window is None and step is not None:
            raise QltyError(f"step {step!r} was given without a window; pass window=(wy, wx)")
        if window is not None:
            if isinstance(window, int):
                window = (window, window)
            step = window if step is None else (step if not isinstance(step, int) else (step, step))
            grid = grid_2d(self.Y, self.X, window, step)
            ys, xs = grid.starts
            wy, wx = grid.window
            if color_y_mod is None:
                color_y_mod = min(safe_colour_mod(ys, wy, math.ceil(wy / grid.step[0])), len(ys))
            if color_x_mod is None:
                color_x_mod = min(safe_colour_mod(xs, wx, math.ceil(wx / grid.step[1])), len(xs))
            boxes = [(y, y + wy, x, x + wx) for y in ys for x in xs]
            cols = [(i % color_y_mod, k % color_x_mod) for i in range(len(ys)) for k in range(len(xs))]
        else:
            color_y_mod, color_x_mod = color_y_mod or 1, color_x_mod or 1
            boxes, cols = [(None, None, None, None)], [(0, 0)]
        for name, v in (("color_y_mod", color_y_mod), ("color_x_mod", color_x_mod)):
            if not isinstance(v, int) or v < 1:
                raise QltyError(f"{name} must be an int >= 1, got {v!r}")
        patches, groups = [], {}
        required = {z0: self._resolved(z0) for z0 in set(self.z_indices)}
        for n in range(self.N):
            for z0 in self.z_indices:
                for (y0, y1, x0, x1), col in zip(boxes, cols):
                    p = PatchExtraction(len(patches), n, z0, y0, y1, x0, x1, col[0], col[1],
                                        list(required[z0]))
                    groups.setdefault(col, []).append(p.patch_idx)
                    patches.append(p)
        return ExtractionPlan(patches=patches, color_groups=groups, total_patches=len(patches))

    def create_non_overlapping_colored_plan(self, window, step=None) -> ExtractionPlan:
        """Extraction plan whose colour groups hold no two overlapping patches (guaranteed,
        including the clamped last row/column; moduli are not capped by the patch count)."""
        if isinstance(window, int):
            window = (window, window)
        step = window if step is None else step
        grid = grid_2d(self.Y, self.X, window, step)
        (ys, xs), (wy, wx) = grid.starts, grid.window
        return self.create_extraction_plan(
            color_y_mod=safe_colour_mod(ys, wy, math.ceil(wy / grid.step[0])),
            color_x_mod=safe_colour_mod(xs, wx, math.ceil(wx / grid.step[1])),
            window=window, step=step,
        )

    def create_stitching_plan(self, extraction_plan=None, window=None, step=None) -> StitchingPlan:
        """Output location of every patch of ``extraction_plan`` (built if None)."""
        if extraction_plan is None:
            extraction_plan = self.create_extraction_plan(window=window, step=step)
        maps = {}
        for p in extraction_plan.patches:
            maps[p.patch_idx] = {
                "n": p.n, "y_start": p.y_start, "y_stop": p.y_stop, "x_start": p.x_start,
                "x_stop": p.x_stop,
                "z_idx": None if self.accumulation_mode == "2d" else self.z_indices.index(p.z0),
            }
        return StitchingPlan(output_shape=self.output_shape, patch_mappings=maps,
                             color_groups=extraction_plan.color_groups)

    def extract_patch_from_plan(self, patch: PatchExtraction) -> torch.Tensor:
        """Build one patch, reading only its slices and spatial box: ``(C', wy, wx)``, or
        ``(C', Y, X)`` for a whole-image patch."""
        if not isinstance(patch, PatchExtraction):
            raise QltyTypeError(f"patch must be a PatchExtraction, got {describe(patch)}")
        if not 0 <= patch.n < self.N or not 0 <= patch.z0 < self.Z:
            raise QltyError(f"patch n={patch.n}, z0={patch.z0} is outside the volume {self.data_source.shape}")
        if patch.y_start is not None:
            ys, xs = slice(patch.y_start, patch.y_stop), slice(patch.x_start, patch.x_stop)
        else:
            ys, xs = slice(0, self.Y), slice(0, self.X)
        h, w = len(range(self.Y)[ys]), len(range(self.X)[xs])
        table = self._table([patch.z0])
        need = self._resolved(patch.z0)
        if need:
            blocks = [self._read(slice(a, b), n=patch.n, y=ys, x=xs) for a, b in _runs(need)]
            slab = torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]
            lut = torch.full((self.Z + 2,), -2, dtype=torch.int64)
            lut[torch.tensor(need)] = torch.arange(len(need))
            lut[-1], lut[-2] = -1, -2
            idx = lut[table.idx]
        else:
            slab = torch.zeros((1, self.C, 1, h, w), dtype=self.data_source.dtype,
                               device=self.data_source.device)
            idx = table.idx
        out = torch.empty((1, 1, self.output_channels, h, w), dtype=self.output_dtype,
                          device=slab.device)
        zagg(out, slab, idx, table.kind, table.chan_base, table.chan_cstride, torch.zeros(1, dtype=torch.int64))
        return out[0, 0]
