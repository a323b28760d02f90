"""Planning stack conversions: every stack and its output fixed before anything is written.

:func:`prepare` finds the stacks (printing qlty's gap report), :func:`plan_stack` reads each
slice header once (shape, layout, dtype) and fixes the stored shape and dtype, and
:func:`plan_outputs` fixes every store path: two stacks mapped to one store, an output that
is or contains an input, or a foreign folder in the way raise here, before any write.

Example:
    >>> import numpy as np, tempfile, pathlib, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     tifffile.imwrite(d / f"s_{i}.tif", np.zeros((4, 6), np.uint16))
    >>> [(p.shape, p.dtype, path.name) for p, path, _ in prepare(d, ".tif", r"(.+)_(\\d+)")]
    [((3, 4, 6), dtype('uint16'), 's.zarr')]
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QltyError, QltyTypeError
from . import axes as ax
from .atomic import check_output
from .images import probe_image, read_image
from .stacks import (
    Gaps,
    Stack,
    StackGapWarning,
    compile_pattern,
    describe_no_match,
    find_stacks,
    normalize_extension,
)

__all__ = [
    "StackPlan",
    "prepare",
    "plan_stack",
    "plan_outputs",
    "same_dtype",
    "result",
    "writer_attrs",
    "check_chunks",
]


@dataclass
class StackPlan:
    """What a stack becomes: stored axis order, shape and dtype, and where each file goes."""

    stack: Stack
    layout: str
    C: int
    Y: int
    X: int
    has_channels: bool
    axis_order: str
    src_dtype: np.dtype
    dtype: np.dtype
    z_of_file: list[int]
    Z: int
    missing: Gaps
    mixed_dtypes: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Stored level-0 shape."""
        return self.shape_for(self.Z, self.Y, self.X)

    def shape_for(self, z: int, y: int, x: int) -> tuple[int, ...]:
        """Stored shape of a ``(z, y, x)``-sized level."""
        return ax.sizes(self.axis_order, Z=z, C=self.C, Y=y, X=x)

    def region(self, z0: int, z1: int) -> tuple:
        """Index of slices ``z0:z1`` in the stored order."""
        return ax.index(self.axis_order, Z=slice(z0, z1))

    def to_stored(self, batch: np.ndarray) -> np.ndarray:
        """A ``(B, C, Y, X)`` batch in the stored order."""
        return ax.transpose(batch, ax.CANONICAL, self.axis_order)

    def default_chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One z-slice per chunk (qlty's default for every order)."""
        return tuple(1 if a == "Z" else max(1, d) for a, d in zip(self.axis_order, shape))


def same_dtype(a: np.dtype, b: np.dtype) -> bool:
    """Same kind and size (byte order does not matter)."""
    return a.kind == b.kind and a.itemsize == b.itemsize


def plan_stack(
    stack: Stack, axis_order: str, dtype: Any, fill_gaps: bool, normalize: bool, libs=None
) -> StackPlan:
    """Probe every slice header and plan the stored array.

    Slices must agree in shape, layout and dtype; with ``dtype`` given, slices of different
    dtypes are each converted to it (rounded and clipped).

    Raises:
        QltyError: Naming the first slice that differs from the stack's first slice.
    """
    libs = libs or {}
    probes = [probe_image(f, **libs) for f in stack.files]
    first = probes[0]
    for p in probes[1:]:
        if p.raw_shape != first.raw_shape or p.layout != first.layout:
            raise QltyError(
                f"Image {p.path} has shape {p.raw_shape}, expected {first.raw_shape} "
                f"(the shape of {first.path}, the first slice of stack '{stack.basename}')"
            )
    src_dtype = first.dtype
    if src_dtype is None:
        src_dtype = read_image(first.path, **libs).dtype
    src_dtype = np.dtype(src_dtype)
    mixed = [p for p in probes[1:] if p.dtype is not None and not same_dtype(p.dtype, src_dtype)]
    if mixed and dtype is None:
        p = mixed[0]
        raise QltyError(
            f"Image {p.path} has dtype {p.dtype}, but {first.path} (the first slice of stack "
            f"'{stack.basename}') has dtype {src_dtype}; slices of one stack must share a "
            "dtype, or pass dtype=... to convert every slice to it (rounded and clipped)"
        )
    C, Y, X = first.cyx_shape
    order = ax.normalize_axis_order(axis_order, first.has_channels)
    if dtype is None:
        out_dtype = np.dtype(np.float32) if normalize else src_dtype
    else:
        try:
            out_dtype = np.dtype(dtype)
        except TypeError as exc:
            raise QltyTypeError(f"dtype must be a numpy dtype, got {dtype!r}") from exc
        if normalize and out_dtype.kind not in "fc":
            raise QltyError(
                f"normalize=True gives zero-mean, unit-std values that dtype={out_dtype} cannot "
                "hold; pass a float dtype (default float32) or normalize=False"
            )
    lo, _hi = stack.counter_range
    if fill_gaps:
        if stack.duplicates:
            raise QltyError(
                f"fill_gaps=True needs one file per counter, but stack '{stack.basename}' has "
                f"duplicate counters {stack.duplicates}"
            )
        z_of_file = [c - lo for c in stack.counters]
        Z = max(z_of_file) + 1
    else:
        z_of_file = list(range(len(stack.files)))
        Z = len(stack.files)
    return StackPlan(
        stack=stack,
        layout=first.layout,
        C=C,
        Y=Y,
        X=X,
        has_channels=first.has_channels,
        axis_order=order,
        src_dtype=src_dtype,
        dtype=out_dtype,
        z_of_file=z_of_file,
        Z=Z,
        missing=stack.missing,
        mixed_dtypes=dtype is not None,
    )


def plan_outputs(
    stacks: Sequence[Stack],
    directory: Path,
    output_dir: str | os.PathLike | None,
    output_naming: Callable[[str], str] | None,
    ome: bool,
    overwrite: bool,
) -> list[Path]:
    """Every stack's store path, checked before anything is written.

    Raises:
        QltyError: Two stacks map to one store; a store is, or contains, the input folder or
            an input file; a store path holds something that is not a qlty_gpu store and
            ``overwrite`` is false.
    """
    paths = []
    seen: dict[str, str] = {}
    every_file = {Path(os.path.abspath(f)) for st in stacks for f in st.files}
    folders = [directory, *{f.parent for f in every_file}]
    for st in stacks:
        if output_naming is not None:
            name = output_naming(st.basename)
            if not isinstance(name, str) or not name:
                raise QltyTypeError(
                    f"output_naming must return a non-empty file name, got {name!r} for "
                    f"'{st.basename}'"
                )
            if ome and not name.endswith(".ome.zarr"):
                name = name.replace(".zarr", ".ome.zarr")
                if not name.endswith(".ome.zarr"):
                    name = f"{name}.ome.zarr"
        else:
            name = f"{st.basename}.ome.zarr" if ome else f"{st.basename}.zarr"
        path = Path(output_dir) / name if output_dir is not None else directory / name
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            raise QltyError(
                f"stacks '{seen[key]}' and '{st.basename}' are both mapped to the output {path} "
                "(output_naming); give each stack its own name. Nothing was written."
            )
        seen[key] = st.basename
        check_output(path, files=every_file, folders=folders, overwrite=overwrite)
        paths.append(path)
    return paths



def prepare(
    directory: str | os.PathLike,
    extension: str,
    pattern: str | re.Pattern,
    *,
    sort_by_counter: bool = True,
    output_dir: str | os.PathLike | None = None,
    output_naming: Callable[[str], str] | None = None,
    ome: bool = False,
    overwrite: bool = False,
    axis_order: str = "ZCYX",
    dtype: Any = None,
    fill_gaps: bool = False,
    normalize: bool = False,
    libs: dict | None = None,
) -> list[tuple[StackPlan, Path, dict]]:
    """Find and plan every stack and its output: ``[(plan, store path, base attrs)]``.

    Gaps are reported as qlty did (a ``Warning: Stack ... has missing counters`` line on
    stdout, which qlty's tests read) and as a :class:`~qlty_gpu.io.stacks.StackGapWarning`.

    Raises:
        QltyError: Missing directory, no matching file, or any check of :func:`plan_stack`
            and :func:`plan_outputs`.
    """
    d = Path(directory)
    if not d.is_dir():
        raise QltyError(
            f"Directory does not exist: {d} (directory must be an existing folder of image files)"
        )
    ext, regex = normalize_extension(extension), compile_pattern(pattern)
    stacks = find_stacks(d, ext, regex, sort_by_counter)
    if not stacks:
        raise QltyError(describe_no_match(d, ext, regex))
    for st in stacks:
        gaps = st.missing
        if gaps:
            print(f"Warning: Stack '{st.basename}' has missing counters: {gaps!r}")
            warnings.warn(
                f"Stack '{st.basename}' has missing counters: {gaps!r} (slices are packed in "
                "counter order; pass fill_gaps=True to keep z = counter)",
                StackGapWarning,
                stacklevel=3,
            )
    plans = [plan_stack(st, axis_order, dtype, fill_gaps, normalize, libs) for st in stacks]
    paths = plan_outputs(stacks, d, output_dir, output_naming, ome, overwrite)
    attrs = [
        {
            "basename": p.stack.basename,
            "file_count": len(p.stack.files),
            "counter_range": list(p.stack.counter_range),
            "axis_order": p.axis_order,
            "files": [str(f) for f in p.stack.files],
            "pattern": regex.pattern,
            "extension": ext,
        }
        for p in plans
    ]
    return list(zip(plans, paths, attrs))


def result(plan: StackPlan, path: Path, **extra: Any) -> dict:
    """The per-stack result dict the converters return (qlty's keys plus ``extra``)."""
    st = plan.stack
    return {
        "zarr_path": str(path),
        "shape": plan.shape,
        "dtype": plan.dtype,
        "file_count": len(st.files),
        "files": [str(f) for f in st.files],
        "counter_range": st.counter_range,
        "axis_order": plan.axis_order,
        "missing_counters": plan.missing,
        **extra,
    }


def writer_attrs(plan: StackPlan, **extra: Any) -> dict:
    """The ``attributes["qlty_gpu"]`` block: complete mark, counters, gaps, z of each file."""
    out = {
        "complete": True,
        "counters": list(plan.stack.counters),
        "missing_ranges": [list(r) for r in plan.missing.ranges],
        "z_of_file": list(plan.z_of_file),
        **extra,
    }
    listed = plan.missing.to_json()
    if listed is not None:
        out["missing_counters"] = listed
    return out


def check_chunks(chunks: Any, shape: tuple[int, ...], order: str) -> tuple[int, ...]:
    """Validate user chunks for an array of ``shape`` and clip them to it."""
    try:
        ch = tuple(int(c) for c in chunks)
    except TypeError as exc:
        raise QltyTypeError(f"zarr_chunks must be a tuple of ints, got {chunks!r}") from exc
    if len(ch) != len(shape) or any(c < 1 for c in ch):
        raise QltyError(
            f"zarr_chunks must have {len(shape)} positive entries for axes {order} "
            f"(array shape {shape}), got {tuple(chunks)}"
        )
    return tuple(min(c, max(1, d)) for c, d in zip(ch, shape))
