"""Reading 2-D image files (TIFF, PNG, ...) into numpy arrays.

TIFF files go through :mod:`tifffile`; everything else (and TIFF when tifffile is missing)
through Pillow. Both are optional (``pip install 'qlty_gpu[io]'``) and imported only when an
image is read. Every failure names the file.

Images are described in a canonical channel-first layout ``(C, Y, X)``: a 2-D image is
``(1, Y, X)`` with ``has_channels=False``. A 3-D array is read as ``(Y, X, C)`` when the file
says so (an RGB/RGBA Pillow mode, a TIFF series whose last axis is ``S`` samples) and
otherwise by qlty's rule: last axis of length <= 4 means ``(Y, X, C)``, else ``(C, Y, X)``.

Example:
    >>> import numpy as np, tempfile, os
    >>> from PIL import Image
    >>> path = os.path.join(tempfile.mkdtemp(), "a_0.png")
    >>> Image.fromarray(np.zeros((4, 6), np.uint8)).save(path)
    >>> probe_image(path).cyx_shape
    (1, 4, 6)
    >>> read_image_cyx(path).shape
    (1, 4, 6)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import optional
from ..errors import QltyDependencyError, QltyError

__all__ = [
    "ImageReadError",
    "MissingImageLibraryError",
    "ImageProbe",
    "AUTO",
    "read_image",
    "read_image_cyx",
    "probe_image",
    "to_cyx",
    "TIFF_SUFFIXES",
]

TIFF_SUFFIXES = (".tif", ".tiff")


class _Auto:
    """Sentinel: import the library lazily (distinct from ``None`` = "not available")."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "AUTO"


AUTO: Any = _Auto()


class ImageReadError(QltyError, RuntimeError):
    """An image file could not be read (missing library, corrupt or truncated file).

    Derives from ``RuntimeError`` too, because qlty raised ``RuntimeError`` for a missing
    image library and its tests catch that type.
    """


class MissingImageLibraryError(ImageReadError, QltyDependencyError):
    """Neither tifffile nor Pillow can read the file (``pip install 'qlty_gpu[io]'``).

    A :class:`~qlty_gpu.errors.QltyDependencyError` (``ImportError``) and, for qlty
    compatibility, a ``RuntimeError``.
    """


def _resolve(tifffile: Any, pil_image: Any) -> tuple[Any, Any]:
    if tifffile is AUTO:
        tifffile = optional("tifffile")
    if pil_image is AUTO:
        pil_image = optional("PIL.Image")
    return tifffile, pil_image


def _corrupt(path, exc: BaseException) -> ImageReadError:
    """The error for a file a reader library failed on, naming the file and the cause."""
    return ImageReadError(
        f"Cannot load image {path}: the file is unreadable or corrupt ({type(exc).__name__}: {exc})"
    )


def _no_library(path: Path) -> ImageReadError:
    err = MissingImageLibraryError(
        f"Cannot load image {path}: No suitable library available. "
        "Install tifffile or Pillow: pip install 'qlty_gpu[io]'"
    )
    return err


def read_image(
    path: str | os.PathLike, *, tifffile: Any = AUTO, pil_image: Any = AUTO
) -> np.ndarray:
    """Read an image file as it is stored (``(Y, X)``, ``(Y, X, C)`` or ``(C, Y, X)``).

    Args:
        path: Image file. ``.tif``/``.tiff`` are read with tifffile when available,
            anything else with Pillow.
        tifffile: The tifffile module to use, ``None`` to disable it, or ``AUTO`` (import it).
        pil_image: The ``PIL.Image`` module, ``None`` to disable it, or ``AUTO``.

    Returns:
        The pixel array.

    Raises:
        ImageReadError: No library can read the file, or the file is corrupt/truncated. The
            message names the file.

    Example:
        >>> import numpy as np, tempfile, os, tifffile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.tif")
        >>> tifffile.imwrite(p, np.ones((3, 5), np.uint16))
        >>> read_image(p).dtype
        dtype('uint16')
    """
    path = Path(path)
    tif, pil = _resolve(tifffile, pil_image)
    suffix = path.suffix.lower()
    try:
        if tif is not None and suffix in TIFF_SUFFIXES:
            return np.asarray(tif.imread(str(path)))
        if pil is not None:
            with pil.open(path) as img:
                return np.array(img)
    except ImageReadError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    raise _no_library(path)


@dataclass(frozen=True)
class ImageProbe:
    """What an image header says, without decoding the pixels.

    Attributes:
        path: The file.
        raw_shape: The array shape as :func:`read_image` returns it.
        layout: ``"YX"``, ``"YXC"`` or ``"CYX"``.
        dtype: The pixel dtype when the header tells it, else ``None``.
    """

    path: Path
    raw_shape: tuple[int, ...]
    layout: str
    dtype: np.dtype | None

    @property
    def has_channels(self) -> bool:
        """Whether the image is multi-channel (3-D)."""
        return self.layout != "YX"

    @property
    def cyx_shape(self) -> tuple[int, int, int]:
        """The shape in canonical ``(C, Y, X)`` layout (``C == 1`` for 2-D images)."""
        s = self.raw_shape
        if self.layout == "YX":
            return (1, s[0], s[1])
        if self.layout == "YXC":
            return (s[2], s[0], s[1])
        return (s[0], s[1], s[2])


