"""Laplacian pyramid stores: what is written, and how it is read back.

A store is a Zarr v3 group with the coarsest level (array ``str(L-1)``, in the data dtype)
and ``diff_k`` for ``k = 0 .. L-2`` (finest first, float32 for 8/16-bit integer data,
float64 otherwise). ``attributes["laplacian_pyramid"]`` records the recipe; pyramids written
by qlty 1.5.0 (no recipe) are decoded with qlty's conventions.

Example:
    >>> import numpy as np, tempfile, pathlib, tifffile
    >>> from qlty_gpu.utils.stack_to_zarr import stack_files_to_ome_zarr_laplacian
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "s_0.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    >>> r = stack_files_to_ome_zarr_laplacian(d, ".tif", r"(.+)_(\\d+)\\.tif$",
    ...                                       pyramid_levels=2, verbose=False)
    >>> info = open_laplacian(r["s"]["zarr_path"])
    >>> reconstruct_block(info, 0, 1, "bilinear", 0).shape
    (1, 1, 8, 8)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QltyError
from . import axes as ax
from .atomic import atomic_zarr_store, check_output
from .pipeline import BATCH_BYTES, batch_bounds, compressors
from .plan import StackPlan, check_chunks
from .pyramid import INTERP_MODES, cast, laplacian_decode, laplacian_encode

__all__ = [
    "RECONSTRUCTION_TEXT",
    "laplacian_metadata",
    "tile_chunks",
    "laplacian_writer",
    "open_laplacian",
    "reconstruct_block",
    "reconstruct",
]

RECONSTRUCTION_TEXT = (
    "r = base (array str(levels-1)) as compute_dtype; for k = levels-2 down to 0: "
    "r = torch.nn.functional.interpolate(r, size=diff_k spatial (y, x) shape, "
    "mode=interpolation_mode, align_corners=False (None for 'nearest'), "
    "antialias=(mode == 'bicubic')) + diff_k; the level-0 image is r rounded to nearest and "
    "clipped to dtype for integer dtypes, or cast to dtype for floats. Exact for integer "
    "dtypes (|v| < 2**24 with float32, 2**52 with float64 differences) and bit-exact for "
    "float16/float32; float64 data round-trips to within a few ulp."
)


def laplacian_metadata(
    plan: StackPlan,
    shapes: Sequence[tuple[int, ...]],
    cum: Sequence[tuple[int, ...]],
    mode: str,
    store_base: bool,
    cdt: torch.dtype,
) -> dict:
    """The ``attributes["laplacian_pyramid"]`` recipe."""
    levels = len(shapes)
    return {
        "version": 1,
        "levels": levels,
        "axis_order": plan.axis_order,
        "dtype": str(plan.dtype),
        "compute_dtype": str(cdt).replace("torch.", ""),
        "interpolation_mode": mode,
        "base_level": str(levels - 1) if store_base else None,
        "diffs": [f"diff_{k}" for k in range(levels - 1)],
        "shapes": [list(s) for s in shapes],
        "scale_factors": [list(f) for f in cum],
        "downsample": "block mean over (y, x) blocks; edge blocks average existing pixels",
        "reconstruction": RECONSTRUCTION_TEXT,
    }


def tile_chunks(order: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Default chunks: one z-slice, all channels, 256 x 256 tiles."""
    return tuple(1 if a == "Z" else (d if a == "C" else min(d, 256)) for a, d in zip(order, shape))


