"""Inference inputs and outputs at paths: Zarr arrays and OME-Zarr (NGFF) groups.

An OME-Zarr input's level 0 is read lazily through :class:`AxesView`, which shows any
``[t][c](z)yx`` array as ``(N, C, *S)`` (``t`` -> N, ``c`` -> C, missing ones as size 1).
An OME-Zarr output keeps the input's axes (a channel axis is added when the model gives
several channels and the input had none) and its level-0 coordinate transformations, the
spatial scale divided by the model's spatial scale factor.

Example:
    >>> import numpy as np
    >>> v = AxesView(np.zeros((7, 5, 6)), (False, False, True, True, True))
    >>> v.shape, v[0:1, 0:1, 2:4, :, 1:2].shape
    ((1, 1, 7, 5, 6), (1, 1, 2, 5, 1))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from ..errors import QltyError, describe

__all__ = ["AxesView", "OmeInput", "open_input", "write_ome_group"]

_GROUP_KIND = "qlty_gpu.infer.ome"


class AxesView:
    """``(N, C, *S)`` view of an array that lacks some of the N / C axes.

    Args:
        array: the stored array (anything with shape, dtype and slicing).
        keep: per axis of ``(N, C, *S)``, whether the stored array has it.
    """

    def __init__(self, array: Any, keep: Sequence[bool]) -> None:
        self.array = array
        self.keep = tuple(bool(k) for k in keep)
        it = iter(array.shape)
        self.shape = tuple(int(next(it)) if k else 1 for k in self.keep)
        self.dtype = array.dtype

    def __getitem__(self, region):
        region = tuple(region) + (slice(None),) * (len(self.keep) - len(region))
        stored = tuple(r for r, k in zip(region, self.keep) if k)
        data = self.array[stored]
        shape = []
        it = iter(data.shape)
        for r, k in zip(region, self.keep):
            shape.append(next(it) if k else len(range(*r.indices(1))))
        return data.reshape(shape)


@dataclass(frozen=True)
class OmeInput:
    """NGFF metadata of an input image (level 0)."""

    axes: tuple  # axis dicts as stored
    transforms: tuple  # level-0 coordinateTransformations
    name: str
    keep: tuple[bool, ...]  # which of (N, C, *S) the input has

    def keep_axes(self, channels: int) -> tuple[bool, ...]:
        """Axes of the output: the input's, plus a channel axis for several channels."""
        return (self.keep[0], self.keep[1] or channels > 1, *self.keep[2:])


def _space_axes(axes) -> tuple[list[str], bool, bool]:
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    has_t = bool(names) and names[0] == "t"
    rest = names[1:] if has_t else names
    has_c = bool(rest) and rest[0] == "c"
    space = rest[1:] if has_c else rest
    if space not in (["y", "x"], ["z", "y", "x"]):
        raise QltyError(
            f"OME-Zarr input axes {names} are not [t][c](z)yx; infer needs the space axes "
            "last, an optional channel axis before them and an optional time axis first"
        )
    return space, has_t, has_c


def open_input(x: Any) -> tuple[Any, Optional[OmeInput]]:
    """Open ``x`` if it is a path or a Zarr group; return (array-like, OME info or None)."""
    import zarr

    group = None
    if isinstance(x, (str, os.PathLike)):
        if not os.path.exists(x):
            raise QltyError(f"input {os.fspath(x)!r} does not exist")
        try:
            node = zarr.open(os.fspath(x), mode="r")
        except Exception as exc:  # noqa: BLE001 - report as ours
            raise QltyError(f"cannot open {os.fspath(x)!r} as Zarr: {exc}") from exc
        if isinstance(node, zarr.Group):
            group = node
        else:
            return node, None
    elif isinstance(x, zarr.Group):
        group = x
    else:
        return x, None
    attrs = dict(group.attrs)
    meta = attrs.get("ome", attrs)
    ms = meta.get("multiscales") if isinstance(meta, dict) else None
    if not ms:
        raise QltyError(
            f"Zarr group {describe(group)} has no OME 'multiscales' metadata; pass an array"
        )
    ms0 = ms[0]
    ds0 = ms0["datasets"][0]
    arr = group[ds0["path"]]
    axes = ms0.get("axes") or [{"name": n} for n in "tczyx"[-len(arr.shape):]]
    space, has_t, has_c = _space_axes(axes)
    keep = (has_t, has_c, *[True] * len(space))
    view = AxesView(arr, keep)
    info = OmeInput(tuple(axes), tuple(ds0.get("coordinateTransformations", ())),
                    str(ms0.get("name", "")), keep)
    return view, info


def write_ome_group(
    out: Any, ome: OmeInput, keep: Sequence[bool], scale: Sequence[Fraction], channels: int
) -> None:
    """Write NGFF 0.5 group metadata at ``out`` for the array ``out/0``."""
    import zarr

    nd = len(scale)
    in_axes = list(ome.axes)
    names = [a["name"] if isinstance(a, dict) else str(a) for a in in_axes]
    space = in_axes[-nd:]
    axes = []
    if keep[0]:
        axes.append(in_axes[0])
    if keep[1]:
        axes.append(in_axes[names.index("c")] if "c" in names else {"name": "c", "type": "channel"})
    axes += space
    transforms = []
    for t in ome.transforms:
        t = dict(t)
        for key in ("scale", "translation"):
            if key in t:
                vals = list(t[key])
                lead = vals[: len(vals) - nd]
                sp = vals[len(vals) - nd :]
                if key == "scale":
                    sp = [float(v / float(f)) for v, f in zip(sp, scale)]
                lead_out = []
                if keep[0]:
                    lead_out.append(lead[0] if ome.keep[0] else 1.0)
                if keep[1]:
                    lead_out.append(1.0 if key == "scale" else 0.0)
                t[key] = lead_out + sp
        transforms.append(t)
    if not transforms:
        transforms = [{"type": "scale", "scale": [1.0] * len(axes)}]
    ms = {"version": "0.5", "multiscales": [{
        "name": ome.name, "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": transforms}],
    }]}
    g = zarr.open_group(os.fspath(out), mode="a")
    g.update_attributes({"ome": ms, "qlty_gpu": {"kind": _GROUP_KIND, "channels": channels}})
