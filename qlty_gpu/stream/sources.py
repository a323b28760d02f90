"""Read a region of any array-like source into a torch tensor; only the region is read.

Accepted sources: ``torch.Tensor``, ``numpy.ndarray`` (``np.memmap`` included), a Zarr
array, an h5py dataset, qlty's ``TensorLike3D``, or any object with ``.shape``, ``.dtype``
and basic slicing (``obj[tuple_of_slices]`` returning something numpy or torch can hold).
A region is a tuple of slices and ints over the leading axes (missing trailing axes mean
"all"); steps other than 1 and out-of-range bounds are refused with a
:class:`~qlty_gpu.errors.QltyError` rather than silently clipped as Python slicing would.

Lazy sources (Zarr, HDF5, memmap) are indexed once with the region, so they fetch only the
chunks/pages that hold it. Tensors and arrays in memory are sliced as views and copied only
when a dtype or device change needs it.

Example:
    >>> import numpy as np
    >>> src = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)
    >>> read_region(src, (1, slice(None), slice(1, 3), slice(0, 4))).shape
    torch.Size([3, 2, 4])
    >>> s = as_source(src)
    >>> s.shape, s.ndim
    ((2, 3, 5, 7), 4)
    >>> read_region(src, (slice(0, 1),), dtype=torch.float64).dtype
    torch.float64
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from ..errors import QltyError, QltyTypeError, describe

__all__ = ["ArraySource", "as_source", "read_region", "normalize_region", "Region"]

Region = tuple[Union[slice, int], ...]

# numpy dtypes torch cannot hold as-is -> the smallest torch dtype that holds every value
_PROMOTE = {
    np.dtype("uint16"): np.dtype("int32"),
    np.dtype("uint32"): np.dtype("int64"),
    np.dtype(">f4"): np.dtype("float32"),
    np.dtype(">f8"): np.dtype("float64"),
}


def _kind(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return "torch"
    if isinstance(obj, np.memmap):
        return "memmap"
    if isinstance(obj, np.ndarray):
        return "numpy"
    mod = type(obj).__module__ or ""
    if mod.startswith("zarr"):
        return "zarr"
    if mod.startswith("h5py"):
        return "h5py"
    if type(obj).__name__ == "TensorLike3D":
        return "tensorlike3d"
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        return "array-like"
    return ""


def normalize_region(region: Sequence[slice | int] | None, shape: Sequence[int]) -> Region:
    """Check ``region`` against ``shape``; return it with every slice made explicit.

    Ints select one index (the axis is dropped, as in numpy); slices must have step 1 and
    lie inside the axis. Missing trailing axes are filled with full slices.

    Raises:
        QltyError: too many axes, a step other than 1, or bounds outside the source.
    """
    shape = tuple(int(d) for d in shape)
    if region is None:
        region = ()
    if isinstance(region, (slice, numbers.Integral)):
        region = (region,)
    if not isinstance(region, (tuple, list)):
        raise QltyTypeError(
            f"region must be a tuple of slices/ints over the source axes, got {describe(region)}"
        )
    if len(region) > len(shape):
        raise QltyError(
            f"region has {len(region)} entries but the source has {len(shape)} axes "
            f"(shape {shape}): {tuple(region)!r}"
        )
    out: list[slice | int] = []
    for ax, (r, d) in enumerate(zip(region, shape)):
        if isinstance(r, numbers.Integral) and not isinstance(r, bool):
            i = int(r)
            if not 0 <= i < d:
                raise QltyError(f"region[{ax}] = {i} is out of range for axis {ax} of size {d}")
            out.append(i)
        elif isinstance(r, slice):
            if r.step not in (None, 1):
                raise QltyError(f"region[{ax}] must have step 1, got {r!r}")
            lo = 0 if r.start is None else int(r.start)
            hi = d if r.stop is None else int(r.stop)
            if not 0 <= lo <= hi <= d:
                raise QltyError(
                    f"region[{ax}] = {r!r} is outside axis {ax} of size {d} "
                    f"(need 0 <= start <= stop <= {d})"
                )
            out.append(slice(lo, hi))
        else:
            raise QltyTypeError(f"region[{ax}] must be a slice or an int, got {describe(r)}")
    out.extend(slice(0, d) for d in shape[len(out):])
    return tuple(out)


def _to_torch(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    target = _PROMOTE.get(arr.dtype)
    if target is None and not arr.dtype.isnative:
        target = arr.dtype.newbyteorder("=")
    if target is not None:
        arr = arr.astype(target)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr, order="C")
    try:
        return torch.from_numpy(arr)
    except TypeError as exc:
        raise QltyTypeError(f"cannot hold data of dtype {arr.dtype} in a torch tensor ({exc})") from exc


class ArraySource:
    """A validated view of an array-like source (see the module docstring for the kinds).

    Attributes:
        obj: the wrapped object.
        kind: 'torch', 'numpy', 'memmap', 'zarr', 'h5py', 'tensorlike3d' or 'array-like'.
        shape: the source shape as a tuple of ints.
    """

    def __init__(self, obj: Any, name: str = "source") -> None:
        kind = _kind(obj)
        if not kind:
            raise QltyTypeError(
                f"{name} must be a torch tensor, numpy array/memmap, Zarr array, h5py dataset "
                f"or an object with .shape, .dtype and slicing; got {describe(obj)}"
            )
        self.obj = obj
        self.kind = kind
        self.name = name
        try:
            self.shape: tuple[int, ...] = tuple(int(d) for d in obj.shape)
        except Exception as exc:  # noqa: BLE001 - any odd .shape is a type problem
            raise QltyTypeError(f"{name}.shape must be a tuple of ints, got {obj.shape!r}") from exc

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    @property
    def dtype(self) -> Any:
        """The source's own dtype (numpy or torch)."""
        return self.obj.dtype

    def read(
        self,
        region: Sequence[slice | int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Read ``region`` (see :func:`normalize_region`) as a tensor on ``device``/``dtype``.

        A torch source keeps its device unless ``device`` is given; other sources land on
        the CPU (or ``device``: a CUDA device receives the region through a pinned buffer).
        """
        reg = normalize_region(region, self.shape)
        if self.kind == "torch":
            t = self.obj[reg]
        else:
            try:
                raw = self.obj[reg]
            except QltyError:
                raise
            except Exception as exc:  # noqa: BLE001 - report any reader failure as ours
                raise QltyError(
                    f"reading {reg!r} from {self.name} ({describe(self.obj)}) failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            t = _to_torch(raw)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None and t.device != torch.device(device):
            from .device_io import host_to_device

            t = host_to_device(t, device)
        return t


def as_source(obj: Any, name: str = "source") -> ArraySource:
    """Wrap ``obj`` as an :class:`ArraySource` (returned unchanged if it already is one)."""
    if isinstance(obj, ArraySource):
        return obj
    return ArraySource(obj, name)


def read_region(
    source: Any,
    region: Sequence[slice | int] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Read ``region`` of ``source`` into a torch tensor (see :class:`ArraySource.read`).

    Raises:
        QltyTypeError: an unsupported source type.
        QltyError: a region outside the source, or a reader failure.
    """
    return as_source(source).read(region, device=device, dtype=dtype)