def _layout_for(shape: tuple[int, ...], hint: str | None, path: Path) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if hint == "YXC":
            return "YXC"
        if hint == "CYX":
            return "CYX"
        return "YXC" if shape[2] <= 4 else "CYX"
    raise QltyError(
        f"Unsupported image dimensions: {len(shape)}D in {path} (shape {tuple(shape)}). "
        "Expected 2D (Y, X) or 3D (C, Y, X) or (Y, X, C)."
    )


_PIL_DTYPES = {
    "1": np.bool_,
    "L": np.uint8,
    "P": np.uint8,
    "RGB": np.uint8,
    "RGBA": np.uint8,
    "LA": np.uint8,
    "CMYK": np.uint8,
    "YCbCr": np.uint8,
    "I": np.int32,
    "F": np.float32,
    "I;16": np.uint16,
    "I;16L": np.uint16,
    "I;16B": np.uint16,
    "I;16N": np.uint16,
}


def probe_image(
    path: str | os.PathLike, *, tifffile: Any = AUTO, pil_image: Any = AUTO
) -> ImageProbe:
    """Read only the header of an image: its shape, channel layout and dtype.

    Args:
        path: Image file.
        tifffile: As in :func:`read_image`.
        pil_image: As in :func:`read_image`.

    Returns:
        An :class:`ImageProbe`.

    Raises:
        ImageReadError: The header cannot be read (corrupt file, no library).
        QltyError: The image is neither 2-D nor 3-D (``Unsupported image dimensions``).

    Example:
        >>> import numpy as np, tempfile, os, tifffile
        >>> p = os.path.join(tempfile.mkdtemp(), "rgb.tif")
        >>> tifffile.imwrite(p, np.zeros((8, 9, 3), np.uint8), photometric="rgb")
        >>> probe_image(p).cyx_shape
        (3, 8, 9)
    """
    path = Path(path)
    tif, pil = _resolve(tifffile, pil_image)
    suffix = path.suffix.lower()
    try:
        if tif is not None and suffix in TIFF_SUFFIXES:
            with tif.TiffFile(str(path)) as tf:
                series = tf.series[0]
                shape = tuple(int(d) for d in series.shape)
                axes = str(getattr(series, "axes", ""))
                dtype = np.dtype(series.dtype)
            hint = None
            if len(shape) == 3 and len(axes) == 3:
                hint = "YXC" if axes.endswith("S") else ("CYX" if axes[0] not in "YS" else None)
            return ImageProbe(path, shape, _layout_for(shape, hint, path), dtype)
        if pil is not None:
            with pil.open(path) as img:
                width, height = img.size
                mode = img.mode
                bands = len(img.getbands())
            shape = (height, width) if bands == 1 else (height, width, bands)
            dt = _PIL_DTYPES.get(mode)
            hint = "YXC" if bands > 1 else None
            return ImageProbe(
                path, shape, _layout_for(shape, hint, path), None if dt is None else np.dtype(dt)
            )
    except (ImageReadError, QltyError):
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    raise _no_library(path)


def to_cyx(img: np.ndarray, layout: str) -> np.ndarray:
    """Return ``img`` as a ``(C, Y, X)`` view given its layout (``YX``, ``YXC``, ``CYX``).

    Example:
        >>> to_cyx(np.zeros((4, 5, 3)), "YXC").shape
        (3, 4, 5)
    """
    if layout == "YX":
        return img[np.newaxis]
    if layout == "YXC":
        return np.moveaxis(img, -1, 0)
    return img


def read_image_cyx(
    path: str | os.PathLike,
    layout: str | None = None,
    *,
    tifffile: Any = AUTO,
    pil_image: Any = AUTO,
) -> np.ndarray:
    """Read an image and return it as ``(C, Y, X)``.

    Args:
        path: Image file.
        layout: The stored layout (from :func:`probe_image`); ``None`` applies qlty's rule.
        tifffile: As in :func:`read_image`.
        pil_image: As in :func:`read_image`.

    Returns:
        ``(C, Y, X)`` array (``C == 1`` for a 2-D image).

    Example:
        >>> import numpy as np, tempfile, os, tifffile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.tif")
        >>> tifffile.imwrite(p, np.ones((3, 5), np.uint16))
        >>> read_image_cyx(p).shape
        (1, 3, 5)
    """
    img = read_image(path, tifffile=tifffile, pil_image=pil_image)
    if layout is None:
        layout = _layout_for(img.shape, None, Path(path))
    elif img.ndim != len(layout):
        raise ImageReadError(
            f"Cannot load image {path}: decoded array has shape {img.shape}, "
            f"but its header announced layout {layout}"
        )
    return to_cyx(img, layout)