def laplacian_writer(
    plan: StackPlan,
    shapes: Sequence[tuple[int, ...]],
    base_chunks: tuple[int, ...],
    zyx: Sequence[tuple[int, int, int]],
    mode: str,
    store_base: bool,
    cdt: torch.dtype,
):
    """``(create, compute)`` for :func:`~qlty_gpu.io.pipeline.run_stack`."""
    import zarr

    L = len(shapes)
    dims = list(plan.axis_order.lower())
    np_cdt = np.float64 if cdt == torch.float64 else np.float32

    def create(store):
        root = zarr.open_group(store, mode="w", zarr_format=3)
        base = None
        if store_base:
            base = root.create_array(
                str(L - 1),
                shape=shapes[-1],
                chunks=base_chunks,
                dtype=plan.dtype,
                fill_value=0,
                compressors=compressors(),
                dimension_names=dims,
            )
        diffs = [
            root.create_array(
                f"diff_{k}",
                shape=shapes[k],
                chunks=tile_chunks(plan.axis_order, shapes[k]),
                dtype=np_cdt,
                fill_value=0.0,
                compressors=compressors(),
                dimension_names=dims,
            )
            for k in range(L - 1)
        ]
        return root, [base, *diffs]

    def compute(arrays, z0, z1, data):
        region = plan.region(z0, z1)
        base, diffs = laplacian_encode(torch.from_numpy(data), zyx, mode, cdt, plan.dtype)
        jobs = [] if arrays[0] is None else [(arrays[0], region, plan.to_stored(base))]
        for k in range(L - 2, -1, -1):
            jobs.append((arrays[1 + k], region, plan.to_stored(diffs[k])))
        return jobs

    return create, compute


# --------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------


