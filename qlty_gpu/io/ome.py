"""OME-NGFF 0.5 metadata for Zarr v3 stores, and atomic (all-or-nothing) store writing.

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

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import QltyError

__all__ = [
    "NGFF_VERSION",
    "NGFF_UNITS",
    "axes_metadata",
    "multiscales_metadata",
    "ngff_conformant",
    "atomic_store",
    "partial_name",
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
    if voxel_size is None:
        voxel = [1.0] * nd
    else:
        voxel = [float(v) for v in voxel_size]
        if len(voxel) != nd or any(not v > 0 for v in voxel):
            raise QltyError(
                f"voxel_size must give {nd} positive sizes for axes {order}, got {tuple(voxel_size)}"
            )
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


def partial_name(path: str | os.PathLike) -> Path:
    """The temporary sibling a store is written under before it is renamed into place.

    Example:
        >>> partial_name("/data/a.ome.zarr").name.startswith("a.ome.zarr.partial-")
        True
    """
    path = Path(path)
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_store(path: str | os.PathLike) -> Iterator[Path]:
    """Write a store under a temporary sibling name and rename it to ``path`` on success.

    On any exception (including ``KeyboardInterrupt``) the partial store is removed and
    ``path`` is left as it was; a process killed outright leaves only a
    ``*.partial-<pid>`` folder, never something named like a finished store. An existing
    ``path`` is replaced only once the new store is complete.

    Args:
        path: Final location of the store.

    Yields:
        The temporary path to write to.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "s.zarr"
        >>> with atomic_store(target) as tmp:
        ...     _ = tmp.mkdir()
        >>> target.is_dir()
        True
    """
    path = Path(path)
    tmp = partial_name(path)
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)
