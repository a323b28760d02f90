"""Image stacks (folders of TIFF/PNG slices) to Zarr, OME-Zarr and Laplacian pyramids.

Same functions, arguments and returned metadata as ``qlty.utils.stack_to_zarr`` (qlty 1.5.0),
with its bugs fixed. This module is the qlty-compatible face; the work is done by
:mod:`qlty_gpu.io` (``pipeline.run_stack`` streams every converter, ``pyramid`` computes
levels, ``laplacian`` holds the Laplacian store, ``atomic`` the all-or-nothing writes).

* **Streaming.** Slices are read (by ``num_workers`` threads, one batch ahead), converted,
  downsampled and written in bounded batches of whole z-chunks; peak memory depends on the
  slice size and batch size, not on the number of slices.
* **No state leaks between stacks**; normalisation is computed in floating point and stored
  as ``float32`` by default (qlty wrapped it into the integer source dtype).
* **Every axis order is right** (CZYX, ZYCX, ... store and downsample the right axes).
* **OME-NGFF 0.5 on Zarr v3** (``attributes["ome"]``, units, scale and translation per
  level); edge blocks average only existing pixels, integer levels are rounded.
* **Laplacian pyramids** store how to reconstruct them; reconstruction is exact for integer
  data and bit-exact for float16/float32 data.
* **Nothing is lost.** Every stack is planned before anything is written: two stacks
  mapped to one store, slices of different dtypes, an output that is or contains the input,
  or an existing folder that is not a qlty_gpu store (without ``overwrite=True``) raise
  :class:`~qlty_gpu.errors.QltyError`. Each store is written under ``<name>.partial-<pid>``
  and renamed into place when complete; after a failure (disk full included) the writes in
  flight are waited for and the partial store is removed; a later run removes partial
  stores of dead runs.
* Gaps in the counters are printed to stdout as qlty did ("missing counters", kept because
  qlty's tests read it; long gaps are summarised as ranges), emit a
  :class:`StackGapWarning`, and are recorded in the metadata; ``fill_gaps=True`` keeps each
  slice at ``z = counter - min`` with zeros in gaps.

Example:
    >>> import numpy as np, tempfile, pathlib, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(3):
    ...     tifffile.imwrite(d / f"cells_{i}.tif", np.full((16, 16), i, np.uint16))
    >>> info = stack_files_to_ome_zarr(d, ".tif", r"(.+)_(\\d+)\\.tif$", pyramid_levels=2,
    ...                                verbose=False)
    >>> info["cells"]["shape"], info["cells"]["pyramid_levels"]
    ((3, 16, 16), 2)
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import optional
from ..errors import QltyError
from ..io import laplacian as _lap
from ..io import ome as _ome
from ..io import pipeline as _pipe
from ..io import plan as _plan
from ..io import pyramid as _pyr
from ..io.images import AUTO, ImageReadError
from ..io.ome import NGFF_VERSION, check_voxel_size, multiscales_metadata, ngff_conformant
from ..io.stacks import Stack, StackGapWarning, find_stacks

__all__ = [
    "stack_files_to_zarr",
    "stack_files_to_ome_zarr",
    "stack_files_to_ome_zarr_laplacian",
    "reconstruct_from_laplacian_pyramid",
    "find_image_stacks",
    "StackGapWarning",
    "NGFFConformanceWarning",
    "ImageReadError",
]

_LAZY_GLOBALS = {"tifffile": "tifffile", "Image": "PIL.Image", "tqdm": "tqdm"}


class NGFFConformanceWarning(UserWarning):
    """The requested axis order cannot carry valid OME-NGFF metadata (channel not first)."""


def __getattr__(name: str) -> Any:
    # qlty-compatible module globals ``tifffile``, ``Image``, ``tqdm``: imported on first
    # access; assigning ``None`` (as qlty's tests do) disables that library.
    if name in _LAZY_GLOBALS:
        mod = optional(_LAZY_GLOBALS[name])
        value = getattr(mod, "tqdm", None) if name == "tqdm" and mod is not None else mod
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _libs() -> dict[str, Any]:
    g = globals()
    return {"tifffile": g.get("tifffile", AUTO), "pil_image": g.get("Image", AUTO)}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    bar = globals()["tqdm"] if "tqdm" in globals() else __getattr__("tqdm")
    if not enabled or bar is None:
        return None
    return bar(total=total, desc=desc, unit="slice")


def find_image_stacks(
    directory: str | os.PathLike,
    extension: str,
    pattern: str | re.Pattern,
    sort_by_counter: bool = True,
) -> list[Stack]:
    """The stacks a conversion would process (empty if nothing matches); see ``find_stacks``."""
    return find_stacks(directory, extension, pattern, sort_by_counter)


_PREPARE_KEYS = ("sort_by_counter", "output_dir", "output_naming", "overwrite", "axis_order",
                 "dtype", "fill_gaps", "normalize")


def _prepare(args: dict, ome: bool) -> list:
    """:func:`qlty_gpu.io.plan.prepare` with a converter's arguments (all stacks planned)."""
    kw = {k: args[k] for k in _PREPARE_KEYS}
    return _plan.prepare(args["directory"], args["extension"], args["pattern"], ome=ome,
                         libs=_libs(), **kw)