def open_laplacian(path: str | os.PathLike) -> dict:
    """Open a pyramid: ``{"base", "diffs", "order", "cdt", "legacy", "mode", "dtype"}``."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise QltyError(f"zarr_group_path does not exist: {p}")
    try:
        root = zarr.open_group(str(p), mode="r")
    except Exception as exc:
        raise QltyError(f"zarr_group_path {p} is not a readable Zarr group: {exc}") from exc
    keys = set(root.array_keys())
    diffs = sorted(
        (k for k in keys if k.startswith("diff_") and k[5:].isdigit()), key=lambda k: int(k[5:])
    )
    meta = dict(root.attrs.get("laplacian_pyramid") or {})
    if meta:
        if meta.get("base_level") is None:
            raise QltyError(
                f"Base level not found in Laplacian pyramid {p}: it was written with "
                "store_base_level=False, so it cannot be reconstructed"
            )
        base_key = meta["base_level"]
        order = meta["axis_order"]
        cdt = torch.float64 if meta.get("compute_dtype") == "float64" else torch.float32
        legacy = False
    else:  # a pyramid written by qlty 1.5.0 (no metadata): follow its conventions
        digits = [k for k in keys if k.isdigit()]
        if not digits:
            raise QltyError(f"Base level not found in Laplacian pyramid {p} (no all-digit array)")
        base_key = max(digits, key=int)
        nd = root[base_key].ndim
        if nd == 3:
            order = "ZYX"
        elif nd == 4:
            s = root[base_key].shape
            order = "ZCYX" if s[0] > s[1] else "CZYX"
        else:
            raise QltyError(f"base level of {p} has {nd} dimensions; expected 3 or 4")
        cdt = torch.float32
        legacy = True
        if not diffs:
            raise QltyError(f"No difference maps found in Laplacian pyramid {p}")
    base = root[base_key]
    return {
        "base": base,
        "diffs": [root[k] for k in diffs],
        "order": order,
        "cdt": cdt,
        "legacy": legacy,
        "mode": meta.get("interpolation_mode"),
        "dtype": np.dtype(base.dtype) if legacy else np.dtype(meta.get("dtype", base.dtype)),
    }


class _Slices(Sequence):
    """``diffs[k]`` read lazily as ``(B, C, y, x)`` slices ``z0:z1`` (one level in memory)."""

    def __init__(self, arrays: list, order: str, z0: int, z1: int):
        self.arrays, self.order, self.reg = arrays, order, ax.index(order, Z=slice(z0, z1))

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, k: Any) -> np.ndarray:
        a = np.asarray(self.arrays[k][self.reg])
        return ax.transpose(a, self.order, ax.CANONICAL)


def reconstruct_block(info: dict, z0: int, z1: int, mode: str, target: int) -> np.ndarray:
    """Reconstruct slices ``z0:z1`` at level ``target``; returns ``(B, C, Y, X)`` in dtype."""
    order = info["order"]
    base = _Slices([info["base"]], order, z0, z1)[0]
    r = laplacian_decode(base, _Slices(info["diffs"], order, z0, z1), mode, info["cdt"], target)
    out = r.numpy()
    if info["legacy"]:
        return out.astype(info["dtype"])
    return cast(out, info["dtype"])


def reconstruct(
    path: str | os.PathLike,
    *,
    z_idx: int | None = None,
    interpolation_mode: str | None = None,
    target_level: int | None = None,
    output_zarr_path: str | os.PathLike | None = None,
    zarr_chunks: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, str], Any] | None = None,
) -> np.ndarray | str:
    """Rebuild a pyramid (see ``reconstruct_from_laplacian_pyramid`` for the arguments)."""
    info = open_laplacian(path)
    stored_mode = info["mode"]
    mode = interpolation_mode or stored_mode or "bilinear"
    if mode not in INTERP_MODES:
        raise QltyError(f"interpolation_mode must be one of {INTERP_MODES}, got {mode!r}")
    if stored_mode is not None and mode != stored_mode:
        raise QltyError(
            f"interpolation_mode={mode!r} does not match the {stored_mode!r} the "
            f"pyramid {path} was written with"
        )
    n_diffs = len(info["diffs"])
    target = 0 if target_level is None else int(target_level)
    if not 0 <= target <= n_diffs:
        raise QltyError(f"target_level must be in [0, {n_diffs}], got {target_level!r}")
    order = info["order"]
    Z = info["base"].shape[order.index("Z")]

    def block(z0: int, z1: int) -> np.ndarray:
        return ax.transpose(reconstruct_block(info, z0, z1, mode, target), ax.CANONICAL, order)

    if z_idx is not None:
        z = int(z_idx) + (Z if int(z_idx) < 0 else 0)
        if not 0 <= z < Z:
            raise QltyError(f"z_idx must be in [-{Z}, {Z}), got {z_idx!r}")
        return block(z, z + 1)[ax.index(order, Z=0)]
    if output_zarr_path is not None:
        check_output(output_zarr_path, stores=[path], overwrite=overwrite, name="output_zarr_path")
    level = info["diffs"][target] if target < n_diffs else info["base"]
    per = int(np.prod(level.shape)) // max(Z, 1)
    bounds = batch_bounds(Z, batch_size or max(1, BATCH_BYTES // max(1, per * 8)))
    bar = progress(Z, "reconstruct") if progress is not None else None
    try:
        if output_zarr_path is None:
            parts = []
            for z0, z1 in bounds:
                parts.append(block(z0, z1))
                if bar is not None:
                    bar.update(z1 - z0)
            return np.concatenate(parts, axis=order.index("Z"))
        import zarr

        first = block(0, min(1, Z))
        shape = tuple(Z if a == "Z" else d for a, d in zip(order, first.shape))
        if zarr_chunks is None:
            chunks = tuple(1 if a == "Z" else d for a, d in zip(order, shape))
        else:
            chunks = check_chunks(zarr_chunks, shape, order)
        with atomic_zarr_store(output_zarr_path) as store:
            arr = zarr.create_array(
                store=store,
                shape=shape,
                chunks=chunks,
                dtype=first.dtype,
                fill_value=0,
                compressors=compressors(),
                dimension_names=list(order.lower()),
            )
            for z0, z1 in bounds:
                arr[ax.index(order, Z=slice(z0, z1))] = block(z0, z1)
                if bar is not None:
                    bar.update(z1 - z0)
            arr.attrs.update(
                {"source": str(path), "axis_order": order, "qlty_gpu": {"complete": True}}
            )
        return str(output_zarr_path)
    finally:
        if bar is not None:
            bar.close()
