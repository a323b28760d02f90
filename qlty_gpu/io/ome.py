"""OME-NGFF 0.5 metadata for Zarr v3 stores (atomic writing: :mod:`qlty_gpu.io.atomic`).

NGFF 0.5 puts its metadata in the Zarr v3 group attributes under ``"ome"``::

    {"ome": {"version": "0.5", "multiscales": [{"name": ..., "axes": [...],
             "datasets": [{"path": "0", "coordinateTransformations": [...]}, ...]}]}}

NGFF requires the space axes last and at most one channel axis before them, so of the
four-axis orders only ``C`` first (``CZYX``) is conformant; :func:`ngff_conformant` says so.

Example:
    >>> ms = multiscales_metadata("cells", "ZYX", [(1, 1, 1), (1, 2, 2)], [(3, 8, 8), (3, 4, 4)])
    >>> ms["datasets"][1]["coordinateTransformations"][0]
    {'type': 'scale', 'scale': [1.0, 2.0, 2.0]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import QltyError
from .atomic import atomic_store, partial_name

__all__ = [
    "NGFF_VERSION",
    "NGFF_UNITS",
    "axes_metadata",
    "multiscales_metadata",
    "ngff_conformant",
    "check_voxel_size",
    "atomic_store",
    "partial_name",
    "pyramid_writer",
]

NGFF_VERSION = "0.5"

#: Space units allowed by NGFF (UDUNITS-2 names).
NGFF_UNITS = frozenset(
    """angstrom attometer centimeter decimeter exameter femtometer foot gigameter hectometer
    inch kilometer megameter meter micrometer mile millimeter nanometer parsec petameter
    picometer terameter yard yoctometer yottameter zeptometer zettameter""".split()
)


def ngff_conformant(axis_order: str) -> bool:
    """Whether arrays in ``axis_order`` can carry valid NGFF multiscales metadata.

    NGFF requires all space axes (Z, Y, X) last, so a channel axis must come first.

    Example:
        >>> ngff_conformant("CZYX"), ngff_conformant("ZCYX"), ngff_conformant("ZYX")
        (True, False, True)
    """
    order = axis_order.upper()
    return "C" not in order or order.index("C") == 0


def check_voxel_size(
    voxel_size: Sequence[float] | None, nd: int | None = None
) -> list[float] | None:
    """Validate ``voxel_size``: finite positive numbers (``nd`` of them when given).

    Infinity or NaN would be written as ``Infinity``/``NaN``, which is not JSON.

    Example:
        >>> check_voxel_size((2, 0.5, 0.5))
        [2.0, 0.5, 0.5]
    """
    if voxel_size is None:
        return None
    try:
        voxel = [float(v) for v in voxel_size]
    except (TypeError, ValueError) as exc:
        raise QltyError(
            f"voxel_size must be a sequence of positive numbers, got {voxel_size!r}"
        ) from exc
    if any(not (math.isfinite(v) and v > 0) for v in voxel):
        raise QltyError(f"voxel_size must hold finite positive sizes, got {tuple(voxel_size)!r}")
    if nd is not None and len(voxel) != nd:
        raise QltyError(
            f"voxel_size must give {nd} sizes, one per stored axis, got {tuple(voxel_size)}"
        )
    return voxel


def axes_metadata(axis_order: str, unit: str | None = None) -> list[dict]:
    """NGFF ``axes`` entries for ``axis_order`` (types ``space``/``channel``, optional unit).

    Args:
        axis_order: e.g. ``"ZYX"`` or ``"CZYX"``.
        unit: Space unit (an NGFF/UDUNITS name such as ``"micrometer"``) or ``None``.

    Example:
        >>> axes_metadata("CZYX", "micrometer")[:2]
        [{'name': 'c', 'type': 'channel'}, {'name': 'z', 'type': 'space', 'unit': 'micrometer'}]
    """
    if unit is not None and unit not in NGFF_UNITS:
        raise QltyError(
            f"unit must be an NGFF space unit such as 'micrometer' or 'nanometer', got {unit!r}"
        )
    out = []
    for ax in axis_order.upper():
        if ax == "C":
            out.append({"name": "c", "type": "channel"})
        else:
            entry = {"name": ax.lower(), "type": "space"}
            if unit is not None:
                entry["unit"] = unit
            out.append(entry)
    return out


def multiscales_metadata(
    name: str,
    axis_order: str,
    cumulative_factors: Sequence[Sequence[int]],
    shapes: Sequence[Sequence[int]],
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    method: str = "block mean",
) -> dict:
    """One NGFF 0.5 ``multiscales`` entry for a block-averaged pyramid.

    Level ``l`` has path ``str(l)``, a ``scale`` of ``voxel_size * factor`` per axis and a
    ``translation`` of ``voxel_size * (factor - 1) / 2``: a block mean's pixel centre sits in
    the middle of the block it averages.

    Args:
        name: Multiscale name (the stack basename).
        axis_order: Axis order of every level.
        cumulative_factors: Per level, the downsampling factor of each axis relative to level 0
            (level 0 is all ones).
        shapes: Per level, the array shape (recorded in ``metadata``).
        voxel_size: Physical size of a level-0 voxel per axis in ``axis_order`` (channel
            entries are ignored); default 1.
        unit: Space unit for the axes.
        method: Description of the downsampling.

    Returns:
        A dict ready to go in ``attributes["ome"]["multiscales"]``.
    """
    order = axis_order.upper()
    nd = len(order)
    voxel = check_voxel_size(voxel_size, nd) or [1.0] * nd
    datasets = []
    for level, factors in enumerate(cumulative_factors):
        scale = [1.0 if ax == "C" else voxel[i] * float(factors[i]) for i, ax in enumerate(order)]
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        shift = [
            0.0 if ax == "C" else voxel[i] * (float(factors[i]) - 1.0) / 2.0
            for i, ax in enumerate(order)
        ]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {
        "name": name,
        "axes": axes_metadata(order, unit),
        "datasets": datasets,
        "type": "mean",
        "metadata": {
            "method": method,
            "description": (
                "each level is the mean of factor-sized blocks of the previous level; "
                "edge blocks average only the pixels that exist (no zero padding); "
                "integer data is rounded to nearest and clipped"
            ),
            "shapes": [list(map(int, s)) for s in shapes],
            "writer": "qlty_gpu",
        },
    }


def pyramid_writer(plan, shapes, chunks, zyx, method: str):
    """``(create, compute)`` for :func:`~qlty_gpu.io.pipeline.run_stack`: a multiscale group.

    Args:
        plan: The :class:`~qlty_gpu.io.pipeline.StackPlan`.
        shapes: Stored shape per level.
        chunks: Chunks per level.
        zyx: Cumulative (z, y, x) factor per level.
        method: ``"mean"`` or ``"scipy_zoom"`` (see :func:`~qlty_gpu.io.pyramid.resample`).
    """
    import zarr

    from .pipeline import array_kwargs
    from .pyramid import cast, compute_dtype, downsample_levels

    def create(store):
        root = zarr.open_group(store, mode="w", zarr_format=3)
        arrays = [
            root.create_array(str(lvl), shape=s, chunks=c, **array_kwargs(plan))
            for lvl, (s, c) in enumerate(zip(shapes, chunks))
        ]
        return root, arrays

    def compute(arrays, z0, z1, data):
        jobs = [(arrays[0], plan.region(z0, z1), plan.to_stored(data))]
        if len(arrays) > 1:
            t = torch.from_numpy(data).to(compute_dtype(plan.dtype))
            for lvl, level in enumerate(downsample_levels(t, zyx, method), 1):
                fz = zyx[lvl][0]
                region = plan.region(z0 // fz, math.ceil(z1 / fz))
                jobs.append((arrays[lvl], region, plan.to_stored(cast(level.numpy(), plan.dtype))))
        return jobs

    return create, compute