def _run(plan, path, create, compute, attrs, align, batch_size, num_workers, stats, verbose):
    _pipe.run_stack(
        plan,
        path,
        create=create,
        compute=compute,
        attrs=attrs,
        num_workers=num_workers,
        batch=_pipe.batch_size_for(plan, align, batch_size),
        stats=stats,
        libs=_libs(),
        progress=lambda total, desc: _progress(total, desc, verbose),
    )


def stack_files_to_zarr(
    directory: str | Path,
    extension: str,
    pattern: str | re.Pattern,
    output_dir: str | Path | None = None,
    zarr_chunks: tuple[int, ...] | None = None,
    dtype: np.dtype | None = None,
    axis_order: str = "ZCYX",
    output_naming: Callable[[str], str] | None = None,
    sort_by_counter: bool = True,
    dry_run: bool = False,
    num_workers: int | None = None,
    normalize: bool = False,
    normalize_mean: float | None = None,
    normalize_std: float | None = None,
    *,
    fill_gaps: bool = False,
    batch_size: int | None = None,
    verbose: bool = False,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Group image files into stacks and write each as one Zarr v3 array, streaming.

    Args:
        directory: Folder of images (top level only).
        extension: File extension (``".tif"``, ``"png"``, ``".ome.tif"``, any case).
        pattern: Regex matched at the start of the file name, groups ``(basename, counter)``.
        output_dir: Where stores go (default ``directory``).
        zarr_chunks: Chunk shape in the stored axis order (default one z-slice per chunk).
        dtype: Stored dtype (default: the images' dtype, or float32 with ``normalize``).
            Conversion to an integer dtype rounds and clips. Slices of one stack must share
            a dtype unless ``dtype`` is given (then each is converted to it).
        axis_order: Stored order for multi-channel stacks, any permutation of ``ZCYX``.
            Single-channel stacks are ``ZYX``.
        output_naming: ``basename -> store name`` (default ``f"{basename}.zarr"``); two
            stacks mapped to one name raise before anything is written.
        sort_by_counter: Order slices by counter (else by file name).
        dry_run: Only analyse (headers are read and outputs checked; nothing is written).
        num_workers: Reader threads (``None``: up to 8; ``0``/``1``: sequential).
        normalize: Store ``(x - mean) / std`` in float. Unset statistics are computed over
            the whole stack (pooled), in one extra streaming pass.
        normalize_mean: Mean to subtract.
        normalize_std: Std to divide by.
        fill_gaps: Place slices at ``z = counter - min`` and leave gaps as zeros (default:
            pack slices in order, as qlty did; gaps always raise a :class:`StackGapWarning`).
        batch_size: Slices per batch (default: about 16 MiB of slices).
        verbose: Show a progress bar (tqdm) on stderr.
        overwrite: Replace an existing output that is not a store written by qlty_gpu
            (default: raise; our own complete stores are always replaced).

    Returns:
        ``{basename: {"zarr_path", "shape", "dtype", "file_count", "files", "counter_range",
        "axis_order", "missing_counters", "chunks"}}``. ``missing_counters`` is a
        :class:`~qlty_gpu.io.stacks.Gaps` (a sequence of ints stored as ranges).

    Raises:
        QltyError: Missing directory, bad pattern, no matching file, unsupported or mismatched
            image shapes or dtypes, unreadable images (the file is named), bad chunks/axis
            order, an output that would replace an input or a foreign folder.

    Example:
        >>> import numpy as np, tempfile, pathlib, tifffile, zarr
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(4):
        ...     tifffile.imwrite(d / f"s_{i}.tif", np.full((8, 8), i, np.uint8))
        >>> out = stack_files_to_zarr(d, ".tif", r"(.+)_(\\d+)\\.tif$")
        >>> zarr.open_array(out["s"]["zarr_path"], mode="r")[:, 0, 0].tolist()
        [0, 1, 2, 3]
    """
    args = dict(locals())  # the arguments, for _prepare
    results: dict[str, dict] = {}
    jobs = []
    for plan, path, attrs in _prepare(args, ome=False):
        shape, order = plan.shape, plan.axis_order
        chunks = (
            plan.default_chunks(shape)
            if zarr_chunks is None
            else _plan.check_chunks(zarr_chunks, shape, order)
        )
        results[plan.stack.basename] = _plan.result(plan, path, chunks=chunks)
        jobs.append((plan, path, attrs, chunks))
    for plan, path, attrs, chunks in [] if dry_run else jobs:
        create, compute = _pipe.plain_writer(plan, chunks)
        stats = _pipe.normalization_stats(
            plan, normalize, normalize_mean, normalize_std, False, num_workers, _libs()
        )
        _run(
            plan,
            path,
            create,
            compute,
            {**attrs, "qlty_gpu": _plan.writer_attrs(plan)},
            chunks[plan.axis_order.index("Z")],
            batch_size,
            num_workers,
            stats,
            verbose,
        )
    return results


def _levels(plan, pyramid_levels, scale_factors, axes):
    levels = _pyr.num_levels(plan.Y, plan.X, pyramid_levels, scale_factors)
    cum = _pyr.cumulative_factors(plan.axis_order, levels, axes, scale_factors)
    zyx, zyx_shapes = _pyr.level_zyx(plan.axis_order, cum, plan.Z, plan.Y, plan.X)
    return cum, zyx, [plan.shape_for(*s) for s in zyx_shapes]


def stack_files_to_ome_zarr(
    directory: str | Path,
    extension: str,
    pattern: str | re.Pattern,
    output_dir: str | Path | None = None,
    zarr_chunks: tuple[int, ...] | None = None,
    dtype: np.dtype | None = None,
    axis_order: str = "ZCYX",
    output_naming: Callable[[str], str] | None = None,
    sort_by_counter: bool = True,
    dry_run: bool = False,
    num_workers: int | None = None,
    pyramid_levels: int | None = None,
    pyramid_scale_factors: list[tuple[int, ...]] | None = None,
    downsample_mode: str = "2d",
    downsample_axes: tuple[str, ...] | None = None,
    downsample_method: str = "dask_coarsen",
    normalize: bool = False,
    normalize_mean: float | None = None,
    normalize_std: float | None = None,
    verbose: bool = True,
    *,
    fill_gaps: bool = False,
    batch_size: int | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Group image files into stacks and write each as an OME-Zarr (NGFF 0.5) pyramid.

    Each store is a Zarr v3 group with arrays ``"0"`` (full resolution), ``"1"``, ... and
    ``attributes["ome"] = {"version": "0.5", "multiscales": [...]}``. Levels are computed
    from the previous level batch by batch while streaming the slices.

    NGFF requires the channel axis before the space axes, so multi-channel stacks are only
    NGFF-conformant with ``axis_order="CZYX"``. Other orders are written as asked, with the
    multiscales description under ``attributes["qlty_gpu"]["multiscales"]`` instead of
    ``"ome"`` (so NGFF readers do not choke on it), and a :class:`NGFFConformanceWarning`.

    Args:
        directory, extension, pattern, output_dir, output_naming, sort_by_counter, dry_run,
        num_workers, dtype, axis_order, normalize, normalize_mean, normalize_std, fill_gaps,
        batch_size, overwrite: As in :func:`stack_files_to_zarr`, except that with
            ``normalize`` and neither statistic given each image is normalised by its own
            mean/std (qlty).
        zarr_chunks: Chunks of level 0; coarser levels use the same chunks clipped to their
            shape (default one z-slice per chunk on every level).
        pyramid_levels: Number of levels (default: from ``min(Y, X)``: one more level per
            halving while above 256, at most 5).
        pyramid_scale_factors: Cumulative factor per level >= 1, one int per stored axis
            (e.g. ``[(1, 2, 2), (1, 4, 4)]`` for ZYX); each must be a multiple of the last.
        downsample_mode: ``"2d"`` (y, x) or ``"3d"`` (z, y, x).
        downsample_axes: Axes to downsample by 2 per level, overriding ``downsample_mode``.
        downsample_method: ``"dask_coarsen"``/``"mean"`` (block mean) or ``"scipy_zoom"``
            (antialiased bilinear in y/x).
        verbose: Show a progress bar.
        voxel_size: Physical size of a level-0 voxel per stored axis (channel ignored);
            finite and positive.
        unit: NGFF space unit, e.g. ``"micrometer"`` (default: none recorded).

    Returns:
        Per stack the keys of :func:`stack_files_to_zarr` plus ``"pyramid_levels"``,
        ``"level_shapes"``, ``"scale_factors"`` and ``"ngff_conformant"``.

    Example:
        >>> import numpy as np, tempfile, pathlib, tifffile, zarr
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     tifffile.imwrite(d / f"s_{i}.tif", np.ones((8, 8), np.uint16))
        >>> r = stack_files_to_ome_zarr(d, ".tif", r"(.+)_(\\d+)\\.tif$", pyramid_levels=3,
        ...                             verbose=False)
        >>> r["s"]["level_shapes"]
        [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
        >>> zarr.open_group(r["s"]["zarr_path"], mode="r").attrs["ome"]["version"]
        '0.5'
    """
    args = dict(locals())  # the arguments, for _prepare
    axes = _pyr.downsample_axes(downsample_mode, downsample_axes)
    method = _pyr.check_method(downsample_method)
    check_voxel_size(voxel_size)
    results: dict[str, dict] = {}
    jobs = []
    for plan, path, attrs in _prepare(args, ome=True):
        cum, zyx, shapes = _levels(plan, pyramid_levels, pyramid_scale_factors, axes)
        if zarr_chunks is None:
            chunks = [plan.default_chunks(s) for s in shapes]
        else:
            c0 = _plan.check_chunks(zarr_chunks, shapes[0], plan.axis_order)
            chunks = [tuple(min(c, d) for c, d in zip(c0, s)) for s in shapes]
        ms = multiscales_metadata(
            plan.stack.basename,
            plan.axis_order,
            cum,
            shapes,
            voxel_size=voxel_size,
            unit=unit,
            method="block mean" if method == "mean" else "antialiased bilinear (y, x)",
        )
        conformant = ngff_conformant(plan.axis_order)
        if conformant:
            attrs["ome"] = {"version": NGFF_VERSION, "multiscales": [ms]}
            extra = {"ngff_conformant": True}
        else:
            extra = {"ngff_conformant": False, "multiscales": [ms]}
        attrs["qlty_gpu"] = _plan.writer_attrs(plan, **extra)
        results[plan.stack.basename] = _plan.result(
            plan,
            path,
            pyramid_levels=len(cum),
            level_shapes=shapes,
            scale_factors=[list(f) for f in cum],
            ngff_conformant=conformant,
        )
        jobs.append((plan, path, attrs, shapes, chunks, zyx))
    for plan, path, attrs, shapes, chunks, zyx in [] if dry_run else jobs:
        if not ngff_conformant(plan.axis_order):
            warnings.warn(
                f"axis_order {plan.axis_order!r} puts the channel axis after a space axis, "
                "which OME-NGFF does not allow; the multiscales metadata is stored under "
                "attributes['qlty_gpu'] instead of 'ome'. Use axis_order='CZYX' for an "
                "NGFF-conformant store.",
                NGFFConformanceWarning,
                stacklevel=2,
            )
        create, compute = _ome.pyramid_writer(plan, shapes, chunks, zyx, method)
        stats = _pipe.normalization_stats(
            plan, normalize, normalize_mean, normalize_std, True, num_workers, _libs()
        )
        align = math.lcm(chunks[0][plan.axis_order.index("Z")], zyx[-1][0])
        _run(plan, path, create, compute, attrs, align, batch_size, num_workers, stats, verbose)
    return results


def stack_files_to_ome_zarr_laplacian(
    directory: str | Path,
    extension: str,
    pattern: str | re.Pattern,
    output_dir: str | Path | None = None,
    zarr_chunks: tuple[int, ...] | None = None,
    dtype: np.dtype | None = None,
    axis_order: str = "ZCYX",
    output_naming: Callable[[str], str] | None = None,
    sort_by_counter: bool = True,
    dry_run: bool = False,
    num_workers: int | None = None,
    pyramid_levels: int | None = None,
    pyramid_scale_factors: list[tuple[int, ...]] | None = None,
    downsample_mode: str = "2d",
    downsample_axes: tuple[str, ...] | None = None,
    interpolation_mode: str = "bilinear",
    store_base_level: bool = True,
    normalize: bool = False,
    normalize_mean: float | None = None,
    normalize_std: float | None = None,
    verbose: bool = True,
    *,
    fill_gaps: bool = False,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Group image files into stacks and write each as a Laplacian pyramid (Zarr v3 group).

    Per slice, a Gaussian-like pyramid ``G_0..G_{L-1}`` is built by block means in y/x. The
    coarsest level is stored (array ``str(L-1)``, in ``dtype``) and, for ``k = L-2 .. 0``,
    ``diff_k = G_k - up(r_{k+1})`` where ``r_{k+1}`` is the reconstruction of the next level
    *from stored data*, so decoding repeats the encoder's arithmetic exactly. The recipe is
    stored in ``attributes["laplacian_pyramid"]``; see
    :func:`reconstruct_from_laplacian_pyramid`. Differences are float32 for 8/16-bit integer
    data and float64 otherwise.

    Args:
        directory, extension, pattern, output_dir, zarr_chunks, dtype, axis_order,
        output_naming, sort_by_counter, dry_run, num_workers, pyramid_levels,
        pyramid_scale_factors, downsample_mode, downsample_axes, normalize, normalize_mean,
        normalize_std, verbose, fill_gaps, batch_size, overwrite: As in
            :func:`stack_files_to_ome_zarr`; only y and x can be downsampled (``z``
            raises). ``zarr_chunks`` applies to the stored base level.
        interpolation_mode: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``;
            validated up front (qlty silently wrote zeros for unsupported modes).
        store_base_level: Store the coarsest level. Without it the pyramid cannot be
            reconstructed (a warning says so).

    Returns:
        Per stack the keys of :func:`stack_files_to_ome_zarr` (without ``ngff_conformant``).

    Example:
        >>> import numpy as np, tempfile, pathlib, tifffile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     tifffile.imwrite(d / f"s_{i}.tif", np.arange(64, dtype=np.uint16).reshape(8, 8))
        >>> r = stack_files_to_ome_zarr_laplacian(d, ".tif", r"(.+)_(\\d+)\\.tif$",
        ...                                       pyramid_levels=2, verbose=False)
        >>> rec = reconstruct_from_laplacian_pyramid(r["s"]["zarr_path"])
        >>> bool((rec[1] == np.arange(64).reshape(8, 8)).all())
        True
    """
    args = dict(locals())  # the arguments, for _prepare
    axes = _pyr.downsample_axes(downsample_mode, downsample_axes)
    if "z" in axes:
        raise QltyError(
            f"the Laplacian pyramid downsamples y and x only; downsample_axes/mode asked for "
            f"{sorted(axes)}"
        )
    if interpolation_mode not in _pyr.INTERP_MODES:
        raise QltyError(
            f"interpolation_mode must be one of {_pyr.INTERP_MODES}, got {interpolation_mode!r}"
        )
    if not store_base_level:
        warnings.warn(
            "store_base_level=False: the coarsest level is not stored, so the pyramid cannot "
            "be reconstructed",
            UserWarning,
            stacklevel=2,
        )
    results: dict[str, dict] = {}
    jobs = []
    for plan, path, attrs in _prepare(args, ome=True):
        cum, zyx, shapes = _levels(plan, pyramid_levels, pyramid_scale_factors, axes)
        if any(f[0] != 1 for f in zyx):
            raise QltyError("the Laplacian pyramid cannot downsample z (pyramid_scale_factors)")
        base_chunks = (
            _lap.tile_chunks(plan.axis_order, shapes[-1])
            if zarr_chunks is None
            else _plan.check_chunks(zarr_chunks, shapes[-1], plan.axis_order)
        )
        cdt = _pyr.laplacian_compute_dtype(plan.dtype)
        attrs["laplacian_pyramid"] = _lap.laplacian_metadata(
            plan, shapes, cum, interpolation_mode, store_base_level, cdt
        )
        attrs["qlty_gpu"] = _plan.writer_attrs(plan, kind="laplacian")
        results[plan.stack.basename] = _plan.result(
            plan,
            path,
            pyramid_levels=len(cum),
            level_shapes=shapes,
            scale_factors=[list(f) for f in cum],
        )
        jobs.append((plan, path, attrs, shapes, base_chunks, zyx, cdt))
    for plan, path, attrs, shapes, base_chunks, zyx, cdt in [] if dry_run else jobs:
        create, compute = _lap.laplacian_writer(
            plan, shapes, base_chunks, zyx, interpolation_mode, store_base_level, cdt
        )
        stats = _pipe.normalization_stats(
            plan, normalize, normalize_mean, normalize_std, True, num_workers, _libs()
        )
        align = base_chunks[plan.axis_order.index("Z")]
        _run(plan, path, create, compute, attrs, align, batch_size, num_workers, stats, verbose)
    return results


def reconstruct_from_laplacian_pyramid(
    zarr_group_path: str | Path,
    z_idx: int | None = None,
    interpolation_mode: str | None = None,
    target_level: int | None = None,
    num_workers: int | None = None,
    output_zarr_path: str | Path | None = None,
    zarr_chunks: tuple[int, ...] | None = None,
    verbose: bool = False,
    *,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> np.ndarray | str:
    """Rebuild the image (or level ``target_level``) from a Laplacian pyramid.

    Reads the recipe stored by :func:`stack_files_to_ome_zarr_laplacian` (axis order,
    interpolation, precision); pyramids written by qlty 1.5.0 (no metadata) are decoded with
    qlty's conventions (float32, axis order guessed from the shape).

    Args:
        zarr_group_path: The pyramid group.
        z_idx: One slice to rebuild (returns the slice without its Z axis), or ``None`` for
            all.
        interpolation_mode: Must match the writer's (default: the stored one, ``bilinear`` for
            qlty pyramids); a different mode raises.
        target_level: Stop at this level (0 = full resolution, the default).
        num_workers: Unused (reconstruction streams batches in this process); kept for qlty
            compatibility.
        output_zarr_path: With ``z_idx=None``, write the result to this Zarr array
            (atomically, batch by batch) and return its path. It must lie outside the
            pyramid; an existing folder that is not a qlty_gpu store needs ``overwrite``.
        zarr_chunks: Chunks of that array (default one z-slice per chunk).
        verbose: Show a progress bar.
        batch_size: Slices per batch when streaming to ``output_zarr_path``.
        overwrite: Replace an ``output_zarr_path`` that is not a store written by qlty_gpu.

    Returns:
        The array in the stored axis order, or the output path as ``str``.

    Example:
        >>> import numpy as np, tempfile, pathlib, tifffile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     tifffile.imwrite(d / f"s_{i}.tif", np.full((8, 8), 7, np.uint8))
        >>> r = stack_files_to_ome_zarr_laplacian(d, ".tif", r"(.+)_(\\d+)\\.tif$",
        ...                                       pyramid_levels=2, verbose=False)
        >>> reconstruct_from_laplacian_pyramid(r["s"]["zarr_path"], z_idx=0).shape
        (8, 8)
    """
    return _lap.reconstruct(
        zarr_group_path,
        z_idx=z_idx,
        interpolation_mode=interpolation_mode,
        target_level=target_level,
        output_zarr_path=output_zarr_path,
        zarr_chunks=zarr_chunks,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=lambda total, desc: _progress(total, desc, verbose),
    )


# qlty-compatible private helpers (qlty's own tests import them from this module)
from ._qlty_compat import (  # noqa: E402, F401
    _apply_axis_order,
    _create_zarr_array,
    _downsample_with_torch,
    _load_and_process_image,
    _load_image,
    _normalize_axis_order,
    _upsample_with_torch,
)
